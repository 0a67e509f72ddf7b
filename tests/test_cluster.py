"""docs/cluster.md, run as written: a Ray head and a second Ray node on loopback, and `fedlora run
--ray-address` on them; plus the per-node check and the choice of Ray on their own.

The doc's ```bash blocks carry `<!-- test: NAME -->` markers and run by name with `bash -euo
pipefail`, the doc's variables set to loopback values (a free port, 1 CPU per node, a temporary
`$SHARED`). Changes the test makes: the run block gets an extra `-c` with the tiny model, a
synthetic CSV large enough for 100 clients and 2 rounds. Ray's files go to a temporary
`RAY_TMPDIR`, so the cluster is invisible to other Ray users of the machine. The nodes are stopped
by PID (their process groups and every descendant seen), never with `ray stop`, which would stop
every Ray on the machine.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from conftest import REPO
from fedlora.core.config import ConfigError, RunConfig
from fedlora.core.version import VERSION
from fedlora.simulations import cluster
from fedlora.simulations.runner import _children, _free_port
from docblocks import doc_blocks
from processes import Tracker, cmdline
from synthetic import write_csv

DOC = REPO / "docs" / "cluster.md"
BIN = Path(sys.executable).parent


def test_the_ray_a_run_uses_is_the_flag_then_the_environment_then_a_private_one(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert cluster.ray_address(None) == "local"  # never a cluster found by chance in /tmp/ray
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    assert cluster.ray_address(None) == "10.0.0.1:6379"
    assert cluster.ray_address("10.0.0.2:6380") == "10.0.0.2:6380" and cluster.ray_address("auto") == "auto"
    with pytest.raises(ConfigError, match="not HOST:PORT"):
        cluster.ray_address("10.0.0.2")


def test_a_node_names_each_path_it_cannot_use(tmp_path, tiny_model_dir, tiny_csv):
    out = tmp_path / "out"
    (out / "logs").mkdir(parents=True)
    cfg = RunConfig(model=str(tiny_model_dir), dataset=str(tiny_csv), output_dir=str(out))
    marker = out / "logs" / "cluster-check-x"
    marker.write_text("")
    assert cluster.check_node(cfg, str(marker), VERSION).problems == ()
    elsewhere = RunConfig(model=str(tmp_path / "no-model"), dataset=str(tmp_path / "no.csv"), output_dir=str(out))
    problems = cluster.check_node(elsewhere, str(tmp_path / "absent" / "cluster-check-y"), "0.0.0").problems
    assert len(problems) == 4, problems
    assert "fedlora 0.1.0 is installed, the run's is 0.0.0" in problems[0].replace(VERSION, "0.1.0")
    assert "no-model" in problems[1] and "no.csv" in problems[2]
    assert "is not the head's folder here" in problems[3] and "mount it at the same path" in problems[3]


@pytest.mark.slow
def test_the_docs_cluster_runs_a_job_with_clients_on_both_nodes(tmp_path, tiny_model_dir):
    blocks = doc_blocks(DOC)
    assert set(blocks) == {"head", "node", "run"}
    ray_tmp = Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))  # Ray's socket paths must stay short
    port = _free_port()
    env = {**os.environ, "HEAD_IP": "127.0.0.1", "NODE_IP": "127.0.0.1", "RAY_PORT": str(port),
           "CPUS": "1", "SHARED": str(tmp_path / "shared"), "RAY_TMPDIR": str(ray_tmp), "HF_HUB_OFFLINE": "1",
           "RAY_USAGE_STATS_ENABLED": "0", "PATH": f"{BIN}:{os.environ['PATH']}"}
    env.pop("RAY_ADDRESS", None)
    (tmp_path / "shared").mkdir()
    csv = write_csv(tmp_path / "shared" / "data.csv", 3000)
    (tmp_path / "logs").mkdir()
    tracker = Tracker(tmp_path / "logs")

    def bash(name: str, code: str) -> subprocess.Popen:
        return tracker.start(name, ["bash", "-euo", "pipefail", "-c", code], env, REPO)

    try:
        head = bash("head", blocks["head"])
        _wait_for(tracker, head, "block forever")
        node = bash("node", blocks["node"])
        _wait_for(tracker, node, "block forever")
        _wait_nodes(env, f"127.0.0.1:{port}", 2)
        tiny = (f" -c \"model='{tiny_model_dir}' dataset='{csv}' test-size=200 clients-per-round=4 "
                "num-server-rounds=2 local-steps=3 batch-size=8 partitioner='iid' max-length=16 dp=false\"")
        run = bash("run", blocks["run"] + tiny)
        actors: dict[str, set[int]] = {"head": set(), "node": set()}
        deadline = time.monotonic() + 900
        while run.poll() is None:
            assert time.monotonic() < deadline, tracker.output(run)[-4000:]
            for name, proc in (("head", head), ("node", node)):
                actors[name] |= {pid for pid in _tree(proc.pid) if "ClientAppActor" in cmdline(pid)}
            time.sleep(0.5)
        rc, out = tracker.wait(run, 60)
        assert rc == 0, out[-4000:]
        assert f"Ray cluster at 127.0.0.1:{port}: 2 nodes see the model, the data and output-dir" in out
        assert "fedlora: completed after round 2" in out
        assert actors["head"] and actors["node"], f"clients ran on {actors}: both nodes should have had one"
        rows = [json.loads(line) for line in (tmp_path / "shared" / "runs" / "study-1" / "metrics.jsonl").open()]
        assert [r["round"] for r in rows] == [0, 1, 2] and rows[-1]["num_clients"] == 4
    finally:
        left = tracker.close()
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert not left, f"processes left running: {left}"


def _tree(pid: int) -> set[int]:
    kids, todo, seen = _children(), [pid], set()
    while todo:
        p = todo.pop()
        seen.add(p)
        todo.extend(kids.get(p, []))
    return seen


def _wait_for(tracker: Tracker, proc: subprocess.Popen, text: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while text not in tracker.output(proc):
        assert proc.poll() is None and time.monotonic() < deadline, tracker.output(proc)[-3000:]
        time.sleep(0.5)


def _wait_nodes(env: dict[str, str], address: str, count: int, timeout: float = 120.0) -> None:
    """Until `count` nodes of the cluster are alive (a node's log line comes before it registers)."""
    code = ("import ray; ray.init(address=%r, logging_level='ERROR', log_to_driver=False); "
            "print(sum(n['Alive'] for n in ray.nodes()))" % address)
    deadline = time.monotonic() + timeout
    while True:
        res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
        if res.returncode == 0 and int(res.stdout.split()[-1]) >= count:
            return
        assert time.monotonic() < deadline, res.stdout + res.stderr
        time.sleep(1)
