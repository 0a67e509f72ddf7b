"""Run the fedlora Flower app in simulation on a private, throw-away SuperLink.

`flwr run` alone has traps (flwr 1.41/1.42): it silently reuses any local SuperLink already on its
fixed port, may re-install dependencies per run, `--stream` exits 0 even when the ServerApp
raises, and sampling more clients than are connected waits forever. So `run_simulation` validates
the config first, starts its own SuperLink (simulation mode, loopback, free ports, temporary
FLWR_HOME, runtime dependency installation off) in a new process group, submits the run, streams
its log, reads the final status with `flwr ls`, and stops every process it started.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import tomllib
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from fedlora.core.config import ConfigError, RunConfig

__all__ = ["RunFailed", "app_defaults", "preflight", "resolve_config", "run_simulation", "unwind_on_signals"]

_CONNECTION = "fedlora-local"


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
    # The apps run in the SuperLink's working directory, not the user's: anchor relative paths.
    for key in ("dataset", "model"):
        value = str(merged.get(key) or "")
        if value and not os.path.isabs(value) and (base / value).exists():
            merged[key] = str((base / value).resolve())
    return RunConfig.from_run_config(merged)


def preflight(cfg: RunConfig, num_supernodes: int) -> None:
    """Everything that can fail before training, checked before any process starts:
    client count, data (file, columns, partitioning) and the model's presence."""
    from fedlora.core import data, model

    cfg.check_federation(num_supernodes)
    if (Path(cfg.output_dir) / "metrics.jsonl").exists():
        raise ConfigError(f"output-dir={cfg.output_dir!r} already holds a run; choose another folder")
    data.split_test(cfg)
    data.partition(cfg, num_supernodes)
    for pid in range(num_supernodes):
        data.client_data(cfg, pid, num_supernodes)
    model.check_model(cfg)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _raise_exit(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)


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
def private_superlink(log_path: Path) -> Iterator[dict[str, str]]:
    """A simulation SuperLink on free loopback ports; yields the environment for `flwr` calls.

    On exit the SuperLink and every process descended from it are terminated, then killed:
    flwr starts the SuperExec in a session of its own, so the process group alone is not enough.
    On Linux the SuperLink also receives SIGTERM if this process dies without cleaning up.
    """
    home = Path(tempfile.mkdtemp(prefix="fedlora-flwr-home-"))
    http_port = _free_port()
    env = {**os.environ, "FLWR_HOME": str(home), "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
           "FLWR_DISABLE_UPDATE_CHECK": "1", "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1"),
           "TOKENIZERS_PARALLELISM": "false",
           "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
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
    with log_path.open("ab") as log_file:
        proc = subprocess.Popen(cmd, env=env, cwd=home, stdout=log_file, stderr=subprocess.STDOUT,
                                start_new_session=True, preexec_fn=_die_with_parent)
    try:
        _wait_healthy(proc, http_port, log_path)
        yield env
    finally:
        _stop_tree(proc)
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


def _descendants(pid: int) -> set[int]:
    kids, out, todo = _children(), set(), [pid]
    while todo:
        for child in kids.get(todo.pop(), []):
            if child not in out:
                out.add(child)
                todo.append(child)
    return out


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


def _stop_tree(proc: subprocess.Popen, grace: float = 15.0) -> None:
    """SIGTERM the SuperLink and all its descendants, SIGKILL what is left after `grace` s."""
    pids = {proc.pid} | _descendants(proc.pid)
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        pids |= {d for p in list(pids) for d in _descendants(p)}  # late-born children too
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline and any(_alive(p) for p in pids):
            proc.poll()
            time.sleep(0.2)
        if not any(_alive(p) for p in pids):
            break
    proc.wait(timeout=5)


def _flwr(args: list[str], env: dict[str, str], timeout: float = 120.0) -> subprocess.CompletedProcess:
    try:
        return subprocess.run([_flwr_bin("flwr"), *args], env=env, text=True, capture_output=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        raise RunFailed(f"`flwr {args[0]}` did not answer within {timeout:.0f} s") from None


def run_simulation(app_dir: Path, cfg: RunConfig, num_supernodes: int, *, client_cpus: int = 1,
                   quiet: bool = False) -> Path:
    """Run the app to completion; returns the output dir, raises `RunFailed` if the run failed."""
    out_dir = Path(cfg.output_dir)
    logs = out_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    overrides = logs / "run_config.toml"
    overrides.write_text("".join(f"{k} = {json.dumps(v)}\n" for k, v in cfg.to_run_config().items()))
    with private_superlink(logs / "superlink.log") as env:
        submit = _flwr(["run", str(Path(app_dir).resolve()), _CONNECTION, "--run-config", str(overrides),
                        "--federation-config",
                        f"num-supernodes={num_supernodes} client-resources-num-cpus={client_cpus}",
                        "--format", "json"],
                       env)
        try:
            run_id = str(json.loads(submit.stdout)["run-id"])
        except (ValueError, KeyError):
            raise RunFailed(f"flwr run did not start the run:\n{submit.stdout}\n{submit.stderr}") from None
        if not quiet:
            print(f"fedlora: run {run_id} submitted; outputs in {out_dir}", flush=True)
        with (logs / "run.log").open("w") as log_file:
            streamer = subprocess.Popen([_flwr_bin("flwr"), "log", run_id, _CONNECTION, "--stream"],
                                        env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
            assert streamer.stdout is not None
            for line in streamer.stdout:
                log_file.write(line)
                log_file.flush()
                if not quiet:
                    sys.stdout.write(line)
                    sys.stdout.flush()
            streamer.wait()
        status = _run_status(run_id, env)
    if status != "finished:completed":
        raise RunFailed(f"run {run_id} ended as {status!r}; the log is in {logs / 'run.log'}")
    return out_dir


def _run_status(run_id: str, env: dict[str, str], poll: float = 2.0) -> str:
    """The run's final status from `flwr ls`, polled until it has finished.

    The log stream can end before the run does (a dropped connection); the ServerApp's own
    `round-timeout` bounds how long a live run can wait for its clients.
    """
    while True:
        res = _flwr(["ls", _CONNECTION, "--run-id", run_id, "--format", "json"], env)
        try:
            status = json.loads(res.stdout)["runs"][0]["status"]
        except (ValueError, KeyError, IndexError):
            raise RunFailed(f"cannot read the status of run {run_id}: {res.stdout.strip()[:300]} "
                            f"{res.stderr.strip()[:300]}") from None
        if status.startswith("finished"):
            return status
        time.sleep(poll)
