"""The whole path through `fedlora run`: a private SuperLink, the simulation engine, the ServerApp
and ClientApp, and the outputs a user reads. Tiny random BERT, 3 clients, 2 rounds.

These tests start real Flower processes, so they run serially and check that none is left behind.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import TEST_TAG, fedlora_run
from processes import cmdline

pytestmark = pytest.mark.slow

FLOWER_PROCS = ("flower-superlink|flower-superexec|flwr-simulation|flwr-serverapp|flwr-clientapp"
                "|raylet|gcs_server|ray::")
ROUND_KEYS = {"round", "strategy", "test_accuracy", "test_loss", "train_loss", "num_clients",
              "bytes_up", "bytes_down", "seconds"}


def _started_by_these_tests(pid: str) -> bool:
    try:
        return TEST_TAG.encode() in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:  # gone already, or not ours to read
        return False


def _processes() -> list[tuple[str, str, str, str]]:
    """(pid, parent pid, state, command line) of every live process, read from /proc: `ps` cuts its
    output to $COLUMNS, which hid the SuperLink's long path on a CI machine."""
    rows = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            stat = (proc / "stat").read_text()
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:  # gone since the listing
            continue
        state, ppid = stat[stat.rindex(")") + 2:].split()[:2]  # the name in (...) may hold spaces
        rows.append((proc.name, ppid, state, cmdline))
    return rows


def _flower_pids() -> set[str]:
    """Live Flower processes started by this test session (zombies awaiting their reaper are not running)."""
    return {pid for pid, _, state, args in _processes()
            if state != "Z" and re.search(FLOWER_PROCS, args) and _started_by_these_tests(pid)}


@pytest.fixture(autouse=True)
def no_flower_left_behind():
    before = _flower_pids()
    yield
    # A process sent SIGTERM by the runner may take a moment to exit; one left running stays.
    deadline = time.monotonic() + 10
    while (left := _flower_pids() - before) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not left, f"Flower processes left running: {[(pid, cmdline(int(pid))[:200]) for pid in left]}"


def _run_ok(overrides: dict) -> dict:
    res = fedlora_run(overrides)
    assert res.returncode == 0, f"fedlora run failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    return overrides


def _rows(out_dir) -> list[dict]:
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


def _init_state(overrides: dict):
    from fedlora.core.config import RunConfig
    from fedlora.core.model import build_model, global_state

    cfg = RunConfig.from_run_config({k: v for k, v in overrides.items() if k != "output-dir"})
    return cfg, global_state(build_model(cfg, 3, {0: "neg", 1: "neu", 2: "pos"}))


def _adapter_bundle(out_dir, cfg, adapter="adapter"):
    """An exported adapter loaded with plain peft/transformers, as a bundle `evaluate` takes."""
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from fedlora.core.model import ModelBundle

    adapter = out_dir / adapter
    id2label = {int(k): v for k, v in json.loads((adapter / "id2label.json").read_text()).items()}
    base = AutoModelForSequenceClassification.from_pretrained(cfg.model, num_labels=len(id2label))
    model = PeftModel.from_pretrained(base, adapter)
    return ModelBundle(model, AutoTokenizer.from_pretrained(adapter), {}, cfg.model)


def _adapter_predictions(out_dir, cfg, adapter="adapter"):
    """Predictions of an exported adapter on the server's test split."""
    from fedlora.core.data import split_test
    from fedlora.core.task import get_task

    return get_task(cfg).evaluate(_adapter_bundle(out_dir, cfg, adapter), split_test(cfg), cfg)["predictions"].tolist()


