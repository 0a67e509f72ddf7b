"""DP-SGD local steps on a model's trainable parameters, with Opacus' per-sample gradients.

One step (Abadi et al. 2016, as Opacus implements it):

1. Poisson sampling: each of the client's n examples joins the batch independently with
   probability q, so the batch size varies and may be 0. This is the sampling the accountant's
   sampled-Gaussian analysis assumes; a fixed-size shuffled batch would not be covered by it.
2. Per-sample gradients of the mean of the per-record losses (`PerSampleLoss`: cross-entropy for
   a classifier; for a causal LM one sequence's mean over its answer tokens, never normalised by
   the batch's token count, so that one record's gradient does not depend on the others), from
   Opacus' hooks ("hooks": materialised per layer; "ghost": only their norms, then a second,
   reweighted backward pass). A batch too large for memory runs as chunks of `micro_batch_size`
   records (gradient accumulation): each chunk's per-sample gradients are clipped and summed, and
   the noise is added once, to the whole logical batch.
3. Flat clipping: each example's gradient over *all* trainable tensors together is scaled to
   norm at most C.
4. Gaussian noise N(0, σ²C²) is added to the sum of the clipped gradients, which is then divided
   by the *expected* batch size q·n (not the drawn one: the drawn size depends on the data).
5. The inner optimizer (SGD or Adam) steps on that gradient.

Secrecy: the accountant's amplification by subsampling holds only if nobody but the client knows
which records each step sampled, and the noise protects only if nobody can regenerate it. So both
come from the operating system's entropy (`secrets`), a fresh secret seed per call, never from
the run `seed`, which the server and everyone who reads the config know. `DPSettings.reproducible`
derives both from the caller's seed instead: for tests only, and the guarantee then does not hold
against anyone who knows that seed (`REPRODUCIBLE_WARNING`).

An empty batch is still a step: its clipped sum is zero, so the update is pure noise, and it is
counted like any other (skipping it would reveal that the batch was empty, which the analysis
does not allow). No forward pass is run for it: Hugging Face models fail on a batch of 0.

A privacy audit (`fedlora.privacy.audit`) adds sample slots whose per-sample gradients it gives
directly (`ExtraSlots`, its canaries): they go through the same sampling, clipping, noise and
normalisation as the records, and the batches' generator is `batch_rng`, so that the audit can
predict them as anyone who knows the seed could.

Opacus' hooks are attached for the duration of `dp_sgd_steps` only and removed afterwards, also
after an exception, because the same model object is trained again for the next client or round.
"""

from __future__ import annotations

import math
import secrets
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from .accounting import PrivacyError

__all__ = ["GRAD_SAMPLE_MODES", "REPRODUCIBLE_WARNING", "DPSettings", "ExtraSlots", "Forward", "PerSampleLoss",
           "batch_rng", "chunks", "dp_sgd_steps", "poisson_batch"]

GRAD_SAMPLE_MODES = ("hooks", "ghost")
REPRODUCIBLE_WARNING = ("dp-reproducible = true: the DP-SGD batches and noise follow the run seed, so the "
                        "privacy guarantee does not hold against anyone who knows `seed` (the server "
                        "included); for tests only")

