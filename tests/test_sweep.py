"""Resumable sweeps (`fedlora.simulations.sweep`): runs whose status.json says finished (completed
or budget-exhausted) are skipped, interrupted and failed ones are cleared and run again, and the
summary reads only finished runs. Flower itself is replaced by a fake that writes what a run would
write."""

from __future__ import annotations

import json
from pathlib import Path

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

    def fake_run(app, cfg, n, client_cpus=1, client_gpus=0.0, quiet=False, ray_address=None):
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


def _experiment(tmp_path, text: str):
    path = tmp_path / "exp.toml"
    path.write_text(text)
    return sweep.Experiment.from_toml(path)


def test_an_experiment_file_is_a_grid_of_named_runs_over_shared_settings(tmp_path):
    exp = _experiment(tmp_path, 'output-dir = "out"\nnum-supernodes = 4\n[base]\nnum-server-rounds = 2\n'
                                '[grid]\nstrategy = ["fedsvd", "ffa"]\ntarget-epsilon = [3.0, 6.0]\n')
    assert exp.root == (tmp_path / "out").resolve() and exp.num_supernodes == 4 and exp.client_cpus == 1
    runs = exp.runs()
    assert [r.name for r in runs] == ["strategy-fedsvd__target-epsilon-3.0", "strategy-fedsvd__target-epsilon-6.0",
                                      "strategy-ffa__target-epsilon-3.0", "strategy-ffa__target-epsilon-6.0"]
    assert runs[2].overrides == {"num-server-rounds": 2, "strategy": "ffa", "target-epsilon": 3.0}


def test_several_grids_run_the_union_of_their_cells_each_once(tmp_path):
    exp = _experiment(tmp_path, 'output-dir = "out"\n'
                                '[[grid]]\nstrategy = ["fedsvd", "ffa"]\ndp = [true]\ntarget-epsilon = [1.0, 6.0]\n'
                                '[[grid]]\nstrategy = ["fedsvd", "fedit", "ffa"]\ndp = [false]\n'
                                '[[grid]]\nstrategy = ["fedit"]\ndp = [false]\n')  # fedit dp=false twice
    assert exp.columns() == ["strategy", "dp", "target-epsilon"]
    assert [r.name for r in exp.runs()] == [
        "strategy-fedsvd__dp-True__target-epsilon-1.0", "strategy-fedsvd__dp-True__target-epsilon-6.0",
        "strategy-ffa__dp-True__target-epsilon-1.0", "strategy-ffa__dp-True__target-epsilon-6.0",
        "strategy-fedsvd__dp-False", "strategy-fedit__dp-False", "strategy-ffa__dp-False"]
    assert exp.runs()[5].overrides == {"strategy": "fedit", "dp": False}


@pytest.mark.parametrize("text, message", [
    ('output-dir = "o"\n[grid]\n', r"\[grid\] is missing or empty"),
    ('output-dir = "o"\n[grid]\nseed = 3\n', r"\['seed'\] must be non-empty lists"),
    ('output-dir = "o"\n[base]\nseed = 1\n[grid]\nseed = [1, 2]\n', r"\['seed'\] are in both"),
    ('[grid]\nseed = [1]\n', "output-dir .* is required"),
    ('output-dir = "o"\nrounds = 3\n[grid]\nseed = [1]\n', r"unknown keys \['rounds'\]"),
    ('output-dir = "o"\nnum-supernodes = 0\n[grid]\nseed = [1]\n', "must be integers >= 1"),
    ('output-dir = "o"\n[grid\n', "exp.toml"),
    ('output-dir = "o"\n[[grid]]\nseed = [1]\n[[grid]]\n', r"\[grid\] is missing or empty"),
    ('output-dir = "o"\n[base]\ndp = false\n[[grid]]\nseed = [1]\n[[grid]]\ndp = [true]\n', r"\['dp'\] are in both"),
])
def test_a_bad_experiment_file_is_refused_naming_the_problem(tmp_path, text, message):
    with pytest.raises(sweep.ConfigError, match=message):
        _experiment(tmp_path, text)


def test_a_bad_cell_stops_the_sweep_before_any_run(tmp_path, monkeypatch):
    monkeypatch.setattr(sweep, "run_simulation", lambda *a, **k: pytest.fail("ran although a cell is bad"))
    runs = [SweepRun("a", {"strategy": "fedsvd"}), SweepRun("b", {"strategy": "no-such-method"})]
    with pytest.raises(sweep.ConfigError, match="no-such-method"):
        run_sweep(REPO, runs, tmp_path)


