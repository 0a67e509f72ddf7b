"""`fedlora run` never waits without limit and always says how a run ended.

`follow_run` is driven by stand-in processes (short Python scripts) and a fake `flwr ls`, with
limits of a second or so: a SuperLink that exits, a status that cannot be read three times in a
row, and a log that goes quiet are each a hang; a run whose status turns finished is followed to
its end, also when its log stream hangs. `run_simulation` records in status.json how a run that
failed, hung or was interrupted ended, and the CLI's last line names the outputs that exist. A
first Ctrl-C asks for a stop between rounds (a file the ServerApp reads), a second stops at once;
`fedlora stop` writes that request. No Flower process is started.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable, Iterator

import pytest

from conftest import REPO
from fedlora.core.status import RunStatus, read_status, request_stop, stop_request, write_status
from fedlora.simulations import cli, runner
from fedlora.simulations.runner import RunFailed, follow_run, resolve_config, run_simulation

SLEEP = "import time; time.sleep(60)"
LINES_THEN_SLEEP = "import time\nfor i in range(3): print(f'line {i}', flush=True)\ntime.sleep(60)"
LINES_THEN_EXIT = "for i in range(3): print(f'line {i}', flush=True)"


@pytest.fixture
def python() -> Iterator[Callable[[str], subprocess.Popen]]:
    """Starts `python -c CODE` with its stdout piped; kills what is still running afterwards."""
    started: list[subprocess.Popen] = []

    def start(code: str) -> subprocess.Popen:
        started.append(subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True))
        return started[-1]

    yield start
    for proc in started:
        proc.kill()
        proc.wait()
        proc.stdout.close()


def _answers(*answers: str | Exception) -> Callable[[], str]:
    """A `flwr ls` stand-in giving `answers` in turn (raising the exceptions), then the last forever."""
    given = list(answers)

    def status() -> str:
        answer = given.pop(0) if len(given) > 1 else given[0]
        if isinstance(answer, Exception):
            raise answer
        return answer

    return status


def _follow(streamer, superlink, status, idle_limit: float = 30.0) -> tuple[str, list[str], float]:
    lines: list[str] = []
    t0 = time.monotonic()
    result = follow_run(streamer, superlink, status, idle_limit=idle_limit, on_line=lines.append, poll=0.2,
                        drain=0.5)
    return result, lines, time.monotonic() - t0


@pytest.mark.parametrize("stream", [LINES_THEN_EXIT, LINES_THEN_SLEEP], ids=["stream-ends", "stream-hangs"])
def test_a_run_is_followed_to_its_end(python, stream):
    status = _answers("running", "running", "finished:completed")
    result, lines, took = _follow(python(stream), python(SLEEP), status)
    assert result == "finished:completed"
    assert lines == ["line 0\n", "line 1\n", "line 2\n"]
    assert took < 10


def test_a_superlink_that_exits_is_a_hang(python):
    superlink = python("import time, sys; time.sleep(0.5); sys.exit(3)")
    with pytest.raises(RunFailed, match=r"the SuperLink exited \(code 3\)"):
        _follow(python(LINES_THEN_SLEEP), superlink, _answers("running"))


def test_three_failed_status_calls_in_a_row_are_a_hang(python):
    refused = RunFailed("`flwr ls` exited with code 1: connection refused")
    with pytest.raises(RunFailed, match=r"`flwr ls` failed 3 times in a row.*connection refused"):
        _follow(python(LINES_THEN_SLEEP), python(SLEEP), _answers(refused))
    # failures that are not in a row are not a hang
    status = _answers(refused, refused, "running", refused, refused, "finished:completed")
    assert _follow(python(LINES_THEN_SLEEP), python(SLEEP), status)[0] == "finished:completed"


def test_a_quiet_log_is_a_hang(python):
    t0 = time.monotonic()
    with pytest.raises(RunFailed, match=r"no log line for \d+ s \(the limit is 2 s: round-timeout \+ 120 s\)"):
        _follow(python(LINES_THEN_SLEEP), python(SLEEP), _answers("running"), idle_limit=2.0)
    assert 2.0 <= time.monotonic() - t0 < 10


@pytest.mark.parametrize("res, error", [
    (subprocess.CompletedProcess([], 1, "", "connection refused"), "exited with code 1: connection refused"),
    (subprocess.CompletedProcess([], 0, "Traceback ...", ""), "gave no status of run 7"),
    (subprocess.CompletedProcess([], 0, '{"runs": []}', ""), "gave no status of run 7"),
])
def test_a_status_call_that_fails_says_how(monkeypatch, res, error):
    monkeypatch.setattr(runner, "_flwr", lambda args, env, timeout: res)
    with pytest.raises(RunFailed, match=error):
        runner._flwr_status("7", {})


def _cfg(tmp_path):
    return resolve_config(REPO, {"output-dir": str(tmp_path / "run")})


def _fake_run(monkeypatch, written: RunStatus | None, ends: BaseException | str) -> None:
    """`run_simulation` with Flower replaced: the ServerApp writes `written`, then the run ends as
    `ends` (Flower's final status) or with that exception."""
    def submit_and_follow(app_dir, cfg, *args):
        if written is not None:
            write_status(cfg.output_dir, written)
        if isinstance(ends, BaseException):
            raise ends
        return "7", ends

    monkeypatch.setattr(runner, "_submit_and_follow", submit_and_follow)


@pytest.mark.parametrize("written", [RunStatus("completed", 5, "all 5 rounds ran"),
                                     RunStatus("budget-exhausted", 3, "stopped before round 4"),
                                     RunStatus("stopped", 2, "stopped before round 3, asked by fedlora stop")])
def test_a_finished_run_returns_its_status(tmp_path, monkeypatch, written):
    _fake_run(monkeypatch, written, "finished:completed")
    assert run_simulation(REPO, _cfg(tmp_path), 3) == written


@pytest.mark.parametrize("written, ends, last_round, reason", [
    (None, SystemExit(128 + 15), -1, "fedlora run was interrupted by signal 15"),
    (RunStatus("running", 3, "round 3 of 50 done"), KeyboardInterrupt(), 3,
     "fedlora run was interrupted by signal 2"),
    # the ServerApp writes `failed` when its process is stopped: the cause is the signal
    (RunStatus("failed", 3, "SystemExit: 1"), SystemExit(128 + 15), 3, "fedlora run was interrupted by signal 15"),
    (RunStatus("running", 2, "round 2 of 50 done"), RunFailed("the SuperLink exited (code -9)"), 2,
     "the SuperLink exited (code -9)"),
    (RunStatus("running", 2, "round 2 of 50 done"), "finished:completed", 2,
     "the ServerApp ended without writing its status (Flower: finished:completed)"),
    (None, "finished:failed", -1, "the ServerApp ended without writing its status (Flower: finished:failed)"),
    (RunStatus("failed", 1, "RuntimeError: out of memory"), "finished:failed", 1, "RuntimeError: out of memory"),
], ids=["sigterm", "sigint", "sigterm-after-serverapp", "hang", "killed-serverapp", "no-serverapp",
        "serverapp-failed"])
def test_a_run_that_did_not_finish_is_recorded_as_failed(tmp_path, monkeypatch, capsys, written, ends,
                                                         last_round, reason):
    cfg = _cfg(tmp_path)
    _fake_run(monkeypatch, written, ends)
    expected = type(ends) if isinstance(ends, BaseException) else RunFailed
    with pytest.raises(expected) as raised:
        run_simulation(REPO, cfg, 3)
    assert read_status(cfg.output_dir) == RunStatus("failed", last_round, reason)
    said = str(raised.value) if expected is RunFailed else capsys.readouterr().err
    assert reason in said
    if isinstance(ends, BaseException):  # what was stopped is said too
        assert "stopped the SuperLink, every process it started and the `flwr log` streamer" in said


def test_a_run_that_finished_keeps_its_status_when_interrupted_afterwards(tmp_path, monkeypatch):
    cfg = _cfg(tmp_path)
    _fake_run(monkeypatch, RunStatus("completed", 5, "all 5 rounds ran"), SystemExit(128 + 15))
    with pytest.raises(SystemExit):
        run_simulation(REPO, cfg, 3)
    assert read_status(cfg.output_dir) == RunStatus("completed", 5, "all 5 rounds ran")


def _cli_run(monkeypatch, tmp_path, outcome: Callable[..., RunStatus]) -> int:
    """`fedlora run` with the run itself replaced by `outcome`, in a fresh output folder."""
    monkeypatch.setattr(runner, "preflight", lambda cfg, n, gpus=0.0: None)
    monkeypatch.setattr(runner, "unwind_on_signals", lambda: None)
    monkeypatch.setattr(runner, "run_simulation", outcome)
    return cli.main(["run", str(REPO), "--quiet", "--run-config", f"output-dir='{tmp_path}' dp=false"])


@pytest.mark.parametrize("status, files, line", [
    (RunStatus("completed", 2, "all 2 rounds ran"), ["metrics.jsonl", "adapters/0/adapter_config.json"],
     "completed after round 2; metrics in {out}/metrics.jsonl, each client's adapter in {out}/adapters"),
    (RunStatus("budget-exhausted", 3, "stopped before round 4: every client has spent its privacy budget"),
     ["metrics.jsonl", "adapter/adapter_config.json", "privacy.json"],
     "stopped early after round 3: budget-exhausted (stopped before round 4: every client has spent its "
     "privacy budget); metrics in {out}/metrics.jsonl, adapter in {out}/adapter, privacy budgets in "
     "{out}/privacy.json"),
], ids=["fedsa-completed", "dp-budget-exhausted"])
def test_the_last_line_says_how_the_run_ended_and_lists_the_outputs_it_wrote(tmp_path, monkeypatch, capsys,
                                                                             status, files, line):
    def outcome(app_dir, cfg, *args, **kwargs) -> RunStatus:
        for name in files:
            (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / name).write_text("{}")
        return status

    assert _cli_run(monkeypatch, tmp_path, outcome) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "fedlora: " + line.format(out=tmp_path)


def test_a_run_stopped_on_request_exits_3_and_says_how_to_continue(tmp_path, monkeypatch, capsys):
    def outcome(app_dir, cfg, *args, **kwargs) -> RunStatus:
        (tmp_path / "metrics.jsonl").write_text("{}")
        return RunStatus("stopped", 2, "stopped before round 3, asked by fedlora stop at 2026-12-05 03:00:00 UTC")

    assert _cli_run(monkeypatch, tmp_path, outcome) == 3
    assert capsys.readouterr().out.splitlines()[-1] == (
        f"fedlora: stopped after round 2 on request (stopped before round 3, asked by fedlora stop at "
        f"2026-12-05 03:00:00 UTC); continue with `fedlora run --resume {tmp_path}`; metrics in {tmp_path}/metrics.jsonl")


def test_the_first_ctrl_c_asks_for_a_stop_between_rounds_and_the_second_stops_at_once(tmp_path, capsys):
    import os
    import signal

    with runner.graceful_interrupt(tmp_path, "Ctrl-C in a test"):
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.1)  # the handler runs between bytecodes of this (the main) thread
        assert "asked by Ctrl-C in a test at" in stop_request(tmp_path)
        assert "stopping before the next round (Ctrl-C in a test)" in capsys.readouterr().err
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # pytest's, as before


