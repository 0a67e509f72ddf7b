"""Crash-safe checkpoints of the ServerApp, so that a run killed at any instant (kill -9, power loss)
resumes exactly from its last complete round. After every round the server rewrites

    output-dir/checkpoint/
      arrays.safetensors   the global LoRA state (`Checkpoint.arrays`), bit-exact in every dtype
      tensors.safetensors  every tensor / numpy array found in strategy, rows, run_config, extra
      state.json           round, job and those four as JSON: a tensor is {"__tensor__": its name in
                           tensors.safetensors}; tuples and dicts with non-string keys are tagged
                           too, so that loading gives back values equal to those saved
      manifest.json        written last: format, round, job and the sha256 of the three files

Atomicity: a save writes a fresh `checkpoint.tmp-<uuid>/` (manifest last), fsyncs its files and the
folder, then renames `checkpoint/` → `checkpoint.old/` and the tmp folder → `checkpoint/` (fsyncing
`output-dir` after each rename), and only then deletes `checkpoint.old/`. So `checkpoint/` only ever
appears as a whole, already durable folder, and at every instant either it or, between the two
renames, `checkpoint.old/` holds the last complete checkpoint. `load_checkpoint` reads `checkpoint/`
if it exists, else `checkpoint.old/`, and never a `checkpoint.tmp-*` (half-written; the next save
deletes them). As no crash can leave `checkpoint/` without a manifest or with a file that misses its
sha256, such a folder is damaged: `CheckpointError`, rather than silently going back a round.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

__all__ = ["RESUMABLE_KEYS", "Checkpoint", "CheckpointError", "check_resume", "load_checkpoint", "save_checkpoint"]

#: run-config keys a resumed run may change: none alters what a round computes
RESUMABLE_KEYS = ("num-server-rounds", "round-timeout", "connect-timeout")
_FORMAT = 1
_FILES = ("arrays.safetensors", "tensors.safetensors", "state.json")
_FIELDS = ("strategy", "rows", "run_config", "extra")  # the JSON parts, in state.json
_TAGS = ("__tensor__", "__ndarray__", "__tuple__", "__items__")


class CheckpointError(ValueError):
    """A checkpoint exists but is damaged or inconsistent, or the new run config cannot resume it."""


@dataclass
class Checkpoint:
    """Everything a resumed run needs, as of the end of round `round`."""

    round: int  # last completed round
    job: str  # uuid4 hex made at the first start, kept across resumes
    arrays: dict[str, torch.Tensor]  # the global state
    strategy: dict[str, Any]  # LoraStrategy.state_dict(), tensors included
    rows: list[dict[str, Any]]  # metrics.jsonl so far
    run_config: dict[str, Any]  # resolved, kebab-case
    extra: dict[str, Any] = field(default_factory=dict)  # free JSON (tensors / numpy arrays allowed)


def _encode(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, torch.Tensor | np.ndarray):
        # A clone of its own: safetensors refuses tensors that share memory (BaseDelta's views).
        name, t = f"t{len(tensors)}", torch.from_numpy(obj) if isinstance(obj, np.ndarray) else obj
        tensors[name] = t.detach().cpu().contiguous().clone()
        return {"__ndarray__" if isinstance(obj, np.ndarray) else "__tensor__": name}
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, tensors) for v in obj]}
    if isinstance(obj, list):
        return [_encode(v, tensors) for v in obj]
    if isinstance(obj, dict):  # a dict with a tag as key is tagged itself, so tags never collide
        if all(isinstance(k, str) for k in obj) and not set(obj) & set(_TAGS):
            return {k: _encode(v, tensors) for k, v in obj.items()}
        return {"__items__": [[_encode(k, tensors), _encode(v, tensors)] for k, v in obj.items()]}
    if obj is None or isinstance(obj, bool | int | float | str):
        return obj
    raise TypeError(f"cannot checkpoint a {type(obj).__name__}: {obj!r}")


def _decode(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if len(obj) != 1 or next(iter(obj)) not in _TAGS:
        return {k: _decode(v, tensors) for k, v in obj.items()}
    ((tag, value),) = obj.items()
    if tag in ("__tensor__", "__ndarray__"):
        return tensors[value] if tag == "__tensor__" else tensors[value].numpy()
    if tag == "__tuple__":
        return tuple(_decode(v, tensors) for v in value)
    return {_decode(k, tensors): _decode(v, tensors) for k, v in value}


def _write(path: Path, data: bytes) -> None:
    with open(path, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def _fsync_dir(path: Path) -> None:
    """Make the folder's entries (new files, renames) durable, not just the files' contents."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(out_dir: Path, ckpt: Checkpoint) -> None:
    """Replace `out_dir/checkpoint/` with `ckpt`, atomically (see the module docstring)."""
    out_dir = Path(out_dir)
    if not isinstance(ckpt.round, int) or ckpt.round < 0 or not ckpt.job:
        raise ValueError(f"a checkpoint needs a round >= 0 and a job id, got {ckpt.round!r}, {ckpt.job!r}")
    tensors: dict[str, torch.Tensor] = {}
    # The keys' order too: safetensors stores them sorted, and a state dict's order should survive.
    state = {"round": ckpt.round, "job": ckpt.job, "arrays": list(ckpt.arrays),
             **{k: _encode(getattr(ckpt, k), tensors) for k in _FIELDS}}
    blobs = {"arrays.safetensors": st_save({k: v.detach().cpu().contiguous().clone() for k, v in ckpt.arrays.items()}),
             "tensors.safetensors": st_save(tensors), "state.json": json.dumps(state).encode()}
    manifest = {"format": _FORMAT, "round": ckpt.round, "job": ckpt.job,
                "files": {name: hashlib.sha256(data).hexdigest() for name, data in blobs.items()}}
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.glob("checkpoint.tmp-*"):  # of saves that crashed: the server is the only writer
        shutil.rmtree(stale, ignore_errors=True)
    final, old, tmp = out_dir / "checkpoint", out_dir / "checkpoint.old", out_dir / f"checkpoint.tmp-{uuid.uuid4().hex}"
    try:
        tmp.mkdir()
        for name, data in [*blobs.items(), ("manifest.json", json.dumps(manifest, indent=1).encode())]:
            _write(tmp / name, data)
        _fsync_dir(tmp)
        if final.exists():
            shutil.rmtree(old, ignore_errors=True)  # left by a crash after the swap: checkpoint/ is complete
            os.replace(final, old)
            _fsync_dir(out_dir)
        os.replace(tmp, final)
        _fsync_dir(out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone after a successful swap; else never to be loaded
    shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(out_dir: Path) -> Checkpoint | None:
    """The last complete checkpoint in `out_dir`; None if there is none; CheckpointError if damaged."""
    for name in ("checkpoint", "checkpoint.old"):  # .old only when a crash hit between the renames
        if (Path(out_dir) / name).is_dir():
            return _read(Path(out_dir) / name)
    return None


def _read(folder: Path) -> Checkpoint:
    def bad(name: str, why: str) -> CheckpointError:
        return CheckpointError(f"checkpoint file {folder / name} {why}")

    try:
        manifest = json.loads((folder / "manifest.json").read_bytes())
    except FileNotFoundError:
        raise bad("manifest.json", "is missing: the checkpoint is incomplete") from None
    except ValueError as exc:
        raise bad("manifest.json", f"is not valid JSON ({exc})") from None
    if not (isinstance(manifest, dict) and manifest.get("format") == _FORMAT
            and isinstance(manifest.get("files"), dict) and sorted(manifest["files"]) == sorted(_FILES)):
        raise bad("manifest.json", f"is not a format-{_FORMAT} manifest of {list(_FILES)}")
    blobs = {}
    for name in _FILES:
        try:
            blobs[name] = (folder / name).read_bytes()
        except FileNotFoundError:
            raise bad(name, "is missing") from None
        if hashlib.sha256(blobs[name]).hexdigest() != manifest["files"][name]:
            raise bad(name, "does not match its sha256 in manifest.json: it is damaged")
    try:
        stored, tensors = st_load(blobs["arrays.safetensors"]), st_load(blobs["tensors.safetensors"])
        state = json.loads(blobs["state.json"])
        if sorted(stored) != sorted(state["arrays"]):
            raise KeyError(f"arrays.safetensors holds {sorted(stored)}, not the {sorted(state['arrays'])} listed")
        arrays = {k: stored[k] for k in state["arrays"]}
        values = {k: _decode(state[k], tensors) for k in _FIELDS}
    except Exception as exc:  # sha256 matched, so the writer itself wrote something inconsistent
        raise bad("state.json", f"is inconsistent: {type(exc).__name__}: {exc}") from exc
    if (state.get("round"), state.get("job")) != (manifest.get("round"), manifest.get("job")):
        raise bad("state.json", "disagrees with manifest.json on the round or the job")
    return Checkpoint(round=state["round"], job=state["job"], arrays=arrays, **values)


def check_resume(saved: dict[str, Any], new: dict[str, Any], last_round: int = 0) -> None:
    """Refuse to resume a checkpoint (config `saved`, `last_round` done) under the run config `new`
    unless they differ only in RESUMABLE_KEYS and `new` asks for at least `last_round` rounds."""
    problems = []
    for key in sorted((set(saved) | set(new)) - set(RESUMABLE_KEYS)):
        if key not in new:
            problems.append(f"{key} is only in the checkpoint ({saved[key]!r}), not in the new config")
        elif key not in saved:
            problems.append(f"{key} is not in the checkpoint (now {new[key]!r})")
        elif saved[key] != new[key]:
            problems.append(f"{key} differs ({saved[key]!r} in the checkpoint, {new[key]!r} now)")
    if int(new.get("num-server-rounds", last_round)) < last_round:
        problems.append(f"num-server-rounds={new['num-server-rounds']} but {last_round} rounds are already done")
    if problems:
        raise CheckpointError(f"cannot resume: {'; '.join(problems)}; only {', '.join(RESUMABLE_KEYS)} may change")