def test_a_checkpointed_run_resumes_a_failing_one_is_reported_and_the_table_is_tidy(tmp_path, monkeypatch):
    """Cell a stopped after round 1 with a checkpoint: resumed (resume=true). Cell b fails: the
    sweep goes on to c and says so. results.csv: a row per run and round, grid keys as columns."""
    import csv

    import torch

    from fedlora.server.checkpoint import Checkpoint, save_checkpoint
    from fedlora.simulations.runner import RunFailed

    seen = {}

    def fake_run(app, cfg, n, client_cpus=1, client_gpus=0.0, quiet=False, ray_address=None):
        name = cfg.output_dir.rsplit("/", 1)[-1]
        seen[name] = cfg.resume
        if name.endswith("seed-1") and cfg.strategy == "ffa":
            raise RunFailed("a client crashed")
        _write_run(tmp_path / name, 2, 2, cfg.strategy)
        return read_status(tmp_path / name)

    monkeypatch.setattr(sweep, "run_simulation", fake_run)
    monkeypatch.setattr(sweep, "preflight", lambda cfg, n, gpus=0.0: None)
    runs = [SweepRun(f"strategy-{s}__seed-{k}", {"strategy": s, "seed": k, "num-server-rounds": 2})
            for s in ("fedsvd", "ffa") for k in (0, 1)]
    interrupted = tmp_path / runs[0].name
    _write_run(interrupted, 2, 1, state="running")
    save_checkpoint(interrupted, Checkpoint(round=1, job="j", arrays={"x": torch.zeros(1)}, strategy={}, rows=[],
                                            run_config={}))
    result = run_sweep(REPO, runs, tmp_path, grid_keys=["strategy", "seed"])
    assert result == sweep.SweepResult(finished=3, failed=["strategy-ffa__seed-1"], stopped=None)
    assert seen == {runs[0].name: True, runs[1].name: False, runs[2].name: False, runs[3].name: False}
    table = list(csv.DictReader((tmp_path / "results.csv").open()))
    assert {r["run"] for r in table} == {r.name for r in runs[:3]}  # the failed one has no rows
    assert [(r["strategy"], r["seed"], r["round"]) for r in table if r["run"] == runs[2].name] == [
        ("ffa", "0", "0"), ("ffa", "0", "1"), ("ffa", "0", "2")]
    assert all(r["state"] == "completed" and r["test_accuracy"] for r in table)


def test_a_run_stopped_on_request_ends_the_sweep_and_the_same_command_resumes_it(tmp_path, monkeypatch):
    """`fedlora stop` (or a first Ctrl-C) on cell a: the sweep stops after it, b does not start; the
    next sweep resumes a from its checkpoint (nothing run twice), then runs b."""
    import torch

    from fedlora.server.checkpoint import Checkpoint, save_checkpoint

    calls = []

    def fake_run(app, cfg, n, client_cpus=1, client_gpus=0.0, quiet=False, ray_address=None):
        out = Path(cfg.output_dir)
        calls.append((out.name, cfg.resume))
        if not calls[:-1]:  # the first run is asked to stop after round 1
            _write_run(out, 3, 1, cfg.strategy, state="stopped")
            save_checkpoint(out, Checkpoint(round=1, job="j", arrays={"x": torch.zeros(1)}, strategy={}, rows=[],
                                            run_config={}))
        else:
            _write_run(out, 3, 3, cfg.strategy)
        return read_status(out)

    monkeypatch.setattr(sweep, "run_simulation", fake_run)
    monkeypatch.setattr(sweep, "preflight", lambda cfg, n, gpus=0.0: None)
    runs = [SweepRun("a", {"strategy": "fedsvd"}), SweepRun("b", {"strategy": "ffa"})]
    assert run_sweep(REPO, runs, tmp_path) == sweep.SweepResult(finished=0, failed=[], stopped="a")
    assert calls == [("a", False)]
    assert run_sweep(REPO, runs, tmp_path) == sweep.SweepResult(finished=2, failed=[], stopped=None)
    assert calls == [("a", False), ("a", True), ("b", False)]


@pytest.mark.parametrize("path", sorted((REPO / "simulations" / "experiments").glob("*.toml")), ids=lambda p: p.name)
def test_every_checked_in_experiment_resolves_every_cell(path):
    """What `fedlora sweep simulations/experiments/<file>` checks before its first run (EXPERIMENTS.md)."""
    exp = sweep.Experiment.from_toml(path)
    assert exp.root.is_relative_to(REPO / "outputs")  # run folders stay out of the app bundle
    runs = exp.runs()
    assert runs and len({r.name for r in runs}) == len(runs)
    for run in runs:
        cfg = sweep.resolve_config(REPO, {**run.overrides, "output-dir": str(exp.root / run.name)})
        cfg.check_federation(exp.num_supernodes)
