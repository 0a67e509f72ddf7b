"""Causal-LM instruction tuning on this CPU with SmolLM2-135M-Instruct (the bundled GGUF model).

1. Client step time, non-private against DP-SGD (Opacus hooks, σ = 1, C = 1), through
   `fedlora.core.train.train_local` (batching included): the tweets as an instruction task
   ("What is the sentiment of this tweet? ..." -> "negative" / "neutral" / "positive", SmolLM2's
   chat template), batch 8, LoRA r = 8 on q_proj/v_proj (peft's default for Llama), trained B only
   (FedSVD) and A and B (FedIT). The client holds 8 rows, so q = 1 and every Poisson batch is the
   non-private batch: both modes do the same forward work. One process per trainable set cycles
   through the modes; a mode's time is its fastest round.
2. A federated instruction-tuning run of FedSVD and of FedIT through `fedlora run`: 3 clients
   (iid), 3 rounds, 5 local steps of batch 8, Adam at 1e-3, no DP, 300 test rows. Test loss (per
   answer token) and exact-match accuracy of greedy answers before (round 0) and after.

    python benchmarks/causal_lm.py [--steps 2] [--rounds 2] [--skip-runs]
                                   [--out benchmarks/results/causal_lm.json]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from aggregation import in_fresh_process, log, machine_info  # benchmarks/aggregation.py

REPO = Path(__file__).resolve().parents[1]
MODEL = "SmolLM2-135M-Instruct"
MODES = ("non-private", "hooks")
TRAINABLE = ("B", "A+B")
BATCH, RANK, THREADS, MAX_LENGTH = 8, 8, 2, 128
RUN = {"task": "causal-lm", "model": MODEL, "dataset": "tweets", "dp": False, "partitioner": "iid",
       "clients-per-round": 3, "num-server-rounds": 3, "local-steps": 5, "batch-size": BATCH,
       "test-size": 300, "max-length": MAX_LENGTH, "optimizer": "adam", "learning-rate": 0.001,
       "eval-batch-size": 32}


def _cfg(**more):
    from fedlora.core.config import RunConfig

    return RunConfig.from_run_config({**RUN, **more})


def _time_child(trainable: str, steps: int, rounds: int, queue) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import numpy as np
    import torch

    from fedlora.core.data import load_text_data
    from fedlora.core.task import get_task
    from fedlora.core.train import train_local
    from fedlora.privacy import DPSettings, sample_rate

    torch.set_num_threads(THREADS)
    cfg = _cfg(**{"local-steps": steps})
    bundle = get_task(cfg).build_model(cfg)
    data = load_text_data(cfg).subset(np.arange(BATCH))
    keys = [k for k in bundle.params if trainable == "A+B" or k.endswith("lora_B")]
    settings = {"non-private": None, "hooks": DPSettings(1.0, 1.0, sample_rate(BATCH, BATCH), "hooks")}

    def train(mode: str, n: int, seed: int) -> float:
        t0 = time.perf_counter()
        train_local(bundle, data, cfg.replace(local_steps=n), keys, seed=(seed,), dp=settings[mode])
        return (time.perf_counter() - t0) / n

    for mode in MODES:
        train(mode, 1, 0)  # warm-up: first-call costs are nobody's step
    step_s = {m: [] for m in MODES}
    for rnd in range(rounds):
        for mode in MODES:
            step_s[mode].append(train(mode, steps, rnd + 1))
    tokens = [len(data.prompt_ids[i]) + len(data.answer_ids[i]) for i in range(len(data))]
    queue.put({"trainable_params": sum(bundle.params[k].numel() for k in keys), "step_s": step_s,
               "tokens_per_row": {"min": min(tokens), "max": max(tokens)}})


def _federated(strategy: str, out: Path) -> dict:
    overrides = {**RUN, "strategy": strategy, "output-dir": str(out)}
    pairs = " ".join(f"{k}={json.dumps(v)}" for k, v in overrides.items())
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "fedlora.simulations.cli", "run", str(REPO), "--quiet",
                           "--num-supernodes", "3", "--run-config", pairs], capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"fedlora run ({strategy}) failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    keep = ("round", "test_accuracy", "test_loss", "test_perplexity", "seconds", "client_train_seconds",
            "server_eval_seconds")
    return {"strategy": strategy, "wall_s": wall, "rounds": [{k: r[k] for k in keep if k in r} for r in rows],
            "samples": samples}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2, help="steps per mode per round (default 2)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds over the modes (default 2)")
    parser.add_argument("--skip-runs", action="store_true", help="step times only")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/causal_lm.json"))
    args = parser.parse_args(argv)
    if os.getloadavg()[0] > 0.5:
        log(f"warning: load average {os.getloadavg()[0]:.2f} > 0.5: other processes compete for the CPUs")
    steps = []
    for trainable in TRAINABLE:
        log(f"[{trainable}] timing {', '.join(MODES)}: {args.rounds} rounds of {args.steps} steps ...")
        timing = in_fresh_process(_time_child, trainable, args.steps, args.rounds)
        best = {m: min(timing["step_s"][m]) for m in MODES}
        log("    " + ", ".join(f"{m} {best[m]:.2f} s/step" for m in MODES))
        steps.append({"trainable": trainable, **timing, "best_step_s": best,
                      "dp_over_non_private": best["hooks"] / best["non-private"]})
    runs = []
    if not args.skip_runs:
        with tempfile.TemporaryDirectory(prefix="fedlora-causal-lm-") as tmp:
            for strategy in ("fedsvd", "fedit"):
                log(f"fedlora run: {strategy}, {RUN['num-server-rounds']} rounds ...")
                runs.append(_federated(strategy, Path(tmp) / strategy))
                first, last = runs[-1]["rounds"][0], runs[-1]["rounds"][-1]
                log(f"    test loss {first['test_loss']:.3f} -> {last['test_loss']:.3f}, exact match "
                    f"{first.get('test_accuracy', float('nan')):.3f} -> {last.get('test_accuracy', float('nan')):.3f}, "
                    f"{runs[-1]['wall_s']:.0f} s")
    result = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "machine": machine_info(),
              "load_average_at_start": os.getloadavg()[0],
              "settings": {"model": MODEL, "batch": BATCH, "lora_rank": RANK, "threads": THREADS,
                           "max_length": MAX_LENGTH, "dp": {"sigma": 1.0, "clip": 1.0, "mode": "hooks"}, "run": RUN},
              "steps": steps, "runs": runs}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    log(f"wrote {args.out}")


if __name__ == "__main__":
    main()