def test_where_sigint_is_ignored_ctrl_c_stays_ignored(tmp_path):
    """A background job of a non-interactive shell ignores SIGINT: the run must not start obeying it."""
    import os
    import signal

    before = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with runner.graceful_interrupt(tmp_path, "Ctrl-C in a test"):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.1)
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, before)
    assert stop_request(tmp_path) is None


def test_a_stop_request_left_from_an_earlier_start_is_withdrawn_before_the_run(tmp_path, monkeypatch):
    cfg = _cfg(tmp_path)
    request_stop(cfg.output_dir, "fedlora stop")  # e.g. the run was killed before it acted on it
    seen = []

    def submit_and_follow(app_dir, cfg, *args):
        seen.append(stop_request(cfg.output_dir))
        write_status(cfg.output_dir, RunStatus("completed", 5, "all 5 rounds ran"))
        return "7", "finished:completed"

    monkeypatch.setattr(runner, "_submit_and_follow", submit_and_follow)
    run_simulation(REPO, cfg, 3)
    assert seen == [None]


@pytest.mark.parametrize("state, code, said", [
    (None, 2, "holds no run (no readable status.json)"),
    ("completed", 2, "is not running (completed after round 3); nothing to stop"),
    ("running", 0, "asked the run in {out} to stop before its next round (round 3 is done)"),
])
def test_fedlora_stop_asks_only_a_running_run(tmp_path, capsys, state, code, said):
    if state is not None:
        write_status(tmp_path, RunStatus(state, 3, "a test"))
    assert cli.main(["stop", str(tmp_path)]) == code
    printed = capsys.readouterr()
    assert said.format(out=tmp_path) in (printed.out if code == 0 else printed.err)
    assert (stop_request(tmp_path) is not None) == (code == 0)
    if code == 0:
        assert "asked by fedlora stop at" in stop_request(tmp_path)