@pytest.mark.parametrize("strategy", ["fedsvd", "ffa", "fedit", "lorafair"])
def test_strategy_end_to_end(strategy, tiny_overrides, tmp_path):
    out = tmp_path / "run"
    overrides = _run_ok({**tiny_overrides, "strategy": strategy, "output-dir": str(out)})
    rows = _rows(out)
    assert [r["round"] for r in rows] == [0, 1, 2]
    for row in rows[1:]:
        assert ROUND_KEYS <= set(row), set(row)
        assert row["num_clients"] == 3 and row["strategy"] == strategy and not row.get("skipped")
        if strategy == "lorafair":  # the correction never makes the aggregate worse
            assert row["fair_cos_after"] >= row["fair_cos_before"] - 1e-9
    assert json.loads((out / "status.json").read_text()) == {
        "state": "completed", "last_round": 2, "reason": "all 2 rounds ran"}
    data = json.loads((out / "data.json").read_text())
    assert data["rows_read"] == data["rows_kept"] == 600 and data["server_test_rows"] == 120
    # only the server evaluates: the clients train on all their rows and hold none out
    assert sum(c["train_rows"] for c in data["clients"].values()) == 480
    assert all(c["local_test_rows"] == 0 for c in data["clients"].values())

    cfg, init = _init_state(overrides)
    adapter = {k.replace("base_model.model.", ""): v
               for k, v in load_file(out / "adapter" / "adapter_model.safetensors").items()}
    lora_a = {k: v for k, v in adapter.items() if "lora_A" in k}
    lora_b = {k: v for k, v in adapter.items() if "lora_B" in k}
    assert len(lora_a) == len(lora_b) == 4  # 2 layers × query, value
    init_b = {k: v for k, v in init.items() if k.endswith("lora_B")}
    assert all(float(v.abs().max()) == 0 for v in init_b.values())
    assert any(float(v.abs().max()) > 0 for v in lora_b.values()), "LoRA B never left its zero init"
    init_a = sorted((k, v) for k, v in init.items() if k.endswith("lora_A"))
    saved_a = [v for _, v in sorted(lora_a.items())]
    if strategy == "fedsvd":
        for a in saved_a:
            torch.testing.assert_close(a @ a.T, torch.eye(a.shape[0]), atol=1e-5, rtol=0)
    elif strategy == "ffa":
        for (_, a0), a in zip(init_a, saved_a):
            torch.testing.assert_close(a, a0, atol=0, rtol=0)  # A is frozen for good
    else:
        assert any(not torch.equal(a, a0) for (_, a0), a in zip(init_a, saved_a))

    # b-only uplink: B (m×r per layer) + head; no A
    if strategy in ("fedsvd", "ffa"):
        head = sum(v.numel() * 4 for k, v in init.items() if k.startswith("head."))
        b_bytes = sum(v.numel() * 4 for k, v in init.items() if k.endswith("lora_B"))
        assert rows[1]["bytes_up"] == 3 * (b_bytes + head)

    saved = json.loads((out / "predictions.json").read_text())["predictions"]
    assert _adapter_predictions(out, cfg) == saved


