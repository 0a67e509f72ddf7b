"""`fedlora submit`: run a job on a real federation (a SuperLink and the sites' SuperNodes) and
wait for its real end.

    fedlora submit [APP_DIR] --superlink HOST:PORT (--root-certificates CA.crt | --insecure)
                   [--run-config "k=v ..."] [--resume OUTPUT_DIR] [--quiet]

checks the run config here (`output-dir` is required and absolute: it is a path on the
SuperLink's machine, as are `model` and `server-test-data`), writes a throw-away FLWR_HOME whose
`config.toml` holds one connection to the SuperLink, submits with `flwr run ... --format json`,
streams the run's log (`flwr log --stream`) and asks Flower for the run's status (`flwr ls`)
until it has ended (`runner.submit_and_follow`). `flwr run --stream` exits 0 even when the
ServerApp fails; this command does not:

* exit 0: Flower reports the run `finished:completed` and, when the output-dir can be read from
  here, its status.json says `completed` or `budget-exhausted`; the last line says so (like
  `fedlora run`).
* exit 3: the run was paused on request between two rounds (`fedlora stop OUTPUT_DIR` on the
  SuperLink's machine; read from status.json, so only where the output-dir can be read from here);
  `--resume` continues it.
* exit 1: the run failed, was stopped by Flower (`flwr stop`), or hangs (no log line for max(round-timeout,
  connect-timeout) + 120 s, or the SuperLink does not answer `flwr ls` 3 times in a row); the
  reason on stderr.
* exit 2: bad input; nothing was submitted.
* 128 + N: interrupted by signal N (Ctrl-C, `kill`). Only the log streamer this command started
  is stopped: the run goes on on the SuperLink (stop it with `flwr stop RUN_ID <connection>`).

`--resume OUTPUT_DIR` continues the run in OUTPUT_DIR from its checkpoint: it submits
`resume=true output-dir=OUTPUT_DIR` over the stopped run's config when OUTPUT_DIR/run_config.json
can be read here (then `-c` may change only num-server-rounds and the timeouts), else over the
`-c` given, which must then repeat the first submission's; the ServerApp checks the config
against its checkpoint and refuses a mismatch, naming the key.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import sys
import tempfile
from pathlib import Path

from fedlora.core.config import ConfigError, RunConfig

__all__ = ["add_commands"]

PROG = "fedlora submit"
_CONNECTION = "superlink"
#: run-config keys that name files the SuperLink (or each site) reads
_PATH_KEYS = ("dataset", "model", "server-test-data")
INSECURE_WARNING = ("--insecure: the run's code and config, the model updates and every answer of the "
                    "SuperLink travel unencrypted, and nothing proves that the SuperLink is the one you "
                    "meant; use it only on a network you trust completely")


def _address(value: str) -> str:
    """HOST:PORT (an IPv6 host in brackets), else ConfigError."""
    host, _, port = value.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536 or "/" in value or " " in value:
        raise ConfigError(f"--superlink {value!r} must be HOST:PORT, e.g. superlink.example.org:9100")
    return value


def _root_certificates(path: str) -> Path:
    """The CA file as an absolute path; ConfigError if it is no PEM certificate. Warns when it
    expires within 30 days."""
    from fedlora.deploy.keys import KeysError, expiry_warning

    ca = Path(path).expanduser().resolve()
    try:
        warning = expiry_warning(ca)
    except KeysError as exc:
        raise ConfigError(f"--root-certificates: {exc}") from None
    if warning:
        print(f"{PROG}: warning: {warning}", file=sys.stderr)
    return ca


def _overrides(args: argparse.Namespace) -> dict:
    """The run config asked for: `-c`, over the stopped run's saved config when resuming one whose
    folder this machine can read (as `fedlora run --resume` does)."""
    from fedlora.simulations import cli

    if args.resume and not os.path.isabs(args.resume):
        raise ConfigError(f"--resume {args.resume!r} must be an absolute path: the output-dir on the "
                          "SuperLink's machine")
    if args.resume and (Path(args.resume) / "run_config.json").is_file():
        return cli._overrides(args)
    overrides = cli._parse_overrides(args.run_config or [])
    if args.resume:
        overrides.update({"resume": True, "output-dir": args.resume})
    return overrides


def _config(args: argparse.Namespace) -> RunConfig:
    """The validated run config; ConfigError for what can be told from here to be wrong."""
    from fedlora.simulations.runner import check_output_dir, resolve_config

    overrides = _overrides(args)
    out = str(overrides.get("output-dir") or "")
    if not out or not os.path.isabs(out):
        raise ConfigError(f"output-dir={out!r}: set it to an absolute path on the SuperLink's machine, e.g. "
                          "-c \"output-dir='/srv/fedlora/runs/run1'\" (the ServerApp writes there)")
    for key in _PATH_KEYS:
        value = str(overrides.get(key) or "")
        if os.sep in value and not os.path.isabs(value):
            raise ConfigError(f"{key}={value!r} must be an absolute path: it is read on the SuperLink's machine "
                              "(and, for dataset, at every site), not here")
    cfg = resolve_config(Path(args.app), overrides)
    if Path(cfg.output_dir).is_dir():  # the SuperLink's folder is visible here: check what we can
        check_output_dir(cfg)
    return cfg


def _flower_home(address: str, ca: Path | None, cfg: RunConfig, home: Path) -> dict[str, str]:
    """Write `home/config.toml` (one connection, `_CONNECTION`: TLS with the CA `ca`, or insecure
    when None) and the run config; the environment for `flwr` calls."""
    from fedlora.simulations.runner import write_run_config

    security = "insecure = true" if ca is None else f"root-certificates = {_toml(str(ca))}"
    (home / "config.toml").write_text(f'[superlink]\ndefault = "{_CONNECTION}"\n\n[superlink.{_CONNECTION}]\n'
                                      f"address = {_toml(address)}\n{security}\n")
    write_run_config(home / "run_config.toml", cfg)
    return {**os.environ, "FLWR_HOME": str(home), "FLWR_DISABLE_UPDATE_CHECK": "1"}


def _toml(text: str) -> str:
    import json

    return json.dumps(text)  # a JSON string is a valid TOML basic string


def _submit(args: argparse.Namespace) -> int:
    from fedlora.simulations.runner import IDLE_MARGIN, RunFailed, submit_and_follow, unwind_on_signals

    try:
        _address(args.superlink)
        cfg = _config(args)
        ca = None if args.insecure else _root_certificates(args.root_certificates)
    except ConfigError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    if args.insecure:
        print(f"{PROG}: warning: {INSECURE_WARNING}", file=sys.stderr)
    if cfg.dp and cfg.dp_reproducible:
        from fedlora.privacy import REPRODUCIBLE_WARNING

        print(f"{PROG}: warning: {REPRODUCIBLE_WARNING}", file=sys.stderr)
    unwind_on_signals()  # a `kill` stops the log streamer too
    home = Path(tempfile.mkdtemp(prefix="fedlora-submit-"))
    run_id = None

    def submitted(rid: str) -> None:
        nonlocal run_id
        run_id = rid
        if not args.quiet:
            print(f"{PROG}: run {rid} submitted to {args.superlink}; outputs in {cfg.output_dir} on the "
                  "SuperLink's machine", flush=True)

    try:
        env = _flower_home(args.superlink, ca, cfg, home)
        run_id, flower_status = submit_and_follow(
            Path(args.app), _CONNECTION, env, home / "run_config.toml", superlink=None, quiet=args.quiet,
            idle_limit=max(cfg.round_timeout, cfg.connect_timeout) + IDLE_MARGIN, on_submit=submitted)
    except RunFailed as exc:
        print(f"{PROG}: run failed: {exc}", file=sys.stderr)
        if run_id is not None:
            print(f"{PROG}: run {run_id} may still be running on the SuperLink; see `flwr ls` / "
                  f"`flwr stop {run_id}` with a connection to it", file=sys.stderr)
        return 1
    except (KeyboardInterrupt, SystemExit) as exc:
        code = 128 + signal.SIGINT if isinstance(exc, KeyboardInterrupt) else exc.code
        if not (isinstance(code, int) and code > 128):
            raise
        which = (f"run {run_id} goes on on the SuperLink: follow it with `flwr log {run_id} <connection> "
                 f"--stream`, stop it with `flwr stop {run_id} <connection>`") if run_id else \
            "the run may have been submitted before the signal: see `flwr ls <connection>`"
        print(f"{PROG}: interrupted by signal {code - 128}; stopped only the log streamer; {which}",
              file=sys.stderr, flush=True)
        return code
    finally:
        shutil.rmtree(home, ignore_errors=True)
    return _ending(cfg, run_id, flower_status)


def _ending(cfg: RunConfig, run_id: str, flower_status: str) -> int:
    """Exit status and last line of an ended run: Flower's word, and status.json's where readable."""
    from fedlora.core.status import read_status
    from fedlora.simulations import cli

    out = Path(cfg.output_dir)
    status = read_status(out)  # None: not readable from here (the SuperLink's machine)
    if flower_status == "finished:completed" and status is not None and status.state == "stopped":
        print(cli._ending(out, status, resume_with=f"{PROG} --superlink ... --resume"))
        return cli.STOPPED
    if flower_status == "finished:completed" and (status is None or status.finished):
        print(cli._ending(out, status) if status is not None else
              f"fedlora: run {run_id} completed (Flower: {flower_status}); outputs in {out} on the "
              "SuperLink's machine")
        return 0
    said = f"; status.json: {status.state} after round {status.last_round}: {status.reason}" if status else \
        f"; the ServerApp's status is in {out / 'status.json'} on the SuperLink's machine"
    print(f"{PROG}: run failed: run {run_id} ended as {flower_status!r}{said}", file=sys.stderr)
    return 1


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    """Add `submit` to the fedlora CLI; its handler returns the exit status."""
    submit = subparsers.add_parser(
        "submit", help="run a job on a deployed federation (SuperLink + SuperNodes) and wait for its end",
        description="Submit the app to a SuperLink, stream its log and exit with the run's real end: 0 "
                    "completed, 1 failed or stopped by Flower, 2 bad input, 3 paused by `fedlora stop`, 128+N "
                    "interrupted by signal N (the run itself goes on). See docs/deployment.md.")
    submit.add_argument("app", nargs="?", default=".",
                        help="the fedlora source folder (its pyproject.toml; default: .)")
    submit.add_argument("--superlink", required=True, metavar="HOST:PORT", help="the SuperLink's address")
    security = submit.add_mutually_exclusive_group(required=True)
    security.add_argument("--root-certificates", metavar="CA.crt",
                          help="the federation's CA certificate (fedlora certs): TLS to the SuperLink")
    security.add_argument("--insecure", action="store_true", help="no TLS (never across a network)")
    submit.add_argument("--run-config", "-c", action="append", metavar="'K=V ...'|FILE.toml",
                        help="run-config keys, as with `fedlora run`; output-dir is required")
    submit.add_argument("--resume", metavar="OUTPUT_DIR",
                        help="continue the run in OUTPUT_DIR (on the SuperLink's machine) from its checkpoint")
    submit.add_argument("--quiet", "-q", action="store_true", help="do not stream the run's log")
    submit.set_defaults(handler=_submit)
