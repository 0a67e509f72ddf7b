"""`fedlora report`: groups a sweep's runs by setting (seeds pooled), plots accuracy with a band over
seeds, ε and bytes per round, and tabulates paired differences with a t interval that claims a
winner only where the interval excludes 0."""

from __future__ import annotations

import json
import math
import struct

import pytest

from fedlora.core.status import RunStatus, write_status
from fedlora.simulations.cli import main as cli
from fedlora.simulations.report import load_groups, paired_difference, write_report

FINAL = {("fedsvd", 0): 0.70, ("fedsvd", 1): 0.72, ("fedsvd", 2): 0.71,
         ("fedit", 0): 0.60, ("fedit", 1): 0.63, ("fedit", 2): 0.61}


def _run(root, strategy: str, seed: int, final: float, *, dp: bool = True, state: str = "completed",
         seconds: float | None = None, **config) -> None:
    out = root / "-".join([strategy, str(seed), *map(str, config.values()), *(["np"] if config and not dp else [])])
    out.mkdir(parents=True)
    write_status(out, RunStatus(state, 3, "test"))
    (out / "run_config.json").write_text(json.dumps({"strategy": strategy, "seed": seed, "dp": dp,
                                                     "output-dir": str(out), "num-server-rounds": 3, **config}))
    rows = [{"round": r, "test_accuracy": final - 0.1 * (3 - r), "bytes_up": 100 * r, "bytes_down": 200 * r,
             **({"epsilon_max": 1.0 * r} if dp else {}), **({"seconds": seconds} if seconds else {})}
            for r in range(4)]
    (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def _png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


def test_paired_difference_is_the_t_interval_of_the_per_seed_differences():
    mean, low, high = paired_difference([0.70, 0.72, 0.71], [0.60, 0.63, 0.61])
    diffs = [0.10, 0.09, 0.10]
    m = sum(diffs) / 3
    sd = math.sqrt(sum((d - m) ** 2 for d in diffs) / 2)
    half = 4.302652729911275 * sd / math.sqrt(3)  # t(0.975, 2 df)
    assert mean == pytest.approx(m) and (low, high) == pytest.approx((m - half, m + half))
    assert paired_difference([0.5], [0.4])[1:] == (None, None)


def test_a_sweep_report_groups_by_setting_and_claims_only_what_the_interval_shows(tmp_path, capsys):
    for (strategy, seed), final in FINAL.items():
        _run(tmp_path, strategy, seed, final)
    _run(tmp_path, "ffa", 0, 0.9, state="running")  # unfinished: left out
    groups = {g.label: g for g in load_groups(tmp_path)}
    assert set(groups) == {"strategy=fedsvd", "strategy=fedit"}
    assert sorted(groups["strategy=fedsvd"].runs) == [0, 1, 2]
    assert cli(["report", str(tmp_path)]) == 0
    report = (tmp_path / "report" / "report.md").read_text()
    assert "| strategy=fedsvd | 3 | 0.710 ± 0.010 | 0.710 ± 0.010 | 3.000 ± 0.000 |" in report
    fedsvd_first = "| strategy=fedsvd | strategy=fedit | 3 | +0.097 |" in report
    assert fedsvd_first or "| strategy=fedit | strategy=fedsvd | 3 | -0.097 |" in report
    assert ("A better" if fedsvd_first else "B better") in report
    for name in ("accuracy.png", "epsilon.png", "bytes.png"):
        assert _png_size(tmp_path / "report" / name) == (770, 462)  # 7 × 4.2 in at 110 dpi
    assert "report.md" in capsys.readouterr().out


def test_overlapping_seeds_show_no_difference_and_one_run_gets_its_plots(tmp_path):
    for seed, (a, b) in enumerate([(0.70, 0.60), (0.60, 0.70), (0.66, 0.64)]):
        _run(tmp_path / "sweep", "fedsvd", seed, a, dp=False)
        _run(tmp_path / "sweep", "fedit", seed, b, dp=False)
    report = write_report(tmp_path / "sweep")
    assert "no difference shown" in (report / "report.md").read_text()
    assert not (report / "epsilon.png").exists()  # nothing private
    single = write_report(tmp_path / "sweep" / "fedsvd-0", tmp_path / "one")
    assert _png_size(single / "accuracy.png") == (770, 462)
    assert "| fedsvd | 1 | 0.700 |" in (single / "report.md").read_text()


def test_pairs_differ_in_one_setting_and_a_non_private_runs_budget_is_not_a_setting(tmp_path):
    for seed in range(3):
        for strategy in ("fedsvd", "fedit"):
            _run(tmp_path, strategy, seed, 0.6, **{"target-epsilon": 1.0})
            _run(tmp_path, strategy, seed, 0.6, dp=False, **{"target-epsilon": 6.0})  # default left in its config
        _run(tmp_path, "fedsvd", seed, 0.6, **{"target-epsilon": 6.0})
    groups = {g.label for g in load_groups(tmp_path)}
    assert groups == {"dp=True, strategy=fedsvd, target-epsilon=1.0", "dp=True, strategy=fedit, target-epsilon=1.0",
                      "dp=True, strategy=fedsvd, target-epsilon=6.0", "dp=False, strategy=fedsvd",
                      "dp=False, strategy=fedit"}
    pairs = [line.split(" | ")[:2] for line in (write_report(tmp_path) / "report.md").read_text().splitlines()
             if line.count("|") == 7 and "=" in line]
    pairs = {frozenset(p) for p in pairs}
    assert len(pairs) == 6  # fedsvd-fedit at ε=1 and without DP; fedsvd ε=1-ε=6; ε=1 (both), ε=6 against no DP
    assert frozenset({"| dp=True, strategy=fedsvd, target-epsilon=6.0", "dp=True, strategy=fedit, target-epsilon=1.0"}) \
        not in pairs  # strategy and budget both differ


def test_a_folder_without_runs_is_refused(tmp_path, capsys):
    assert cli(["report", str(tmp_path)]) == 2
    assert "no finished run" in capsys.readouterr().err


def test_runs_each_at_their_strategys_default_or_at_one_value_differ_in_strategy_only(tmp_path):
    for seed in range(2):
        _run(tmp_path, "fedsvd", seed, 0.6, **{"learning-rate": 1.0})  # "auto" resolves per strategy
        _run(tmp_path, "fedit", seed, 0.5, **{"learning-rate": 0.3})
        _run(tmp_path, "fedit", seed, 0.55, **{"learning-rate": 1.0})  # chosen: a setting
    labels = {g.label for g in load_groups(tmp_path)}
    assert labels == {"learning-rate=1.0, strategy=fedsvd", "learning-rate=0.3, strategy=fedit",
                      "learning-rate=1.0, strategy=fedit"}
    report = (write_report(tmp_path) / "report.md").read_text()
    pairs = {frozenset(line.strip("| ").split(" | ")[:2]) for line in report.splitlines()
             if line.count("|") == 7 and "=" in line}
    assert pairs == {
        frozenset({"learning-rate=1.0, strategy=fedsvd", "learning-rate=0.3, strategy=fedit"}),  # each at its default
        frozenset({"learning-rate=1.0, strategy=fedsvd", "learning-rate=1.0, strategy=fedit"}),  # one value for both
        frozenset({"learning-rate=0.3, strategy=fedit", "learning-rate=1.0, strategy=fedit"}),  # the rate alone
    }


def test_runs_that_all_share_a_learning_rate_are_labelled_by_strategy_alone(tmp_path):
    for strategy in ("fedsvd", "fedit"):
        for seed in range(2):
            _run(tmp_path, strategy, seed, FINAL[strategy, seed], **{"learning-rate": 1.0})
    assert {g.label for g in load_groups(tmp_path)} == {"strategy=fedsvd", "strategy=fedit"}
    assert "| 2 | +0.095 |" in (write_report(tmp_path) / "report.md").read_text().replace("| -0.095 |", "| +0.095 |")


def test_time_to_accuracy_adds_up_the_rounds_seconds_until_the_first_evaluation_that_reaches_it(tmp_path, capsys):
    # accuracy final - 0.1·(3 - round): fedsvd seed 0 reaches 0.6 at round 2, 0.7 at round 3
    for seed, final in [(0, 0.70), (1, 0.65)]:
        _run(tmp_path, "fedsvd", seed, final, seconds=10.0)
    _run(tmp_path, "fedit", 0, 0.62, seconds=20.0)
    groups = {g.label: g for g in load_groups(tmp_path)}
    fedsvd, fedit = groups["strategy=fedsvd"], groups["strategy=fedit"]
    times, accuracies = zip(*fedsvd.elapsed(0))
    assert times == (10, 20, 30, 40) and accuracies == pytest.approx((0.4, 0.5, 0.6, 0.7))
    assert fedsvd.time_to(0, 0.6) == 30 and fedsvd.time_to(1, 0.6) == 40 and fedsvd.time_to(1, 0.7) is None
    assert fedit.time_to(0, 0.6) == 80
    assert cli(["report", str(tmp_path), "--time-to", "0.6,0.7"]) == 0
    report = (tmp_path / "report" / "report.md").read_text()
    assert "| group | to 0.6 | to 0.7 |" in report
    assert "| strategy=fedsvd | 35 s (2/2) | 40 s (1/2) |" in report
    assert "| strategy=fedit | 80 s (1/1) | not reached (0/1) |" in report
    assert _png_size(tmp_path / "report" / "accuracy-time.png") == (770, 462)
    with pytest.raises(SystemExit):
        cli(["report", str(tmp_path), "--time-to", "60"])  # a percentage, not an accuracy
    assert "an accuracy is in (0, 1]" in capsys.readouterr().err


def test_without_round_times_there_is_no_time_to_accuracy(tmp_path):
    _run(tmp_path, "fedsvd", 0, 0.7)
    (group,) = load_groups(tmp_path)
    assert group.elapsed(0) == [] and group.time_to(0, 0.5) is None