def _merged_predictions(out_dir, cfg):
    """Predict the server's test split with the merged model, loaded with plain transformers."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from fedlora.core.data import split_test
    from fedlora.core.model import ModelBundle
    from fedlora.core.task import get_task

    model = AutoModelForSequenceClassification.from_pretrained(out_dir / "merged")
    bundle = ModelBundle(model, AutoTokenizer.from_pretrained(out_dir / "merged"), {}, str(out_dir / "merged"))
    return model, get_task(cfg).evaluate(bundle, split_test(cfg), cfg)["predictions"].tolist()


@pytest.mark.parametrize("strategy, ranks", [("fedex", ""), ("flora", "2,4,8")])
def test_strategies_that_change_the_base_export_a_merged_model(strategy, ranks, tiny_overrides, tmp_path):
    out = tmp_path / "run"
    overrides = _run_ok({**tiny_overrides, "strategy": strategy, "lora-ranks": ranks, "output-dir": str(out)})
    rows = _rows(out)
    assert [r["round"] for r in rows] == [0, 1, 2] and all(r["num_clients"] == 3 for r in rows[1:])
    cfg, _ = _init_state(overrides)
    merged, predictions = _merged_predictions(out, cfg)
    assert predictions == json.loads((out / "predictions.json").read_text())["predictions"]
    from transformers import AutoModelForSequenceClassification

    base = AutoModelForSequenceClassification.from_pretrained(cfg.model)
    query = "bert.encoder.layer.0.attention.self.query.weight"
    assert not torch.allclose(merged.state_dict()[query], base.state_dict()[query])
    if strategy == "flora":  # adapters start afresh each round: the global B is zero
        adapter = load_file(out / "adapter" / "adapter_model.safetensors")
        assert all(float(v.abs().max()) == 0 for k, v in adapter.items() if "lora_B" in k)
        assert all(v.shape[0] == 8 for k, v in adapter.items() if "lora_A" in k)  # the largest rank


def test_flexlora_with_mixed_ranks(tiny_overrides, tmp_path):
    out = tmp_path / "run"
    overrides = _run_ok({**tiny_overrides, "strategy": "flexlora", "lora-ranks": "2,4", "output-dir": str(out)})
    cfg, init = _init_state(overrides)
    adapter = load_file(out / "adapter" / "adapter_model.safetensors")
    lora_a = [v for k, v in sorted(adapter.items()) if "lora_A" in k]
    assert all(a.shape[0] == 4 for a in lora_a)  # the global model has the largest rank
    for a in lora_a:  # FlexLoRA's A is the right singular vectors: orthonormal rows
        torch.testing.assert_close(a @ a.T, torch.eye(4), atol=1e-5, rtol=0)
    assert any(float(v.abs().max()) > 0 for k, v in adapter.items() if "lora_B" in k)
    saved = json.loads((out / "predictions.json").read_text())["predictions"]
    assert _adapter_predictions(out, cfg.replace(lora_rank=4)) == saved


def test_two_hundred_virtual_clients_five_per_round(tiny_overrides, tmp_path):
    """Many virtual clients, few per round: every one is discovered and sized once, each round
    trains the 5 sampled. (What each node keeps between rounds is checked directly in
    test_client_app: only the sent-once factor, here FFA's A.)"""
    from synthetic import write_csv

    data = write_csv(tmp_path / "big.csv", 6000, seed=1)
    out = tmp_path / "run"
    overrides = {**tiny_overrides, "dataset": str(data), "test-size": 200, "partitioner": "iid", "strategy": "ffa",
                 "clients-per-round": 5, "local-steps": 3, "batch-size": 8, "min-partition-size": "auto",
                 "output-dir": str(out)}
    res = fedlora_run(overrides, num_supernodes=200, timeout=900)
    assert res.returncode == 0, f"fedlora run failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    clients = json.loads((out / "data.json").read_text())["clients"]
    assert len(clients) == 200 and all(c["train_rows"] == 29 for c in clients.values())
    rows = _rows(out)
    assert [r["round"] for r in rows] == [0, 1, 2] and all(r["num_clients"] == 5 for r in rows[1:])


def test_fedsa_keeps_each_clients_b_and_exports_its_adapter(tiny_overrides, tmp_path):
    out = tmp_path / "run"
    overrides = _run_ok({**tiny_overrides, "strategy": "fedsa", "evaluate-on": "auto", "output-dir": str(out)})
    rows = _rows(out)
    for row in rows[1:]:
        assert {"personalized_accuracy", "personalized_loss"} <= set(row), row
    assert {"test_accuracy", "test_loss"} <= set(rows[-1])  # the global split: on the last round
    assert not (out / "adapter").exists()  # no global model to export
    cfg, init = _init_state(overrides)
    exported = sorted(p.name for p in (out / "adapters").iterdir())
    assert exported == ["0", "1", "2"]
    b_of, a_prev = [], None
    for pid in exported:
        adapter = {k.replace("base_model.model.", ""): v
                   for k, v in load_file(out / "adapters" / pid / "adapter_model.safetensors").items()}
        b_of.append([v for k, v in sorted(adapter.items()) if "lora_B" in k])
        assert all(float(b.abs().max()) > 0 for b in b_of[-1]), "a client's B never trained"
        a = [v for k, v in sorted(adapter.items()) if "lora_A" in k]
        assert len(_adapter_predictions(out, cfg, f"adapters/{pid}")) == 120  # loads with plain peft
        if a_prev is not None:  # one shared A, personal B
            assert all(torch.equal(x, y) for x, y in zip(a, a_prev))
            assert not all(torch.equal(x, y) for x, y in zip(b_of[-1], b_of[0]))
        a_prev = a


@pytest.mark.parametrize("privacy", [{"dp": False}, {"dp": True, "dp-reproducible": True}],
                         ids=["non-private", "dp-reproducible"])
def test_same_seed_same_adapter(privacy, tiny_overrides, tmp_path):
    """A seed fixes the whole run; under DP only with `dp-reproducible` (secret batches and noise
    otherwise: tests/test_privacy.py)."""
    runs = []
    for name in ("a", "b"):
        out = tmp_path / name
        _run_ok({**tiny_overrides, **privacy, "output-dir": str(out)})  # round 2 trains against FedSVD's new A
        runs.append(load_file(out / "adapter" / "adapter_model.safetensors"))
    assert runs[0].keys() == runs[1].keys()
    for key in runs[0]:
        assert torch.equal(runs[0][key], runs[1][key]), key


def test_failing_run_exits_nonzero(tiny_overrides, tiny_model_dir, tmp_path):
    broken = tmp_path / "broken-model"
    shutil.copytree(tiny_model_dir, broken)
    (broken / "model.safetensors").unlink()  # passes the pre-flight check, fails in the ServerApp
    res = fedlora_run({**tiny_overrides, "model": str(broken), "output-dir": str(tmp_path / "out")})
    assert res.returncode == 1, res.stdout + res.stderr
    assert "run failed" in res.stderr


def test_client_side_evaluation_with_a_frozen_head(tiny_overrides, tmp_path):
    out = tmp_path / "run"
    overrides = _run_ok({**tiny_overrides, "evaluate-on": "both", "head": "frozen", "num-server-rounds": 1,
                         "output-dir": str(out)})
    row = _rows(out)[1]
    assert row["client_evaluated"] == 3 and row["client_eval_rejected"] == 0
    cfg, init = _init_state(overrides)
    # The exported adapter on each client's own held-out rows, weighted by their number: what the
    # clients reported, recomputed here without Flower.
    from fedlora.core.data import client_data
    from fedlora.core.task import get_task

    bundle = _adapter_bundle(out, cfg)
    local = [client_data(cfg, pid, 3).test for pid in range(3)]
    assert all(len(t) > 0 for t in local)
    accuracy = [get_task(cfg).evaluate(bundle, t, cfg)["accuracy"] for t in local]
    expected = sum(a * len(t) for a, t in zip(accuracy, local)) / sum(len(t) for t in local)
    assert row["client_accuracy"] == pytest.approx(expected, abs=1e-9)
    saved = json.loads((out / "predictions.json").read_text())
    server_accuracy = sum(p == y for p, y in zip(saved["predictions"], saved["labels"])) / len(saved["labels"])
    assert row["test_accuracy"] == pytest.approx(server_accuracy, abs=1e-9)
    assert not any(k.startswith("head.") for k in init)  # a frozen head is never exchanged...
    saved = json.loads((out / "predictions.json").read_text())["predictions"]
    assert _adapter_predictions(out, cfg) == saved  # ...but saved, so the adapter reproduces the server


@pytest.fixture
def start_run():
    """Starts `fedlora run` (log streamed to its stdout) in the background; one a test left running
    is stopped with SIGTERM, as a user would, before the check for leftover processes."""
    import signal
    import sys

    from conftest import REPO

    started = []

    def start(overrides: dict, stderr) -> subprocess.Popen:
        pairs = " ".join(f"{k}={json.dumps(v)}" for k, v in overrides.items())
        started.append(subprocess.Popen([sys.executable, "-m", "fedlora.simulations.cli", "run", str(REPO),
                                         "--num-supernodes", "3", "--run-config", pairs],
                                        stdout=subprocess.PIPE, stderr=stderr, text=True, cwd=REPO))
        return started[-1]

    yield start
    for proc in started:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=120)


