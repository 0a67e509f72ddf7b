"""Real comparisons of the strategies on the default job (MiniLM, tweets, Dirichlet α = 0.5),
run as resumable sweeps (`fedlora.simulations.sweep`): start the same command again after an
interruption and finished runs are skipped.

    python benchmarks/compare.py strategies               # every strategy, non-private, seed 0
    python benchmarks/compare.py privacy --seeds 0,1      # FedSVD, FFA-LoRA, FedIT under DP at ε = 3 and 6

Both: 10 rounds, 5 of 10 clients per round.

Runs go to outputs/compare-<preset>/ (git-ignored, so never packed into the Flower app);
the summary to benchmarks/results/compare-<preset>.json, a plot next to it, and a markdown table
to stdout for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from pathlib import Path

from aggregation import machine_info  # benchmarks/aggregation.py

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


# The seeds' claim (FedSVD paper): under DP-SGD, FedSVD's B-only training with an orthonormal A
# loses less than FFA-LoRA (B-only, fixed random A) and FedIT (A and B, noise in both factors).
PRIVATE = ["fedsvd", "ffa", "fedit"]
EPSILONS = [3.0, 6.0]


def privacy_preset(seeds: list[int]) -> list[SweepRun]:
    """FedSVD vs FFA-LoRA vs FedIT under DP-SGD at each ε (δ = 1e-5, each client's budget planned for
    all 10 rounds), every strategy at its default learning rate."""
    return [SweepRun(f"{name}-eps{eps:g}-seed{seed}", {**COMMON, "strategy": name, "seed": seed, "dp": True,
                                                        "target-epsilon": eps})
            for seed in seeds for eps in EPSILONS for name in PRIVATE]


PRESETS = {"strategies": strategies_preset, "privacy": privacy_preset}


def _budget(row: dict) -> str:
    return f"ε = {row['target_epsilon']:g}" if row["dp"] else "non-private"


def _plot(rows: list[dict], path: Path, title: str) -> None:
    """Test accuracy per round, one panel per privacy budget."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    budgets = sorted({_budget(r) for r in rows})
    seeds = sorted({r["seed"] for r in rows})
    colors = plt.get_cmap("tab10").colors  # one colour per strategy, one line style per seed
    fig, axes = plt.subplots(1, len(budgets), figsize=(6.5 * len(budgets), 4), sharey=True, squeeze=False)
    for ax, budget in zip(axes[0], budgets):
        for row in (r for r in rows if _budget(r) == budget):
            ax.plot(row["evaluated_rounds"], row["accuracy_by_round"], marker="o", ms=3, label=row["run"],
                    color=colors[ORDER.index(row["strategy"]) % len(colors)],
                    linestyle=("-", "--", ":", "-.")[seeds.index(row["seed"]) % 4])
        ax.set(xlabel="round", title=budget)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
    axes[0][0].set_ylabel("test accuracy")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


LAST = 3  # with half the clients per round the last round alone swings by points: also average the last rounds


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def mean_table(rows: list[dict]) -> str:
    """Test accuracy per strategy and budget over seeds: the final round's and the mean of the last
    LAST evaluated rounds (mean over seeds, then each seed's), and the ε each run spent."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for row in rows:
        groups.setdefault((row["strategy"], _budget(row)), []).append(row)
    out = [f"| strategy | budget | seeds | final acc: mean (per seed) | last {LAST} rounds: mean (per seed) "
           "| ε spent, max over clients (per seed) |",
           "|---|---|---:|---|---|---|"]
    for (strategy, budget), group in sorted(groups.items(), key=lambda kv: (kv[0][1], ORDER.index(kv[0][0]))):
        final = [r["final_accuracy"] for r in group]
        last = [_mean(r["accuracy_by_round"][-LAST:]) for r in group]
        spent = ", ".join(f"{r['epsilon_max']:.2f}" for r in group) if group[0]["dp"] else ""
        out.append(f"| {strategy} | {budget} | {len(group)} | {_mean(final):.3f} ({', '.join(f'{a:.3f}' for a in final)}) "
                   f"| {_mean(last):.3f} ({', '.join(f'{a:.3f}' for a in last)}) | {spent} |")
    return "\n".join(out)


def summary(rows: list[dict]) -> dict:
    """The summary file: the machine that writes it (a resumed sweep's earlier runs may have run on
    another), the date, the shared settings and the runs."""
    return {"machine": machine_info(), "date": dt.date.today().isoformat(), "settings": COMMON, "runs": rows}


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
    (results / f"compare-{args.preset}.json").write_text(json.dumps(summary(rows), indent=2) + "\n")
    if rows:
        _plot(rows, results / f"compare-{args.preset}.png", f"{args.preset}: test accuracy per round")
    print("| run | strategy | lr | budget | final acc | best acc | personalised acc | MB up | MB down | wall |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        pers = f"{r['personalized_accuracy']:.3f}" if "personalized_accuracy" in r else ""
        print(f"| {r['run']} | {r['strategy']} | {r['learning_rate']} | {_budget(r)} | {r['final_accuracy']:.3f} | "
              f"{r['best_accuracy']:.3f} | {pers} | {r['bytes_up'] / 1e6:.1f} | {r['bytes_down'] / 1e6:.1f} | "
              f"{r['seconds'] / 60:.1f} min |")
    if rows:
        print("\n" + mean_table(rows))
    missing = len(runs) - len(rows)
    if missing:
        print(f"\n{missing} of {len(runs)} runs not finished yet", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
