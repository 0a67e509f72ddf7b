"""Process tracking for the tests that start long-running programs (SuperLinks, SuperNodes, Ray
nodes): each in a session of its own, its output timestamped, its descendants sampled from /proc
while it runs, so that every process it ever had can be checked, and stopped, at the end."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from pathlib import Path

from fedlora.simulations.runner import _alive, _children, _stop_tree

__all__ = ["Tracker", "cmdline"]


def cmdline(pid: int) -> str:
    """A process's command line ("" once it has gone)."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""



def _start_time(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


class Tracker:
    """Starts processes in sessions of their own, timestamps their output lines, and samples
    their descendants from /proc, so that every process they ever had can be checked at the end."""

    def __init__(self, logs: Path) -> None:
        self.logs, self.procs, self.seen = logs, [], set()  # seen: (pid, start time)
        self.lines: dict[int, list[tuple[float, str]]] = {}
        self._stop = threading.Event()
        threading.Thread(target=self._sample, daemon=True).start()

    def _sample(self) -> None:
        while not self._stop.wait(0.3):
            self.snapshot()

    def snapshot(self) -> None:
        """Record every live tracked process and its descendants (one pass over /proc)."""
        kids, todo = _children(), [proc.pid for proc in list(self.procs) if proc.poll() is None]
        while todo:
            pid = todo.pop()
            if (start := _start_time(pid)) is not None:
                self.seen.add((pid, start))
            todo.extend(kids.get(pid, []))

    def start(self, name: str, cmd: list[str], env: dict[str, str], cwd: Path) -> subprocess.Popen:
        proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, errors="replace", start_new_session=True)
        self.procs.append(proc)
        self.lines[proc.pid] = lines = []
        log = (self.logs / f"{name}.{proc.pid}.log").open("w")

        def pump() -> None:
            with log:
                for line in proc.stdout:
                    lines.append((time.time(), line))
                    log.write(f"{time.time():.3f} {line}")
                    log.flush()

        proc.pump = threading.Thread(target=pump, daemon=True)
        proc.pump.start()
        self.snapshot()
        return proc

    def output(self, proc: subprocess.Popen) -> str:
        return "".join(line for _, line in self.lines[proc.pid])

    def wait(self, proc: subprocess.Popen, timeout: float) -> tuple[int, str]:
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.stop(proc)
            raise AssertionError(f"still running after {timeout:.0f} s:\n{self.output(proc)[-4000:]}") from None
        proc.pump.join(timeout=10)
        return rc, self.output(proc)

    def stop(self, proc: subprocess.Popen) -> None:
        """SIGTERM the process, its process group and all its descendants, SIGKILL what is left. (A
        process that has ended has no tree to walk: its pid may be another's now; what it left
        behind is in `seen`, for `close`.)"""
        if proc.poll() is None:
            self.snapshot()
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            _stop_tree(proc, grace=15.0)
        proc.pump.join(timeout=10)

    def close(self) -> list[str]:
        """Stop everything; the processes of the tests still alive after that (should be none)."""
        stoppers = [threading.Thread(target=self.stop, args=(proc,)) for proc in self.procs]
        for thread in stoppers:
            thread.start()
        for thread in stoppers:
            thread.join()
        self._stop.set()
        left = []
        for pid, start in sorted(self.seen):
            try:
                if _start_time(pid) == start and _alive(pid):
                    left.append(f"{pid} {cmdline(pid)}")
                    os.kill(pid, signal.SIGKILL)  # reported as a failure, but not left running
            except OSError:
                continue  # exited while we looked
        return left
