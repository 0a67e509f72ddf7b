"""`fedlora privacy audit`: an empirical lower bound on ε from one training run, so that the
privacy claim is checked, not only computed (Steinke, Nasr & Jagielski, "Privacy Auditing with One
(1) Training Run", NeurIPS 2023).

The accountant's ε is an upper bound that holds if the implementation is right. The audit tests
the implementation: it runs one client's DP-SGD exactly as training does (`train_local` →
`dp_sgd_steps`: its Poisson sampler, per-sample clipping, noise and normalisation, on the
configured model's trainable tensors: B, or A and B, plus the head) with m canaries added as extra
sample slots (`ExtraSlots`). Each canary is "in" with probability ½, independently; an in canary's
per-sample gradient is C·e_c along its own coordinate c of the flattened trainable vector (norm C:
the most one record can move a step), an out canary's slot has a zero gradient. So whether a
canary is in changes neither the number of slots N = n + m, nor any index, and q is given
explicitly (by default the client's training q, batch-size / n).

The auditor scores every canary from what the DP optimiser releases at each step (the noisy,
normalised gradient, read just before the inner optimiser steps: not parameter changes, so Adam
and float32 rounding do not blur it), guesses "in" for the k highest scores and "out" for the k
lowest, and counts its correct guesses v of r = 2k. Under (ε, δ)-DP that many correct guesses are
unlikely (Steinke et al., Thm. 5.2 and Cor. 5.4, evaluated numerically as in their App. D); the
largest ε the count rejects at the chosen confidence is the lower bound. The k of `GUESS_GRID`
(shares of m) are all tried, Bonferroni-corrected, unless one k is fixed in advance.

Two auditors, both reported:

* "server": knows what the server can know, and more: every step's release (the server receives
  only the adapter they end in) but not the batches. Score: the sum over all steps.
* "seed": also knows the batches as far as the run's seed determines them (the server sets the
  seed and everyone reads the config). Score: the sum over the steps whose predicted batch holds
  the canary of (release - μ/2), μ = C/(q·N) the mean an in canary adds to a step's release: the
  order of the per-canary likelihood ratio of in against out, so that a canary predicted in few
  steps is not ranked like one predicted in many. With secret sampling (OS entropy) the prediction is unrelated to the real batches
  and must give nothing more; a sampler seeded from the run seed gives the subsampling's
  amplification away, which this auditor shows.

What it cannot do (`LIMITS`, printed with the result): the bound has a ceiling (all guesses right:
`ceiling`), so audit at ε ≈ 2–3 where a violation can show; a bound below ε never certifies the
implementation; the records' own gradients on the canaries' coordinates blur the scores and make
the bound conservative (`control`: the same audit with the records' gradients left out); a
`dp-reproducible` run hits the ceiling trivially and is refused; ghost clipping is not audited
(it never builds per-sample gradients to add canaries to).
"""

from __future__ import annotations

import math
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook
from scipy import stats

from .accounting import PrivacyError, epsilon, noise_multiplier, sample_rate
from .dpsgd import DPSettings, ExtraSlots, batch_rng, poisson_batch

__all__ = ["AUDITORS", "GUESS_GRID", "LIMITS", "AuditSettings", "ceiling", "epsilon_lower_bound", "format_audit",
           "guess_bound", "p_value", "run_audit"]

#: k (guesses per side) tried when none is fixed in advance, as shares of the m canaries (10 ... 500
#: at m = 1,000); Bonferroni-corrected over all of them
GUESS_GRID = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5)
AUDITORS = {"server": "sees every step's release, not the batches",
            "seed": "also knows the batches the run seed predicts"}
LIMITS = (
    "a lower bound below the accountant's ε does not certify the implementation: the audit only "
    "failed to find a violation",
    "the bound cannot exceed its ceiling (every guess right), so it can show a violation only where "
    "the accountant's ε is below it: audit at ε ≈ 2-3",
    "the records' own gradients on the canaries' coordinates blur the scores, which makes the bound "
    "conservative; --control repeats the audit without them",
    "Opacus hooks only: ghost clipping (grad-sample-mode = ghost) never builds the per-sample "
    "gradients canaries are added to, and is not audited",
)


def p_value(m: int, r: int, v: int, eps: float, delta: float) -> float:
    """An upper bound on P[at least v of r guesses correct] about m canaries, each in with
    probability ½, under an (ε, δ)-DP algorithm (Steinke et al. 2023, Thm. 5.2 with App. D's
    numeric form): P[Binomial(r, p) ≥ v] + 2mδ·max_i P[v - i ≤ Binomial(r, p) < v] / i,
    p = e^ε / (1 + e^ε)."""
    if not 0 <= v <= r <= m:
        raise ValueError(f"need 0 <= v <= r <= m, got v={v}, r={r}, m={m}")
    p = 1.0 / (1.0 + math.exp(-eps))
    tail = float(stats.binom.sf(v - 1, r, p))
    if v == 0:
        return min(1.0, tail)
    below = np.cumsum(stats.binom.pmf(np.arange(v - 1, -1, -1), r, p))  # P[v - i <= Bin < v], i = 1..v
    return min(1.0, tail + 2 * m * delta * float(np.max(below / np.arange(1, v + 1))))