Forward = Callable[[np.ndarray], tuple[torch.Tensor, torch.Tensor]]
"""Runs the model on the examples at the given indices; returns (model output, target)."""
PerSampleLoss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""(model output, target) -> one loss per record, shape (batch,)."""


def _cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(logits, labels, reduction="none")


class _Criterion(nn.Module):
    """The mean of a per-record loss, with the `reduction` switch Opacus' ghost clipping flips to
    "none" to get the per-record losses themselves."""

    def __init__(self, per_sample: PerSampleLoss) -> None:
        super().__init__()
        self.per_sample, self.reduction = per_sample, "mean"

    def forward(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        losses = self.per_sample(output, target)
        return losses if self.reduction == "none" else losses.mean()


def chunks(idx: np.ndarray, size: int) -> list[np.ndarray]:
    """`idx` in consecutive chunks of at most `size` (0: one chunk); never an empty list."""
    if size <= 0 or len(idx) <= size:
        return [idx]
    return [idx[start : start + size] for start in range(0, len(idx), size)]

# Attributes Opacus leaves on modules when a step is interrupted between forward and backward;
# `cleanup()` does not remove them, and stale activations would corrupt the next step.
_MODULE_STATE = ("activations", "max_batch_len")
# Set on parameters by the DP optimizers; not covered by the hooks' `cleanup()`.
_PARAM_STATE = ("summed_grad",)


@dataclass(frozen=True)
class DPSettings:
    """Record-level DP-SGD parameters of one client's local training.

    `reproducible=False` (the only private choice) draws the Poisson batches and the noise from
    the operating system's entropy. `reproducible=True` derives both from the training seed, so a
    run can be repeated exactly; anyone who knows that seed (the server sets it) then knows which
    records every step used and can regenerate the noise and subtract it. Neither is Opacus'
    `secure_mode` (noise hardened against floating-point attacks).
    """

    noise_multiplier: float
    max_grad_norm: float
    sample_rate: float
    grad_sample_mode: str = "hooks"
    reproducible: bool = False

    def __post_init__(self) -> None:
        if not (math.isfinite(self.noise_multiplier) and self.noise_multiplier >= 0):
            raise PrivacyError(f"noise multiplier={self.noise_multiplier!r} must be a finite number >= 0")
        if not (math.isfinite(self.max_grad_norm) and self.max_grad_norm > 0):
            raise PrivacyError(f"max grad norm (clipping bound C)={self.max_grad_norm!r} must be a "
                               "finite number > 0")
        if not (math.isfinite(self.sample_rate) and 0 < self.sample_rate <= 1):
            raise PrivacyError(f"sample rate={self.sample_rate!r} must be in (0, 1]")
        if self.grad_sample_mode not in GRAD_SAMPLE_MODES:
            raise PrivacyError(f"grad sample mode={self.grad_sample_mode!r} is not supported; choose "
                               f"one of {list(GRAD_SAMPLE_MODES)}")


@dataclass(frozen=True)
class ExtraSlots:
    """`count` sample slots after the model's records whose per-sample gradients are given
    directly instead of by a forward pass: a privacy audit's canaries (`fedlora.privacy.audit`).
    They are sampled, clipped, summed, noised and normalised exactly like records (the expected
    batch size is q·(records + count)). `gradients(idx)` gets the sampled slots' offsets (0 to
    `count` - 1) and returns one tensor of shape (len(idx), *p.shape) per trainable parameter, in
    the optimizer's order. Hooks mode only: ghost clipping never materialises per-sample gradients.
    """

    count: int
    gradients: Callable[[np.ndarray], Sequence[torch.Tensor]]


def poisson_batch(n: int, q: float, rng: np.random.Generator) -> np.ndarray:
    """Indices of a Poisson-sampled batch: each of `n` examples independently with probability `q`."""
    return np.flatnonzero(rng.random(n) < q)


def _trainable(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[nn.Parameter]:
    """The optimizer's parameters, checked to be exactly the model's live trainable ones.

    Opacus computes per-sample gradients for every parameter that requires grad, and the DP
    optimizer needs one for each of its parameters: a trainable parameter unused by the
    optimizer, or an optimizer parameter that is not the model's (stale tensors, opacus #820),
    breaks the step or makes it a silent no-op.
    """
    live = {id(p): name for name, p in model.named_parameters() if p.requires_grad}
    params = [p for group in optimizer.param_groups for p in group["params"]]
    held = {id(p) for p in params}
    stale = sum(id(p) not in live for p in params)
    unused = sorted(name for pid, name in live.items() if pid not in held)
    problems = []
    if not params:
        problems.append("the optimizer holds no parameters")
    if stale:
        problems.append(f"{stale} optimizer parameter(s) are not trainable parameters of the model")
    if unused:
        problems.append(f"trainable but not optimised: {unused[:5]}{' ...' if len(unused) > 5 else ''}")
    if problems:
        raise ValueError("the optimizer must hold exactly the model's trainable parameters for "
                         "DP-SGD: " + "; ".join(problems))
    return params


@contextmanager
def _opacus_hooks(model: nn.Module, dp: DPSettings) -> Iterator[object]:
    """Opacus' per-sample-gradient hooks on `model` (not wrapped), removed on exit whatever happens."""
    from opacus.grad_sample import GradSampleHooks, GradSampleHooksFastGradientClipping

    if dp.grad_sample_mode == "ghost":
        hooks = GradSampleHooksFastGradientClipping(model, batch_first=True, loss_reduction="mean",
                                                    max_grad_norm=dp.max_grad_norm,
                                                    use_ghost_clipping=True)
    else:
        hooks = GradSampleHooks(model, batch_first=True, loss_reduction="mean")
    try:
        yield hooks
    finally:
        hooks.cleanup()
        # Through `__dict__`: peft wrappers forward attribute look-ups to the module they wrap.
        for module in model.modules():
            for attr in _MODULE_STATE:
                module.__dict__.pop(attr, None)
        for p in model.parameters():
            for attr in _PARAM_STATE:
                p.__dict__.pop(attr, None)


