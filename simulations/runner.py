"""Run the fedlora Flower app in simulation on a private, throw-away SuperLink.

`flwr run` alone has traps (flwr 1.41/1.42): it silently reuses any local SuperLink already on its
fixed port, may re-install dependencies per run, `--stream` exits 0 even when the ServerApp
raises, and sampling more clients than are connected waits forever. So `run_simulation` validates
the config first, starts its own SuperLink (simulation mode, loopback, free ports, temporary
FLWR_HOME, runtime dependency installation off) in a new process group, submits the run, streams
its log, reads the final status with `flwr ls`, and stops every process it started.

It never waits without limit: `follow_run` ends the wait as a hang when the SuperLink exits, when
`flwr ls` fails 3 times in a row, or when no log line arrives for `round-timeout` + 120 s. The run
counts as finished only when Flower reports it completed and its `status.json` says `completed` or
`budget-exhausted` (or `stopped`: paused on request, resumable); a run that failed, hung or was
interrupted is recorded there as `failed`, with the reason, when the ServerApp could not record it
itself.

A first Ctrl-C asks the ServerApp to stop before its next round (`graceful_interrupt`), so that a
private run is not charged twice for the round it would otherwise lose; a second stops everything
at once. The `flwr` processes it starts run in sessions of their own, so that the terminal's Ctrl-C
reaches only this process, which decides.
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Any

from fedlora.core.config import ConfigError, RunConfig
from fedlora.core.status import RunStatus, clear_stop, read_status, request_stop, write_status

__all__ = ["IDLE_MARGIN", "MAX_STATUS_FAILURES", "RunFailed", "app_defaults", "check_output_dir", "check_resumable",
           "client_gpu_share", "federation_config", "follow_run", "graceful_interrupt", "preflight", "resolve_config",
           "run_simulation", "submit_and_follow", "unwind_on_signals", "write_run_config"]

_CONNECTION = "fedlora-local"
#: seconds without a log line, beyond `round-timeout`, after which a run counts as hung
IDLE_MARGIN = 120.0
#: `flwr ls` failures in a row after which the SuperLink counts as unreachable
MAX_STATUS_FAILURES = 3
#: seconds between checks that the SuperLink is alive while the log is quiet
_TICK = 1.0


class RunFailed(RuntimeError):
    """The Flower run did not finish successfully."""


def app_defaults(app_dir: Path) -> dict[str, Any]:
    """`[tool.flwr.app.config]` of the app's pyproject.toml."""
    pyproject = Path(app_dir) / "pyproject.toml"
    if not pyproject.is_file():
        raise ConfigError(f"{app_dir} is not a Flower app: no pyproject.toml (run from the fedlora "
                          "checkout, or pass its path)")
    with pyproject.open("rb") as f:
        config = tomllib.load(f).get("tool", {}).get("flwr", {}).get("app", {}).get("config")
    if config is None:
        raise ConfigError(f"{pyproject} has no [tool.flwr.app.config] section")
    return config


