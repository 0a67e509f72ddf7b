"""Resumable sweeps (`fedlora.simulations.sweep`): runs whose status.json says finished (completed
or budget-exhausted) are skipped, interrupted and failed ones are cleared and run again, and the
summary reads only finished runs. Flower itself is replaced by a fake that writes what a run would
write."""

from __future__ import annotations

import json

import pytest

from conftest import REPO
from fedlora.core.status import RunStatus, read_status, write_status
from fedlora.simulations import sweep
from fedlora.simulations.sweep import SweepRun, run_sweep, summarize


def _write_run(out, rounds: int, last: int, strategy: str = "fedsvd", state: str = "completed") -> None:
    out.mkdir(parents=True, exist_ok=True)
    write_status(out, RunStatus(state, last, f"{state} in a test"))
    (out / "run_config.json").write_text(json.dumps({"strategy": strategy, "seed": 0, "num-server-rounds": rounds,
                                                     "learning-rate": 1.0}))
    rows = [{"round": r, "test_accuracy": 0.1 * r, "seconds": 1.0} for r in range(last + 1)]
    (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"round": ')  # cut short


def test_finished_runs_are_skipped_and_interrupted_ones_rerun(tmp_path, monkeypatch):
    calls = []

    def fake_run(app, cfg, n, client_cpus=1, client_gpus=0.0, quiet=False):
        calls.append(cfg.strategy)
        out = tmp_path / f"{cfg.strategy}-run"
        _write_run(out, cfg.num_server_rounds, cfg.num_server_rounds, cfg.strategy)
        return read_status(out)

    monkeypatch.setattr(sweep, "run_simulation", fake_run)
    monkeypatch.setattr(sweep, "preflight", lambda cfg, n, gpus=0.0: None)
    _write_run(tmp_path / "fedsvd-run", 2, 2)  # finished earlier
    _write_run(tmp_path / "ffa-run", 2, 1, "ffa", state="running")  # killed after round 1
    (tmp_path / "ffa-run" / "stale.txt").write_text("from the interrupted run")
    _write_run(tmp_path / "fedit-run", 2, 2, "fedit", state="failed")  # every round ran, then it failed
    runs = [SweepRun(f"{s}-run", {"strategy": s, "num-server-rounds": 2}) for s in ("fedsvd", "ffa", "fedit")]
    assert [r["run"] for r in summarize(tmp_path)] == ["fedsvd-run"]  # not the interrupted or failed one
    run_sweep(REPO, runs, tmp_path)
    assert calls == ["ffa", "fedit"]
    assert not (tmp_path / "ffa-run" / "stale.txt").exists()
    assert read_status(tmp_path / "ffa-run") == RunStatus("completed", 2, "completed in a test")
    rows = summarize(tmp_path)
    assert [r["run"] for r in rows] == ["fedit-run", "fedsvd-run", "ffa-run"]
    assert rows[0]["accuracy_by_round"] == [0.0, 0.1, 0.2] and rows[0]["final_accuracy"] == 0.2
    assert rows[0]["evaluated_rounds"] == [0, 1, 2]


def test_the_summary_carries_each_private_runs_budget_and_spend(tmp_path):
    _write_run(tmp_path / "plain", 2, 2)
    out = tmp_path / "private"
    _write_run(out, 2, 2)
    (out / "run_config.json").write_text(json.dumps({"strategy": "fedsvd", "seed": 1, "num-server-rounds": 2,
                                                     "learning-rate": 1.0, "dp": True, "target-epsilon": 3.0}))
    rows = [{"round": r, "test_accuracy": 0.5, "epsilon_max": 1.5 * r, "epsilon_mean": r} for r in range(3)]
    (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    plain, private = summarize(tmp_path)
    assert not plain["dp"] and "target_epsilon" not in plain
    assert private["dp"] and (private["target_epsilon"], private["epsilon_max"], private["epsilon_mean"]) == (3.0, 3.0, 2)


def test_a_run_that_spent_every_budget_is_finished_kept_and_summarised(tmp_path, monkeypatch):
    monkeypatch.setattr(sweep, "run_simulation", lambda *a, **k: pytest.fail("a finished run was run again"))
    monkeypatch.setattr(sweep, "preflight", lambda cfg, n, gpus=0.0: None)
    out = tmp_path / "dp-run"
    _write_run(out, 5, 3, state="budget-exhausted")  # stopped after round 3 of 5: nobody left to train
    run_sweep(REPO, [SweepRun("dp-run", {"num-server-rounds": 5})], tmp_path)
    assert (out / "metrics.jsonl").exists()
    (row,) = summarize(tmp_path)
    assert (row["run"], row["state"], row["last_round"], row["rounds"]) == ("dp-run", "budget-exhausted", 3, 3)
    assert row["accuracy_by_round"] == pytest.approx([0.0, 0.1, 0.2, 0.3])
