"""Shared fixtures: a tiny random BERT with its own small vocabulary and a synthetic labelled CSV.

Nothing here needs the network, the bundled MiniLM or the tweet corpus: the tokenizer is built
from a vocabulary file written by the fixture, and the text carries a learnable signal.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from synthetic import tiny_model, write_csv

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Inherited by every process a test starts (SuperLink, SuperExec, Ray workers): the leftover check
# of test_end_to_end looks only at processes carrying this tag, so Flower runs outside the tests
# (a sweep in another terminal) are neither blamed nor touched.
TEST_TAG = f"FEDLORA_TEST_SESSION={os.getpid()}"
os.environ["FEDLORA_TEST_SESSION"] = str(os.getpid())
# The accountant's on-disk memo (fedlora.privacy.cache) of this session only: tests neither read
# nor fill the user's ~/.cache.
os.environ["FEDLORA_CACHE_DIR"] = tempfile.mkdtemp(prefix="fedlora-test-cache-")
# A suite started as a background job of a non-interactive shell (`cmd &` in a script) inherits
# SIGINT ignored, and an ignored signal stays ignored in every program it starts, so the tests that
# press Ctrl-C (SIGINT to a `fedlora` process group) would find it shrugged off. A handler here is
# reset to the default in each child at exec, as in a program started from a terminal.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A randomly initialised 2-layer BERT (hidden 32) saved with a word-level vocabulary."""
    return tiny_model(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture(scope="session")
def tiny_csv(tmp_path_factory) -> Path:
    """600 short texts, 3 classes, each text mixing its class words with filler."""
    return write_csv(tmp_path_factory.mktemp("data") / "tiny.csv", 600)


@pytest.fixture
def tiny_overrides(tiny_model_dir, tiny_csv) -> dict:
    """Run-config overrides for a seconds-long run on the tiny model and data (non-private unless a
    test sets dp: the DP tests say so)."""
    return {"dp": False, "model": str(tiny_model_dir), "dataset": str(tiny_csv), "test-size": 120,
            "clients-per-round": 3, "num-server-rounds": 2, "local-steps": 5, "batch-size": 16,
            "min-partition-size": 20, "max-length": 16, "learning-rate": 0.5}


def fedlora_run(overrides: dict, *, num_supernodes: int = 3, timeout: float = 600) -> subprocess.CompletedProcess:
    """`fedlora run` on this repo as a user would call it (a separate process)."""
    import json

    pairs = " ".join(f"{k}={json.dumps(v)}" for k, v in overrides.items())
    cmd = [sys.executable, "-m", "fedlora.simulations.cli", "run", str(REPO), "--quiet",
           "--num-supernodes", str(num_supernodes), "--run-config", pairs]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO)


def check_data_cli(capsys, *argv: str) -> tuple[int, str, str]:
    """`fedlora check-data ARGV` in this process: (exit code, stdout, stderr)."""
    import argparse

    from fedlora.simulations.checkdata import add_commands

    parser = argparse.ArgumentParser(prog="fedlora")
    add_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["check-data", *argv])
    rc = args.handler(args)
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.fixture
def task_identity(monkeypatch):
    """Messages need a run id (and a node and task id), which Flower sets inside a real run: for
    tests that call the app handlers directly."""
    from flwr.supercore.task_identity import TaskIdentity

    monkeypatch.setattr(TaskIdentity, "_run_id", 7)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    monkeypatch.setattr(TaskIdentity, "_task_id", 0)