def resolve_config(app_dir: Path, overrides: dict[str, Any], *, cwd: Path | None = None) -> RunConfig:
    """Defaults + overrides, validated, with `output-dir` made absolute (default: ./outputs/<UTC>)."""
    merged = {**app_defaults(app_dir), **overrides}
    out = str(merged.get("output-dir") or "")
    base = Path(cwd or os.getcwd())
    if not out:
        out = str(base / "outputs" / datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ"))
    merged["output-dir"] = str((base / out).resolve()) if not os.path.isabs(out) else out
    # The apps run in the SuperLink's working directory, not the user's: anchor relative paths
    # (a per-site file pattern, `{partition-id}`, is anchored whether or not it matches yet).
    for key in ("dataset", "model", "server-test-data"):
        value = str(merged.get(key) or "")
        if value and not os.path.isabs(value) and ((base / value).exists() or "{partition-id}" in value):
            merged[key] = str((base / value).resolve())
    return RunConfig.from_run_config(merged)


def preflight(cfg: RunConfig, num_supernodes: int, client_gpus: float = 0.0) -> None:
    """Everything that can fail before training, checked before any process starts: the output
    folder (a new run never overwrites one; a resumed run needs a checkpoint that fits the
    config), client count, data (file, columns, labels, partitioning), the model's presence, and
    a GPU for `precision = "bf16"` (on this machine, for the server, and a share for every client)."""
    from fedlora.core import data, model

    cfg.check_federation(num_supernodes)
    if cfg.precision != "fp32" and not (_cuda() and client_gpus > 0):
        raise ConfigError(f"precision={cfg.precision!r} needs a CUDA GPU for the server and a GPU share for the "
                          f"clients; " + ("--client-gpus is 0" if _cuda() else "this machine has none"))
    check_output_dir(cfg)
    data.server_test(cfg)
    if not data.is_site_data(cfg):
        data.partition(cfg, num_supernodes)
    for pid in range(num_supernodes):
        data.client_data(cfg, pid, num_supernodes)
    model.check_model(cfg)


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def client_gpu_share(requested: float | None, client_cpus: int) -> float:
    """The fraction of a GPU Ray reserves for each virtual client (`client-resources-num-gpus`).

    Default: none without CUDA; with it, an equal share for each client that can run at once on
    this machine's cores (`client_cpus` each), so they all fit on the GPU together. Ray shows a
    client with share 0 no GPU (it trains on the CPU) and gives one with a share its GPU; the
    ServerApp is not a Ray actor and uses the GPU when there is one.
    """
    if requested is None:
        return 1.0 / max(1, (os.cpu_count() or 1) // client_cpus) if _cuda() else 0.0
    if not 0.0 <= requested <= 1.0:
        raise ConfigError(f"--client-gpus={requested:g} must be in [0, 1]: the fraction of one GPU each client "
                          "gets (a client trains on one device)")
    if requested > 0 and not _cuda():
        raise ConfigError(f"--client-gpus={requested:g} but this machine has no CUDA GPU (use 0, the default here)")
    return float(requested)


def check_output_dir(cfg: RunConfig) -> None:
    """`ConfigError` unless `output-dir` may take the run: a new run never overwrites one, a resumed
    run needs a checkpoint that fits the config."""
    from fedlora.core.status import check_fresh

    if cfg.resume:
        check_resumable(cfg)
    else:
        try:
            check_fresh(cfg.output_dir)
        except FileExistsError as exc:
            raise ConfigError(str(exc)) from None


def check_resumable(cfg: RunConfig) -> None:
    """`ConfigError` unless `output-dir` holds a complete checkpoint whose config differs from `cfg`
    only in keys that may change on resume."""
    from fedlora.server.checkpoint import CheckpointError, check_resume, load_checkpoint

    try:
        checkpoint = load_checkpoint(Path(cfg.output_dir))
        if checkpoint is None:
            raise CheckpointError(f"{cfg.output_dir} has no checkpoint to resume (a run writes one after each round)")
        drop = ("resume",)
        check_resume({k: v for k, v in checkpoint.run_config.items() if k not in drop},
                     {k: v for k, v in cfg.to_run_config().items() if k not in drop}, checkpoint.round)
    except CheckpointError as exc:
        raise ConfigError(str(exc)) from None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _raise_exit(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)


@contextmanager
def graceful_interrupt(out_dir: Path, who: str) -> Iterator[None]:
    """While inside: the first Ctrl-C (SIGINT) asks the run in `out_dir` to stop before its next
    round (`request_stop`, naming `who`) and says so; the next gets the handler from before (Python's:
    KeyboardInterrupt). Outside the main thread (where signal handlers cannot be set), and where
    SIGINT is ignored (a background job of a non-interactive shell), nothing changes."""
    previous = signal.getsignal(signal.SIGINT)
    if threading.current_thread() is not threading.main_thread() or previous is signal.SIG_IGN:
        yield
        return
    previous = previous if previous is not None else signal.default_int_handler  # None: set outside Python

    def first(_signum: int, _frame: object) -> None:
        signal.signal(signal.SIGINT, previous)
        request_stop(out_dir, who)
        print(f"fedlora: stopping before the next round ({who}); the round in progress ends and is "
              "checkpointed. Ctrl-C again to stop at once: that round is then lost and, under DP, "
              "paid for again when resumed", file=sys.stderr, flush=True)

    signal.signal(signal.SIGINT, first)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def unwind_on_signals() -> None:
    """Make SIGTERM and SIGHUP unwind like Ctrl-C, so that a `kill` (or a CI cancel) still stops
    the SuperLink that `run_simulation` started."""
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _raise_exit)


def _flwr_bin(name: str) -> str:
    """The Flower executable next to this Python (a venv need not be activated)."""
    local = Path(sys.executable).parent / name
    return str(local) if local.exists() else (shutil.which(name) or name)


@contextmanager
def private_superlink(log_path: Path, ray_address: str = "local") -> Iterator[tuple[dict[str, str], subprocess.Popen]]:
    """A simulation SuperLink on free loopback ports whose simulation runs on the Ray at
    `ray_address` (`cluster.ray_address`: a cluster, or "local", a private one); yields the
    environment for `flwr` calls and the SuperLink's process.

    On exit the SuperLink and every process it started are terminated, then killed: flwr starts
    the SuperExec in a session of its own, so the process group alone is not enough, and a
    SuperLink that died leaves its children to init, out of reach of the process tree; they are
    found by an environment entry only the SuperLink's processes carry.
    On Linux the SuperLink also receives SIGTERM if this process dies without cleaning up.
    """
    home = Path(tempfile.mkdtemp(prefix="fedlora-flwr-home-"))
    http_port = _free_port()
    env = {**os.environ, "FLWR_HOME": str(home), "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
           "FLWR_DISABLE_UPDATE_CHECK": "1", "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1"),
           "TOKENIZERS_PARALLELISM": "false", "RAY_ADDRESS": ray_address,
           "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost",
           # the SuperLink starts `flower-superexec` from PATH: the one next to this Python
           "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])}
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "{_CONNECTION}"\n\n[superlink.{_CONNECTION}]\n'
        f'address = "127.0.0.1:{http_port}"\ninsecure = true\n')
    log_path.parent.mkdir(parents=True, exist_ok=True)
    cmd = [_flwr_bin("flower-superlink"), "--insecure", "--simulation", "--isolation", "subprocess",
           "--host", "127.0.0.1", "--port", str(http_port),
           "--database", str(home / "state.db"), "--disable-runtime-dependency-installation"]
    marker = f"FEDLORA_SUPERLINK={home}"
    with log_path.open("ab") as log_file:
        proc = subprocess.Popen(cmd, env={**env, "FEDLORA_SUPERLINK": str(home)}, cwd=home, stdout=log_file,
                                stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=_die_with_parent)
    try:
        _wait_healthy(proc, http_port, log_path)
        yield env, proc
    finally:
        _stop_tree(proc, marker=marker)
        shutil.rmtree(home, ignore_errors=True)


