"""Time and memory of one DP-SGD local step against the non-private step, on the bundled MiniLM.

all-MiniLM-L6-v2 (6 layers, hidden 384) with peft LoRA r = 8 on query/value, sequence length 64,
batch 32, SGD, 2 CPU threads, through `fedlora.core.train.train_local` (tokenisation included):

  non-private   shuffled batches of 32, global gradient-norm clip (the default path);
  hooks         DP-SGD, Opacus per-sample gradients from layer hooks, σ = 1, C = 1;
  ghost         DP-SGD, Opacus ghost clipping (norms only, two backward passes).

The client holds 32 examples, so q = 1 and every Poisson batch is exactly the 32 examples of the
non-private batch: the modes do the same forward work and differ only by the privacy machinery.

Time: one process per trainable set holds one model and cycles through the modes, `--steps` steps
per mode per round, for `--rounds` rounds after a 2-step warm-up of each mode, so that a load
change on the (shared) machine hits all modes alike; a mode's time per step is its fastest round.
Memory: each (trainable set, mode) also runs alone in a fresh process (2 warm-up + `--steps`
steps), whose peak resident memory (ru_maxrss) is that mode's, model and libraries included.
Target (issue 5): hooks ≤ 1.3× non-private per step on CPU.

    python benchmarks/dp_step.py [--quick] [--steps 4] [--rounds 4]
                                 [--out benchmarks/results/dp_step.json]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import resource
import sys
import time
from pathlib import Path

import numpy as np

from aggregation import in_fresh_process, log, machine_info  # benchmarks/aggregation.py

MODES = ("non-private", "hooks", "ghost")
TRAINABLE = ("B+head", "A+B+head")
BATCH, LENGTH, RANK, THREADS = 32, 64, 8, 2
SIGMA, CLIP = 1.0, 1.0
TARGET_HOOKS_RATIO = 1.3


def _texts(tokenizer, n: int, seed: int = 0) -> tuple[str, ...]:
    """`n` texts of random vocabulary words, long enough to fill `LENGTH` tokens (no padding)."""
    words = [w for w in tokenizer.get_vocab() if w.isalpha() and len(w) > 3]
    rng = np.random.default_rng(seed)
    return tuple(" ".join(rng.choice(sorted(words), LENGTH)) for _ in range(n))


def _setup(trainable: str, steps: int):
    """Model, data and trainable keys in this (fresh) process, and the `train_local` to time."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    from fedlora.core.config import RunConfig
    from fedlora.core.data import TextData
    from fedlora.core.model import BUNDLED_MODEL, build_model
    from fedlora.core.train import train_local
    from fedlora.privacy import DPSettings, sample_rate

    torch.set_num_threads(THREADS)
    cfg = RunConfig.from_run_config({"model": BUNDLED_MODEL, "lora-rank": RANK, "max-length": LENGTH,
                                     "batch-size": BATCH, "optimizer": "sgd", "learning-rate": 0.01,
                                     "local-steps": steps})
    bundle = build_model(cfg, 2)
    data = TextData(_texts(bundle.tokenizer, BATCH), np.arange(BATCH) % 2, ("a", "b"))
    keys = [k for k in bundle.params if trainable == "A+B+head" or not k.endswith("lora_A")]
    q = sample_rate(len(data), BATCH)
    settings = {m: None if m == "non-private" else DPSettings(SIGMA, CLIP, q, m) for m in MODES}

    def train(mode: str, *, steps: int = steps, seed: int = 0) -> float:
        """Seconds per step of `steps` local steps in `mode`."""
        t0 = time.perf_counter()
        train_local(bundle, data, cfg.replace(local_steps=steps), keys, seed=(seed,), dp=settings[mode])
        return (time.perf_counter() - t0) / steps

    return train, sum(bundle.params[k].numel() for k in keys)


def _time_child(trainable: str, steps: int, rounds: int, queue) -> None:
    train, n_params = _setup(trainable, steps)
    for mode in MODES:
        train(mode, steps=2)  # warm-up: first-call costs (kernels, Opacus imports) are nobody's step
    step_ms: dict[str, list[float]] = {m: [] for m in MODES}
    for rnd in range(rounds):
        for mode in MODES:
            step_ms[mode].append(train(mode, seed=rnd + 1) * 1e3)
    queue.put({"trainable_params": n_params, "step_ms": step_ms})