def _printed(proc: subprocess.Popen, text: str, timeout: float) -> bool:
    """Whether `proc` prints a line holding `text` within `timeout` s. Its stdout is read to the
    end in a thread, so that it never blocks on a full pipe."""
    import threading

    seen = threading.Event()

    def read() -> None:
        for line in proc.stdout:
            if text in line:
                seen.set()

    threading.Thread(target=read, daemon=True).start()
    return seen.wait(timeout)


def test_sigterm_stops_everything_it_started(start_run, tiny_overrides, tmp_path):
    import signal

    from fedlora.core.status import read_status

    out = tmp_path / "o"
    proc = start_run({**tiny_overrides, "num-server-rounds": 50, "output-dir": str(out)}, subprocess.STDOUT)
    assert _printed(proc, "round 1/50", timeout=180), "the run never reached round 1"
    assert proc.poll() is None, f"fedlora run ended before the signal (exit {proc.returncode})"
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 128 + signal.SIGTERM
    status = read_status(out)
    assert status.state == "failed" and "signal 15" in status.reason, status
    assert status.last_round >= 1


def test_ctrl_c_stops_a_private_run_between_rounds_and_its_resume_pays_for_no_round_twice(start_run, tiny_overrides,
                                                                                          tmp_path):
    """A first Ctrl-C asks for a stop: the round in progress ends and is checkpointed, `fedlora run`
    exits 3 and says how to continue. Resumed with num-server-rounds = its last round, it ends there
    with that round's adapter; resumed again for all 4 rounds, every client's ledger holds each
    round once (a kill mid-round would have it pay for that round again)."""
    import signal
    import sys

    from conftest import REPO
    from fedlora.core.status import STOP_FILE, read_status
    from fedlora.privacy import PrivacyLedger

    out = tmp_path / "o"
    with (tmp_path / "stderr").open("w") as stderr:
        proc = start_run({**tiny_overrides, "dp": True, "target-epsilon": 6.0, "num-server-rounds": 4,
                          "output-dir": str(out)}, stderr)
        assert _printed(proc, "round 1/4", timeout=180), "the run never reached round 1"
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=300) == 3
    assert "stopping before the next round (Ctrl-C in fedlora)" in (tmp_path / "stderr").read_text()
    status = read_status(out)
    assert status.state == "stopped" and 1 <= status.last_round <= 3, status
    assert f"stopped before round {status.last_round + 1}, asked by Ctrl-C in fedlora at" in status.reason
    assert not (out / STOP_FILE).exists() and not (out / "adapter").exists()  # paused, not ended

    def resume(rounds: int) -> str:
        res = subprocess.run([sys.executable, "-m", "fedlora.simulations.cli", "run", str(REPO), "--quiet",
                              "--resume", str(out), "-c", f"num-server-rounds={rounds}"],
                             capture_output=True, text=True, timeout=600, cwd=REPO)
        assert res.returncode == 0, res.stderr
        return res.stdout

    last = status.last_round
    assert f"completed after round {last}" in resume(last)  # no round left: the outputs of round `last`
    saved = json.loads((out / "predictions.json").read_text())
    accuracy = sum(p == y for p, y in zip(saved["predictions"], saved["labels"])) / len(saved["labels"])
    assert accuracy == pytest.approx(_rows(out)[-1]["test_accuracy"])
    adapter = load_file(out / "adapter" / "adapter_model.safetensors")
    assert any(float(v.abs().max()) > 0 for k, v in adapter.items() if "lora_B" in k)  # trained, not the init
    assert "completed after round 4" in resume(4)
    assert [row["round"] for row in _rows(out)] == [0, 1, 2, 3, 4]
    for pid in ("0", "1", "2"):
        ledger = PrivacyLedger.load(out / "privacy" / f"{pid}.json")
        assert [p["round"] for p in ledger.participations] == [1, 2, 3, 4]
        assert ledger.epsilon <= 6.0
    assert (out / "adapter").exists()


