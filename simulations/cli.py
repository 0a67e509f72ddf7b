"""`fedlora` console script.

    fedlora run [APP_DIR] [--run-config "key=value ..."] [--num-supernodes N] [--client-cpus C]

validates the run config, runs the simulation on a private SuperLink (see `runner`), waits for the
end and exits 0 on success, 1 if the run failed, 2 on bad input (before anything started).
"""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

from fedlora.core.config import ConfigError

__all__ = ["main"]


def _parse_overrides(items: list[str]) -> dict:
    """`--run-config` values: 'k=v k2=v2' pairs (TOML values) or a path to a TOML file."""
    from flwr.common.config import parse_config_args

    try:
        return dict(parse_config_args(items))
    except Exception as exc:  # flwr raises ValueError/TOMLDecodeError/click errors for bad syntax
        raise ConfigError(f"--run-config could not be parsed ({exc}); use \"key=value key2='text'\"") from exc


def _raise_exit(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)


def _run(args: argparse.Namespace) -> int:
    from .runner import RunFailed, preflight, resolve_config, run_simulation

    try:
        if args.client_cpus < 1:
            raise ConfigError(f"--client-cpus={args.client_cpus} must be >= 1")
        cfg = resolve_config(Path(args.app), _parse_overrides(args.run_config or []))
        preflight(cfg, args.num_supernodes)
    except ConfigError as exc:
        print(f"fedlora: error: {exc}", file=sys.stderr)
        return 2
    # A `kill` (or a CI cancel) must still stop the SuperLink: make SIGTERM/SIGHUP unwind like Ctrl-C.
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _raise_exit)
    try:
        out = run_simulation(Path(args.app), cfg, args.num_supernodes, client_cpus=args.client_cpus,
                             quiet=args.quiet)
    except RunFailed as exc:
        print(f"fedlora: run failed: {exc}", file=sys.stderr)
        return 1
    print(f"fedlora: finished; metrics in {out / 'metrics.jsonl'}, adapter in {out / 'adapter'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fedlora", description="Federated LoRA fine-tuning on Flower.")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the app in simulation and wait for it to finish")
    run.add_argument("app", nargs="?", default=".", help="the Flower app folder (default: .)")
    run.add_argument("--run-config", "-c", action="append", metavar="'K=V ...'|FILE.toml",
                     help="override [tool.flwr.app.config] keys, as with `flwr run --run-config`")
    run.add_argument("--num-supernodes", type=int, default=10,
                     help="number of simulated clients (default: 10)")
    run.add_argument("--client-cpus", type=int, default=1,
                     help="CPU cores per simulated client; clients run in parallel on the cores "
                          "left (default: 1)")
    run.add_argument("--quiet", "-q", action="store_true", help="do not stream the run's log")
    args = parser.parse_args(argv)
    return _run(args)


if __name__ == "__main__":
    sys.exit(main())