def _secret_or_seed(dp: DPSettings, seed: Sequence[int]) -> np.random.SeedSequence:
    """128 bits of OS entropy, fresh on every call; or, with `dp.reproducible`, `seed`."""
    return np.random.SeedSequence(list(seed) if dp.reproducible else [secrets.randbits(64), secrets.randbits(64)])


def batch_rng(dp: DPSettings, seed: Sequence[int]) -> np.random.Generator:
    """The generator of a run's Poisson batches: secret, unless `dp.reproducible` (then it follows
    `seed`, and anyone who knows `seed` can compute every batch: what a privacy audit checks)."""
    return np.random.default_rng(_secret_or_seed(dp, seed).spawn(2)[0])


def _noise_generator(dp: DPSettings, seed: Sequence[int], device: torch.device) -> torch.Generator:
    """The generator of a run's Gaussian noise: secret, unless `dp.reproducible`."""
    state = _secret_or_seed(dp, seed).spawn(2)[1]
    noise = torch.Generator(device=device)
    noise.manual_seed(int(state.generate_state(1, dtype=np.uint64)[0] >> np.uint64(1)))
    return noise


def _add_extra_rows(params: list[nn.Parameter], rows: Sequence[torch.Tensor]) -> None:
    """Append given per-sample gradients (`ExtraSlots`) after the records' rows of a chunk, if any."""
    for p, extra in zip(params, rows, strict=True):
        if extra.shape[1:] != p.shape:
            raise ValueError(f"an extra slot's gradient has shape {tuple(extra.shape[1:])}, its parameter "
                             f"{tuple(p.shape)}")
        own = getattr(p, "grad_sample", None)
        p.grad_sample = extra.to(p) if own is None else torch.cat([own, extra.to(own)])


