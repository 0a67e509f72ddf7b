"""Class shares of the server's test split of the default job, per seed: what a model that
predicts one class for every row scores (the floor the comparison runs are read against).

    python benchmarks/test_split.py [--seeds 0,1]

Writes benchmarks/results/test-split.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
from pathlib import Path

import numpy as np

from fedlora.core.config import RunConfig
from fedlora.core.data import data_report, split_test

RESULTS = Path(__file__).resolve().parent / "results"


def shares(seed: int) -> dict[str, float]:
    """Each class's share of the `test-size` rows that `seed` draws (the default job's config)."""
    test = split_test(RunConfig(seed=seed))
    counts = np.bincount(test.labels, minlength=len(test.label_names))
    return {name: float(c / len(test)) for name, c in zip(test.label_names, counts)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", default="0,1", help="comma-separated seeds (default: 0,1)")
    seeds = [int(s) for s in parser.parse_args().seeds.split(",")]
    by_seed = {str(seed): shares(seed) for seed in seeds}
    report = data_report(RunConfig())
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "test-split.json").write_text(json.dumps({
        "what": "class shares of the server's test split (test-size 2000) of the default job, by seed",
        "date": dt.date.today().isoformat(), "dataset": report.summary(), "shares": by_seed}, indent=2) + "\n")
    names = list(next(iter(by_seed.values())))
    print("| seed | " + " | ".join(names) + " |")
    print("|---|" + "---:|" * len(names))
    for seed, row in by_seed.items():
        print(f"| {seed} | " + " | ".join(f"{row[n]:.4f}" for n in names) + " |")


if __name__ == "__main__":
    main()
