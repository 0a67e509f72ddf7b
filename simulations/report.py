"""`fedlora report DIR`: plots and a table that compare the runs of a sweep folder (or show one run).

    fedlora report SWEEP_DIR|RUN_DIR [--out FOLDER] [--time-to 0.6,0.65,0.7]

Runs are grouped by every run-config key that differs between them except `seed`: a group is one
method under one setting, its runs are its seeds. Two runs whose values of a key are each their own
strategy's default (learning-rate = "auto": 1.0 for FedSVD, 0.3 for FedIT) do not differ in it. Written to `<DIR>/report/` (or `--out`):

* `accuracy.png`: test accuracy per round, each group's mean over seeds with a band from its
  lowest to its highest seed;
* `epsilon.png` (private runs only): the largest ε any client has spent, per round;
* `bytes.png`: bytes sent per round (up + down), per group;
* `accuracy-time.png` (where the metrics have each round's `seconds`): test accuracy against wall
  time (the rounds' `seconds` added up from the initial evaluation on; start-up not counted), per
  group, mean over seeds;
* `report.md`: per group, the final and best-of-last-3 test accuracy as mean ± std over seeds and
  the ε spent; then every pair of groups that differ in one setting (two strategies under the same
  budget, one strategy under two budgets) compared seed by seed (paired differences of the final
  accuracy, same seed in both): the mean difference with its 95 % t interval. A difference is
  claimed only where that interval excludes 0; with one shared seed there is no interval.
  With `--time-to 0.6,0.65,0.7` it also gives each group's wall time to reach each test accuracy
  (the same clock as `accuracy-time.png`), mean over the seeds that reached it.

A single run's folder gets the same plots (one group, no pairs).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import statistics
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedlora.core.status import read_status

from .sweep import read_rows

__all__ = ["Group", "add_commands", "load_groups", "paired_difference", "write_report"]

#: keys that differ between runs without making them different methods or settings
_NOT_A_SETTING = {"seed", "output-dir", "resume", "round-timeout", "connect-timeout"}
#: keys that mean nothing without DP: a non-private run's budget is not a setting of it
_DP_ONLY = {"target-epsilon", "target-delta", "accountant", "grad-sample-mode", "dp-max-participations",
            "dp-reproducible"}


@dataclass
class Group:
    """One method under one setting: its label and each seed's metrics rows."""

    label: str
    runs: dict[int, list[dict[str, Any]]]  # seed -> metrics.jsonl rows
    dp: bool
    settings: dict[str, Any] = field(default_factory=dict)  # the keys that differ between groups

    def curve(self, value: Callable[[dict[str, Any]], float | None]) -> dict[int, list[float]]:
        """round -> `value(row)` of each seed's row of that round (seeds where it is not None)."""
        out: dict[int, list[float]] = {}
        for rows in self.runs.values():
            for row in rows:
                if (v := value(row)) is not None:
                    out.setdefault(int(row["round"]), []).append(float(v))
        return dict(sorted(out.items()))

    def final(self, seed: int) -> float | None:
        acc = [r["test_accuracy"] for r in self.runs[seed] if r.get("test_accuracy") is not None]
        return acc[-1] if acc else None

    def best_of_last_3(self, seed: int) -> float | None:
        acc = [r["test_accuracy"] for r in self.runs[seed] if r.get("test_accuracy") is not None]
        return max(acc[-3:]) if acc else None

    def elapsed(self, seed: int) -> list[tuple[float, float]]:
        """(wall seconds so far, test accuracy) after each evaluated round of one seed: the rounds'
        `seconds` added up from the initial evaluation (round 0) on; [] if a round lacks them."""
        out, clock = [], 0.0
        for row in sorted(self.runs[seed], key=lambda r: int(r["round"])):
            if row.get("seconds") is None:
                return []
            clock += float(row["seconds"])
            if row.get("test_accuracy") is not None:
                out.append((clock, float(row["test_accuracy"])))
        return out

    def time_to(self, seed: int, accuracy: float) -> float | None:
        """Wall seconds until the first evaluation at or above `accuracy` (None: never reached)."""
        return next((t for t, acc in self.elapsed(seed) if acc >= accuracy), None)

    def epsilon(self, seed: int) -> float | None:
        eps = [r["epsilon_max"] for r in self.runs[seed] if r.get("epsilon_max") is not None]
        return eps[-1] if eps else None


def _run_folders(folder: Path) -> list[Path]:
    if (folder / "metrics.jsonl").exists():
        return [folder]
    return sorted(p for p in folder.iterdir() if (p / "metrics.jsonl").exists() and (p / "run_config.json").exists())


