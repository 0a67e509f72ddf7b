"""Time and peak memory of one server step (`method.aggregate`) per LoRA layer, for every strategy.

For one m×n layer (m = n ∈ {1024, 4096, 8192}), ranks r ∈ {8, 16}, K ∈ {3, 10} clients of unequal
size, float32 client tensors (the methods compute in float64 where they say so), 2 CPU threads:

  steps     one `aggregate` of every strategy in `available_strategies()` on a fresh method
            (round 1: FedEx-LoRA and FLoRA start with no folded base-weight change D);
  folded    FedEx-LoRA and FLoRA at r = 16, K = 10 once D exists: factored at the largest rank that
            is still factored (the costliest factored step: the re-compression of D right before it
            turns dense, `dense_is_cheaper`) and dense;
  fedsvd    the FedSVD step in round 1 (peft's Kaiming A) and in later rounds (A orthonormal, the
            previous round's Vᵀ) against a plain float32 weighted sum of the B's (one in-place
            `add_` per client), alone and as it runs inside a later step (after an untimed
            re-factorisation, whose temporaries evict the clients' B's from cache), against
            `weighted_average` (the sum every B-only method pays, with its input checks), against
            `refactorize` alone in both routes, and against the naive dense `torch.linalg.svd` of the
            m×n product that the official code runs (K = 10);
  lorafair  LoRA-FAIR's Gram-form solver against the dense one of benchmarks/lorafair.py (ΔW formed
            as an m×n matrix, autograd), the same Adam schedule for the same 50 steps, float64.

Every measurement runs in a fresh process (forked from a server that has imported torch) after a
warm-up at m = 64, so that first-call costs (LAPACK set-up) are not counted. Memory: "peak extra" is
how far the process's peak resident set (VmHWM, reset through /proc/self/clear_refs just before the
call) rises above its resident set just before the call, over the first call at full size: what the
step touches beyond its inputs (temporaries and outputs). torch's CPU allocator does not cache, so
freed tensors go back to malloc; at most the few MiB malloc keeps from the warm-up can hide.
Times are medians of repeats after that first call (which doubles as the warm-up); a call that takes
more than 1 s runs 3 times in all, the first included, and one that takes more than 10 s only once.
The dense references at 8192² run at r = 16, K = 10 only.

Targets: FedSVD at 4096², r = 16, K = 10: naive / FedSVD ≥ 1000×, FedSVD − floor ≤ 2 ms, and a
later round's FedSVD step within 4× of the plain float32 sum; LoRA-FAIR at 4096², r = 16, K = 10:
dense / Gram ≥ 100× and the Gram form's peak far below one m×n matrix.

    python benchmarks/aggregation.py [--quick] [--out benchmarks/results/aggregation.json]

`--quick` runs m = n = 1024 only. The markdown tables go to stdout, progress to stderr, all numbers
(with machine info and load averages) to --out.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import multiprocessing as mp
import os
import platform
import queue as queue_module
import re
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import torch

from fedlora.strategies import available_strategies, get_method, normalized_weights, refactorize, weighted_average
from fedlora.strategies.lowrank import dense_is_cheaper

__all__ = ["cpu_model", "in_fresh_process", "log", "machine_info", "time_ms"]

THREADS = 2
SIZES = (1024, 4096, 8192)
RANKS = (8, 16)
CLIENTS = (3, 10)
BIG = 8192  # from this size on: dense references at (r, K) = FULL only
FULL = (16, 10)  # (r, K) of the targets and of the one-off runs
FAIR_STEPS = 50
ALPHA = 16.0
LAYER = "layer"
SLOW_MS = 1_000.0  # a first call slower than this: 3 calls in all, the first included
VERY_SLOW_MS = 10_000.0  # slower than this: that first call is the only one
TARGET_FEDSVD = {"m": 4096, "r": 16, "speedup": 1000.0, "overhead_ms": 2.0, "ratio_to_float32_sum": 4.0}
TARGET_FAIR = {"m": 4096, "r": 16, "K": 10, "speedup": 100.0}
#: columns a round folds into D at rank r with K clients: FedEx the K B_k A_k and −B̄Ā, FLoRA the K products
FOLDED_COLUMNS = {"fedex": lambda r, k: (k + 1) * r, "flora": lambda r, k: k * r}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return platform.processor() or "unknown"


def machine_info() -> dict[str, object]:
    """The machine this process runs on and its software, for every benchmark's results file (the
    thread count each script sets is a setting and goes with its settings)."""
    try:
        memory_gib = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (AttributeError, ValueError, OSError):  # no POSIX sysconf
        memory_gib = None
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count() if torch.cuda.is_available() else 0)]
    info: dict[str, object] = {
        "cpu_model": cpu_model(),
        "processor": platform.processor(),
        "cpu_count": os.cpu_count(),
        "memory_gib": memory_gib,
        "gpu": ", ".join(gpus) or "no GPU",
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "loadavg_1_5_15_at_start": list(os.getloadavg()),
    }
    info["description"] = f"{info['cpu_model']}, {info['cpu_count']} cores, {memory_gib} GiB RAM, {info['gpu']}"
    return info


def time_ms(fn: Callable[[], object], *, warmup: int, min_repeats: int, max_repeats: int, budget_s: float,
            before: Callable[[], object] | None = None) -> dict:
    """Median wall time of `fn` in ms: `warmup` untimed calls, then repeats until both
    `min_repeats` and (`max_repeats` or `budget_s`) are reached; `before`, if given, runs untimed
    ahead of every call."""
    for _ in range(warmup):
        fn()
    samples: list[float] = []
    start = time.perf_counter()
    while len(samples) < max_repeats and (len(samples) < min_repeats or time.perf_counter() - start < budget_s):
        if before is not None:
            before()
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e3)
    return {"median_ms": statistics.median(samples), "min_ms": min(samples), "repeats": len(samples)}


# --------------------------------------------------------------------------------------------------
# inputs: one layer, K clients


def make_inputs(m: int, r: int, k: int, seed: int = 0):
    """A one-layer global state (peft's Kaiming A, B = 0), every client's trained A_k and B_k (LoRA-sized),
    and unequal weights p_k. float32."""
    g = torch.Generator().manual_seed(seed)
    a = torch.empty(r, m)
    torch.nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=g)
    state = {f"{LAYER}.lora_A": a, f"{LAYER}.lora_B": torch.zeros(m, r)}
    clients = [{f"{LAYER}.lora_A": a + 0.3 * torch.randn(r, m, generator=g) / math.sqrt(m),
                f"{LAYER}.lora_B": 1e-2 * torch.randn(m, r, generator=g)} for _ in range(k)]
    weights = normalized_weights(torch.randint(50, 500, (k,), generator=g).tolist())
    return state, clients, weights


def uplinks(method, state, clients) -> list[dict[str, torch.Tensor]]:
    """What each client sends under `method` (B-only methods: B alone; FedSA: A alone)."""
    return [{key: c[key] for key in method.uplink_keys(state)} for c in clients]


def largest_factored_rank(m: int, columns: int) -> int | None:
    """The largest rank of an m×m D that is still re-compressed when `columns` more arrive (None:
    at this size D is dense from the first round on)."""
    return next((q for q in range(m, -1, -1) if not dense_is_cheaper(m, m, q, columns)), None)


def folded_state(m: int, form: str, columns: int) -> dict[str, Any]:
    """A FedEx-LoRA / FLoRA `state_dict` whose layer already has a base-weight change D: `factored`
    at the largest rank q that BaseDelta still re-compresses when `columns` more arrive, or `dense`."""
    g = torch.Generator().manual_seed(1)
    q = largest_factored_rank(m, columns)
    if q is None:  # no factored form at this size; a dense D of any rank will do
        assert form == "dense", f"D is never factored at {m}×{m} with {columns} new columns"
        q = 1
    u = torch.randn(m, q, generator=g, dtype=torch.float64) * 1e-3
    v = torch.randn(q, m, generator=g, dtype=torch.float64)
    delta = {"shape": (m, m), "U": u, "V": v, "dense": None}
    if form == "dense":
        delta = {"shape": (m, m), "U": u[:, :0], "V": v[:0], "dense": u @ v}
    return {"deltas": {LAYER: delta}, "rounds": 1}


# --------------------------------------------------------------------------------------------------
# the measured calls: each `setup` builds its inputs and returns the call to measure


class Task(NamedTuple):
    kind: str  # a key of SETUPS
    m: int
    r: int
    k: int
    option: str = ""  # the strategy ("step"), or "<strategy>:<form of D>" ("folded")


def _setup_step(task: Task) -> Callable[[], object]:
    """One `aggregate` on a fresh method (so repeats do the same work: FedEx and FLoRA keep state)."""
    state, clients, weights = make_inputs(task.m, task.r, task.k)
    updates = uplinks(get_method(task.option), state, clients)
    return lambda: get_method(task.option, {"lora-alpha": ALPHA}).aggregate(state, updates, weights)


def _setup_folded(task: Task) -> Callable[[], object]:
    name, form = task.option.split(":")
    state, clients, weights = make_inputs(task.m, task.r, task.k)
    updates = uplinks(get_method(name), state, clients)
    method = get_method(name, {"lora-alpha": ALPHA})
    columns = FOLDED_COLUMNS[name](task.r, task.k)
    method.load_state_dict(folded_state(task.m, form, columns))
    if form == "dense":  # every call adds to D and D stays dense: the same work each time
        return lambda: method.aggregate(state, updates, weights)

    def step():  # the factored D turns dense in this step: each call starts again from the factored one
        fresh = get_method(name, {"lora-alpha": ALPHA})
        fresh.load_state_dict(folded_state(task.m, form, columns))
        return fresh.aggregate(state, updates, weights)

    return step


def _b_only(task: Task):
    state, clients, weights = make_inputs(task.m, task.r, task.k)
    return state, uplinks(get_method("fedsvd"), state, clients), weights


def _setup_floor(task: Task) -> Callable[[], object]:
    _, updates, weights = _b_only(task)
    return lambda: weighted_average(updates, weights)


def float32_sum(updates, weights) -> torch.Tensor:
    """Σ p_k B_k in float32, one in-place add per client: the least any B-only server can do."""
    bs = [u[f"{LAYER}.lora_B"] for u in updates]
    acc = torch.zeros_like(bs[0])
    for w, b in zip(weights.tolist(), bs):
        acc.add_(b, alpha=w)
    return acc


def _setup_sum32(task: Task) -> Callable[[], object]:
    _, updates, weights = _b_only(task)
    return lambda: float32_sum(updates, weights)


def _setup_later(task: Task) -> Callable[[], object]:
    """A FedSVD step after round 1: the global A is the previous step's orthonormal Vᵀ."""
    state, updates, weights = _b_only(task)
    state = get_method("fedsvd").aggregate(state, updates, weights)
    return lambda: get_method("fedsvd").aggregate(state, updates, weights)


def _setup_refactorize_later(task: Task) -> Callable[[], object]:
    """`refactorize` alone after round 1: B̄ against the previous step's orthonormal Vᵀ (the Gram route)."""
    state, updates, weights = _b_only(task)
    a = get_method("fedsvd").aggregate(state, updates, weights)[f"{LAYER}.lora_A"]
    b_bar = weighted_average(updates, weights)[f"{LAYER}.lora_B"]
    return lambda: refactorize(b_bar, a)


def _setup_refactorize(task: Task) -> Callable[[], object]:
    state, updates, weights = _b_only(task)
    b_bar = weighted_average(updates, weights)[f"{LAYER}.lora_B"]
    return lambda: refactorize(b_bar, state[f"{LAYER}.lora_A"])


def naive_fedsvd(state, updates, weights):
    """Weighted sum, then the dense m×n product and its full thin SVD, truncated to r (official code)."""
    b_bar = weighted_average(updates, weights)[f"{LAYER}.lora_B"]
    a = state[f"{LAYER}.lora_A"]
    r = a.shape[0]
    u, s, vh = torch.linalg.svd(b_bar @ a, full_matrices=False)
    return u[:, :r] * s[:r], vh[:r]


def _setup_naive(task: Task) -> Callable[[], object]:
    state, updates, weights = _b_only(task)
    return lambda: naive_fedsvd(state, updates, weights)


def _fair_inputs(task: Task):
    from lorafair import _inputs  # benchmarks/lorafair.py: its float64 clients, shared by both solvers

    return _inputs(task.m, task.r, task.k)


def _setup_fair(task: Task) -> Callable[[], object]:
    from lorafair import dense_solver, gram_solver

    solver = gram_solver if task.kind == "fair-gram" else dense_solver
    bs, as_, w = _fair_inputs(task)
    return lambda: solver(bs, as_, w, FAIR_STEPS)


SETUPS: dict[str, Callable[[Task], Callable[[], object]]] = {
    "step": _setup_step, "folded": _setup_folded, "floor": _setup_floor, "refactorize": _setup_refactorize,
    "sum32": _setup_sum32, "sum32-in-step": _setup_sum32, "fedsvd-later": _setup_later,
    "refactorize-later": _setup_refactorize_later, "naive": _setup_naive, "fair-gram": _setup_fair, "fair-dense": _setup_fair,
}


# --------------------------------------------------------------------------------------------------
# measuring in a fresh process


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M).group(1))