def epsilon_lower_bound(m: int, r: int, v: int, delta: float, alpha: float) -> float:
    """The largest ε whose (ε, δ)-DP the count (v of r right) rejects at level `alpha`; 0 if none.
    Bisection: the p-value grows with ε."""
    if p_value(m, r, v, 0.0, delta) >= alpha:
        return 0.0
    low, high = 0.0, 1.0
    while p_value(m, r, v, high, delta) < alpha:
        low, high = high, 2 * high
    for _ in range(40):
        mid = (low + high) / 2
        low, high = (mid, high) if p_value(m, r, v, mid, delta) < alpha else (low, mid)
    return low


def _grid(m: int, guesses: int) -> list[int]:
    if guesses:
        if not 1 <= guesses <= m // 2:
            raise PrivacyError(f"guesses={guesses} per side must be between 1 and canaries / 2 = {m // 2}")
        return [guesses]
    return sorted({max(1, round(share * m)) for share in GUESS_GRID})


def guess_bound(scores: np.ndarray, included: np.ndarray, delta: float, confidence: float,
                guesses: int = 0) -> dict[str, Any]:
    """The one-run bound of guessing "in" for the k highest `scores`, "out" for the k lowest: the
    best over `GUESS_GRID` (Bonferroni-corrected), or with `guesses` = k fixed in advance."""
    m = len(scores)
    grid = _grid(m, guesses)
    alpha = (1 - confidence) / len(grid)
    order = np.argsort(-np.asarray(scores), kind="stable")
    tried = []
    for k in grid:
        correct = int(included[order[:k]].sum() + (~included[order[m - k:]]).sum())
        tried.append({"epsilon": epsilon_lower_bound(m, 2 * k, correct, delta, alpha), "k": k, "correct": correct})
    return max(tried, key=lambda t: t["epsilon"])  # the first k of the grid among equals


def ceiling(m: int, delta: float, confidence: float, guesses: int = 0) -> float:
    """The most the audit can show: its bound with every guess right."""
    grid = _grid(m, guesses)
    return max(epsilon_lower_bound(m, 2 * k, 2 * k, delta, (1 - confidence) / len(grid)) for k in grid)


@dataclass(frozen=True)
class AuditSettings:
    """What `run_audit` does besides the run config: the DP-SGD it audits and how it guesses.

    Exactly one of `epsilon` (σ is calibrated to it over `steps` at q) and `sigma`. `sample_rate`
    0: the client's training q (batch-size / its records). `guesses` 0: the k of `GUESS_GRID`,
    Bonferroni-corrected. `control`: the records contribute zero gradients (same N, q, steps).
    `seed`: the canaries' coordinates and which are in (None: OS entropy); the run's own seed is
    the run config's, as in training.
    """

    epsilon: float | None = 2.0
    sigma: float | None = None
    steps: int = 100
    sample_rate: float = 0.0
    canaries: int = 1000
    delta: float = 1e-5
    confidence: float = 0.95
    guesses: int = 0
    client: int = 0
    num_clients: int = 10
    control: bool = False
    seed: int | None = None

    def __post_init__(self) -> None:
        if (self.epsilon is None) == (self.sigma is None):
            raise PrivacyError("give exactly one of epsilon (to calibrate σ) and sigma")
        if self.epsilon is not None and not (math.isfinite(self.epsilon) and self.epsilon > 0):
            raise PrivacyError(f"epsilon={self.epsilon!r} must be a finite number > 0")
        if self.sigma is not None and not (math.isfinite(self.sigma) and self.sigma > 0):
            raise PrivacyError(f"sigma={self.sigma!r} must be a finite number > 0 (σ = 0 has ε = ∞)")
        for name, low in (("steps", 1), ("canaries", 2), ("num_clients", 1)):
            if getattr(self, name) < low:
                raise PrivacyError(f"{name}={getattr(self, name)!r} must be at least {low}")
        if not 0 <= self.client < self.num_clients:
            raise PrivacyError(f"client={self.client} must be in [0, num_clients={self.num_clients})")
        if not 0 <= self.sample_rate <= 1:
            raise PrivacyError(f"sample_rate={self.sample_rate!r} must be in (0, 1] (0: the client's q)")
        if not 0 < self.delta < 1:
            raise PrivacyError(f"delta={self.delta!r} must be in (0, 1)")
        if not 0 < self.confidence < 1:
            raise PrivacyError(f"confidence={self.confidence!r} must be in (0, 1), e.g. 0.95")
        _grid(self.canaries, self.guesses)


