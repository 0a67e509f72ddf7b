"""Resumable sweeps: many `fedlora run`s (strategies × settings × seeds) into one folder, and the
table that compares them.

Each run gets its own folder `<root>/<name>/`. A run whose `status.json` says it finished
(`completed`, or `budget-exhausted`: a DP run that stopped early because every budget was spent)
is skipped; one whose status is missing, `running` (interrupted) or `failed` is cleared and run
again. So a sweep killed halfway (a closed laptop, a CI limit) is resumed by starting the same
command again. The summary has the finished runs only, each with its `state` and `last_round`.

    python -m fedlora.simulations.sweep ROOT            # the comparison table of what is in ROOT
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedlora.core.status import read_status

from .runner import client_gpu_share, preflight, resolve_config, run_simulation, unwind_on_signals

__all__ = ["SweepRun", "run_sweep", "summarize"]


@dataclass(frozen=True)
class SweepRun:
    """One run of a sweep: a folder name and its run-config overrides."""

    name: str
    overrides: dict[str, Any] = field(default_factory=dict)


def _rows(out_dir: Path) -> list[dict]:
    path = Path(out_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:  # a line cut short by a kill
            break
    return rows


def run_sweep(app_dir: Path, runs: Sequence[SweepRun], root: Path, *, num_supernodes: int = 10,
              client_cpus: int = 1) -> None:
    """Run every unfinished run of `runs` in turn, printing one progress line per run."""
    unwind_on_signals()
    root = Path(root)
    names = [r.name for r in runs]
    if len(set(names)) != len(names):
        raise ValueError(f"sweep run names must be unique: {names}")
    for i, run in enumerate(runs, start=1):
        out = root / run.name
        cfg = resolve_config(app_dir, {**run.overrides, "output-dir": str(out)})
        earlier = read_status(out)
        if earlier is not None and earlier.finished:
            print(f"[{i}/{len(runs)}] {run.name}: {earlier.state} earlier, skipped", flush=True)
            continue
        if out.exists():  # interrupted or failed: runs restart from round 0 (minutes, not hours)
            shutil.rmtree(out)
        client_gpus = client_gpu_share(None, client_cpus)
        preflight(cfg, num_supernodes, client_gpus)
        print(f"[{i}/{len(runs)}] {run.name}: running ({cfg.num_server_rounds} rounds)", flush=True)
        t0 = time.monotonic()
        status = run_simulation(app_dir, cfg, num_supernodes, client_cpus=client_cpus, client_gpus=client_gpus,
                                quiet=True)
        rows = _rows(out)
        print(f"[{i}/{len(runs)}] {run.name}: {status.state} after round {status.last_round} in "
              f"{time.monotonic() - t0:.0f} s, final test accuracy "
              f"{rows[-1].get('test_accuracy', float('nan')):.3f}", flush=True)


def summarize(root: Path) -> list[dict[str, Any]]:
    """One row per finished run under `root`: its settings, how it ended and final/best test accuracy."""
    out = []
    for path in sorted(Path(root).iterdir()):
        status = read_status(path)
        rows = _rows(path)
        config_path = path / "run_config.json"
        if status is None or not status.finished or not rows or not config_path.exists():
            continue  # unfinished, failed, or not a run
        cfg = json.loads(config_path.read_text())
        acc = [r["test_accuracy"] for r in rows if "test_accuracy" in r]
        out.append({
            "run": path.name, "strategy": cfg["strategy"], "seed": cfg["seed"],
            "state": status.state, "last_round": status.last_round,
            "rounds": rows[-1]["round"], "learning_rate": cfg["learning-rate"],
            "final_accuracy": acc[-1] if acc else None, "best_accuracy": max(acc) if acc else None,
            "final_loss": rows[-1].get("test_loss"),
            **({"personalized_accuracy": rows[-1]["personalized_accuracy"]}
               if "personalized_accuracy" in rows[-1] else {}),
            "dp": bool(cfg.get("dp")),
            **({"target_epsilon": cfg["target-epsilon"], "epsilon_max": rows[-1].get("epsilon_max"),
                "epsilon_mean": rows[-1].get("epsilon_mean")} if cfg.get("dp") else {}),
            "accuracy_by_round": acc,
            "evaluated_rounds": [r["round"] for r in rows if "test_accuracy" in r],  # fedsa: the last only
            "bytes_up": sum(r.get("bytes_up", 0) for r in rows),
            "bytes_down": sum(r.get("bytes_down", 0) for r in rows),
            "seconds": sum(r.get("seconds", 0.0) for r in rows),
        })
    return out


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or not Path(args[0]).is_dir():
        print("usage: python -m fedlora.simulations.sweep ROOT  (a folder of sweep runs)", file=sys.stderr)
        return 2
    print(json.dumps(summarize(Path(args[0])), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
