"""Server checkpoints (`server/checkpoint.py`): exact round trips, and that a crash at any point of a
save leaves the previous checkpoint loadable while damage is reported, never loaded."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid

import numpy as np
import pytest
import torch

from fedlora.core.config import RunConfig
from fedlora.server import checkpoint as ck
from fedlora.server.checkpoint import (Checkpoint, CheckpointError, check_resume, load_checkpoint,
                                       save_checkpoint)
from fedlora.strategies import get_method
from fedlora.strategies.flower import LoraStrategy

JOB = uuid.uuid4().hex


def _flora_strategy() -> dict:
    """A real LoraStrategy state after one FLoRA aggregation: BaseDelta tensors (float64), a shape
    tuple, int-keyed dicts."""
    method = get_method("flora", {"seed": 3})
    strategy = LoraStrategy(method, partitions={0: 10, 1: 11, 2: 12}, clients_per_round=2, seed=3)
    g = torch.Generator().manual_seed(0)
    state = {"l.lora_A": torch.randn(2, 6, generator=g), "l.lora_B": torch.zeros(5, 2),
             "head.w": torch.randn(3, 4, generator=g)}
    updates = [{k: v + torch.randn(v.shape, generator=g) for k, v in state.items()} for _ in range(2)]
    method.aggregate(state, updates, torch.tensor([0.25, 0.75], dtype=torch.float64))
    strategy.contacted, strategy.trained = {0, 2}, [0, 2]
    strategy.epsilon, strategy.participations, strategy.exhausted = {0: 1.5, 2: 0.5}, {0: 1, 2: 1}, {1: "spent"}
    return strategy.state_dict()


def _ckpt(rnd: int = 1) -> Checkpoint:
    g = torch.Generator().manual_seed(rnd)
    arrays = {"l.lora_A": torch.randn(2, 6, generator=g), "l.lora_B": torch.randn(5, 2, generator=g).half(),
              "l.delta": torch.randn(5, 6, generator=g, dtype=torch.float64), "empty": torch.zeros(5, 0)}
    rows = [{"round": r, "strategy": "flora", "test_accuracy": 0.1 * r, "seconds": 1.0} for r in range(rnd + 1)]
    cfg = RunConfig(strategy="flora", num_server_rounds=5).to_run_config()
    extra = {"predictions": np.arange(7, dtype=np.int64), "rng": (1, [2, 3]), "__tensor__": "not a tag"}
    return Checkpoint(rnd, JOB, arrays, _flora_strategy(), rows, cfg, extra)


def _same(a, b) -> bool:
    """Equal values of the same types; tensors and arrays bit-exact with the same dtype."""
    if type(a) is not type(b):
        return False
    if isinstance(a, torch.Tensor):
        return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, np.ndarray):
        return a.dtype == b.dtype and np.array_equal(a, b)
    if isinstance(a, dict):
        return list(a) == list(b) and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def _same_ckpt(a: Checkpoint, b: Checkpoint) -> bool:
    return all(_same(getattr(a, k), getattr(b, k)) for k in ("round", "job", "arrays", "strategy", "rows",
                                                              "run_config", "extra"))


def test_round_trip_is_exact_and_the_strategy_state_loads(tmp_path):
    ckpt = _ckpt()
    assert load_checkpoint(tmp_path) is None
    save_checkpoint(tmp_path, ckpt)
    loaded = load_checkpoint(tmp_path)
    assert _same_ckpt(loaded, ckpt)
    assert loaded.strategy["method"]["deltas"]["l"]["U"].dtype == torch.float64
    # It restores a fresh strategy to the same state.
    fresh = LoraStrategy(get_method("flora", {"seed": 3}), partitions={0: 10, 1: 11, 2: 12},
                         clients_per_round=2, seed=3)
    fresh.load_state_dict(loaded.strategy)
    assert _same(fresh.state_dict(), ckpt.strategy)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint"]


def test_a_new_round_replaces_the_old_one(tmp_path):
    save_checkpoint(tmp_path, _ckpt(1))
    save_checkpoint(tmp_path, _ckpt(2))
    assert _same_ckpt(load_checkpoint(tmp_path), _ckpt(2))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint"]


def test_a_leftover_tmp_folder_is_ignored_then_cleaned(tmp_path):
    save_checkpoint(tmp_path, _ckpt(1))
    tmp = tmp_path / "checkpoint.tmp-deadbeef"
    tmp.mkdir()
    (tmp / "arrays.safetensors").write_bytes(b"\x00" * 10)  # half-written, no manifest
    assert load_checkpoint(tmp_path).round == 1
    save_checkpoint(tmp_path, _ckpt(2))
    assert not tmp.exists() and load_checkpoint(tmp_path).round == 2


def test_a_crash_between_the_two_renames_loads_the_previous_round(tmp_path):
    save_checkpoint(tmp_path, _ckpt(1))
    os.replace(tmp_path / "checkpoint", tmp_path / "checkpoint.old")  # as the save leaves it
    assert _same_ckpt(load_checkpoint(tmp_path), _ckpt(1))
    save_checkpoint(tmp_path, _ckpt(2))  # and the next save recovers
    assert load_checkpoint(tmp_path).round == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint"]


@pytest.mark.parametrize("failing_call", [1, 2])
def test_a_save_that_fails_midway_leaves_the_previous_checkpoint(tmp_path, monkeypatch, failing_call):
    """Fail the first rename (checkpoint → .old) or the second (tmp → checkpoint)."""
    save_checkpoint(tmp_path, _ckpt(1))
    calls, real = [], os.replace

    def replace(src, dst):
        calls.append(src)
        if len(calls) == failing_call:
            raise OSError("power loss")
        real(src, dst)

    monkeypatch.setattr(ck.os, "replace", replace)
    with pytest.raises(OSError, match="power loss"):
        save_checkpoint(tmp_path, _ckpt(2))
    monkeypatch.undo()
    assert _same_ckpt(load_checkpoint(tmp_path), _ckpt(1))
    assert not list(tmp_path.glob("checkpoint.tmp-*"))


def test_a_save_that_fails_while_writing_files_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    save_checkpoint(tmp_path, _ckpt(1))
    real = ck._write

    def write(path, data):
        if path.name == "state.json":
            real(path, data[:5])
            raise OSError("disk full")
        real(path, data)

    monkeypatch.setattr(ck, "_write", write)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(tmp_path, _ckpt(2))
    assert load_checkpoint(tmp_path).round == 1


_SAVER = """
import sys, torch
from pathlib import Path
from fedlora.server.checkpoint import Checkpoint, save_checkpoint
for rnd in range(1, 100000):
    x = torch.full((256, 256), float(rnd), dtype=torch.float64)
    save_checkpoint(Path(sys.argv[1]), Checkpoint(rnd, "job", {"x": x}, {"s": x}, [{"round": rnd}], {}))