class _Canaries:
    """m Dirac gradient canaries on distinct coordinates of the flattened trainable tensors,
    after `filler` zero-gradient slots (the records' stand-ins of a control run)."""

    def __init__(self, params: Sequence[torch.Tensor], m: int, clip: float, filler: int,
                 rng: np.random.Generator) -> None:
        sizes = [p.numel() for p in params]
        if m > sum(sizes):
            raise PrivacyError(f"{m} canaries need as many trainable coordinates; the model has {sum(sizes)} "
                               "(fewer canaries, or a larger lora-rank)")
        self.params, self.clip, self.filler = params, clip, filler
        self.coords = rng.choice(sum(sizes), size=m, replace=False)
        self.included = rng.random(m) < 0.5
        self.starts = np.cumsum([0, *sizes])
        self.which = np.searchsorted(self.starts, self.coords, side="right") - 1

    def gradients(self, slots: np.ndarray) -> list[torch.Tensor]:
        canary = slots - self.filler
        rows = [torch.zeros((len(slots), p.numel()), dtype=p.dtype, device=p.device) for p in self.params]
        for row, j in enumerate(canary):
            if j >= 0 and self.included[j]:
                rows[self.which[j]][row, self.coords[j] - self.starts[self.which[j]]] = self.clip
        return [r.view(len(slots), *p.shape) for r, p in zip(rows, self.params)]


