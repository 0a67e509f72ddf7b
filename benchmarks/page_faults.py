"""Why the weighted sum of the B's was slow at 8192×16: page faults of float64 temporaries.

    python benchmarks/page_faults.py

Times Σ p_k u_k over 10 float32 m×r tensors, accumulated in float64, two ways: the way
`weighted_average` did it before issue 12 (`acc += w * u.to(float64)`: two float64 temporaries per
client) and the way it does now (`acc.add_(u, alpha=w)`: none), with the minor page faults each call
takes (`getrusage`). 2 torch threads, 100 calls after 5 untimed. Writes
benchmarks/results/page-faults.json.
"""

from __future__ import annotations

import datetime as dt
import json
import resource
import time
from pathlib import Path

import torch

from aggregation import machine_info  # benchmarks/aggregation.py

RESULTS = Path(__file__).resolve().parent / "results"


def before(updates: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    acc = torch.zeros(updates[0].shape, dtype=torch.float64)
    for w, u in zip(weights, updates):
        acc += w * u.to(torch.float64)
    return acc.float()


def now(updates: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    acc = torch.zeros(updates[0].shape, dtype=torch.float64)
    for w, u in zip(weights, updates):
        acc.add_(u, alpha=w)
    return acc.float()


def main() -> None:
    torch.set_num_threads(2)
    rows = []
    for m, r in ((4096, 16), (8192, 8), (8192, 16)):
        updates, weights = [torch.randn(m, r) for _ in range(10)], [0.1] * 10
        for name, fn in (("before", before), ("now", now)):
            for _ in range(5):
                fn(updates, weights)
            faults, t0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.perf_counter()
            for _ in range(100):
                fn(updates, weights)
            rows.append({"m": m, "r": r, "K": 10, "way": name, "ms": (time.perf_counter() - t0) * 10,
                         "minor_faults_per_call": (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / 100})
            print(rows[-1])
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "page-faults.json").write_text(json.dumps({
        "benchmark": "weighted-sum-page-faults", "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": "python benchmarks/page_faults.py", "machine": machine_info(), "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