def first_call(fn: Callable[[], object]) -> tuple[object, float, float, str]:
    """(result, wall ms, peak resident MiB above the resident set before the call, how it was measured)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current resident set
        how = "VmHWM after /proc/self/clear_refs reset"
    except OSError:  # no reset: the high-water mark so far stands in (can hide the step's peak)
        how = "ru_maxrss"
    base = _status_kib("VmRSS")
    t0 = time.perf_counter()
    out = fn()
    ms = (time.perf_counter() - t0) * 1e3
    peak = _status_kib("VmHWM") if how != "ru_maxrss" else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return out, ms, max(peak - base, 0) / 1024, how


def _cosines(task: Task, b_new: torch.Tensor) -> dict[str, float]:
    from lorafair import fair_problem

    problem = fair_problem(*_fair_inputs(task))
    return {"cos_before": problem.cosine(problem.b_bar), "cos_after": problem.cosine(b_new)}


def _naive_error(task: Task) -> dict[str, float]:
    """Relative error of FedSVD's product against the naive one (a check of what is timed)."""
    state, updates, weights = _b_only(task)
    new = get_method("fedsvd").aggregate(state, updates, weights)
    ref_b, ref_a = naive_fedsvd(state, updates, weights)
    prod = ref_b.double() @ ref_a.double()
    got = new[f"{LAYER}.lora_B"].double() @ new[f"{LAYER}.lora_A"].double()
    return {"relative_product_error_vs_naive": float(torch.linalg.matrix_norm(got - prod) / torch.linalg.matrix_norm(prod))}


