"""Simulation on a Ray cluster: which Ray the simulation uses, and a start-up check of every node.

Flower's simulation engine runs the virtual clients as Ray actors and calls `ray.init()` with only
a few settings of its own, so the `RAY_ADDRESS` environment variable is the way to point it at a
cluster (`fedlora run --ray-address HOST:PORT`, or `RAY_ADDRESS` already set). Without one, a run
gets a private local Ray (`RAY_ADDRESS=local`): a bare `ray.init()` would attach to whatever cluster
`ray start` last left on the machine (`/tmp/ray/ray_current_cluster`), even a dead one.

On a cluster the clients run on other machines and open the run's paths there: the model, the
dataset and the output folder (each client writes its privacy ledger under it) must resolve to the
same files on every node, i.e. live on a filesystem every node mounts at the same path.
`check_cluster` checks that before the run starts: it writes a marker into the output folder here
and runs a small task on every node that must find the marker, write next to it, import this
version of fedlora and find the model and the dataset. Every node that fails is named, with why.
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass
from pathlib import Path

from fedlora.core.config import ConfigError, RunConfig

__all__ = ["LOCAL", "NodeCheck", "check_cluster", "check_node", "ray_address"]

#: `RAY_ADDRESS` for a private Ray started by the simulation itself
LOCAL = "local"
_TIMEOUT = 120.0  # seconds for all nodes to answer the check (a worker may have to start first)


def ray_address(requested: str | None) -> str:
    """The Ray the simulation uses: `--ray-address`, else `RAY_ADDRESS`, else a private local one
    ("local"). As in Ray, "auto" is the cluster that `ray start` runs on this machine."""
    address = (requested or os.environ.get("RAY_ADDRESS") or LOCAL).strip()
    if address not in (LOCAL, "auto") and (":" not in address or not address.rsplit(":", 1)[1].isdigit()) \
            and not address.startswith("ray://"):
        raise ConfigError(f"--ray-address={address!r} is not HOST:PORT (the head's GCS address, as "
                          "`ray start --head --port PORT` prints it), 'auto' (the cluster `ray start` "
                          "runs on this machine) or 'local'")
    return address


@dataclass(frozen=True)
class NodeCheck:
    """What one node found: its address, and the problems (none: it can run clients of this job)."""

    node: str
    problems: tuple[str, ...]


def check_node(cfg: RunConfig, marker: str, version: str) -> NodeCheck:
    """On one node: can it run this job's clients? (Run as a Ray task pinned to the node.)"""
    import socket

    from fedlora.core import data, model
    from fedlora.core.version import VERSION

    problems = []
    if VERSION != version:
        problems.append(f"fedlora {VERSION} is installed, the run's is {version}")
    try:
        model.resolve_model_path(cfg.model)
    except ConfigError as exc:
        problems.append(str(exc))
    if not data.is_site_data(cfg):
        try:
            data.load_text_data(cfg)  # what a client loads first: the file, its columns and labels
        except ConfigError as exc:
            problems.append(str(exc))
    folder = Path(marker).parent
    if not Path(marker).is_file():
        problems.append(f"output-dir {cfg.output_dir} is not the head's folder here (the marker "
                        f"{Path(marker).name} the head wrote is missing): mount it at the same path")
    else:
        probe = folder / f"{Path(marker).name}.{socket.gethostname()}.{os.getpid()}"
        try:
            probe.write_text("ok\n")
            probe.unlink()
        except OSError as exc:
            problems.append(f"cannot write in output-dir {cfg.output_dir} ({exc.strerror})")
    return NodeCheck(socket.gethostname(), tuple(problems))


def check_cluster(cfg: RunConfig, address: str) -> list[NodeCheck]:
    """Check every live node of the cluster at `address` for `cfg` (see the module docstring);
    returns what each found, or raises `ConfigError` naming each node that cannot run the job."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from fedlora.core.version import VERSION

    logs = Path(cfg.output_dir) / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    marker = logs / f"cluster-check-{uuid.uuid4().hex}"
    marker.write_text("written by the head before the run: every node must see it\n")
    try:
        ray.init(address=address, logging_level="ERROR", log_to_driver=False, include_dashboard=False)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        marker.unlink()
        raise ConfigError(f"--ray-address={address}: no Ray cluster answers there ({exc})") from None
    try:
        nodes = [n for n in ray.nodes() if n["Alive"] and n["Resources"].get("CPU", 0) > 0]
        task = ray.remote(num_cpus=0, max_retries=0)(check_node)
        pending = [(n["NodeManagerAddress"], task.options(scheduling_strategy=NodeAffinitySchedulingStrategy(
            n["NodeID"], soft=False)).remote(cfg, str(marker), VERSION)) for n in nodes]
        found = []
        for ip, ref in pending:
            try:
                check = ray.get(ref, timeout=_TIMEOUT)
                found.append(NodeCheck(f"{ip} ({check.node})", check.problems))
            except Exception as exc:  # the task could not even run there: no fedlora, another Python
                found.append(NodeCheck(ip, (f"the check did not run ({type(exc).__name__}: "
                                            f"{str(exc).strip().splitlines()[-1][:300]}); install the same "
                                            "environment (Python, fedlora, its dependencies) on every node",)))
    finally:
        ray.shutdown()
        marker.unlink(missing_ok=True)
    bad = [c for c in found if c.problems]
    if bad:
        raise ConfigError("these Ray nodes cannot run the job's clients (docs/cluster.md):\n" + "\n".join(
            f"  node {c.node}: " + "; ".join(c.problems) for c in bad))
    return found
