"""A small on-disk memo for the accountant's slow answers (ε of a step history, σ for a budget).

Opacus' PRV accountant takes about a second per ε and a noise search many times that. The same
questions come back: a client asks "ε after one more round?" and then records that very history;
every load of a ledger re-checks its stored ε; `fedlora privacy report` re-checks every ledger of
a run; a deployment starts a fresh ClientApp process for every message. So answers are kept in
memory and in `$FEDLORA_CACHE_DIR/accountant.json` (default `$XDG_CACHE_HOME/fedlora` or
`~/.cache/fedlora`), keyed by a hash of the exact question (accountant, Opacus version, δ, the
merged history or budget). An answer is a pure function of its key, so a stale entry cannot
exist; a missing or unreadable file only costs time. Writes are atomic; concurrent writers (Ray
workers) may drop each other's newest entries, which is harmless for a cache.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path

from fedlora.core.files import write_text_atomic

__all__ = ["cache_path", "memoized"]

_MAX_ENTRIES = 4096  # oldest dropped first: a few hundred KiB at most
_memory: dict[str, float] = {}


def cache_path() -> Path:
    """Where the on-disk memo lives (`FEDLORA_CACHE_DIR` overrides)."""
    folder = os.environ.get("FEDLORA_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "fedlora")
    return Path(folder) / "accountant.json"


def _read(path: Path) -> dict[str, float]:
    try:
        entries = json.loads(path.read_text())
        return {str(k): float(v) for k, v in entries.items()} if isinstance(entries, dict) else {}
    except (OSError, ValueError, TypeError):
        return {}


def memoized(question: list, compute: Callable[[], float]) -> float:
    """The answer to `question` (a JSON-able list), computed once per machine."""
    from opacus import __version__ as opacus_version

    key = hashlib.sha256(json.dumps([opacus_version, *question]).encode()).hexdigest()
    if key in _memory:
        return _memory[key]
    path = cache_path()
    stored = _read(path)
    if key in stored:
        _memory[key] = stored[key]
        return stored[key]
    value = float(compute())
    _memory[key] = value
    stored[key] = value
    try:
        write_text_atomic(path, json.dumps(dict(list(stored.items())[-_MAX_ENTRIES:])))
    except OSError:
        pass  # a read-only home: the memo in memory still serves this process
    return value