def load_groups(folder: Path) -> list[Group]:
    """The finished runs under `folder` (or `folder` itself, a run), grouped by setting."""
    runs = []
    for path in _run_folders(Path(folder)):
        status = read_status(path)
        if status is not None and not status.finished:
            continue  # running or failed: its numbers are not final
        runs.append((_settings(json.loads((path / "run_config.json").read_text())), read_rows(path)))
    if not runs:
        raise ValueError(f"{folder}: no finished run (a folder with metrics.jsonl and run_config.json)")
    keys = set().union(*(cfg for cfg, _ in runs)) - _NOT_A_SETTING
    varying = sorted(k for k in keys if _varies(k, [cfg for cfg, _ in runs]))
    # A label names what varies among the runs that have the setting: not a non-private run's
    # absent DP keys, nor the DP keys every private run shares (accountant=prv, ...).
    shown = [k for k in varying if _varies(k, [cfg for cfg, _ in runs if k in cfg])]
    groups: dict[str, Group] = {}
    for cfg, rows in runs:
        label = ", ".join(f"{k}={cfg[k]}" for k in shown if k in cfg) or str(cfg.get("strategy", "run"))
        group = groups.setdefault(label, Group(label, {}, bool(cfg.get("dp")), {k: cfg.get(k) for k in varying}))
        group.runs[int(cfg.get("seed", 0))] = rows
    return list(groups.values())


def _settings(cfg: dict[str, Any]) -> dict[str, Any]:
    """A run's config as settings to compare: without the DP keys of a non-private run."""
    return cfg if cfg.get("dp") else {k: v for k, v in cfg.items() if k not in _DP_ONLY}


def _strategy_defaults(settings: dict[str, Any]) -> dict[str, Any]:
    from fedlora.strategies import method_class

    try:
        return method_class(str(settings.get("strategy"))).defaults
    except ValueError:  # no strategy among the settings (it does not vary), or an unknown one
        return {}