def _child(task: Task, queue) -> None:
    torch.set_num_threads(THREADS)
    # warm-up: LAPACK and thread-pool set-up are not the step's (a 64×64 D is never factored)
    SETUPS[task.kind](task._replace(m=64, option=task.option.replace(":factored", ":dense")))()
    fn = SETUPS[task.kind](task)
    # the float32 sum as it runs inside a later FedSVD step: after the previous step's re-factorisation
    before = SETUPS["refactorize-later"](task) if task.kind == "sum32-in-step" else None
    if before is not None:
        before()
    out, first_ms, peak_mib, how = first_call(fn)
    if first_ms > SLOW_MS:
        samples = [first_ms]
        for _ in range(0 if first_ms > VERY_SLOW_MS else 2):
            t0 = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - t0) * 1e3)
        timing = {"median_ms": statistics.median(samples), "min_ms": min(samples), "repeats": len(samples)}
    else:
        timing = time_ms(fn, warmup=0, min_repeats=3, max_repeats=50, budget_s=1.0, before=before)
    extra: dict[str, Any] = {}
    if task.kind.startswith("fair"):
        extra = _cosines(task, out)
    elif task.kind == "naive":
        extra = _naive_error(task)
    queue.put({**task._asdict(), **timing, "peak_extra_mib": peak_mib, "memory_measure": how, **extra,
               "loadavg_1min": os.getloadavg()[0]})


