"""`fedlora` console script.

    fedlora run [APP_DIR] [--run-config "key=value ..."] [--num-supernodes N] [--client-cpus C] [--client-gpus F]
                [--ray-address HOST:PORT]
    fedlora run [APP_DIR] --resume OUTPUT_DIR [--run-config "num-server-rounds=..."]

validates the run config, runs the simulation on a private SuperLink (see `runner`) and waits for
its end. `--resume` continues a run that stopped (crashed, killed, or asked for more rounds) from
the checkpoint in its folder, with its saved config; only `num-server-rounds` and the timeouts may
change. Exit 0: the run completed, or stopped early because every client's privacy budget was
spent; the last line says which, after what round, and lists the outputs it wrote. Exit 1: the run
failed or hung (the reason on stderr and in `<output-dir>/status.json`). Exit 2: bad input, before
anything started. Exit 3: stopped on request between two rounds (a first Ctrl-C, or `fedlora stop`),
its last round checkpointed: `--resume` continues it. 128 + N: stopped at once by signal N (a second
Ctrl-C, `kill`); every process it started is stopped.
With `--ray-address` (or `RAY_ADDRESS`) the clients run on that Ray cluster, after a check that
every node sees the run's model, data and output folder (`cluster`, docs/cluster.md).

    fedlora sweep EXPERIMENT.toml [--app APP_DIR] [--ray-address HOST:PORT]

runs every cell of an experiment's grid (`sweep`: one `fedlora run` each, into its own folder),
skipping finished cells and resuming interrupted ones, so the same command continues a sweep.
Exit 0: every cell finished; 1: some failed (the others ran); 2: bad input; 3: stopped on request
(a first Ctrl-C stops the cell in progress before its next round, and the sweep there).

    fedlora stop OUTPUT_DIR

asks the run writing to OUTPUT_DIR (a simulation, or a deployed run on the SuperLink's machine) to
stop before its next round: it checkpoints the round in progress, writes `stopped` in status.json
and ends; `--resume` continues it with nothing run or paid for twice.

    fedlora report SWEEP_DIR|RUN_DIR [--out FOLDER]

plots (accuracy with a band over seeds, ε, bytes per round) and a table with paired differences
between methods (`report`).

    fedlora privacy plan (--epsilon E | --sigma S) --delta D (--sample-rate Q | --num-examples N
                         --batch-size B) --steps T [--accountant prv|rdp] [--json]
    fedlora privacy report OUTPUT_DIR|SITE_DIR [--json]
    fedlora privacy audit [--run-config "..."] [--epsilon E | --sigma S] [--steps T] [--sample-rate Q]
                          [--canaries M] [--guesses K] [--control] [--json] ...

`plan` prints the noise multiplier that meets a target ε, or the ε a noise multiplier spends;
`report` prints the budget each client of a DP run has spent, from its ledger; `audit` trains one
client's DP-SGD once with canaries and prints an empirical lower bound on ε beside the
accountant's (`fedlora.privacy.audit`): exit 0 when no bound exceeds it, 1 when one does (a
violation). All exit 2 on bad input.

    fedlora check-data FILE --labels a,b,c      a site checks its file before joining
    fedlora certs OUT_DIR --host H ...          the CA and the SuperLink's TLS certificate
    fedlora keys OUT_DIR [--name NAME]          a site's SuperNode key pair
    fedlora submit [APP_DIR] --superlink H:P (--root-certificates CA | --insecure) -c "output-dir=..."
                                                a run on a deployed federation, to its real end (docs/deployment.md)
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
from pathlib import Path

from fedlora.core.config import ConfigError
from fedlora.core.status import RunStatus

__all__ = ["main"]

#: what a finished run may leave in its output-dir, in the order the last line lists those it has
_OUTPUTS = (("metrics", "metrics.jsonl"), ("adapter", "adapter"), ("merged model", "merged"),
            ("each client's adapter", "adapters"), ("privacy budgets", "privacy.json"))
_FEDERATION = "federation.json"  # in <output-dir>/logs: the simulation's client count, for --resume
STOPPED = 3  # the exit status of a run (or sweep) stopped on request between rounds


def _parse_overrides(items: list[str]) -> dict:
    """`--run-config` values: 'k=v k2=v2' pairs (TOML values) or a path to a TOML file."""
    from flwr.common.config import parse_config_args

    try:
        return dict(parse_config_args(items))
    except Exception as exc:  # flwr raises ValueError/TOMLDecodeError/click errors for bad syntax
        raise ConfigError(f"--run-config could not be parsed ({exc}); use \"key=value key2='text'\"") from exc


def _federation(args: argparse.Namespace) -> int:
    """--num-supernodes: as given, else the resumed run's, else 10. A resumed run must keep its
    clients: the partitions (and so every client's data) depend on their number."""
    saved = None
    if args.resume:
        try:
            saved = json.loads((Path(args.resume) / "logs" / _FEDERATION).read_text())["num-supernodes"]
        except (OSError, ValueError, KeyError):
            pass
    if saved is not None and args.num_supernodes not in (None, saved):
        raise ConfigError(f"--num-supernodes={args.num_supernodes}, but the run in {args.resume} has {saved} "
                          "clients: a resumed run keeps its clients")
    return args.num_supernodes or saved or 10


def _overrides(args: argparse.Namespace) -> dict:
    """The run config: `--run-config` values; on resume over the stopped run's saved config."""
    overrides = _parse_overrides(args.run_config or [])
    if not args.resume:
        return overrides
    folder = Path(args.resume).resolve()
    try:
        saved = json.loads((folder / "run_config.json").read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"--resume {args.resume}: not a run folder ({exc})") from None
    return {**saved, **overrides, "resume": True, "output-dir": str(folder)}


def _run(args: argparse.Namespace) -> int:
    from .cluster import ray_address
    from .runner import RunFailed, client_gpu_share, preflight, resolve_config, run_simulation, unwind_on_signals

    try:
        if args.client_cpus < 1:
            raise ConfigError(f"--client-cpus={args.client_cpus} must be >= 1")
        client_gpus = client_gpu_share(args.client_gpus, args.client_cpus)
        num_supernodes = _federation(args)
        cfg = resolve_config(Path(args.app), _overrides(args))
        address = ray_address(args.ray_address)
        preflight(cfg, num_supernodes, client_gpus)
        _check_cluster(cfg, address, args.quiet)
    except ConfigError as exc:
        print(f"fedlora: error: {exc}", file=sys.stderr)
        return 2
    if cfg.dp and cfg.dp_reproducible:
        from fedlora.privacy import REPRODUCIBLE_WARNING

        print(f"fedlora: warning: {REPRODUCIBLE_WARNING}", file=sys.stderr)
    unwind_on_signals()  # a `kill` (or a CI cancel) must still stop the SuperLink
    logs = Path(cfg.output_dir) / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    (logs / _FEDERATION).write_text(json.dumps({"num-supernodes": num_supernodes}) + "\n")
    try:
        status = run_simulation(Path(args.app), cfg, num_supernodes, client_cpus=args.client_cpus,
                                client_gpus=client_gpus, quiet=args.quiet, ray_address=address)
    except RunFailed as exc:
        print(f"fedlora: run failed: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # the runner has said so and stopped everything: no traceback
        return 128 + signal.SIGINT
    print(_ending(Path(cfg.output_dir), status))
    return STOPPED if status.state == "stopped" else 0


def _check_cluster(cfg, address: str, quiet: bool) -> None:
    """On a Ray cluster, check every node before the run (`cluster.check_cluster`)."""
    from .cluster import LOCAL, check_cluster

    if address == LOCAL:
        return
    nodes = check_cluster(cfg, address)
    if not quiet:
        print(f"fedlora: Ray cluster at {address}: {len(nodes)} nodes see the model, the data and "
              f"output-dir ({', '.join(n.node for n in nodes)})", flush=True)


def _ending(out: Path, status: RunStatus, resume_with: str = "fedlora run --resume") -> str:
    """The last line of an ended run: how it ended, and where the outputs it wrote are; a stopped
    run's says the command (`resume_with` OUTPUT_DIR) that continues it."""
    if status.state == "completed":
        how = f"completed after round {status.last_round}"
    elif status.state == "stopped":
        how = (f"stopped after round {status.last_round} on request ({status.reason}); continue with "
               f"`{resume_with} {out}`")
    else:
        how = f"stopped early after round {status.last_round}: {status.state} ({status.reason})"
    return f"fedlora: {how}; " + ", ".join(f"{what} in {out / name}" for what, name in _OUTPUTS
                                           if (out / name).exists())


def _privacy_plan(args: argparse.Namespace) -> int:
    from fedlora.privacy import PrivacyError, sample_rate
    from fedlora.privacy.report import format_plan, plan

    try:
        by_size = args.num_examples is not None or args.batch_size is not None
        if args.sample_rate is not None and by_size:
            raise PrivacyError("--sample-rate cannot be combined with --num-examples/--batch-size")
        if args.sample_rate is None and (args.num_examples is None or args.batch_size is None):
            raise PrivacyError("give either --sample-rate, or both --num-examples and --batch-size")
        q = args.sample_rate if args.sample_rate is not None else sample_rate(args.num_examples,
                                                                              args.batch_size)
        result = plan(delta=args.delta, sample_rate=q, steps=args.steps, accountant=args.accountant,
                      target_epsilon=args.epsilon, sigma=args.sigma)
    except PrivacyError as exc:
        print(f"fedlora privacy plan: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(result) if args.json else format_plan(result))
    return 0


def _privacy_report(args: argparse.Namespace) -> int:
    from fedlora.privacy import PrivacyError, load_ledgers
    from fedlora.privacy.report import format_report, summarize

    try:
        rows = summarize(load_ledgers(args.output_dir))
    except PrivacyError as exc:
        print(f"fedlora privacy report: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps({"output_dir": str(args.output_dir), "clients": rows}) if args.json
          else format_report(rows))
    return 0


def _privacy_audit(args: argparse.Namespace) -> int:
    from fedlora.core.config import RunConfig
    from fedlora.privacy import PrivacyError
    from fedlora.privacy.audit import AuditSettings, format_audit, run_audit

    try:
        cfg = RunConfig.from_run_config(_parse_overrides(args.run_config or []))
        settings = AuditSettings(
            epsilon=args.epsilon if args.sigma is None else None, sigma=args.sigma, steps=args.steps,
            sample_rate=args.sample_rate, canaries=args.canaries,
            delta=cfg.target_delta if args.delta is None else args.delta, confidence=args.confidence,
            guesses=args.guesses, client=args.client, num_clients=args.num_clients, control=args.control,
            seed=args.seed)
        result = run_audit(cfg, settings, progress=lambda line: print(f"fedlora privacy audit: {line}",
                                                                      file=sys.stderr, flush=True))
    except (PrivacyError, ConfigError) as exc:
        print(f"fedlora privacy audit: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(result) if args.json else format_audit(result))
    return 1 if result["violation"] else 0


def _add_privacy(sub: argparse._SubParsersAction) -> None:
    from fedlora.privacy import ACCOUNTANTS

    privacy = sub.add_parser("privacy", help="plan a DP budget, report what a DP run spent, or audit DP-SGD")
    commands = privacy.add_subparsers(dest="privacy_command", required=True)
    plan = commands.add_parser(
        "plan", help="noise multiplier for a target epsilon, or epsilon of a noise multiplier",
        description="Exactly one of --epsilon (prints sigma) or --sigma (prints epsilon). The sample "
                    "rate is --sample-rate, or min(1, batch-size / num-examples); steps are all local "
                    "steps a client takes over the run (rounds it trains in × local-steps).")
    target = plan.add_mutually_exclusive_group(required=True)
    target.add_argument("--epsilon", type=float, help="target epsilon: print the noise multiplier")
    target.add_argument("--sigma", type=float, help="noise multiplier: print the epsilon it spends")
    plan.add_argument("--delta", type=float, required=True, help="delta of the (epsilon, delta) guarantee")
    plan.add_argument("--sample-rate", type=float, help="Poisson sampling rate q of a step")
    plan.add_argument("--num-examples", type=int, help="a client's training examples (with --batch-size)")
    plan.add_argument("--batch-size", type=int, help="expected batch size (with --num-examples)")
    plan.add_argument("--steps", type=int, required=True, help="DP-SGD steps over the whole run")
    plan.add_argument("--accountant", choices=ACCOUNTANTS, default="prv", help="default: prv")
    plan.add_argument("--json", action="store_true", help="print one JSON object")
    plan.set_defaults(handler=_privacy_plan)
    report = commands.add_parser("report", help="budget spent by each client of a DP run")
    report.add_argument("output_dir", type=Path,
                        help="the run's output-dir (ledgers in its privacy/), or a site's site-dir")
    report.add_argument("--json", action="store_true", help="print one JSON object")
    report.set_defaults(handler=_privacy_report)
    audit = commands.add_parser(
        "audit", help="an empirical lower bound on epsilon from one DP-SGD run with canaries",
        description="Train one client's DP-SGD once, as a run would (the run config's model, strategy, data, "
                    "clipping), with canaries as extra sample slots, and bound epsilon from below by how well "
                    "an auditor tells which canaries were in (Steinke et al. 2023). Exit 0: no bound exceeds "
                    "the accountant's epsilon; 1: one does (a violation); 2: bad input.")
    audit.add_argument("--run-config", "-c", action="append", metavar="'K=V ...'|FILE.toml",
                       help="the run config (default: the default job); its model, strategy, data, batch-size, "
                            "max-grad-norm, accountant and seed are audited")
    noise = audit.add_mutually_exclusive_group()
    noise.add_argument("--epsilon", type=float, default=2.0,
                       help="calibrate sigma to this epsilon over --steps at q (default: 2, where a violation can show)")
    noise.add_argument("--sigma", type=float, help="audit this noise multiplier instead")
    audit.add_argument("--steps", type=int, default=100, help="DP-SGD steps of the audited run (default: 100)")
    audit.add_argument("--sample-rate", type=float, default=0.0,
                       help="Poisson rate q (default: the client's training q, batch-size / its records)")
    audit.add_argument("--canaries", type=int, default=1000, help="canaries, each in with probability 1/2 (default: 1000)")
    audit.add_argument("--delta", type=float, default=None, help="delta (default: the run config's target-delta)")
    audit.add_argument("--confidence", type=float, default=0.95, help="confidence of the bound (default: 0.95)")
    audit.add_argument("--guesses", type=int, default=0,
                       help="guesses per side, fixed in advance (default: 0, the best of a grid, Bonferroni-corrected)")
    audit.add_argument("--client", type=int, default=0, help="the audited client's partition (default: 0)")
    audit.add_argument("--num-clients", type=int, default=10, help="clients the data is split into (default: 10)")
    audit.add_argument("--control", action="store_true",
                       help="the records contribute zero gradients: the audit without their blur")
    audit.add_argument("--seed", type=int, default=None,
                       help="seed of the canaries' coordinates and membership (default: OS entropy)")
    audit.add_argument("--json", action="store_true", help="print one JSON object")
    audit.set_defaults(handler=_privacy_audit)


def _sweep(args: argparse.Namespace) -> int:
    """`fedlora sweep`: 0 when every run finished, 1 when some failed (the others ran), 2 bad input,
    3 stopped on request."""
    from .cluster import ray_address
    from .sweep import Experiment, run_sweep

    try:
        experiment = Experiment.from_toml(args.experiment)
        runs = experiment.runs()
        result = run_sweep(Path(args.app), runs, experiment.root, num_supernodes=experiment.num_supernodes,
                           client_cpus=experiment.client_cpus, grid_keys=experiment.columns(),
                           ray_address=ray_address(args.ray_address), before_run=_check_cluster)
    except ConfigError as exc:
        print(f"fedlora: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 128 + signal.SIGINT
    print(f"fedlora sweep: {result.finished} of {len(runs)} runs finished"
          + (f"; failed: {', '.join(result.failed)}" if result.failed else "")
          + (f"; stopped on request in {result.stopped}: the same command resumes it" if result.stopped else "")
          + f"; results in {experiment.root / 'results.csv'}")
    return STOPPED if result.stopped else 1 if result.failed else 0


def _stop(args: argparse.Namespace) -> int:
    """`fedlora stop`: 0 when the request is written, 2 when OUTPUT_DIR holds no running run."""
    from fedlora.core.status import read_status, request_stop

    status = read_status(args.output_dir)
    if status is None:
        print(f"fedlora stop: error: {args.output_dir} holds no run (no readable status.json)", file=sys.stderr)
        return 2
    if status.state != "running":
        print(f"fedlora stop: error: the run in {args.output_dir} is not running ({status.state} after round "
              f"{status.last_round}); nothing to stop", file=sys.stderr)
        return 2
    request_stop(args.output_dir, "fedlora stop")
    print(f"fedlora stop: asked the run in {args.output_dir} to stop before its next round (round "
          f"{status.last_round} is done); it checkpoints the round in progress, then writes 'stopped' in "
          "status.json.")
    return 0


_RAY_HELP = ("run the clients on this Ray cluster (its head's address; default: $RAY_ADDRESS, else a private "
             "local Ray); every node must see the run's paths (docs/cluster.md)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fedlora", description="Federated LoRA fine-tuning on Flower.")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the app in simulation and wait for it to finish")
    run.add_argument("app", nargs="?", default=".", help="the Flower app folder (default: .)")
    run.add_argument("--run-config", "-c", action="append", metavar="'K=V ...'|FILE.toml",
                     help="override [tool.flwr.app.config] keys, as with `flwr run --run-config`")
    run.add_argument("--num-supernodes", type=int, default=None,
                     help="number of simulated clients (default: 10, or the resumed run's)")
    run.add_argument("--resume", metavar="OUTPUT_DIR",
                     help="continue the run in OUTPUT_DIR from its checkpoint, with its saved config")
    run.add_argument("--client-cpus", type=int, default=1,
                     help="CPU cores per simulated client; clients run in parallel on the cores "
                          "left (default: 1)")
    run.add_argument("--client-gpus", type=float, default=None, metavar="FRACTION",
                     help="the share of a GPU each simulated client reserves; 0 keeps clients on the CPU "
                          "(default: 0 without a GPU, else an equal share for each client running at once)")
    run.add_argument("--quiet", "-q", action="store_true", help="do not stream the run's log")
    run.add_argument("--ray-address", metavar="HOST:PORT", default=None, help=_RAY_HELP)
    run.set_defaults(handler=_run)
    sweep = sub.add_parser("sweep", help="run every cell of an experiment's grid (again: resume it)")
    sweep.add_argument("experiment", type=Path, help="the experiment file (TOML: output-dir, [base], [grid] or several [[grid]])")
    sweep.add_argument("--app", default=".", help="the Flower app folder (default: .)")
    sweep.add_argument("--ray-address", metavar="HOST:PORT", default=None, help=_RAY_HELP)
    sweep.set_defaults(handler=_sweep)
    stop = sub.add_parser("stop", help="ask a run to stop before its next round (resumable, nothing paid twice)",
                          description="Write a stop request into OUTPUT_DIR: the ServerApp writing there stops "
                                      "before its next round, its last round checkpointed, and status.json says "
                                      "'stopped'; --resume continues it. Run it where OUTPUT_DIR is (a deployed "
                                      "run: on the SuperLink's machine). Exit 0: asked; 2: no running run there.")
    stop.add_argument("output_dir", type=Path, help="the run's output-dir")
    stop.set_defaults(handler=_stop)
    _add_privacy(sub)
    from fedlora.deploy.keys import add_commands as add_key_commands
    from fedlora.deploy.submit import add_commands as add_submit_commands

    from .checkdata import add_commands as add_data_commands
    from .report import add_commands as add_report_commands

    add_data_commands(sub)
    add_report_commands(sub)
    add_key_commands(sub)
    add_submit_commands(sub)
    args = parser.parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
