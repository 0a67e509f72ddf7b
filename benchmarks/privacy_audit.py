"""`fedlora privacy audit` on the default job's model: does the audit catch a seeded sampler?

The command (`fedlora.privacy.audit`) runs on the default job (all-MiniLM-L6-v2, FedSVD: B + head
trainable, tweets, client 0 of 10) at the setting of issue 14's prototype: q = 0.036, 100 steps,
C = 1, 1,000 canaries, σ calibrated to ε = 2 (PRV, δ = 1e-5), 95 % confidence, k from the grid
(Bonferroni). Variants, `--runs` each, run seed i for run i:

  secret    today's sampler (OS entropy);
  seeded    the sampler replaced, in this process only, by one seeded from the run seed (the
            defect the hardening issue fixed; the noise stays secret);
  control   today's sampler, the records' gradients left out (`--control`): the audit without
            their blur.

Each run's lower bounds (the "server" auditor: every step's release; the "seed" auditor: also the
batches the run seed predicts) and its time go to the results file.

    python benchmarks/privacy_audit.py [--runs 4] [--control-runs 2]
                                       [--out benchmarks/results/privacy_audit.json]
                                       [--run-config "K=V ..." --num-clients N]  (another job)
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as dt
import io
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from aggregation import log, machine_info  # benchmarks/aggregation.py

SETTING = ["--epsilon", "2", "--sample-rate", "0.036", "--steps", "100", "--canaries", "1000", "--json"]


def audit(variant: str, seed: int, run_config: str = "", num_clients: int = 10) -> dict:
    """One `fedlora privacy audit` run in this process; the seeded variant patches the sampler."""
    from fedlora.privacy import dpsgd
    from fedlora.simulations.cli import main as cli

    secret = dpsgd.batch_rng
    if variant == "seeded":
        dpsgd.batch_rng = lambda dp, s: secret(dataclasses.replace(dp, reproducible=True), s)
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            rc = cli(["privacy", "audit", "--run-config", f"{run_config} seed={seed}", *SETTING,
                      "--num-clients", str(num_clients),
                      *(["--control"] if variant == "control" else [])])
    finally:
        dpsgd.batch_rng = secret
    if rc not in (0, 1):
        raise RuntimeError(f"fedlora privacy audit exited {rc}")
    return json.loads(out.getvalue())


def summary(runs: list[dict]) -> dict:
    def spread(values: list[float]) -> dict:
        return {"median": float(np.median(values)), "min": min(values), "max": max(values)}

    return {"runs": len(runs), "violations": sum(r["violation"] for r in runs),
            "epsilon": runs[0]["epsilon"], "seconds": spread([r["seconds"]["total"] for r in runs]),
            **{name: spread([r["auditors"][name]["epsilon"] for r in runs]) for name in runs[0]["auditors"]}}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=4)
    parser.add_argument("--control-runs", type=int, default=2)
    parser.add_argument("--run-config", default="", help="run-config overrides of the default job")
    parser.add_argument("--num-clients", type=int, default=10)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "privacy_audit.json")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    started = time.perf_counter()
    variants = {"secret": args.runs, "seeded": args.runs, "control": args.control_runs}
    results: dict[str, list[dict]] = {}
    for variant, count in variants.items():
        for seed in range(count):
            log(f"{variant} run {seed + 1}/{count} ({time.perf_counter() - started:.0f} s so far)")
            result = audit(variant, seed, args.run_config, args.num_clients)
            results.setdefault(variant, []).append(result)
            log("  " + ", ".join(f"{k}: {a['epsilon']:.2f}" for k, a in result["auditors"].items())
                + f" (accountant {result['epsilon']:.2f}; {result['seconds']['total']:.0f} s)")
    out = {"date": dt.date.today().isoformat(), "machine": machine_info(),
           "command": f"fedlora privacy audit --run-config '{args.run_config} seed=<run>' "
                      f"--num-clients {args.num_clients} " + " ".join(SETTING),
           "summary": {variant: summary(runs) for variant, runs in results.items()},
           "runs": results, "seconds": round(time.perf_counter() - started, 1)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1) + "\n")
    log(f"wrote {args.out}")
    json.dump(out["summary"], sys.stdout, indent=1)
    print()


if __name__ == "__main__":
    main()
