"""Causal-LM instruction tuning: the per-sequence loss, evaluation and the final model's samples.

The loss of one record is the mean cross-entropy over its answer tokens (prompt and padding carry
the label -100 and no loss: `core/instructions.py` builds the batches). It is computed from the
logits, per sequence: transformers' own `labels=` loss averages over all the answer tokens of the
batch, which makes one record's gradient depend on the other records' lengths, so it is no
per-sample quantity and DP-SGD could not clip it. Under DP the unit of privacy is therefore one
sequence (one instruction and its answer), not one user.

Evaluation reports the test loss per answer token and its perplexity and, where the answers come
from a small fixed set (label words such as the tweets' "negative", "neutral", "positive"), the
exact-match accuracy of greedy answers, so that an instruction-tuned LM can be compared with a
classification head on the same data.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .config import RunConfig
from .instructions import InstructionData, collate, generation_inputs
from .model import ModelBundle, precision_context

__all__ = ["IGNORE", "LABEL_LIKE_MAX", "evaluate", "forward", "generate", "is_label_like", "normalize_answer",
           "sequence_loss", "write_samples"]

IGNORE = -100  # the label of prompt and padding positions (torch's cross-entropy ignore_index)
#: answers count as labels (exact match is scored) when the test rows hold at most this many distinct ones
LABEL_LIKE_MAX = 32


def sequence_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Each sequence's mean next-token cross-entropy over its answer tokens: shape (batch,).

    Position t predicts token t+1; labels are the input ids with IGNORE on prompt and padding. A
    sequence without answer tokens (it cannot happen with `collate`) would get 0, not NaN.
    """
    targets = labels[:, 1:]
    token_loss = F.cross_entropy(logits[:, :-1].transpose(1, 2).float(), targets, ignore_index=IGNORE,
                                 reduction="none")
    counts = (targets != IGNORE).sum(dim=1)
    return token_loss.sum(dim=1) / counts.clamp_min(1)


def forward(bundle: ModelBundle, data: InstructionData, device: torch.device):
    """Row indices -> (logits, labels) of a right-padded batch."""
    pad = bundle.tokenizer.pad_token_id

    def run(idx: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        batch = {k: v.to(device) for k, v in collate(data, idx, pad).items()}
        labels = batch.pop("labels")
        return bundle.model(**batch).logits, labels

    return run


def is_label_like(data: InstructionData) -> bool:
    """Whether the answers come from a small fixed set (then exact match is scored)."""
    distinct = len({normalize_answer(a) for a in data.answers})
    return 0 < distinct <= LABEL_LIKE_MAX and distinct < len(data)


def normalize_answer(text: str) -> str:
    """What exact match compares: case-folded, surrounding whitespace and final punctuation stripped."""
    return text.strip().rstrip(".!").strip().casefold()


@torch.no_grad()
def generate(bundle: ModelBundle, data: InstructionData, idx: np.ndarray, max_new_tokens: int,
             cfg: RunConfig) -> list[str]:
    """Greedy answers to the prompts at `idx` (left-padded, as generation needs)."""
    tok = bundle.tokenizer
    device = next(bundle.model.parameters()).device
    inputs = {k: v.to(device) for k, v in generation_inputs(data, idx, tok.pad_token_id).items()}
    with precision_context(cfg, device):
        out = bundle.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                    pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    return tok.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


@torch.no_grad()
def evaluate(bundle: ModelBundle, data: InstructionData, cfg: RunConfig) -> dict[str, Any]:
    """Loss per answer token and perplexity on `data`; with label-like answers also the exact-match
    accuracy of greedy answers ("predictions": the answers, in `data`'s order)."""
    device = next(bundle.model.parameters()).device
    bundle.model.eval()
    run = forward(bundle, data, device)
    precision = precision_context(cfg, device)
    lengths = [len(p) + len(a) for p, a in zip(data.prompt_ids, data.answer_ids)]
    order = np.argsort(lengths, kind="stable")  # similar lengths: less padding
    total, tokens = 0.0, 0
    for start in range(0, len(data), cfg.eval_batch_size):
        idx = order[start : start + cfg.eval_batch_size]
        with precision:
            logits, labels = run(idx)
        counts = (labels[:, 1:] != IGNORE).sum(dim=1)
        total += float((sequence_loss(logits, labels) * counts).sum())
        tokens += int(counts.sum())
    loss = total / max(tokens, 1)
    result: dict[str, Any] = {"loss": loss, "perplexity": math.exp(min(loss, 700.0))}
    if is_label_like(data):
        # long enough for the longest reference answer and its end token, and no longer
        new_tokens = min(cfg.max_new_tokens, max(len(a) for a in data.answer_ids))
        answers: list[str] = [""] * len(data)
        prompt_order = np.argsort([len(p) for p in data.prompt_ids], kind="stable")
        for start in range(0, len(data), cfg.eval_batch_size):
            idx = prompt_order[start : start + cfg.eval_batch_size]
            for i, text in zip(idx, generate(bundle, data, idx, new_tokens, cfg)):
                answers[i] = text
        hits = [normalize_answer(a) == normalize_answer(r) for a, r in zip(answers, data.answers)]
        result["accuracy"] = float(np.mean(hits)) if hits else 0.0
        result["predictions"] = answers
    return result


def write_samples(bundle: ModelBundle, data: InstructionData, cfg: RunConfig, path: Path) -> None:
    """The final model's greedy answers to the first `num-samples` prompts of `data`, one JSON
    object per line: prompt, reference answer, generated answer."""
    idx = np.arange(min(cfg.num_samples, len(data)))
    answers = generate(bundle, data, idx, cfg.max_new_tokens, cfg)
    with open(path, "w") as f:
        for i, answer in zip(idx, answers):
            f.write(json.dumps({"prompt": data.prompts[i], "reference": data.answers[i], "generated": answer}) + "\n")