def test_ctrl_c_exits_with_the_signals_code_without_a_traceback(tmp_path, monkeypatch):
    def outcome(*args, **kwargs) -> RunStatus:
        raise KeyboardInterrupt

    assert _cli_run(monkeypatch, tmp_path, outcome) == 130


def test_client_gpus_reach_flower_as_each_clients_share(monkeypatch, tmp_path):
    """`--client-gpus F` is Ray's GPU budget per virtual client (Flower's client-resources-num-gpus);
    without CUDA only 0 is accepted, and it is the default."""
    got = {}

    def outcome(app, cfg, n, *, client_cpus=1, client_gpus=0.0, quiet=False, ray_address=None):
        got["gpus"], got["ray"] = client_gpus, ray_address
        return RunStatus("completed", 5, "all 5 rounds ran")

    monkeypatch.setattr(runner, "_cuda", lambda: False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert _cli_run(monkeypatch, tmp_path / "a", outcome) == 0 and got == {"gpus": 0.0, "ray": "local"}
    assert cli.main(["run", str(REPO), "--client-gpus", "0.5", "-c", f"output-dir='{tmp_path / 'b'}'"]) == 2
    monkeypatch.setattr(runner, "_cuda", lambda: True)
    monkeypatch.setattr(runner.os, "cpu_count", lambda: 8)
    assert runner.client_gpu_share(None, 2) == 0.25  # 4 clients at once on 8 cores: a quarter each
    assert runner.client_gpu_share(0.5, 1) == 0.5 and runner.client_gpu_share(0, 1) == 0.0
    with pytest.raises(runner.ConfigError, match="must be in \\[0, 1\\]"):
        runner.client_gpu_share(2, 1)
    assert runner.federation_config(1000, 1, 0.25) == (
        "num-supernodes=1000 client-resources-num-cpus=1 client-resources-num-gpus=0.25")


def test_a_client_without_a_gpu_share_is_shown_no_gpu_by_ray(monkeypatch):
    """Ray hides the GPU from actors that reserve none only if nothing turns that off: the private
    SuperLink's environment must not carry RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO=0."""
    import inspect

    assert "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO" not in inspect.getsource(runner)


# On SIGTERM it starts an orphan (its own session, its parent gone at once) that carries the
# marker, then exits: a process born after the stopper's first look, reachable only by marker.
SPAWNS_AN_ORPHAN_ON_SIGTERM = """
import os, pathlib, signal, subprocess, sys, time
ORPHAN = "import os, sys, time\\nif os.fork(): os._exit(0)\\nopen(sys.argv[1], 'w').write(str(os.getpid()))\\ntime.sleep(60)"
def spawn(*_):
    subprocess.run([sys.executable, "-c", ORPHAN, sys.argv[1]], start_new_session=True)
    while not pathlib.Path(sys.argv[1]).exists():
        time.sleep(0.05)
    os._exit(0)
signal.signal(signal.SIGTERM, spawn)
print("ready", flush=True)
time.sleep(60)
"""


def test_stopping_a_tree_also_stops_what_is_born_while_it_stops(tmp_path):
    import os

    marker = f"FEDLORA_TEST_STOP={tmp_path}"
    orphan_pid = tmp_path / "orphan.pid"
    proc = subprocess.Popen([sys.executable, "-c", SPAWNS_AN_ORPHAN_ON_SIGTERM, str(orphan_pid)], stdout=subprocess.PIPE,
                            text=True, env={**os.environ, "FEDLORA_TEST_STOP": str(tmp_path)})
    assert proc.stdout.readline() == "ready\n"
    runner._stop_tree(proc, grace=5.0, marker=marker)
    orphan = int(orphan_pid.read_text())
    alive = runner._alive(orphan)
    if alive:
        os.kill(orphan, 9)
    assert not alive, "the process born during the stop was left running"
