"""What the harness costs: a MiniLM round's wall time against the work inside it, with one actor.

    python benchmarks/harness.py [--rounds 3] [--clients 10]

Runs `fedlora run` as a user does, non-private (a DP client does not report its training time:
it follows the secret Poisson batch sizes), every client sampled every round, `--client-cpus`
equal to this machine's cores, so that Ray runs one actor and the clients train one after
another with every core. Each round's metrics.jsonl row says how long the round took
(`seconds`), how long the clients' training took inside `train_local` (`client_train_seconds`,
summed over the replies), their local evaluation (`client_eval_seconds`) and the server's
(`server_eval_seconds`). The harness overhead is the rest: messages, Ray, Flower, setting up a
client's model and data for each message, aggregation, checkpoints and outputs. Target: at most
20 % of a round. Writes benchmarks/results/harness.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from aggregation import machine_info  # benchmarks/aggregation.py

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
TARGET = 0.20
PARTS = ("client_train_seconds", "client_eval_seconds", "server_eval_seconds")


def overhead(rows: list[dict]) -> list[dict]:
    """Per trained round: its time, the work inside it, and the rest (the harness's share)."""
    out = []
    for row in rows:
        if row.get("round", 0) < 1 or "client_train_seconds" not in row:
            continue
        work = sum(float(row.get(k, 0.0)) for k in PARTS)
        out.append({"round": row["round"], "seconds": row["seconds"], **{k: float(row.get(k, 0.0)) for k in PARTS},
                    "harness_seconds": row["seconds"] - work, "harness_share": (row["seconds"] - work) / row["seconds"]})
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--clients", type=int, default=10)
    args = parser.parse_args(argv)
    cores = os.cpu_count() or 1
    machine = machine_info()
    with tempfile.TemporaryDirectory(prefix="fedlora-harness-") as tmp:
        out_dir = Path(tmp) / "run"
        cmd = [sys.executable, "-m", "fedlora.simulations.cli", "run", str(REPO), "--quiet",
               "--num-supernodes", str(args.clients), "--client-cpus", str(cores), "--run-config",
               f"dp=false num-server-rounds={args.rounds} clients-per-round={args.clients} output-dir='{out_dir}'"]
        print(f"harness: {' '.join(cmd[2:])}", file=sys.stderr, flush=True)
        t0 = time.monotonic()
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        wall = time.monotonic() - t0
        if proc.returncode != 0:
            print(proc.stdout[-3000:], proc.stderr[-3000:], file=sys.stderr)
            return 1
        rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    per_round = overhead(rows)
    share = statistics.fmean(r["harness_share"] for r in per_round)
    result = {
        "benchmark": "harness-overhead",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["python", "benchmarks/harness.py", *(argv if argv is not None else sys.argv[1:])]),
        "machine": machine,
        "settings": {"model": "all-MiniLM-L6-v2", "strategy": "fedsvd", "dp": False, "clients": args.clients,
                     "clients_per_round": args.clients, "rounds": args.rounds, "client_cpus": cores,
                     "actors": 1},
        "wall_s": wall,
        "round_0_seconds": rows[0]["seconds"],
        "rounds": per_round,
        "mean_harness_share": share,
        "target": TARGET,
        "target_met": share <= TARGET,
        "loadavg_1_5_15_at_end": list(os.getloadavg()),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "harness.json").write_text(json.dumps(result, indent=1) + "\n")
    for r in per_round:
        print(f"round {r['round']}: {r['seconds']:.1f} s = train {r['client_train_seconds']:.1f} + client eval "
              f"{r['client_eval_seconds']:.1f} + server eval {r['server_eval_seconds']:.1f} + harness "
              f"{r['harness_seconds']:.1f} ({100 * r['harness_share']:.1f} %)")
    print(f"mean harness share {100 * share:.1f} % (target ≤ {100 * TARGET:.0f} %); wrote {RESULTS / 'harness.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
