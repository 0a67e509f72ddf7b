"""The default job as a user runs it (`fedlora run`, MiniLM on the tweets), private or not, with
its raw results kept for the README.

    python benchmarks/default_job.py private       # dp = true (the default), ε = 6
    python benchmarks/default_job.py non-private   # the same job with dp = false

Runs `fedlora run` (extra run-config overrides: `-c "key=value ..."`) into
outputs/default-job-<name>/ (git-ignored; `--outputs`) and writes
benchmarks/results/default-job-<name>.json (`--results`):
the command, date, machine, wall time, the resolved run config, every metrics.jsonl row,
status.json, data.json and (private) privacy.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from aggregation import machine_info  # benchmarks/aggregation.py

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
PRESETS = {"private": "dp=true", "non-private": "dp=false"}


def _json(path: Path) -> object:
    return json.loads(path.read_text()) if path.exists() else None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("preset", choices=sorted(PRESETS))
    parser.add_argument("-c", "--run-config", default="", help="extra run-config overrides")
    parser.add_argument("--results", type=Path, default=RESULTS, help="folder of the results file")
    parser.add_argument("--outputs", type=Path, default=REPO / "outputs", help="folder of the run's output-dir")
    args = parser.parse_args()
    out = args.outputs / f"default-job-{args.preset}"
    if out.exists():
        shutil.rmtree(out)  # a fresh run each time: the results file describes one whole run
    overrides = f"{PRESETS[args.preset]} output-dir='{out}' {args.run_config}".strip()
    command = [sys.executable, "-m", "fedlora.simulations.cli", "run", str(REPO), "--run-config", overrides]
    machine = machine_info()
    start = time.monotonic()
    code = subprocess.call(command, cwd=REPO)
    wall = time.monotonic() - start
    if code != 0:
        print(f"fedlora run exited with {code}; nothing written", file=sys.stderr)
        return code
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    result = {
        "what": f"the default job ({args.preset}): every metrics.jsonl row, status.json, data.json"
                + (" and privacy.json" if args.preset == "private" else "") + " of one `fedlora run`",
        "command": "fedlora run --run-config \"" + f"{PRESETS[args.preset]} {args.run_config}".strip() + "\"",
        "date": dt.date.today().isoformat(), "machine": machine,
        "loadavg_1_5_15_at_end": list(os.getloadavg()), "wall_s": round(wall, 1),
        "run_config": _json(out / "run_config.json"), "status": _json(out / "status.json"),
        "data": _json(out / "data.json"), "rounds": rows, "privacy": _json(out / "privacy.json"),
    }
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / f"default-job-{args.preset}.json").write_text(json.dumps(result, indent=1) + "\n")
    print("round | " + " | ".join(str(r["round"]) for r in rows))
    print("test accuracy | " + " | ".join(f"{r.get('test_accuracy', float('nan')):.3f}" for r in rows))
    print(f"wall {wall / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