@pytest.mark.parametrize("strategy", ["fedsvd", "ffa", "fedit"])
def test_dp_end_to_end(strategy, tiny_overrides, tmp_path):
    from fedlora.privacy import PrivacyLedger, epsilon

    out = tmp_path / "run"
    _run_ok({**tiny_overrides, "strategy": strategy, "dp": True, "target-epsilon": 6.0, "output-dir": str(out)})
    rows = _rows(out)
    for row in rows[1:]:
        assert "train_loss" not in row  # a loss on private records is not released under DP
        assert set(row["epsilon"]) == {"0", "1", "2"} and row["epsilon_max"] <= 6.0 and row["refused"] == 0
    # σ is planned for the 2 rounds every client trained in: the budget is spent, not undershot
    # (a σ far too large would pass an upper bound alone). Opacus' σ search stops within 0.01.
    assert 6.0 - 0.05 <= rows[-1]["epsilon_max"] <= 6.0
    summary = json.loads((out / "privacy.json").read_text())
    assert summary["delta"] == 1e-5 and summary["accountant"] == "prv" and summary["reproducible"] is False
    assert "operating system's entropy" in summary["guarantee"]
    for pid in ("0", "1", "2"):
        ledger = PrivacyLedger.load(out / "privacy" / f"{pid}.json")
        assert [p["round"] for p in ledger.participations] == [1, 2]
        assert summary["clients"][pid]["participations"] == 2
        assert summary["clients"][pid]["epsilon"] == pytest.approx(ledger.epsilon)
        assert ledger.epsilon == pytest.approx(epsilon(ledger.history, 1e-5, "prv"), rel=1e-6)
        assert 6.0 - 0.05 <= ledger.epsilon <= 6.0
    adapter = load_file(out / "adapter" / "adapter_model.safetensors")
    assert any(float(v.abs().max()) > 0 for k, v in adapter.items() if "lora_B" in k)


