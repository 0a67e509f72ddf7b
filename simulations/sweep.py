"""Resumable sweeps: many `fedlora run`s (strategies × settings × seeds) into one folder, and the
tables that compare them.

    fedlora sweep EXPERIMENT.toml                       # run every cell of the grid; again to resume
    python -m fedlora.simulations.sweep ROOT            # the comparison table of what is in ROOT

An experiment file names the folder, the federation, the settings every run shares and the grid:

    output-dir = "sweeps/dp"          # relative to the file's folder
    num-supernodes = 10
    client-cpus = 1
    [base]                            # run-config keys of every cell
    num-server-rounds = 5
    [grid]                            # one run per combination, in this order
    strategy = ["fedsvd", "ffa", "fedit"]
    seed = [0, 1, 2]

Several grids (`[[grid]]`, an array of tables) run the union of their combinations, a run that two
grids share once: e.g. three strategies at several ε, and every strategy without DP.

Each run gets its own folder `<root>/<name>/` (`strategy-fedsvd__seed-0`). A run whose
`status.json` says it finished (`completed`, or `budget-exhausted`: a DP run that stopped early
because every budget was spent) is skipped; one that stopped after a round it checkpointed is
resumed from that checkpoint (`resume = true`); any other (no status, failed before round 1) is
cleared and run again. So a sweep killed halfway (a closed laptop, a CI limit) is resumed by
starting the same command again. A first Ctrl-C (or `fedlora stop` on the run in progress) stops
that run before its next round and the sweep after it, so that no private round is paid twice. `<root>/results.csv` has one row per run and round (tidy: the
grid's keys as columns), rewritten after every run; the summary has the finished runs only.
"""

from __future__ import annotations

import csv
import itertools
import json
import re
import shutil
import sys
import threading
import time
import tomllib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedlora.core.config import ConfigError
from fedlora.core.status import read_status

from .runner import RunFailed, client_gpu_share, preflight, resolve_config, run_simulation, unwind_on_signals

__all__ = ["Experiment", "SweepResult", "SweepRun", "read_rows", "run_sweep", "summarize", "write_results"]


@dataclass(frozen=True)
class SweepRun:
    """One run of a sweep: a folder name and its run-config overrides."""

    name: str
    overrides: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Experiment:
    """An experiment file: where its runs go, the federation, what every run shares, and the grids
    (one `[grid]`, or several `[[grid]]` whose runs are united)."""

    root: Path
    grids: tuple[dict[str, list[Any]], ...]
    base: dict[str, Any] = field(default_factory=dict)
    num_supernodes: int = 10
    client_cpus: int = 1

    @classmethod
    def from_toml(cls, path: Path) -> Experiment:
        """Read and check an experiment file; `ConfigError` names what is wrong."""
        path = Path(path)
        try:
            doc = tomllib.loads(path.read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"{path}: {exc}") from None
        unknown = set(doc) - {"output-dir", "num-supernodes", "client-cpus", "base", "grid"}
        if unknown:
            raise ConfigError(f"{path}: unknown keys {sorted(unknown)}; an experiment has output-dir, "
                              "num-supernodes, client-cpus, [base] and [grid]")
        grids, base = doc.get("grid"), doc.get("base", {})
        grids = [grids] if isinstance(grids, dict) else grids
        if not isinstance(grids, list) or not grids or not all(isinstance(g, dict) and g for g in grids):
            raise ConfigError(f"{path}: [grid] is missing or empty: give each swept key a list of values")
        for grid in grids:
            bad = [k for k, v in grid.items() if not isinstance(v, list) or not v]
            if bad:
                raise ConfigError(f"{path}: [grid] {bad} must be non-empty lists, e.g. seed = [0, 1, 2]")
            both = sorted(set(grid) & set(base))
            if both:
                raise ConfigError(f"{path}: {both} are in both [base] and [grid]")
        if "output-dir" in {*base, *(k for g in grids for k in g)}:
            raise ConfigError(f"{path}: output-dir is the sweep's (top level); each run gets a folder in it")
        if "output-dir" not in doc:
            raise ConfigError(f"{path}: output-dir (the sweep's folder) is required")
        counts = {k: doc.get(k, 10 if k == "num-supernodes" else 1) for k in ("num-supernodes", "client-cpus")}
        if any(not isinstance(v, int) or isinstance(v, bool) or v < 1 for v in counts.values()):
            raise ConfigError(f"{path}: num-supernodes and client-cpus must be integers >= 1, not {counts}")
        return cls(root=(path.parent / doc["output-dir"]).resolve(), grids=tuple(grids), base=base,
                   num_supernodes=counts["num-supernodes"], client_cpus=counts["client-cpus"])

    def columns(self) -> list[str]:
        """The swept keys, in the order they first appear: the run names' and results.csv's order."""
        return list(dict.fromkeys(k for grid in self.grids for k in grid))

    def runs(self) -> list[SweepRun]:
        """One run per combination of each grid's values, named by them; a run that several grids
        give (same name, so same settings) once."""
        runs: dict[str, SweepRun] = {}
        for grid in self.grids:
            keys = [k for k in self.columns() if k in grid]
            for values in itertools.product(*(grid[k] for k in keys)):
                name = "__".join(f"{k}-{_slug(v)}" for k, v in zip(keys, values))
                runs.setdefault(name, SweepRun(name, {**self.base, **dict(zip(keys, values))}))
        return list(runs.values())


