"""How a run ended: `<output-dir>/status.json`, written by the ServerApp every round and read by
`fedlora run`, sweeps and resume.

    {"state": "running" | "completed" | "budget-exhausted" | "stopped" | "failed",
     "last_round": <the last round whose row is in metrics.jsonl; 0 = the initial evaluation only,
                    -1 = none yet>,
     "reason": "<why it is in that state, in words>"}

`completed`: every configured round ran. `budget-exhausted`: the run stopped early because every
client that could still train has spent its privacy budget; it is finished, not interrupted.
`stopped`: paused on request between two rounds (`fedlora stop OUTPUT_DIR`, or a first Ctrl-C in
`fedlora run` or `fedlora sweep`): the checkpoint holds the last round whole and no round was begun,
so `--resume` continues with nothing run (or, under DP, paid for) twice.
`failed`: the ServerApp raised, or the run was stopped from outside (`fedlora run` records that
when the ServerApp could not). A file still saying `running` after its run ended means the
ServerApp died without a word (killed): readers treat it as failed.

A stop is asked for with a file beside it, `<output-dir>/stop-requested` (`request_stop`): the
ServerApp looks for it before each round, and deletes it when it stops or ends. A file is the one
channel that works the same in a simulation and on a deployed SuperLink's machine.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

from .files import write_text_atomic

__all__ = ["FINISHED", "STATES", "STATUS_FILE", "STOP_FILE", "RunStatus", "check_fresh", "clear_stop",
           "read_status", "request_stop", "stop_request", "write_status"]

STATUS_FILE = "status.json"
STOP_FILE = "stop-requested"
STATES = ("running", "completed", "budget-exhausted", "stopped", "failed")
#: states of a run that ended as it should: its outputs are complete
FINISHED = ("completed", "budget-exhausted")


@dataclass(frozen=True)
class RunStatus:
    state: str
    last_round: int
    reason: str = ""

    def __post_init__(self) -> None:
        if self.state not in STATES:
            raise ValueError(f"run state {self.state!r} is not one of {list(STATES)}")
        if isinstance(self.last_round, bool) or not isinstance(self.last_round, int) or self.last_round < -1:
            raise ValueError(f"last_round={self.last_round!r} must be an integer >= -1")

    @property
    def finished(self) -> bool:
        """The run ended as it should (completed, or stopped because every budget is spent)."""
        return self.state in FINISHED

    @property
    def ended_cleanly(self) -> bool:
        """The ServerApp itself ended the run between rounds: finished, or stopped on request."""
        return self.finished or self.state == "stopped"


def write_status(out_dir: str | os.PathLike[str], status: RunStatus) -> None:
    """Write `<out_dir>/status.json` atomically."""
    write_text_atomic(Path(out_dir) / STATUS_FILE, json.dumps(asdict(status), indent=1) + "\n")


def read_status(out_dir: str | os.PathLike[str]) -> RunStatus | None:
    """The status a run folder records; None when it has no (readable, well-formed) status file."""
    try:
        raw = json.loads((Path(out_dir) / STATUS_FILE).read_text())
        return RunStatus(str(raw["state"]), raw["last_round"], str(raw.get("reason", "")))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def check_fresh(out_dir: str | os.PathLike[str]) -> None:
    """`FileExistsError` if `out_dir` holds a run a new one must not overwrite: anything that got as far
    as a training round, or that has a checkpoint (resume it instead). A run that failed before
    round 1 may be retried into the same folder. `fedlora run` calls this before it submits."""
    out_dir = Path(out_dir)
    if not (out_dir / "metrics.jsonl").exists():
        return
    status = read_status(out_dir)
    if (out_dir / "checkpoint").exists():
        raise FileExistsError(f"output-dir {out_dir} holds a run with a checkpoint (after round "
                              f"{status.last_round if status else '?'}): continue it with --resume, or "
                              "choose another folder")
    if status is None or status.state != "failed" or status.last_round > 0:
        how = f"{status.state} after round {status.last_round}" if status else "no status.json"
        raise FileExistsError(f"output-dir {out_dir} already holds a run ({how}); choose another folder")


def request_stop(out_dir: str | os.PathLike[str], who: str) -> None:
    """Ask the run writing to `out_dir` to stop before its next round; `who` asked, in words."""
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    write_text_atomic(Path(out_dir) / STOP_FILE, json.dumps({"by": who, "at": when}) + "\n")


def stop_request(out_dir: str | os.PathLike[str]) -> str | None:
    """Who asked the run in `out_dir` to stop, and when, in words; None when nobody has."""
    try:
        raw = (Path(out_dir) / STOP_FILE).read_text()
    except FileNotFoundError:
        return None
    try:
        asked = json.loads(raw)
        return f"asked by {asked['by']} at {asked['at']}"
    except (ValueError, KeyError, TypeError):  # a file made by hand (`touch`) is a request too
        return f"{STOP_FILE} found in {out_dir}"


def clear_stop(out_dir: str | os.PathLike[str]) -> None:
    """Withdraw a stop request (the ServerApp acted on it, or a new start must not obey an old one)."""
    (Path(out_dir) / STOP_FILE).unlink(missing_ok=True)