def _same(key: str, a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Do two runs' settings agree on `key`? Equal values do, and so do two values that are each
    their own strategy's default: learning-rate = "auto" gives 1.0 for FedSVD and 0.3 for FedIT, so
    those two runs differ in strategy only, while FedSVD and FedIT both at 1.0 differ in nothing else
    either."""
    if a.get(key) == b.get(key):
        return True
    da, db = _strategy_defaults(a), _strategy_defaults(b)
    return key in da and key in db and a.get(key) == da[key] and b.get(key) == db[key]


def _varies(key: str, configs: list[dict[str, Any]]) -> bool:
    return any(not _same(key, a, b) for a, b in itertools.combinations(configs, 2))


def paired_difference(a: list[float], b: list[float]) -> tuple[float, float | None, float | None]:
    """Mean of the paired differences a_i - b_i and its 95 % t interval (None with one pair)."""
    diffs = [x - y for x, y in zip(a, b, strict=True)]
    mean = statistics.fmean(diffs)
    if len(diffs) < 2:
        return mean, None, None
    from scipy.stats import t

    half = t.ppf(0.975, len(diffs) - 1) * statistics.stdev(diffs) / math.sqrt(len(diffs))
    return mean, mean - half, mean + half


def _mean_std(values: list[float | None]) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "–"
    return f"{statistics.fmean(values):.3f} ± {statistics.stdev(values):.3f}" if len(values) > 1 else f"{values[0]:.3f}"


def _differences(a: Group, b: Group) -> set[str]:
    """The settings in which two groups differ; a private and a non-private run differ in `dp` only."""
    keys = {k for k in {*a.settings, *b.settings} if not _same(k, a.settings, b.settings)}
    return keys - _DP_ONLY if "dp" in keys else keys


def _time_table(groups: list[Group], thresholds: Sequence[float]) -> str:
    head = " | ".join(f"to {a:g}" for a in thresholds)
    lines = ["", "Wall time to reach a test accuracy (seconds from the initial evaluation on, start-up not "
             "counted; mean over the seeds that reached it, how many of the group's seeds did):", "",
             f"| group | {head} |", "|---|" + "---|" * len(thresholds)]
    for g in groups:
        cells = []
        for a in thresholds:
            times = [t for s in sorted(g.runs) if (t := g.time_to(s, a)) is not None]
            cells.append(f"{statistics.fmean(times):.0f} s ({len(times)}/{len(g.runs)})" if times
                         else f"not reached (0/{len(g.runs)})")
        lines.append(f"| {g.label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _table(groups: list[Group]) -> str:
    lines = ["| group | seeds | final accuracy | best of last 3 | ε spent (max) |", "|---|---|---|---|---|"]
    for g in groups:
        seeds = sorted(g.runs)
        eps = [g.epsilon(s) for s in seeds]
        lines.append(f"| {g.label} | {len(seeds)} | {_mean_std([g.final(s) for s in seeds])} | "
                     f"{_mean_std([g.best_of_last_3(s) for s in seeds])} | "
                     f"{_mean_std(eps) if g.dp else 'not private'} |")
    if len(groups) > 1:
        lines += ["", "Paired by seed, final test accuracy (A − B), between groups that differ in one setting:", "",
                  "| A | B | seeds | mean difference | 95 % interval | claim |", "|---|---|---|---|---|---|"]
        for a, b in itertools.combinations(groups, 2):
            if len(_differences(a, b)) != 1:
                continue  # two things changed: the difference would not say which one matters
            seeds = sorted(s for s in set(a.runs) & set(b.runs) if a.final(s) is not None and b.final(s) is not None)
            if not seeds:
                lines.append(f"| {a.label} | {b.label} | 0 | – | – | no shared seed |")
                continue
            mean, low, high = paired_difference([a.final(s) for s in seeds], [b.final(s) for s in seeds])
            if low is None:
                interval, claim = "–", "one seed: no interval"
            else:
                interval = f"[{low:+.3f}, {high:+.3f}]"
                claim = "A better" if low > 0 else "B better" if high < 0 else "no difference shown"
            lines.append(f"| {a.label} | {b.label} | {len(seeds)} | {mean:+.3f} | {interval} | {claim} |")
    return "\n".join(lines) + "\n"


def _plot(groups: list[Group], value: Callable[[dict[str, Any]], float | None], ylabel: str, title: str, path: Path,
          *, band: bool) -> None:
    with _figure(path, "round", ylabel, title) as ax:
        for g in groups:
            curve = g.curve(value)
            if not curve:
                continue
            rounds = list(curve)
            means = [statistics.fmean(v) for v in curve.values()]
            (line,) = ax.plot(rounds, means, marker="o", label=f"{g.label} ({len(g.runs)} seeds)")
            if band and any(len(v) > 1 for v in curve.values()):
                ax.fill_between(rounds, [min(v) for v in curve.values()], [max(v) for v in curve.values()],
                                color=line.get_color(), alpha=0.2)


@contextmanager
def _figure(path: Path, xlabel: str, ylabel: str, title: str) -> Iterator[Any]:
    """One report plot: the axes to draw on, then labelled and saved as a 770×462 PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    yield ax
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_time(groups: list[Group], path: Path) -> None:
    """Accuracy against wall time: per group, the seeds' mean time and mean accuracy after each
    evaluation (only the evaluations every seed of the group has)."""
    with _figure(path, "wall time (minutes, start-up not counted)", "test accuracy",
                 "Test accuracy against wall time (mean over seeds)") as ax:
        for g in groups:
            curves = [c for s in sorted(g.runs) if (c := g.elapsed(s))]
            if not curves:
                continue
            points = list(zip(*curves))  # the i-th evaluation of every seed
            ax.plot([statistics.fmean(t for t, _ in p) / 60 for p in points],
                    [statistics.fmean(a for _, a in p) for p in points], marker="o",
                    label=f"{g.label} ({len(curves)} seeds)")


def _bytes(row: dict[str, Any]) -> float | None:
    if "bytes_up" not in row and "bytes_down" not in row:
        return None
    return row.get("bytes_up", 0) + row.get("bytes_down", 0)


def write_report(folder: Path, out: Path | None = None, time_to: Sequence[float] = ()) -> Path:
    """The plots and report.md for `folder` (with wall times to the accuracies in `time_to`);
    returns the report folder."""
    groups = load_groups(folder)
    out = Path(out) if out else Path(folder) / "report"
    out.mkdir(parents=True, exist_ok=True)
    _plot(groups, lambda r: r.get("test_accuracy"), "test accuracy",
          "Test accuracy per round (mean over seeds, band: min–max)", out / "accuracy.png", band=True)
    if any(g.dp for g in groups):
        _plot(groups, lambda r: r.get("epsilon_max"), "ε spent (largest client)", "Privacy spent per round",
              out / "epsilon.png", band=True)
    _plot(groups, _bytes, "bytes per round (up + down)", "Communication per round", out / "bytes.png", band=False)
    if any(g.elapsed(s) for g in groups for s in g.runs):  # the rounds' seconds are in the metrics
        _plot_time(groups, out / "accuracy-time.png")
    table = _table(groups) + (_time_table(groups, time_to) if time_to else "")
    (out / "report.md").write_text(f"# Report: {Path(folder).resolve().name}\n\n{table}")
    return out


def _report(args: argparse.Namespace) -> int:
    try:
        out = write_report(args.folder, args.out, args.time_to)
    except (OSError, ValueError) as exc:
        print(f"fedlora: error: {exc}", file=sys.stderr)
        return 2
    print((out / "report.md").read_text())
    print(f"fedlora report: plots and report.md in {out}")
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    report = sub.add_parser("report", help="plots and a comparison table of a sweep's runs (or of one run)")
    report.add_argument("folder", type=Path, help="a sweep's output-dir, or one run's output-dir")
    report.add_argument("--out", type=Path, help="where to write (default: FOLDER/report)")
    report.add_argument("--time-to", type=_accuracies, default=(), metavar="ACC,ACC,...",
                        help="also tabulate the wall time to reach these test accuracies, e.g. 0.6,0.65,0.7")
    report.set_defaults(handler=_report)


def _accuracies(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected accuracies separated by commas, e.g. 0.6,0.65,0.7") from None
    if not all(0 < v <= 1 for v in values):
        raise argparse.ArgumentTypeError(f"{text!r}: an accuracy is in (0, 1]")
    return values