def _slug(value: Any) -> str:
    return re.sub(r"[^A-Za-z0-9.+-]+", "_", str(value)).strip("_") or "_"


def read_rows(out_dir: Path) -> list[dict]:
    """A run's metrics.jsonl rows (none if it has none), up to a line a kill cut short."""
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


@dataclass(frozen=True)
class SweepResult:
    """How a sweep ended: its runs that finished and failed, and the one stopped on request (then
    the sweep stopped there, and the runs after it did not start)."""

    finished: int
    failed: list[str]
    stopped: str | None = None


def run_sweep(app_dir: Path, runs: Sequence[SweepRun], root: Path, *, num_supernodes: int = 10,
              client_cpus: int = 1, grid_keys: Sequence[str] = (), ray_address: str = "local",
              before_run: Callable[[Any, str, bool], None] | None = None) -> SweepResult:
    """Run every unfinished run of `runs` in turn on the Ray at `ray_address`, with a progress bar
    over runs and one over the current run's rounds; a run that fails is named in the result and
    the others go on, while one stopped on request ends the sweep. Every run's config is checked
    before the first starts, and each again (`preflight`, then `before_run(cfg, ray_address,
    quiet)`) just before it starts.
    `<root>/results.csv` (`write_results`, with `grid_keys` as columns) is rewritten after each run."""
    from tqdm import tqdm

    unwind_on_signals()
    root = Path(root)
    names = [r.name for r in runs]
    if len(set(names)) != len(names):
        raise ValueError(f"sweep run names must be unique: {names}")
    plans = [(run, _plan(app_dir, run, root)) for run in runs]  # ConfigError now, not after hours
    client_gpus = client_gpu_share(None, client_cpus)
    failed, stopped = [], None
    done = sum(action == "skip" for _, (action, _) in plans)
    with tqdm(total=len(runs), initial=done, desc="runs", unit="run", position=0) as bar:
        for run, (action, cfg) in plans:
            out = root / run.name
            if action == "skip":
                continue
            if action == "fresh" and out.exists():  # failed before any round: nothing worth keeping
                shutil.rmtree(out)
            preflight(cfg, num_supernodes, client_gpus)
            if before_run is not None:
                before_run(cfg, ray_address, True)
            bar.set_postfix_str(f"{run.name} ({action})")
            t0 = time.monotonic()
            try:
                with _RoundBar(out, cfg.num_server_rounds, run.name):
                    status = run_simulation(app_dir, cfg, num_supernodes, client_cpus=client_cpus,
                                            client_gpus=client_gpus, quiet=True, ray_address=ray_address)
            except RunFailed as exc:
                failed.append(run.name)
                bar.write(f"{run.name}: failed: {exc}")
                status = None
            write_results(root, runs, grid_keys)
            if status is not None:
                bar.write(f"{run.name}: {status.state} after round {status.last_round} in "
                          f"{time.monotonic() - t0:.0f} s, test accuracy "
                          f"{read_rows(out)[-1].get('test_accuracy', float('nan')):.3f}")
                if status.state == "stopped":
                    stopped = run.name
                    break
                done += 1
            bar.update(1)
    write_results(root, runs, grid_keys)  # also when every run was skipped
    return SweepResult(finished=done, failed=failed, stopped=stopped)