def _wait_healthy(proc: subprocess.Popen, port: int, log_path: Path, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RunFailed(f"flower-superlink exited with code {proc.returncode}; see {log_path}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.3)
    raise RunFailed(f"flower-superlink did not become healthy within {timeout:.0f} s; see {log_path}")


def _die_with_parent() -> None:
    """In the child, before exec: ask Linux to SIGTERM it when its parent dies."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass  # not Linux: cleanup relies on the finally block


def _children() -> dict[int, list[int]]:
    """parent pid -> live (non-zombie) child pids, from /proc (empty where there is no /proc)."""
    kids: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # exited while we looked
        if fields[0] != "Z":
            kids.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    return kids


def _descendants(pids: set[int]) -> set[int]:
    kids, out, todo = _children(), set(), list(pids)
    while todo:
        for child in kids.get(todo.pop(), []):
            if child not in out:
                out.add(child)
                todo.append(child)
    return out


def _carrying(entry: str | None) -> set[int]:
    """Processes whose environment holds `entry` ("NAME=value"), from /proc (none for None)."""
    if entry is None:
        return set()
    found = set()
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            if entry.encode() in environ.read_bytes().split(b"\0"):
                found.add(int(environ.parent.name))
        except OSError:
            continue  # exited while we looked, or not ours to read
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        return state != "Z"
    except OSError:
        try:
            os.kill(pid, 0)
            return True
        except ProcessLookupError:
            return False


def _stop_tree(proc: subprocess.Popen, grace: float = 15.0, marker: str | None = None) -> None:
    """SIGTERM `proc`, all its descendants and the processes whose environment holds `marker`,
    SIGKILL what is left after `grace` s.

    The set is looked for again until two looks in a row find nothing alive: a process may be
    born after a look (Ray's raylet starts its agents while `ray.init` is still under way), and
    once its parent is gone it is reachable only by `marker`. Nothing new can be born once no
    process of the set is alive, and the second look closes the gap of a fork between a look's
    listing of /proc and its liveness checks.
    """
    termed: set[int] = set()
    kill_at, give_up = time.monotonic() + grace, time.monotonic() + grace + 10.0
    pids, quiet = {proc.pid}, 0
    while quiet < 2 and time.monotonic() < give_up:
        pids = {p for p in pids | _descendants(pids) | _carrying(marker) if _alive(p)}
        quiet = 0 if pids else quiet + 1
        killing = time.monotonic() >= kill_at
        for pid in pids if killing else pids - termed:
            try:
                os.kill(pid, signal.SIGKILL if killing else signal.SIGTERM)
            except ProcessLookupError:
                pass
        termed |= pids
        proc.poll()
        time.sleep(0.2)
    proc.wait(timeout=5)


def _flwr(args: list[str], env: dict[str, str], timeout: float = 120.0) -> subprocess.CompletedProcess:
    try:
        return subprocess.run([_flwr_bin("flwr"), *args], env=env, text=True, capture_output=True,
                              timeout=timeout, start_new_session=True)  # out of the terminal's Ctrl-C
    except subprocess.TimeoutExpired:
        raise RunFailed(f"`flwr {args[0]}` did not answer within {timeout:.0f} s") from None


def run_simulation(app_dir: Path, cfg: RunConfig, num_supernodes: int, *, client_cpus: int = 1,
                   client_gpus: float = 0.0, quiet: bool = False, ray_address: str = "local") -> RunStatus:
    """Run the app to its end, its clients on the Ray at `ray_address` (a private local one by
    default); returns how it ended (`completed`, `budget-exhausted`, or `stopped` on request: a
    first Ctrl-C while it runs asks for that, see `graceful_interrupt`).

    Raises `RunFailed` when the run failed or hung; that and an interruption (SIGINT, or a signal
    `unwind_on_signals` turned into SystemExit) stop every process this started and leave
    `status.json` saying `failed` and why, unless the ServerApp had already recorded a finished run.
    """
    out_dir = Path(cfg.output_dir)
    logs = out_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    write_run_config(logs / "run_config.toml", cfg)
    clear_stop(out_dir)  # a request left from an earlier start is not for this one
    try:
        with graceful_interrupt(out_dir, "Ctrl-C in fedlora"):
            run_id, flower_status = _submit_and_follow(app_dir, cfg, federation_config(num_supernodes, client_cpus,
                                                                                       client_gpus), quiet, logs,
                                                       ray_address)
    except BaseException as exc:
        reason = _failure_reason(exc)
        _record_failure(out_dir, reason)
        stopped = "stopped the SuperLink, every process it started and the `flwr log` streamer"
        if isinstance(exc, RunFailed):
            raise RunFailed(f"{reason}; {stopped}; logs in {logs}") from None
        # An interruption unwinds past the CLI's RunFailed handler: say here what happened.
        print(f"fedlora: {reason}; {stopped}", file=sys.stderr, flush=True)
        raise
    return _ending(out_dir, run_id, flower_status, logs / "run.log")


def write_run_config(path: Path, cfg: RunConfig) -> None:
    """`cfg` as the TOML file `flwr run --run-config` reads."""
    path.write_text("".join(f"{k} = {json.dumps(v)}\n" for k, v in cfg.to_run_config().items()))


def federation_config(num_supernodes: int, client_cpus: int, client_gpus: float) -> str:
    """The simulation's settings for `flwr run --federation-config`: clients and each one's resources."""
    return (f"num-supernodes={num_supernodes} client-resources-num-cpus={client_cpus} "
            f"client-resources-num-gpus={client_gpus:g}")


def _submit_and_follow(app_dir: Path, cfg: RunConfig, federation: str, quiet: bool,
                       logs: Path, ray_address: str) -> tuple[str, str]:
    """Submit the run to a private SuperLink and follow its log: (run id, Flower's final status)."""
    def submitted(run_id: str) -> None:
        if not quiet:
            print(f"fedlora: run {run_id} submitted; outputs in {cfg.output_dir}", flush=True)

    with private_superlink(logs / "superlink.log", ray_address) as (env, superlink), \
            (logs / "run.log").open("a") as log_file:  # a resumed run appends
        return submit_and_follow(
            app_dir, _CONNECTION, env, logs / "run_config.toml", superlink=superlink,
            idle_limit=cfg.round_timeout + IDLE_MARGIN, quiet=quiet, log_file=log_file, on_submit=submitted,
            extra_args=["--federation-config", federation])


def submit_and_follow(app_dir: Path, connection: str, env: dict[str, str], run_config: Path, *,
                      superlink: subprocess.Popen | None, idle_limit: float, quiet: bool,
                      log_file: IO[str] | None = None, on_submit: Callable[[str], None] | None = None,
                      extra_args: list[str] | tuple[str, ...] = ()) -> tuple[str, str]:
    """`flwr run APP CONNECTION --run-config FILE --format json` with `env` (its FLWR_HOME names the
    connection), then follow the run's log (`flwr log --stream`, each line into `log_file` and, unless
    `quiet`, stdout) to the run's end with `follow_run`: (run id, Flower's final status).
    `on_submit(run_id)` is called once the run is submitted. The log streamer is stopped on any exit;
    the run itself is not touched."""
    submit = _flwr(["run", str(Path(app_dir).resolve()), connection, "--run-config", str(run_config),
                    *extra_args, "--format", "json"], env)
    try:
        run_id = str(json.loads(submit.stdout)["run-id"])
    except (ValueError, KeyError):
        raise RunFailed(f"flwr run did not start the run:\n{submit.stdout}\n{submit.stderr}") from None
    if on_submit is not None:
        on_submit(run_id)
    streamer = subprocess.Popen([_flwr_bin("flwr"), "log", run_id, connection, "--stream"],
                                env=env, text=True, errors="replace", stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=_die_with_parent)

    def on_line(line: str) -> None:
        if log_file is not None:
            log_file.write(line)
            log_file.flush()
        if not quiet:
            sys.stdout.write(line)
            sys.stdout.flush()

    try:
        return run_id, follow_run(streamer, superlink, lambda: _flwr_status(run_id, env, connection),
                                  idle_limit=idle_limit, on_line=on_line)
    finally:
        _stop_tree(streamer, grace=5.0)


def follow_run(streamer: subprocess.Popen, superlink: subprocess.Popen | None, run_status: Callable[[], str], *,
               idle_limit: float, on_line: Callable[[str], None], poll: float = 60.0,
               drain: float = 10.0) -> str:
    """Pass each line of `streamer`'s output to `on_line` until `run_status` (Flower's status of the
    run; raises `RunFailed` when it cannot tell) says the run finished; returns that status.

    Raises `RunFailed` naming the hang when the SuperLink exits (`superlink`: its process, or None for
    a SuperLink this machine does not run; `run_status` failing then tells), when `run_status` fails
    MAX_STATUS_FAILURES times in a row, or when no line arrives for `idle_limit` s. The status is
    asked at once when the stream ends and whenever `poll` s pass without a line (or another ask),
    so the end of a run is seen even if the stream hangs; while lines flow the run is alive, and
    each `flwr ls` (a second of CPU) would only slow its training. After the end, the stream's last
    lines get up to `drain` s to arrive. Stopping the processes is the caller's job.
    """
    lines: queue.Queue[str | None] = queue.Queue()
    pump = threading.Thread(target=_pump, args=(streamer.stdout, lines), daemon=True)
    pump.start()
    last_line = last_ask = time.monotonic()
    ask_now, failures = False, 0
    while True:
        due = min(max(last_line, last_ask) + poll, last_line + idle_limit)
        try:
            line = lines.get(timeout=min(_TICK, max(0.0, due - time.monotonic())))
        except queue.Empty:
            pass
        else:
            if line is None:  # the stream ended: the run finished, or the connection dropped
                ask_now = True
            else:
                on_line(line)
                last_line = time.monotonic()
        if superlink is not None and superlink.poll() is not None:
            raise RunFailed(f"the SuperLink exited (code {superlink.returncode})")
        now = time.monotonic()
        if ask_now or now >= max(last_line, last_ask) + poll:
            ask_now, last_ask = False, now
            try:
                status = run_status()
            except RunFailed as exc:
                failures += 1
                if failures >= MAX_STATUS_FAILURES:
                    raise RunFailed(f"`flwr ls` failed {failures} times in a row, the SuperLink does not "
                                    f"answer (last: {exc})") from None
            else:
                failures = 0
                if status.startswith("finished"):
                    pump.join(timeout=drain)
                    while not lines.empty():
                        if (line := lines.get_nowait()) is not None:
                            on_line(line)
                    return status
        if now - last_line >= idle_limit:
            raise RunFailed(f"no log line for {now - last_line:.0f} s (the limit is {idle_limit:.0f} s: "
                            f"round-timeout + {IDLE_MARGIN:.0f} s), the run hangs")


def _pump(stream: IO[str], lines: queue.Queue[str | None]) -> None:
    """In a thread: each line of `stream` into `lines`, then None when it ends."""
    try:
        for line in stream:
            lines.put(line)
    finally:
        lines.put(None)


def _flwr_status(run_id: str, env: dict[str, str], connection: str = _CONNECTION) -> str:
    """Flower's status of the run, e.g. `running` or `finished:completed` (one `flwr ls`)."""
    res = _flwr(["ls", connection, "--run-id", run_id, "--format", "json"], env, timeout=60.0)
    if res.returncode != 0:
        raise RunFailed(f"`flwr ls` exited with code {res.returncode}: {res.stderr.strip()[-300:]}")
    try:
        return str(json.loads(res.stdout)["runs"][0]["status"])
    except (ValueError, KeyError, IndexError, TypeError):
        raise RunFailed(f"`flwr ls` gave no status of run {run_id}: {res.stdout.strip()[:300]} "
                        f"{res.stderr.strip()[:300]}") from None


def _ending(out_dir: Path, run_id: str, flower_status: str, log: Path) -> RunStatus:
    """How the ended run ended: finished only if Flower says completed and status.json agrees."""
    status = read_status(out_dir)
    if status is None or status.state == "running":  # the ServerApp was killed, or never started
        status = _record_failure(out_dir, f"the ServerApp ended without writing its status "
                                          f"(Flower: {flower_status})")
    if flower_status == "finished:completed" and status.ended_cleanly:
        return status
    raise RunFailed(f"run {run_id} ended as {flower_status!r}, {status.state} after round "
                    f"{status.last_round}: {status.reason}; the log is in {log}")


def _record_failure(out_dir: Path, reason: str) -> RunStatus:
    """Write status.json as `failed` for `reason`, keeping its last round; a run that ended cleanly
    before the trouble (finished, or stopped on request) keeps its status. Returns what status.json
    now says."""
    status = read_status(out_dir)
    if status is not None and status.ended_cleanly:
        return status
    failed = RunStatus("failed", status.last_round if status else -1, reason)
    write_status(out_dir, failed)
    return failed


def _failure_reason(exc: BaseException) -> str:
    """Why `fedlora run` ends early, in words, from what ended it."""
    if isinstance(exc, KeyboardInterrupt):
        return f"fedlora run was interrupted by signal {int(signal.SIGINT)}"
    if isinstance(exc, SystemExit) and isinstance(exc.code, int) and exc.code > 128:  # see _raise_exit
        return f"fedlora run was interrupted by signal {exc.code - 128}"
    if isinstance(exc, RunFailed):
        return str(exc)
    return f"fedlora run failed: {type(exc).__name__}: {exc}"