@dataclass
class _Releases:
    """Every DP step's released gradient at the canaries' coordinates, read by a global optimiser
    pre-step hook from the inner optimiser (the one holding `params`), after Opacus has clipped,
    noised and normalised it."""

    params: Sequence[torch.Tensor]
    coords: np.ndarray
    steps: int
    progress: Callable[[str], None]

    def __post_init__(self) -> None:
        self.rows: list[np.ndarray] = []
        self.started = time.perf_counter()

    def __call__(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if hasattr(optimizer, "original_optimizer") or optimizer.param_groups[0]["params"][0] is not self.params[0]:
            return  # Opacus' wrapper, or another optimiser
        flat = torch.cat([p.grad.detach().flatten() for p in self.params]).double().cpu().numpy()
        self.rows.append(flat[self.coords])
        done = len(self.rows)
        if done % max(1, self.steps // 10) == 0 or done == self.steps:
            self.progress(f"step {done}/{self.steps} ({time.perf_counter() - self.started:.0f} s)")


def run_audit(cfg, settings: AuditSettings, progress: Callable[[str], None] = lambda line: None) -> dict[str, Any]:
    """Audit one client's DP-SGD under the run config `cfg` (a `RunConfig`); a JSON-ready dict.
    Raises PrivacyError or ConfigError on bad input, before training."""
    from fedlora.core.data import client_data
    from fedlora.core.task import get_task
    from fedlora.core.train import train_local
    from fedlora.strategies import get_method

    if cfg.dp_reproducible:
        raise PrivacyError("dp-reproducible = true: its batches and noise follow the run seed, so the audit "
                           "would reach its ceiling trivially; audit the private setting (dp-reproducible = false)")
    if cfg.grad_sample_mode != "hooks":
        raise PrivacyError(f"grad-sample-mode = {cfg.grad_sample_mode!r}: the audit adds its canaries to Opacus' "
                           "per-sample gradients, which ghost clipping never builds; audit with 'hooks'")
    started = time.perf_counter()
    records = client_data(cfg, settings.client, settings.num_clients).train
    q = settings.sample_rate or sample_rate(len(records), cfg.batch_size)
    sigma = settings.sigma if settings.sigma is not None else noise_multiplier(
        settings.epsilon, settings.delta, q, settings.steps, cfg.accountant)
    claimed = epsilon([(sigma, q, settings.steps)], settings.delta, cfg.accountant)
    bundle = get_task(cfg).build_model(cfg)
    keys = get_method(cfg.strategy).trainable_keys(bundle.params)
    params = [bundle.params[k] for k in keys]
    rng = np.random.default_rng(settings.seed if settings.seed is not None else secrets.randbits(128))
    filler = len(records) if settings.control else 0
    canaries = _Canaries(params, settings.canaries, cfg.max_grad_norm, filler, rng)
    trained = records.subset(np.arange(0)) if settings.control else records
    dp = DPSettings(sigma, cfg.max_grad_norm, q, "hooks")
    run_seed = (cfg.seed, 1, settings.client)  # what a client's first round trains with
    releases = _Releases(params, canaries.coords, settings.steps, progress)
    progress(f"training {settings.steps} DP-SGD steps: {len(records)} records{' (control: zero gradients)' if settings.control else ''} "
             f"+ {settings.canaries} canary slots, q = {q:.4g}, σ = {sigma:.4g}")
    hook = register_optimizer_step_pre_hook(releases)
    try:
        train_local(bundle, trained, cfg.replace(local_steps=settings.steps), keys, seed=run_seed, dp=dp,
                    extra=ExtraSlots(filler + settings.canaries, canaries.gradients))
    finally:
        hook.remove()
    train_seconds = time.perf_counter() - started
    released = np.stack(releases.rows)
    if released.shape[0] != settings.steps:
        raise RuntimeError(f"read {released.shape[0]} releases of {settings.steps} DP-SGD steps")
    # The batches anyone who knows the run seed computes, as a seeded sampler would draw them.
    predict = batch_rng(replace(dp, reproducible=True), run_seed)
    first = len(records)  # the canaries' first slot, in a control run too
    sampled = np.zeros_like(released, dtype=bool)
    for t in range(settings.steps):
        idx = poisson_batch(first + settings.canaries, q, predict)
        sampled[t, idx[idx >= first] - first] = True
    mu = cfg.max_grad_norm / (q * (first + settings.canaries))  # what an in canary adds to a release
    scores = {"server": released.sum(axis=0), "seed": ((released - mu / 2) * sampled).sum(axis=0)}
    auditors = {name: guess_bound(s, canaries.included, settings.delta, settings.confidence, settings.guesses)
                for name, s in scores.items()}
    top = ceiling(settings.canaries, settings.delta, settings.confidence, settings.guesses)
    return {
        "model": cfg.model, "strategy": cfg.strategy, "trainable_keys": len(keys),
        "trainable_coordinates": int(canaries.starts[-1]), "client": settings.client,
        "num_clients": settings.num_clients, "records": len(records), "control": settings.control,
        "canaries": settings.canaries, "canaries_in": int(canaries.included.sum()), "sample_rate": q,
        "sigma": sigma, "steps": settings.steps, "max_grad_norm": cfg.max_grad_norm, "delta": settings.delta,
        "accountant": cfg.accountant, "epsilon": claimed, "confidence": settings.confidence,
        "guesses": _grid(settings.canaries, settings.guesses), "ceiling": top,
        "auditors": {name: {**bound, "threat_model": AUDITORS[name]} for name, bound in auditors.items()},
        "violation": any(a["epsilon"] > claimed for a in auditors.values()),
        "seconds": {"train": round(train_seconds, 2), "total": round(time.perf_counter() - started, 2)},
        "limits": list(LIMITS),
    }


def format_audit(result: dict[str, Any]) -> str:
    """`run_audit`'s result as the command prints it."""
    grid = result["guesses"]
    lines = [
        f"audited: {result['model']}, {result['strategy']} ({result['trainable_keys']} trainable tensors, "
        f"{result['trainable_coordinates']} coordinates), client {result['client']} of {result['num_clients']} "
        f"({result['records']} records{', control run: zero gradients' if result['control'] else ''})",
        f"DP-SGD: σ = {result['sigma']:.4g}, q = {result['sample_rate']:.4g}, {result['steps']} steps, "
        f"C = {result['max_grad_norm']:g}: the accountant's ε = {result['epsilon']:.3f} "
        f"({result['accountant']}, δ = {result['delta']:g})",
        f"{result['canaries']} canaries ({result['canaries_in']} in), {result['confidence']:.0%} confidence, "
        + (f"k = {grid[0]} per side, fixed in advance" if len(grid) == 1 else
           f"k in {grid} per side, Bonferroni-corrected"),
        f"{'auditor':<58} ε lower bound  correct",
    ]
    for name, a in result["auditors"].items():
        lines.append(f"{name + ': ' + a['threat_model']:<58} {a['epsilon']:>13.3f}  {a['correct']}/{2 * a['k']} "
                     f"(k = {a['k']})")
    lines.append(f"ceiling: with every guess right this audit would show ε >= {result['ceiling']:.2f}"
                 + ("" if result["ceiling"] > result["epsilon"] else
                    f"; the accountant's ε = {result['epsilon']:.2f} is above it, so no violation can show"))
    lines.append(f"time: {result['seconds']['train']:.0f} s of training, {result['seconds']['total']:.0f} s in all")
    lines.append("VIOLATION: an empirical lower bound exceeds the accountant's ε; the implementation leaks more "
                 "than it claims" if result["violation"] else
                 "no violation found: every lower bound is at most the accountant's ε")
    lines += ["limits:", *(f"- {limit}" for limit in result["limits"])]
    return "\n".join(lines)