def in_fresh_process(target: Callable[..., None], *args, start_method: str = "spawn") -> dict:
    """`target(*args, queue)` in a new process; returns what it put on the queue. (Shared by the
    benchmark scripts: a measurement in a fresh process is not skewed by an earlier one's memory.)"""
    ctx = mp.get_context(start_method)
    queue = ctx.Queue()
    proc = ctx.Process(target=target, args=(*args, queue))
    proc.start()
    while True:  # a child that dies (out of memory, an exception) must not leave us waiting forever
        try:
            out = queue.get(timeout=5)
            break
        except queue_module.Empty:
            if not proc.is_alive():
                raise RuntimeError(f"{target.__name__}{args} failed in its process (exit code {proc.exitcode})") from None
    proc.join()
    return out


def measure(task: Task) -> dict:
    out = in_fresh_process(_child, task, start_method="forkserver")
    ms = out["median_ms"]
    log(f"  {task.kind:<11} {task.option:<16} m={task.m:<5} r={task.r:<2} K={task.k:<2} "
        f"{ms:10.2f} ms  peak +{out['peak_extra_mib']:.1f} MiB  (×{out['repeats']})")
    return out


# --------------------------------------------------------------------------------------------------
# the plan and the tables


def plan(sizes: tuple[int, ...]) -> list[Task]:
    tasks = [Task("step", m, r, k, name) for m in sizes for r in RANKS for k in CLIENTS for name in available_strategies()]
    r, k = FULL
    for m in sizes:
        for name in ("fedex", "flora"):
            factored = largest_factored_rank(m, FOLDED_COLUMNS[name](r, k)) is not None
            tasks += [Task("folded", m, r, k, f"{name}:{form}") for form in ("factored", "dense")
                      if form == "dense" or factored]
        for rank in RANKS:
            tasks += [Task(kind, m, rank, k) for kind in ("sum32", "sum32-in-step", "floor", "fedsvd-later",
                                                          "refactorize", "refactorize-later")]
            if m < BIG or rank == r:
                tasks.append(Task("naive", m, rank, k))
        for rank, clients in ((rk, kk) for rk in RANKS for kk in CLIENTS):
            if m < BIG or (rank, clients) == FULL:
                tasks += [Task(kind, m, rank, clients) for kind in ("fair-gram", "fair-dense")]
    return tasks


