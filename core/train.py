"""The local training loop of every client, for any task (`core/task.py` gives the model's forward
pass on a batch and the per-record loss), with or without DP-SGD; and the numeric precision both
training and evaluation run in."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch

from .config import RunConfig
from .model import ModelBundle, precision_context
from .task import get_task

if TYPE_CHECKING:
    from fedlora.privacy.dpsgd import DPSettings, ExtraSlots

__all__ = ["round_learning_rate", "train_local"]


def _batches(n: int, batch_size: int, rng: np.random.Generator) -> Iterator[np.ndarray]:
    """Endless shuffled mini-batches; a partition smaller than a batch is used whole."""
    while True:
        order = rng.permutation(n)
        for start in range(0, n, batch_size):
            yield order[start : start + batch_size]


def round_learning_rate(cfg: RunConfig, server_round: int) -> float:
    """The learning rate of a round: `learning-rate` throughout, or with `lr-schedule = cosine` a
    half cosine from it (round 1) down to `min-learning-rate` (the last round), as FlowerTune does."""
    if cfg.lr_schedule == "constant" or cfg.num_server_rounds == 1:
        return cfg.learning_rate
    progress = min(max(server_round - 1, 0) / (cfg.num_server_rounds - 1), 1.0)
    return cfg.min_learning_rate + 0.5 * (cfg.learning_rate - cfg.min_learning_rate) * (1 + math.cos(math.pi * progress))


def train_local(bundle: ModelBundle, data, cfg: RunConfig, trainable: Sequence[str],
                *, seed: Sequence[int], dp: DPSettings | None = None, server_round: int = 1,
                extra: ExtraSlots | None = None) -> list[float]:
    """`local-steps` optimizer steps on `trainable` keys; returns the loss of every step.

    `data` is the task's (`TextData`, `InstructionData`). A fresh optimizer each round (as the
    FedSVD and FFA-LoRA reference code does), at the round's learning rate (`round_learning_rate`).
    Without `dp`, shuffled mini-batches of `batch-size` and the global gradient norm clipped at
    `max-grad-norm` unless it is 0. With `dp`, DP-SGD (`fedlora.privacy.dpsgd`): Poisson batches at
    rate `dp.sample_rate`, per-sample clipping and noise instead of the global clip; the loss of a
    step whose Poisson batch was empty (a noise-only step) is `nan`, so there is still one loss
    per step. Either way a batch runs in chunks of `micro-batch-size` rows when that is set
    (gradient accumulation: the same step, less memory). Dropout masks and the non-private
    batches follow from `seed`; the DP batches and noise are secret unless `dp.reproducible`
    (dropout is data-independent: knowing its masks does not weaken the guarantee). `extra`
    (DP only) adds sample slots with given gradients: a privacy audit's canaries.
    """
    if extra is not None and dp is None:
        raise ValueError("extra sample slots are a DP-SGD feature (an audit's canaries): pass dp")
    task = get_task(cfg)
    device = next(bundle.model.parameters()).device
    params = [bundle.params[k] for k in trainable]
    for p in bundle.model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    opt_cls = torch.optim.SGD if cfg.optimizer == "sgd" else torch.optim.Adam
    optimizer = opt_cls(params, lr=round_learning_rate(cfg, server_round))
    torch.manual_seed(int(np.random.SeedSequence(list(seed)).generate_state(1)[0]))  # dropout
    precision = precision_context(cfg, device)
    batch_forward = task.forward(bundle, data, cfg, device)

    def forward(idx: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        with precision:
            output, target = batch_forward(idx)
        return output.float(), target

    bundle.model.train()
    try:
        if dp is not None:
            from fedlora.privacy.dpsgd import (
                dp_sgd_steps,  # opacus is only needed for DP runs
            )

            return dp_sgd_steps(bundle.model, optimizer, dp, num_examples=len(data), steps=cfg.local_steps,
                                forward=forward, seed=seed, loss=task.loss, micro_batch_size=cfg.micro_batch_size,
                                extra=extra)
        from fedlora.privacy.dpsgd import chunks

        batches = _batches(len(data), cfg.batch_size, np.random.default_rng(list(seed)))
        losses = []
        for _ in range(cfg.local_steps):
            idx = next(batches)
            optimizer.zero_grad(set_to_none=True)
            total = 0.0
            for part in chunks(idx, cfg.micro_batch_size):
                # each chunk's share of the batch mean: the summed gradients are the whole batch's
                loss = task.loss(*forward(part)).sum() / len(idx)
                loss.backward()
                total += float(loss.detach())
            if cfg.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            optimizer.step()
            losses.append(total)
        return losses
    finally:
        for p in params:
            p.requires_grad_(False)
        bundle.model.eval()
