"""Local training and evaluation loops, shared by the ClientApp (training, local evaluation) and
the ServerApp (evaluation of the global model on the held-out test split)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import nullcontext
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from .config import ConfigError, RunConfig
from .data import TextData
from .model import ModelBundle

if TYPE_CHECKING:
    from fedlora.privacy.dpsgd import DPSettings

__all__ = ["evaluate", "precision_context", "train_local"]


def _encode(bundle: ModelBundle, texts: Sequence[str], max_length: int, device: torch.device) -> dict:
    enc = bundle.tokenizer(list(texts), truncation=True, max_length=max_length, padding=True,
                           return_tensors="pt")
    return {k: v.to(device) for k, v in enc.items()}


def precision_context(cfg: RunConfig, device: torch.device):
    """The forward pass's numeric precision: float32, or bfloat16 autocast on CUDA (`precision`).
    A process without CUDA cannot honour bf16 (e.g. a site without a GPU): that is an error, not
    a silent fallback, so that runs compared as bf16 are bf16."""
    if cfg.precision == "fp32":
        return nullcontext()
    if device.type != "cuda":
        raise ConfigError(f"precision={cfg.precision!r} needs a CUDA GPU, and this process runs on {device.type} "
                          "(with `fedlora run`, give clients a GPU share: --client-gpus)")
    return torch.autocast("cuda", dtype=torch.bfloat16)


def _batches(n: int, batch_size: int, rng: np.random.Generator) -> Iterator[np.ndarray]:
    """Endless shuffled mini-batches; a partition smaller than a batch is used whole."""
    while True:
        order = rng.permutation(n)
        for start in range(0, n, batch_size):
            yield order[start : start + batch_size]


def train_local(bundle: ModelBundle, data: TextData, cfg: RunConfig, trainable: Sequence[str],
                *, seed: Sequence[int], dp: DPSettings | None = None) -> list[float]:
    """`local-steps` optimizer steps on `trainable` keys; returns the loss of every step.

    A fresh optimizer each round (as the FedSVD and FFA-LoRA reference code does). Without `dp`,
    shuffled mini-batches of `batch-size` and the global gradient norm clipped at `max-grad-norm`
    unless it is 0. With `dp`, DP-SGD (`fedlora.privacy.dpsgd`): Poisson batches at rate
    `dp.sample_rate`, per-sample clipping and noise instead of the global clip; the loss of a
    step whose Poisson batch was empty (a noise-only step) is `nan`, so there is still one loss
    per step. Dropout masks and the non-private batches follow from `seed`; the DP batches and
    noise are secret unless `dp.reproducible` (dropout is data-independent: knowing its masks
    does not weaken the guarantee).
    """
    device = next(bundle.model.parameters()).device
    params = [bundle.params[k] for k in trainable]
    for p in bundle.model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    opt_cls = torch.optim.SGD if cfg.optimizer == "sgd" else torch.optim.Adam
    optimizer = opt_cls(params, lr=cfg.learning_rate)
    torch.manual_seed(int(np.random.SeedSequence(list(seed)).generate_state(1)[0]))  # dropout
    labels = torch.as_tensor(data.labels, device=device)

    precision = precision_context(cfg, device)

    def forward(idx: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        enc = _encode(bundle, [data.texts[i] for i in idx], cfg.max_length, device)
        with precision:
            logits = bundle.model(**enc).logits
        return logits.float(), labels[idx]

    bundle.model.train()
    try:
        if dp is not None:
            from fedlora.privacy.dpsgd import (
                dp_sgd_steps,  # opacus is only needed for DP runs
            )

            return dp_sgd_steps(bundle.model, optimizer, dp, num_examples=len(data),
                                steps=cfg.local_steps, forward=forward, seed=seed)
        batches = _batches(len(data), cfg.batch_size, np.random.default_rng(list(seed)))
        losses = []
        for _ in range(cfg.local_steps):
            loss = F.cross_entropy(*forward(next(batches)))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            optimizer.step()
            losses.append(float(loss.detach()))
        return losses
    finally:
        for p in params:
            p.requires_grad_(False)
        bundle.model.eval()


@torch.no_grad()
def evaluate(bundle: ModelBundle, data: TextData, cfg: RunConfig) -> dict[str, float | np.ndarray]:
    """Accuracy, mean cross-entropy and the predicted labels on `data` (in its order)."""
    device = next(bundle.model.parameters()).device
    bundle.model.eval()
    # Batches of similar length waste less compute on padding.
    order = np.argsort([len(t) for t in data.texts], kind="stable")
    preds = np.empty(len(data), dtype=np.int64)
    total_loss = 0.0
    labels = torch.as_tensor(data.labels, device=device)
    precision = precision_context(cfg, device)
    for start in range(0, len(data), cfg.eval_batch_size):
        idx = order[start : start + cfg.eval_batch_size]
        enc = _encode(bundle, [data.texts[i] for i in idx], cfg.max_length, device)
        with precision:
            logits = bundle.model(**enc).logits.float()
        total_loss += float(F.cross_entropy(logits, labels[idx], reduction="sum"))
        preds[idx] = logits.argmax(-1).cpu().numpy()
    n = max(len(data), 1)
    return {"accuracy": float((preds == data.labels).mean()) if len(data) else 0.0,
            "loss": total_loss / n, "predictions": preds}