"""


@pytest.mark.parametrize("delay", [0.05, 0.23])
def test_kill_9_during_saves_leaves_a_complete_checkpoint(tmp_path, delay):
    proc = subprocess.Popen([sys.executable, "-c", _SAVER, str(tmp_path)])
    try:
        deadline = time.monotonic() + 60
        while not (tmp_path / "checkpoint").exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(delay)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    ckpt = load_checkpoint(tmp_path)
    assert ckpt.round >= 1 and ckpt.rows == [{"round": ckpt.round}]
    assert bool((ckpt.arrays["x"] == ckpt.round).all()) and bool((ckpt.strategy["s"] == ckpt.round).all())


@pytest.mark.parametrize("name", ["arrays.safetensors", "tensors.safetensors", "state.json"])
def test_a_damaged_file_is_an_error_naming_it(tmp_path, name):
    save_checkpoint(tmp_path, _ckpt(1))
    path = tmp_path / "checkpoint" / name
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01  # one flipped bit
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=name):
        load_checkpoint(tmp_path)


def test_without_a_manifest_a_checkpoint_is_not_complete(tmp_path):
    save_checkpoint(tmp_path, _ckpt(1))
    (tmp_path / "checkpoint" / "manifest.json").unlink()
    with pytest.raises(CheckpointError, match="manifest.json"):
        load_checkpoint(tmp_path)
    (tmp_path / "checkpoint").rename(tmp_path / "checkpoint.tmp-1")  # where a crash can leave one
    assert load_checkpoint(tmp_path) is None


def test_a_missing_file_is_an_error_naming_it(tmp_path):
    save_checkpoint(tmp_path, _ckpt(1))
    (tmp_path / "checkpoint" / "tensors.safetensors").unlink()
    with pytest.raises(CheckpointError, match="tensors.safetensors"):
        load_checkpoint(tmp_path)


def test_only_resumable_keys_may_change():
    saved = RunConfig(strategy="flora", num_server_rounds=5).to_run_config()
    check_resume(saved, dict(saved), last_round=5)
    check_resume(saved, {**saved, "num-server-rounds": 9, "round-timeout": 10.0, "connect-timeout": 5.0}, 5)
    for key, value in [("model", "other"), ("strategy", "fedex"), ("seed", 1), ("lora-rank", 4),
                       ("labels", "a,b"), ("dataset", "other.csv")]:
        with pytest.raises(CheckpointError, match=rf"{key} differs \({saved[key]!r} in the checkpoint"):
            check_resume(saved, {**saved, key: value}, 2)
    with pytest.raises(CheckpointError, match="model differs.*seed differs"):  # every key is named
        check_resume(saved, {**saved, "model": "x", "seed": 9})


def test_missing_keys_and_too_few_rounds_are_refused():
    saved = RunConfig().to_run_config()
    with pytest.raises(CheckpointError, match="fair-lr is only in the checkpoint"):
        check_resume(saved, {k: v for k, v in saved.items() if k != "fair-lr"})
    with pytest.raises(CheckpointError, match="new-key is not in the checkpoint"):
        check_resume(saved, {**saved, "new-key": 1})
    with pytest.raises(CheckpointError, match="num-server-rounds=3 but 4 rounds are already done"):
        check_resume(saved, {**saved, "num-server-rounds": 3}, last_round=4)