def test_spent_budgets_are_enforced_and_the_run_ends_cleanly(tiny_overrides, tmp_path):
    out = tmp_path / "run"
    # σ is planned for one participation: each client can train once, and says so with its update,
    # so the server samples the others instead and no round is lost to a refusal.
    res = fedlora_run({**tiny_overrides, "dp": True, "target-epsilon": 3.0, "dp-max-participations": 1,
                       "clients-per-round": 2, "num-server-rounds": 6, "output-dir": str(out)})
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    rows = _rows(out)
    assert [(row["num_clients"], row["refused"]) for row in rows[1:]] == [(2, 0), (1, 0)]  # 3 clients
    assert not any(row.get("skipped") for row in rows)
    status = json.loads((out / "status.json").read_text())
    assert status["state"] == "budget-exhausted" and status["last_round"] == 2  # stopped early
    assert "stopped before round 3: every client has spent its privacy budget" in status["reason"]
    summary = json.loads((out / "privacy.json").read_text())
    assert all(c["exhausted"] and c["participations"] == 1 and 0 < c["epsilon"] <= 3.0
               for c in summary["clients"].values())
    assert "one more round would spend" in summary["clients"]["0"]["reason"]
    assert (out / "adapter").exists() and (out / "predictions.json").exists()  # outputs written


def test_a_superlink_that_dies_ends_the_run_with_an_error(start_run, tiny_overrides, tmp_path):
    import os
    import signal
    import time

    from fedlora.core.status import read_status

    out = tmp_path / "o"
    with (tmp_path / "stderr").open("w") as stderr:
        proc = start_run({**tiny_overrides, "num-server-rounds": 50, "output-dir": str(out)}, stderr)
    assert _printed(proc, "round 1/50", timeout=180), "the run never reached round 1"
    (superlink,) = [int(pid) for pid, ppid, _, args in _processes()
                    if ppid == str(proc.pid) and "flower-superlink" in args]
    os.kill(superlink, signal.SIGKILL)
    t0 = time.monotonic()
    assert proc.wait(timeout=120) == 1
    assert time.monotonic() - t0 < 60  # noticed within seconds; the rest is stopping processes
    said = (tmp_path / "stderr").read_text()
    assert "the SuperLink exited (code -9)" in said and "stopped the SuperLink" in said, said
    status = read_status(out)
    assert status.state == "failed" and status.reason == "the SuperLink exited (code -9)", status


def _kill_tree(root: int, started_before: set[str]) -> None:
    """SIGKILL `root`, everything below it and every Flower process this test started (Ray's
    daemons are not all descendants): the crash a power cut or the OOM killer would cause."""
    import os
    import signal
    import time

    kids: dict[str, list[str]] = {}
    for pid, ppid, _, _ in _processes():
        kids.setdefault(ppid, []).append(pid)
    tree, todo = set(), [str(root)]
    while todo:
        pid = todo.pop()
        tree.add(pid)
        todo += kids.get(pid, [])
    for _ in range(20):
        for pid in tree | (_flower_pids() - started_before):
            try:
                os.kill(int(pid), signal.SIGKILL)
            except ProcessLookupError:
                pass
        if not (_flower_pids() - started_before):
            return
        time.sleep(0.5)


def test_kill_9_of_the_whole_run_then_resume_ends_as_an_uninterrupted_run(start_run, tiny_overrides, tmp_path):
    """`fedlora run` and every process under it are killed at once during round 2; `fedlora run
    --resume` continues from round 1's checkpoint and ends with the same metrics and adapter."""
    overrides = {**tiny_overrides, "num-server-rounds": 3, "local-steps": 20}
    assert fedlora_run({**overrides, "output-dir": str(tmp_path / "whole")}).returncode == 0
    before = _flower_pids()
    out = tmp_path / "o"
    with (tmp_path / "stderr").open("w") as stderr:
        proc = start_run({**overrides, "output-dir": str(out)}, stderr)
    assert _printed(proc, "round 2: training", timeout=180), "the run never reached round 2"
    _kill_tree(proc.pid, before)
    proc.wait(timeout=30)
    assert json.loads((out / "status.json").read_text())["state"] == "running"  # nobody could record the end
    import sys

    from conftest import REPO

    resumed = subprocess.run([sys.executable, "-m", "fedlora.simulations.cli", "run", str(REPO), "--quiet",
                              "--resume", str(out)], capture_output=True, text=True, timeout=600, cwd=REPO)
    assert resumed.returncode == 0, resumed.stderr
    assert "completed after round 3" in resumed.stdout

    def rows(folder: Path) -> list[dict]:
        return [{k: v for k, v in json.loads(line).items() if not k.endswith("seconds")}
                for line in (folder / "metrics.jsonl").read_text().splitlines()]

    assert rows(out) == rows(tmp_path / "whole")
    got, want = (load_file(folder / "adapter" / "adapter_model.safetensors") for folder in (out, tmp_path / "whole"))
    assert sorted(got) == sorted(want)
    assert all(torch.allclose(got[k], want[k], atol=1e-6, rtol=0) for k in got)