def _plan(app_dir: Path, run: SweepRun, root: Path) -> tuple[str, Any]:
    """What to do with `run` ("skip", "resume" or "fresh") and its resolved config."""
    out = root / run.name
    overrides = {**run.overrides, "output-dir": str(out)}
    earlier = read_status(out)
    if earlier is not None and earlier.finished:
        return "skip", resolve_config(app_dir, overrides)
    from fedlora.server.checkpoint import CheckpointError, load_checkpoint

    try:
        resumable = load_checkpoint(out) is not None
    except CheckpointError:
        resumable = False  # damaged: start again
    if resumable:
        return "resume", resolve_config(app_dir, {**overrides, "resume": True})
    return "fresh", resolve_config(app_dir, overrides)


class _RoundBar:
    """A progress bar over one run's rounds, fed by its metrics.jsonl from a thread."""

    def __init__(self, out: Path, rounds: int, name: str) -> None:
        self.out, self.rounds, self.name, self.stop = out, rounds, name, threading.Event()

    def __enter__(self) -> _RoundBar:
        from tqdm import tqdm

        self.bar = tqdm(total=self.rounds, desc="rounds", unit="round", position=1, leave=False)
        self.thread = threading.Thread(target=self._follow, daemon=True)
        self.thread.start()
        return self

    def _follow(self) -> None:
        while not self.stop.wait(1.0):
            rows = read_rows(self.out)
            if rows:
                self.bar.n = min(self.rounds, max(int(r.get("round", 0)) for r in rows))
                self.bar.refresh()

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()
        self.bar.close()


def write_results(root: Path, runs: Sequence[SweepRun], grid_keys: Sequence[str] = ()) -> Path:
    """`<root>/results.csv`: one row per run and round of every run that has rows, tidy: the run's
    name, its grid values, how it ended, the round and that round's metrics."""
    metric_keys = ("test_accuracy", "test_loss", "test_perplexity", "train_loss", "personalized_accuracy",
                   "num_clients", "num_rejected", "epsilon_max", "epsilon_mean", "bytes_up", "bytes_down", "seconds",
                   "client_train_seconds", "client_eval_seconds", "server_eval_seconds", "fair_cos_before",
                   "fair_cos_after", "skipped")
    table = []
    for run in runs:
        out = Path(root) / run.name
        status = read_status(out)
        for row in read_rows(out):
            table.append({"run": run.name, **{k: run.overrides.get(k) for k in grid_keys},
                          "state": status.state if status else "", "round": row.get("round"),
                          **{k: row.get(k) for k in metric_keys}})
    path = Path(root) / "results.csv"
    path.parent.mkdir(parents=True, exist_ok=True)
    columns = ["run", *grid_keys, "state", "round", *metric_keys]
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(table)
    return path


def summarize(root: Path) -> list[dict[str, Any]]:
    """One row per finished run under `root`: its settings, how it ended and final/best test accuracy."""
    out = []
    for path in sorted(Path(root).iterdir()):
        status = read_status(path)
        rows = read_rows(path)
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
