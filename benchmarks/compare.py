"""Real comparisons of the strategies on the default job (MiniLM, tweets, Dirichlet α = 0.5),
run as resumable sweeps (`fedlora.simulations.sweep`): start the same command again after an
interruption and finished runs are skipped.

    python benchmarks/compare.py strategies   # every strategy, non-private, 10 rounds, 5 of 10 clients

Runs go to outputs/compare-<preset>/ (git-ignored, so never packed into the Flower app);
the summary to benchmarks/results/compare-<preset>.json, a plot next to it, and a markdown table
to stdout for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import sys
from pathlib import Path

from fedlora.simulations.sweep import SweepRun, run_sweep, summarize
from fedlora.strategies import available_strategies

REPO = Path(__file__).resolve().parents[1]
COMMON = {"num-server-rounds": 10, "clients-per-round": 5}


# The seeds' two methods and their closest baselines first: a sweep cut short still compares them.
ORDER = ["fedsvd", "lorafair", "ffa", "fedit", "fedex", "flexlora", "flora", "fedsa"]


def strategies_preset(seeds: list[int]) -> list[SweepRun]:
    """Every strategy at its default learning rate, same data, same clients per round, non-private."""
    names = ORDER + sorted(set(available_strategies()) - set(ORDER))
    return [SweepRun(f"{name}-seed{seed}", {**COMMON, "strategy": name, "seed": seed, "dp": False})
            for seed in seeds for name in names]


PRESETS = {"strategies": strategies_preset}


def _plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for row in rows:
        ax.plot(range(len(row["accuracy_by_round"])), row["accuracy_by_round"], marker="o", ms=3, label=row["run"])
    ax.set(xlabel="round", ylabel="test accuracy", title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("preset", choices=sorted(PRESETS))
    parser.add_argument("--seeds", default="0", help="comma-separated seeds (default: 0)")
    parser.add_argument("--root", help="folder of the runs (default: outputs/compare-<preset>)")
    parser.add_argument("--report-only", action="store_true", help="summarise what has finished; run nothing")
    args = parser.parse_args()
    root = Path(args.root) if args.root else REPO / "outputs" / f"compare-{args.preset}"
    runs = PRESETS[args.preset]([int(s) for s in args.seeds.split(",")])
    if not args.report_only:
        run_sweep(REPO, runs, root)
    rows = [r for r in summarize(root) if r["run"] in {run.name for run in runs}]
    results = REPO / "benchmarks" / "results"
    (results / f"compare-{args.preset}.json").write_text(json.dumps({
        "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}, 2-core VM, no GPU",
        "date": dt.date.today().isoformat(), "settings": COMMON, "runs": rows}, indent=2) + "\n")
    if rows:
        _plot(rows, results / f"compare-{args.preset}.png", f"{args.preset}: test accuracy per round")
    print("| run | strategy | lr | final acc | best acc | personalised acc | MB up | MB down | wall |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        pers = f"{r['personalized_accuracy']:.3f}" if "personalized_accuracy" in r else ""
        print(f"| {r['run']} | {r['strategy']} | {r['learning_rate']} | {r['final_accuracy']:.3f} | "
              f"{r['best_accuracy']:.3f} | {pers} | {r['bytes_up'] / 1e6:.1f} | {r['bytes_down'] / 1e6:.1f} | "
              f"{r['seconds'] / 60:.1f} min |")
    missing = len(runs) - len(rows)
    if missing:
        print(f"\n{missing} of {len(runs)} runs not finished yet", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
