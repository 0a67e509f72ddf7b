"""LoRA-FAIR's server step: the Gram-form solver against the dense one, same steps, same optimizer.

For one layer with m = n ∈ {1024, 4096}, r ∈ {8, 16}, K ∈ {3, 10} clients (float64, 2 threads):

  gram   `FairProblem.build` (r×r and m×r matrices only) + `fair_correction` for STEPS Adam steps;
  dense  ΔW = Σ p_k B_k A_k formed as an m×n matrix, then the same Adam schedule on ΔB with the loss
         1 − cos(ΔW, (B̄+ΔB)Ā) + λ‖ΔB‖²/‖B̄‖² evaluated on m×n matrices and differentiated by autograd.

Each solver runs in a fresh process so that its peak resident memory (ru_maxrss above the inputs)
is its own. Target (issue 4): ≥ 100× at 4096², r = 16, K = 10, and peak memory far below one m×n
matrix (4096² float64 = 128 MiB).

    python benchmarks/lorafair.py [--quick] [--steps 50] [--out benchmarks/results/lorafair.json]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import resource
import sys
import time
from pathlib import Path

import torch

from aggregation import in_fresh_process, log, machine_info  # benchmarks/aggregation.py

from fedlora.strategies import normalized_weights
from fedlora.strategies.lorafair import FairProblem, fair_correction

LAM, LR = 0.01, 0.05
TARGET = {"m": 4096, "r": 16, "K": 10, "speedup": 100.0}


def _inputs(m: int, r: int, k: int):
    g = torch.Generator().manual_seed(0)
    a0 = torch.randn(r, m, generator=g, dtype=torch.float64) / m**0.5
    bs = [1e-2 * torch.randn(m, r, generator=g, dtype=torch.float64) for _ in range(k)]
    as_ = [a0 + 0.3 * torch.randn(r, m, generator=g, dtype=torch.float64) / m**0.5 for _ in range(k)]
    return bs, as_, normalized_weights(list(range(100, 100 + 37 * k, 37)))


def dense_solver(bs, as_, w, steps: int) -> torch.Tensor:
    """The textbook implementation: everything on m×n matrices, gradients by autograd."""
    dw = sum(p * b @ a for p, b, a in zip(w, bs, as_))
    b_bar = sum(p * b for p, b in zip(w, bs))
    a_bar = sum(p * a for p, a in zip(w, as_))
    rms = float(b_bar.pow(2).mean().sqrt())
    x = torch.zeros_like(b_bar, requires_grad=True)
    opt = torch.optim.Adam([x], lr=LR)
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.01 ** (1.0 / steps))
    for _ in range(steps):
        delta = rms * x
        prod = (b_bar + delta) @ a_bar
        loss = 1 - (prod * dw).sum() / (prod.norm() * dw.norm()) + LAM * (delta * delta).sum() / b_bar.pow(2).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return b_bar + rms * x.detach()


def fair_problem(bs, as_, w) -> FairProblem:
    """The one-layer problem that `lorafair` builds from these clients' factors."""
    return FairProblem.build([{"l.lora_A": a, "l.lora_B": b} for b, a in zip(bs, as_)], "l", w)


def gram_solver(bs, as_, w, steps: int) -> torch.Tensor:
    """What `lorafair` runs (Gram form), without early stopping so both solvers take `steps` steps."""
    problem = fair_problem(bs, as_, w)
    return problem.b_bar + fair_correction(problem, LAM, steps, LR, tol=float("-inf"))


def _child(kind: str, m: int, r: int, k: int, steps: int, queue) -> None:
    torch.set_num_threads(2)
    solver = gram_solver if kind == "gram" else dense_solver
    solver(*_inputs(64, r, k), steps)  # warm-up: first-call costs (imports, kernels) are not the solver's
    bs, as_, w = _inputs(m, r, k)
    base_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    b_new = solver(bs, as_, w, steps)
    seconds = time.perf_counter() - t0
    peak_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base_kib) / 1024
    problem = fair_problem(bs, as_, w)
    queue.put({"seconds": seconds, "peak_extra_mib": peak_mib,
               "cos_before": problem.cosine(problem.b_bar), "cos_after": problem.cosine(b_new)})


def run(kind: str, m: int, r: int, k: int, steps: int) -> dict:
    return in_fresh_process(_child, kind, m, r, k, steps)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="only m = n = 1024")
    parser.add_argument("--steps", type=int, default=50, help="solver steps for both (default 50)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/lorafair.json"))
    args = parser.parse_args(argv)
    sizes = [1024] if args.quick else [1024, 4096]
    rows = []
    for m in sizes:
        for r in (8, 16):
            for k in (3, 10):
                row = {"m": m, "n": m, "r": r, "K": k, "steps": args.steps}
                for kind in ("gram", "dense"):
                    log(f"[{m}² r={r} K={k}] {kind} ...")
                    row[kind] = run(kind, m, r, k, args.steps)
                row["speedup"] = row["dense"]["seconds"] / row["gram"]["seconds"]
                row["dense_matrix_mib"] = m * m * 8 / 2**20
                rows.append(row)
                log(f"    gram {row['gram']['seconds']*1e3:.1f} ms, dense {row['dense']['seconds']*1e3:.0f} ms, "
                    f"{row['speedup']:.0f}×")
    print("| m = n | r | K | Gram form (ms) | dense (ms) | speed-up | Gram peak extra (MiB) | dense peak extra (MiB) "
          "| one m×n (MiB) | cos FedIT → FAIR (Gram / dense) |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for x in rows:
        print(f"| {x['m']} | {x['r']} | {x['K']} | {x['gram']['seconds']*1e3:.1f} | {x['dense']['seconds']*1e3:.0f} "
              f"| {x['speedup']:,.0f}× | {x['gram']['peak_extra_mib']:.1f} | {x['dense']['peak_extra_mib']:.0f} "
              f"| {x['dense_matrix_mib']:.0f} | {x['gram']['cos_before']:.4f} → {x['gram']['cos_after']:.4f} / "
              f"{x['dense']['cos_after']:.4f} |")
    target = next((x for x in rows if (x["m"], x["r"], x["K"]) == (TARGET["m"], TARGET["r"], TARGET["K"])), None)
    if target:
        print(f"\n- speed-up at 4096², r=16, K=10: {target['speedup']:,.0f}× (target ≥ 100×): "
              f"{'met' if target['speedup'] >= TARGET['speedup'] else 'NOT met'}; Gram peak extra "
              f"{target['gram']['peak_extra_mib']:.1f} MiB vs one m×n matrix {target['dense_matrix_mib']:.0f} MiB")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "benchmark": "lorafair-server-step", "command": " ".join(["python", *sys.argv]),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "machine": machine_info(),
        "settings": {"lambda": LAM, "lr": LR, "dtype": "float64", "threads": 2}, "rows": rows}, indent=2) + "\n")
    log(f"wrote {args.out}")


if __name__ == "__main__":
    main()