def _memory_child(trainable: str, mode: str, steps: int, queue) -> None:
    train, _ = _setup(trainable, steps)
    train(mode, steps=2)
    base_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    train(mode)
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    queue.put({"peak_rss_mib": peak_kib / 1024, "peak_after_warmup_extra_mib": (peak_kib - base_kib) / 1024})


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="B+head only, 2 rounds")
    parser.add_argument("--steps", type=int, default=4, help="steps per mode per round (default 4)")
    parser.add_argument("--rounds", type=int, default=4, help="rounds over the modes (default 4)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/dp_step.json"))
    args = parser.parse_args(argv)
    trainables = TRAINABLE[:1] if args.quick else TRAINABLE
    rounds = 2 if args.quick else args.rounds
    machine = machine_info()
    if os.getloadavg()[0] > 0.5:
        log(f"warning: load average {os.getloadavg()[0]:.2f} > 0.5: other processes compete for the CPUs")

    rows = []
    for trainable in trainables:
        log(f"[{trainable}] timing {', '.join(MODES)}: {rounds} rounds of {args.steps} steps each ...")
        timing = in_fresh_process(_time_child, trainable, args.steps, rounds)
        best = {m: min(timing["step_ms"][m]) for m in MODES}
        log("    " + ", ".join(f"{m} {best[m]:.0f} ms/step" for m in MODES))
        memory = {}
        for mode in MODES:
            log(f"[{trainable}] peak memory of {mode} alone ...")
            memory[mode] = in_fresh_process(_memory_child, trainable, mode, args.steps)
            log(f"    {memory[mode]['peak_rss_mib']:.0f} MiB")
        rows.append({
            "trainable": trainable, "trainable_params": timing["trainable_params"],
            **{m: {"best_step_ms": best[m], "samples_per_s": BATCH / best[m] * 1e3,
                   "round_step_ms": timing["step_ms"][m], **memory[m]} for m in MODES},
            "hooks_over_non_private": best["hooks"] / best["non-private"],
            "ghost_over_non_private": best["ghost"] / best["non-private"],
        })

    print("| trainable | params | non-private ms/step | hooks ms/step | ghost ms/step | hooks / non-priv "
          "| ghost / non-priv | peak RSS MiB (non-priv / hooks / ghost) |")
    print("|---|---:|---:|---:|---:|---:|---:|---|")
    for x in rows:
        print(f"| {x['trainable']} | {x['trainable_params']:,} | {x['non-private']['best_step_ms']:.0f} "
              f"| {x['hooks']['best_step_ms']:.0f} | {x['ghost']['best_step_ms']:.0f} "
              f"| {x['hooks_over_non_private']:.2f}× | {x['ghost_over_non_private']:.2f}× "
              f"| {x['non-private']['peak_rss_mib']:.0f} / {x['hooks']['peak_rss_mib']:.0f} / "
              f"{x['ghost']['peak_rss_mib']:.0f} |")
    worst = max(x["hooks_over_non_private"] for x in rows)
    print(f"\n- hooks / non-private, worst trainable set: {worst:.2f}× (target ≤ {TARGET_HOOKS_RATIO}×): "
          f"{'met' if worst <= TARGET_HOOKS_RATIO else 'NOT met'}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "benchmark": "dp-sgd-step", "command": " ".join(["python", *sys.argv]),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "machine": machine,
        "settings": {"model": "all-MiniLM-L6-v2", "lora_rank": RANK, "targets": "query,value",
                     "batch": BATCH, "length": LENGTH, "threads": THREADS, "sigma": SIGMA, "clip": CLIP,
                     "sample_rate": 1.0, "optimizer": "sgd", "steps_per_round": args.steps,
                     "rounds": rounds},
        "loadavg_1_5_15_at_end": list(os.getloadavg()),
        "target": {"hooks_over_non_private": TARGET_HOOKS_RATIO, "worst": worst,
                   "met": worst <= TARGET_HOOKS_RATIO},
        "rows": rows}, indent=2) + "\n")
    log(f"wrote {args.out}")


if __name__ == "__main__":
    main()