def test_the_readmes_sweep_runs_every_cell_skips_them_again_and_resumes_an_interrupted_one(tiny_overrides, tmp_path):
    """`fedlora sweep experiment.toml` as the README writes it, the grid cut to 2 strategies × 2
    seeds and the runs to the tiny model."""
    import csv
    import os
    import sys
    import tomllib

    from conftest import REPO
    from fedlora.core.status import RunStatus, read_status, write_status

    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("## Sweeps"):]
    experiment = tomllib.loads(re.search(r"```toml\n(.*?)```", section, re.S).group(1))
    command = re.search(r"```bash\n(fedlora sweep [^\n]+)\n```", section).group(1).split()
    report = re.search(r"```bash\n(fedlora report [^\n]+)\n```", section).group(1).split()
    experiment["grid"] = {"strategy": ["fedsvd", "ffa"], "seed": [0, 1]}
    experiment["num-supernodes"] = 3
    experiment["base"].update({k: v for k, v in tiny_overrides.items() if k != "seed"})
    lines = [f"{k} = {json.dumps(v)}" for k, v in experiment.items() if not isinstance(v, dict)]
    for table in ("base", "grid"):
        lines += [f"[{table}]", *(f"{k} = {json.dumps(v)}" for k, v in experiment[table].items())]
    (tmp_path / command[-1]).write_text("\n".join(lines) + "\n")
    root = tmp_path / experiment["output-dir"]

    def sweep() -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "fedlora.simulations.cli", *command[1:], "--app", str(REPO)],
                              cwd=tmp_path, capture_output=True, text=True, timeout=1200,
                              env={**os.environ, "HF_HUB_OFFLINE": "1"})

    res = sweep()
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "4 of 4 runs finished" in res.stdout
    names = {f"strategy-{s}__seed-{k}" for s in ("fedsvd", "ffa") for k in (0, 1)}
    table = list(csv.DictReader((root / "results.csv").open()))
    assert {r["run"] for r in table} == names and len(table) == 4 * 3  # rounds 0, 1, 2 of each
    assert {(r["strategy"], r["seed"]) for r in table} == {(s, str(k)) for s in ("fedsvd", "ffa") for k in (0, 1)}
    stamps = {n: (root / n / "status.json").stat().st_mtime_ns for n in names}

    res = sweep()  # nothing left to do
    assert res.returncode == 0 and "4 of 4 runs finished" in res.stdout
    assert {n: (root / n / "status.json").stat().st_mtime_ns for n in names} == stamps

    cut = root / "strategy-ffa__seed-1"  # as if killed after its last checkpoint
    write_status(cut, RunStatus("running", 2, "killed in a test"))
    res = sweep()
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert read_status(cut).state == "completed"
    assert {n: (root / n / "status.json").stat().st_mtime_ns for n in names - {cut.name}} == {
        n: stamps[n] for n in names - {cut.name}}

    res = subprocess.run([sys.executable, "-m", "fedlora.simulations.cli", *report[1:]], cwd=tmp_path,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    for name in ("accuracy.png", "bytes.png", "accuracy-time.png"):
        png = (root / "report" / name).read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and png[16:24] == (770).to_bytes(4, "big") + (462).to_bytes(4, "big")
    table = (root / "report" / "report.md").read_text()
    assert table.count("| 2 |") >= 2  # each strategy's group: 2 seeds
    assert "| group | to 0.6 | to 0.65 | to 0.7 |" in table  # --time-to, as the README writes it
