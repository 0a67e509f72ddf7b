"""How a run ended: `<output-dir>/status.json`, written by the ServerApp every round and read by
`fedlora run`, sweeps and resume.

    {"state": "running" | "completed" | "budget-exhausted" | "failed",
     "last_round": <the last round whose row is in metrics.jsonl; 0 = the initial evaluation only,
                    -1 = none yet>,
     "reason": "<why it is in that state, in words>"}

`completed`: every configured round ran. `budget-exhausted`: the run stopped early because every
client that could still train has spent its privacy budget; it is finished, not interrupted.
`failed`: the ServerApp raised, or the run was stopped from outside (`fedlora run` records that
when the ServerApp could not). A file still saying `running` after its run ended means the
ServerApp died without a word (killed): readers treat it as failed.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from .files import write_text_atomic

__all__ = ["FINISHED", "STATES", "STATUS_FILE", "RunStatus", "check_fresh", "read_status", "write_status"]

STATUS_FILE = "status.json"
STATES = ("running", "completed", "budget-exhausted", "failed")
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