def dp_sgd_steps(model: nn.Module, optimizer: torch.optim.Optimizer, dp: DPSettings, *,
                 num_examples: int, steps: int, forward: Forward, seed: Sequence[int] = (),
                 loss: PerSampleLoss = _cross_entropy, micro_batch_size: int = 0,
                 extra: ExtraSlots | None = None) -> list[float]:
    """`steps` DP-SGD steps on the parameters of `optimizer` (the model's trainable ones).

    `forward` runs the model (in training mode) on a batch of example indices and `loss` turns its
    output into one loss per record (default: cross-entropy of logits against labels). With
    `micro_batch_size` > 0 a Poisson batch runs in chunks of that many records whose clipped
    per-sample gradients are summed before the one noise draw of the step. The Poisson
    batches and the noise are secret (OS entropy) unless `dp.reproducible`, when they follow
    `seed`. `extra` adds slots with given per-sample gradients (`ExtraSlots`). Returns the mean
    loss of every step's records, `nan` for a step that sampled none (a noise-only step, or one
    of extra slots only), so the list always has `steps` entries. Plain Python floats; the caller
    averages with nanmean.
    """
    from opacus.optimizers import DPOptimizer, DPOptimizerFastGradientClipping
    from opacus.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping

    if isinstance(num_examples, bool) or not isinstance(num_examples, int) or num_examples < 0:
        raise ValueError(f"num_examples={num_examples!r} must be an int >= 0")
    slots = num_examples + (extra.count if extra else 0)
    if slots < 1:
        raise ValueError("DP-SGD needs at least one example (or extra slot), got none")
    if extra and dp.grad_sample_mode != "hooks":
        raise ValueError("extra sample slots need grad_sample_mode='hooks': ghost clipping never builds "
                         "per-sample gradients to add them to")
    if dp.reproducible and not seed:
        raise ValueError("DPSettings.reproducible needs a seed to reproduce")
    params = _trainable(model, optimizer)
    rng, generator = batch_rng(dp, seed), _noise_generator(dp, seed, params[0].device)
    ghost = dp.grad_sample_mode == "ghost"
    before = [p.detach().clone() for p in params]
    data_seen = False
    losses: list[float] = []
    with _opacus_hooks(model, dp) as hooks, warnings.catch_warnings():
        # Frozen embeddings mean the first hooked layer's inputs need no gradient; torch warns,
        # but the hook still gets the output gradient, which is all Opacus uses.
        warnings.filterwarnings("ignore", message="Full backward hook is firing when gradients")
        dp_optimizer = (DPOptimizerFastGradientClipping if ghost else DPOptimizer)(
            optimizer, noise_multiplier=dp.noise_multiplier, max_grad_norm=dp.max_grad_norm,
            # Normalising by the expected batch size q·n keeps the sensitivity of the mean at C/(q·n)
            # whatever batch was drawn; Opacus rounds it down to an int, we keep it exact.
            expected_batch_size=dp.sample_rate * slots, loss_reduction="mean",
            generator=generator)
        # Ghost clipping needs its criterion: it runs both backward passes inside `backward()`.
        criterion = (DPLossFastGradientClipping(hooks, dp_optimizer, _Criterion(loss), "mean")
                     if ghost else _Criterion(loss))
        try:
            for _ in range(steps):
                dp_optimizer.zero_grad(set_to_none=True)
                idx = poisson_batch(slots, dp.sample_rate, rng)
                if len(idx) == 0:
                    # Hand Opacus an empty per-sample set (hooks) or a zero clipped sum (ghost):
                    # its own step then adds the noise, scales by q·n and steps the optimizer.
                    for p in params:
                        if ghost:
                            p.grad = torch.zeros_like(p)
                        else:
                            p.grad_sample = p.new_zeros((0, *p.shape))
                    dp_optimizer.step()
                    losses.append(math.nan)
                    continue
                parts, total, records = chunks(idx, micro_batch_size), 0.0, 0
                for j, part in enumerate(parts):
                    if j:  # the per-sample gradients of the previous chunk; its clipped sum stays
                        dp_optimizer.zero_grad(set_to_none=True)
                    own = part[part < num_examples]
                    if len(own):
                        batch_loss = criterion(*forward(own))
                        batch_loss.backward()
                        total += float(batch_loss.detach()) * len(own)
                        records += len(own)
                    if len(own) < len(part):
                        _add_extra_rows(params, extra.gradients(part[part >= num_examples] - num_examples))
                    # Clip and sum only, until the logical batch is complete: then noise, once.
                    dp_optimizer.signal_skip_step(do_skip=j < len(parts) - 1)
                    dp_optimizer.step()
                losses.append(total / records if records else math.nan)
                data_seen = data_seen or records > 0
        finally:
            dp_optimizer.zero_grad(set_to_none=True)  # no noisy or per-sample grads left behind
    moved = any(not torch.equal(b, p.detach()) for b, p in zip(before, params))
    if steps and (data_seen or dp.noise_multiplier > 0) and not moved:
        raise RuntimeError(
            f"DP-SGD took {steps} steps but no trainable parameter changed: the optimizer does not "
            "update the tensors the model computes with (opacus #820); build the model on its "
            "device before wrapping it with peft, and the optimizer after both"
        )
    return losses