def _find(rows: list[dict], **key) -> dict | None:
    return next((x for x in rows if all(x[k] == v for k, v in key.items())), None)


def _cell(row: dict | None) -> str:
    if row is None:
        return "–"
    ms = row["median_ms"]
    time_s = f"{ms:.2f}" if ms < 100 else f"{ms:,.0f}"
    return f"{time_s} ms / {row['peak_extra_mib']:.1f} MiB"


def steps_tables(rows: list[dict], sizes) -> str:
    combos = [(r, k) for r in RANKS for k in CLIENTS]
    out = []
    for m in sizes:
        out += [f"**m = n = {m}** (one m×n float32 matrix: {m * m * 4 / 2**20:.0f} MiB)", "",
                "| strategy | " + " | ".join(f"r={r}, K={k}" for r, k in combos) + " |",
                "|---|" + "---:|" * len(combos)]
        for name in available_strategies():
            cells = [_cell(_find(rows, kind="step", m=m, r=r, k=k, option=name)) for r, k in combos]
            out.append(f"| {name} | " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out)


def folded_table(rows: list[dict], sizes) -> str:
    out = ["| m = n | strategy | D empty (round 1) | D factored, rank just below the switch | D dense |",
           "|---:|---|---:|---:|---:|"]
    r, k = FULL
    for m in sizes:
        for name in ("fedex", "flora"):
            cells = [_cell(_find(rows, kind="step", m=m, r=r, k=k, option=name)),
                     _cell(_find(rows, kind="folded", m=m, option=f"{name}:factored")),
                     _cell(_find(rows, kind="folded", m=m, option=f"{name}:dense"))]
            out.append(f"| {m} | {name} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def fedsvd_table(rows: list[dict], sizes) -> tuple[str, list[dict]]:
    out = ["| m = n | r | float32 Σ p_k B_k (ms) | the same sum inside a later step (ms) | floor: `weighted_average` (ms) "
           "| FedSVD round 1 (ms) | FedSVD later rounds (ms) | later / float32 sum | refactorize alone, round 1 (ms) "
           "| refactorize alone, later (ms) | naive dense SVD (ms) | speed-up naive/FedSVD round 1 "
           "| FedSVD round 1 − floor (ms) | FedSVD peak extra (MiB) | naive peak extra (MiB) |",
           "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    summary = []
    k = FULL[1]
    for m in sizes:
        for r in RANKS:
            floor, refac = _find(rows, kind="floor", m=m, r=r), _find(rows, kind="refactorize", m=m, r=r)
            sum32, later = _find(rows, kind="sum32", m=m, r=r), _find(rows, kind="fedsvd-later", m=m, r=r)
            in_step, refac_later = _find(rows, kind="sum32-in-step", m=m, r=r), _find(rows, kind="refactorize-later", m=m, r=r)
            step = _find(rows, kind="step", m=m, r=r, k=k, option="fedsvd")
            naive = _find(rows, kind="naive", m=m, r=r)
            if None in (floor, refac, sum32, later, step, in_step, refac_later):
                continue
            row = {"m": m, "r": r, "K": k, "float32_sum_ms": sum32["median_ms"], "float32_sum_in_step_ms": in_step["median_ms"],
                   "floor_ms": floor["median_ms"], "fedsvd_ms": step["median_ms"], "fedsvd_later_ms": later["median_ms"],
                   "later_over_float32_sum": later["median_ms"] / sum32["median_ms"],
                   "refactorize_ms": refac["median_ms"], "refactorize_later_ms": refac_later["median_ms"],
                   "overhead_ms": step["median_ms"] - floor["median_ms"]}
            if naive is not None:
                row.update({"naive_ms": naive["median_ms"], "naive_repeats": naive["repeats"],
                            "speedup": naive["median_ms"] / step["median_ms"],
                            "relative_product_error_vs_naive": naive["relative_product_error_vs_naive"]})
            summary.append(row)
            naive_cells = (f"{row['naive_ms']:,.1f} (×{row['naive_repeats']}) | {row['speedup']:,.0f}×"
                           if naive is not None else "– | –")
            out.append(f"| {m} | {r} | {row['float32_sum_ms']:.3f} | {row['float32_sum_in_step_ms']:.3f} "
                       f"| {row['floor_ms']:.3f} | {row['fedsvd_ms']:.3f} | {row['fedsvd_later_ms']:.3f} "
                       f"| {row['later_over_float32_sum']:.1f}× | {row['refactorize_ms']:.3f} | {row['refactorize_later_ms']:.3f} "
                       f"| {naive_cells} | {row['overhead_ms']:.3f} | {step['peak_extra_mib']:.1f} "
                       f"| {naive['peak_extra_mib'] if naive else float('nan'):.0f} |")
    return "\n".join(out), summary


def fair_table(rows: list[dict], sizes) -> tuple[str, list[dict]]:
    out = ["| m = n | r | K | Gram form (ms) | dense (ms) | speed-up | Gram peak extra (MiB) | dense peak extra (MiB) "
           "| one m×n float64 (MiB) | cos FedIT → FAIR (Gram / dense) |",
           "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    summary = []
    for m in sizes:
        for r in RANKS:
            for k in CLIENTS:
                gram, dense = _find(rows, kind="fair-gram", m=m, r=r, k=k), _find(rows, kind="fair-dense", m=m, r=r, k=k)
                if gram is None or dense is None:
                    continue
                row = {"m": m, "r": r, "K": k, "gram_ms": gram["median_ms"], "dense_ms": dense["median_ms"],
                       "speedup": dense["median_ms"] / gram["median_ms"], "gram_peak_mib": gram["peak_extra_mib"],
                       "dense_peak_mib": dense["peak_extra_mib"], "matrix_mib": m * m * 8 / 2**20}
                summary.append(row)
                out.append(f"| {m} | {r} | {k} | {row['gram_ms']:.1f} | {row['dense_ms']:,.0f} | {row['speedup']:,.0f}× "
                           f"| {row['gram_peak_mib']:.1f} | {row['dense_peak_mib']:.0f} | {row['matrix_mib']:.0f} "
                           f"| {gram['cos_before']:.4f} → {gram['cos_after']:.4f} / {dense['cos_after']:.4f} |")
    return "\n".join(out), summary


def check_targets(fedsvd: list[dict], fair: list[dict]) -> dict[str, Any]:
    t, f = TARGET_FEDSVD, TARGET_FAIR
    out: dict[str, Any] = {}
    row = _find(fedsvd, m=t["m"], r=t["r"])
    if row:
        out["fedsvd"] = {"target": t, "speedup": row["speedup"], "speedup_met": row["speedup"] >= t["speedup"],
                         "overhead_ms": row["overhead_ms"], "overhead_met": row["overhead_ms"] <= t["overhead_ms"],
                         "later_over_float32_sum": row["later_over_float32_sum"],
                         "ratio_met": row["later_over_float32_sum"] <= t["ratio_to_float32_sum"]}
    row = _find(fair, m=f["m"], r=f["r"], K=f["K"])
    if row:
        out["lorafair"] = {"target": f, "speedup": row["speedup"], "speedup_met": row["speedup"] >= f["speedup"],
                           "gram_peak_mib": row["gram_peak_mib"], "matrix_mib": row["matrix_mib"]}
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="only m = n = 1024")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/aggregation.json"))
    args = parser.parse_args(argv)

    sizes = (1024,) if args.quick else SIZES
    machine = machine_info()
    log(f"machine: {machine['description']}, torch {torch.__version__}, {THREADS} threads, "
        f"load {os.getloadavg()[0]:.2f}")
    mp.set_forkserver_preload(["torch", "fedlora.strategies", "fedlora.strategies.lorafair"])
    started = time.perf_counter()
    rows = [measure(task) for task in plan(sizes)]

    fedsvd_md, fedsvd = fedsvd_table(rows, sizes)
    fair_md, fair = fair_table(rows, sizes)
    targets = check_targets(fedsvd, fair)
    print("### One server step per strategy (time / peak extra memory)\n")
    print(steps_tables(rows, sizes))
    print("### FedEx-LoRA and FLoRA once D exists (r = 16, K = 10)\n")
    print(folded_table(rows, sizes) + "\n")
    print("### FedSVD against the naive dense SVD (K = 10)\n")
    print(fedsvd_md + "\n")
    print(f"### LoRA-FAIR: Gram form against the dense solver ({FAIR_STEPS} steps)\n")
    print(fair_md + "\n")
    print("targets: " + json.dumps(targets, indent=2))

    result = {
        "benchmark": "server-step-per-strategy",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["python", *sys.argv]),
        "wall_s": time.perf_counter() - started,
        "machine": machine,
        "settings": {"threads": THREADS, "sizes": list(sizes), "ranks": list(RANKS), "clients": list(CLIENTS),
                     "client_dtype": "float32", "lora_alpha": ALPHA, "fair_steps": FAIR_STEPS,
                     "dense_references_only_at_full_from": BIG, "memory": "peak extra resident set (see docstring)"},
        "loadavg_1_5_15_at_end": list(os.getloadavg()),
        "targets": targets,
        "fedsvd_vs_naive": fedsvd,
        "lorafair_gram_vs_dense": fair,
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    log(f"wrote {args.out} after {result['wall_s']:.0f} s")


if __name__ == "__main__":
    main()
