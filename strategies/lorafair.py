"""LoRA-FAIR: FedIT averaging plus a server-side correction of B towards the ideal update.

Bian, Wang, Zhang, Xu, "LoRA-FAIR: Federated LoRA Fine-Tuning with Aggregation and Initialization
Refinement", ICCV 2025 (arXiv 2411.14961).

Clients train A and B. The server forms Ā = Σ p_k A_k, B̄ = Σ p_k B_k and the ideal update
ΔW = Σ p_k B_k A_k, then finds

    ΔB* = argmin_ΔB  1 − cos(ΔW, (B̄ + ΔB) Ā) + λ ‖ΔB‖²_F / ‖B̄‖²_F          (λ = `fair-lambda`)

and sets A ← Ā, B ← B̄ + ΔB*. The base weights are untouched; the LoRA scale s cancels in the
cosine and is not part of the regulariser (the paper's convention).

The penalty. The paper writes λ‖ΔB‖ (the norm, not squared, as far as the secondary sources we
could read show). We use the squared norm relative to B̄'s: squared because it is smooth at
ΔB = 0, where the solver starts (the plain norm has no gradient there), as a third-party
re-implementation also does; divided by ‖B̄‖² because the cosine ignores B's scale and an absolute penalty does not:
λ = 0.01 then did nothing at LoRA's usual B entries (~0.02: the same cosine as λ = 0) and dominated
at entries ~1. Relative, λ means the same at every adapter scale (B_k → c B_k gives ΔB* → c ΔB*):
λ = 0.01 prices a change of B̄ by 10 % at 1e-4 of cosine. Where B̄ = 0 but ΔW ≠ 0, ‖B̄‖ is replaced
by ‖ΔW‖_F / ‖Ā‖_F, the smallest ‖B‖ with ‖BĀ‖ = ‖ΔW‖ (`FairProblem.b_scale`).

Nothing m×n is formed (shared/notes/algorithms.md §4). With B_st = [p_1 B_1 | … | p_K B_K] and
A_st = [A_1; …; A_K], ΔW = B_st A_st, and everything the loss needs is an r×r or m×r matrix:
G = Ā Āᵀ, P = ΔW Āᵀ = B_st (A_st Āᵀ), ‖ΔW‖² = tr((B_stᵀB_st)(A_st A_stᵀ)), and for B' = B̄ + ΔB
⟨ΔW, B'Ā⟩ = ⟨P, B'⟩, ‖B'Ā‖² = tr(B'ᵀB' G). Set-up is O(K²r²(m+n)), each solver step O(m r²).

Solver: the cosine's gradient scales with 1/‖B'Ā‖, so plain SGD with a fixed lr moves
very differently for small and large adapters (an lr tuned on one scale stalls or explodes on
another). Adam is invariant to the gradient's scale, and we let it move ΔB in units of B̄'s RMS
entry, so one default works at any adapter scale. The lr decays geometrically to 1 % of
`fair-lr` over `fair-steps` steps so that the iterate settles instead of oscillating, and the
solver stops early once the best loss so far has improved by less than `tol` (relative) over the
last `PATIENCE` = 50 steps (the best, not the current loss: Adam's first steps have a fixed size
and overshoot a small correction, and the current loss can then sit above the one some steps back
while better points are still being found). It returns the best iterate seen, so the loss never
exceeds that of ΔB = 0 and the corrected cosine is never below FedIT's (the penalty is ≥ 0).
Why 50: where the whole correction is far smaller than Adam's first steps (clients' A_k nearly
equal) a patience of 20 stopped with under 99 % of the reachable decrease on 33 of 240 test
problems at λ = 0 and 46 of 144 at λ = 0.01; 50 on none, for about a third more steps. Known limit:
at large λ (≳ 10) the correction is tiny and may still be cut short (not measured with 50).
Defaults: 500 steps at lr 0.05 reach the λ = 0 optimum (the projection of ΔW onto Ā's row
space) to < 1e-4 in cosine on the test problems. On a 384×384, r = 8 layer (K = 5 or 10 clients of
benchmarks/aggregation.py) one `aggregate` took 31 ms (median of 21, in-process, one torch
thread, on the idle 2-core VM, 2026-12-03).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

import torch

from .base import AB_DEFAULTS, B_SUFFIX, LoraMethod, State, layer_names, stacked_factors

__all__ = ["FairProblem", "LoRAFAIR", "fair_correction"]

PATIENCE = 50  # solver steps without a better loss (by more than tol, relative) before it stops


@dataclass(frozen=True)
class FairProblem:
    """The Gram-form pieces of one layer's LoRA-FAIR problem (float64)."""

    b_bar: torch.Tensor  # m×r
    G: torch.Tensor  # r×r, Ā Āᵀ
    P: torch.Tensor  # m×r, ΔW Āᵀ
    dw_norm: float  # ‖ΔW‖_F

    @classmethod
    def build(cls, updates: Sequence[State], layer: str, weights: torch.Tensor) -> FairProblem:
        """The problem of `layer` from the clients' (A_k, B_k) and weights p_k."""
        b_st, a_st = stacked_factors(updates, weights, layer, alpha=None)  # m×Kr, Kr×n; s cancels
        r = a_st.shape[0] // len(updates)
        b_bar = sum(b_st[:, k * r : (k + 1) * r] for k in range(len(updates)))
        a_bar = sum(p * a_st[k * r : (k + 1) * r] for k, p in enumerate(weights.tolist()))
        dw_sq = torch.trace((b_st.T @ b_st) @ (a_st @ a_st.T))
        return cls(b_bar, a_bar @ a_bar.T, b_st @ (a_st @ a_bar.T), float(dw_sq.clamp_min(0).sqrt()))

    @cached_property
    def a_norm(self) -> float:
        """‖Ā‖_F = √tr G."""
        return float(self.G.trace().clamp_min(0).sqrt())

    @cached_property
    def b_scale(self) -> float:
        """The penalty's scale s: ‖B̄‖_F, or ‖ΔW‖_F / ‖Ā‖_F (also in B's units) where B̄ = 0."""
        return float(self.b_bar.norm()) or (self.dw_norm / self.a_norm if self.a_norm else 0.0)

    def cosine(self, b: torch.Tensor) -> float:
        """cos(ΔW, B Ā) over the flattened m×n matrices (0 where either is zero)."""
        norm = float(((b @ self.G) * b).sum().clamp_min(0).sqrt())
        if norm == 0.0 or self.dw_norm == 0.0:
            return 0.0
        return float((self.P * b).sum()) / (norm * self.dw_norm)

    def loss_and_grad(self, delta: torch.Tensor, lam: float) -> tuple[float, torch.Tensor]:
        """1 − cos + λ‖ΔB‖²/s² (s = `b_scale`) and its gradient with respect to ΔB (closed form).

        Where B′Ā = 0 (B′ = B̄ + ΔB: the solver's start when B̄ = 0) the cosine is taken as 0. It has
        no gradient there (its gradient grows as 1/‖B′Ā‖ near it, which would swamp Adam's moment
        estimates for the rest of the solve), so the gradient is that of ⟨ΔW, B′Ā⟩ / (‖ΔW‖ s‖Ā‖):
        ‖B′Ā‖ replaced by its bound s‖Ā‖ at ‖B′‖ = s, an ascent direction of the usual size.
        """
        b = self.b_bar + delta
        bg = b @ self.G
        norm = float((bg * b).sum().clamp_min(0).sqrt()) or self.b_scale * self.a_norm
        ip = float((self.P * b).sum())
        cos = ip / (norm * self.dw_norm)
        grad_cos = (self.P / self.dw_norm - (cos / norm) * bg) / norm
        mu = lam / self.b_scale**2
        return 1.0 - cos + mu * float((delta * delta).sum()), -grad_cos + 2.0 * mu * delta

    def best_cosine(self) -> float:
        """cos* = √tr(P G⁻¹ Pᵀ) / ‖ΔW‖: the best any B can do with this Ā (λ = 0)."""
        if self.dw_norm == 0.0:
            return 0.0
        sol = torch.linalg.lstsq(self.G, self.P.T).solution  # G⁻¹ Pᵀ (pseudo-inverse if singular)
        return float(torch.trace(self.P @ sol).clamp_min(0).sqrt()) / self.dw_norm


def fair_correction(problem: FairProblem, lam: float, steps: int, lr: float, tol: float = 1e-9) -> torch.Tensor:
    """ΔB minimising the LoRA-FAIR objective, by Adam from ΔB = 0 (see the module docstring)."""
    if problem.dw_norm == 0.0 or problem.a_norm == 0.0:
        return torch.zeros_like(problem.b_bar)  # nothing to match: no correction
    rms = problem.b_scale / problem.b_bar.numel() ** 0.5  # B̄'s RMS entry (where B̄ = 0: that of the scale s)
    x = torch.zeros_like(problem.b_bar, requires_grad=True)  # ΔB = rms · x
    opt = torch.optim.Adam([x], lr=lr)
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.01 ** (1.0 / max(steps, 1)))
    best_history: list[float] = []  # the best loss so far, after each step
    best_loss, best_x = float("inf"), x.detach().clone()
    for _ in range(steps + 1):
        loss, grad = problem.loss_and_grad(rms * x.detach(), lam)
        if loss < best_loss:  # Adam's first steps have a fixed size and can overshoot a near-optimum
            best_loss, best_x = loss, x.detach().clone()
        best_history.append(best_loss)
        if len(best_history) > steps:
            break
        if len(best_history) > PATIENCE:  # progress is the best loss's (module docstring)
            before = best_history[-PATIENCE - 1]
            if before - best_loss <= tol * max(abs(before), 1e-12):
                break
        x.grad = rms * grad
        opt.step()
        sched.step()
    # The best iterate, never worse than ΔB = 0: so the cosine never drops below FedIT's.
    return rms * best_x


class LoRAFAIR(LoraMethod):
    name = "lorafair"
    paper = "Bian et al., ICCV 2025, arXiv:2411.14961"
    trains_a = True
    exact = False  # the best B with Ā fixed: still approximate
    defaults = AB_DEFAULTS
    options = {"lam": "fair-lambda", "steps": "fair-steps", "lr": "fair-lr"}

    def __init__(self, lam: float = 0.01, steps: int = 500, lr: float = 0.05) -> None:
        self.lam, self.steps, self.lr = lam, steps, lr
        self._metrics: dict[str, float] = {}

    def aggregate(self, state: State, updates: Sequence[State], weights: torch.Tensor) -> State:
        new = super().aggregate(state, updates, weights)  # FedIT: Ā, B̄ (and the head)
        before, after = [], []
        for layer in layer_names(new):
            problem = FairProblem.build(updates, layer, weights)
            delta = fair_correction(problem, self.lam, self.steps, self.lr)
            before.append(problem.cosine(problem.b_bar))
            after.append(problem.cosine(problem.b_bar + delta))
            new[layer + B_SUFFIX] = (problem.b_bar + delta).to(new[layer + B_SUFFIX].dtype)
        self._metrics = {"fair_cos_before": sum(before) / len(before), "fair_cos_after": sum(after) / len(after)}
        return new

    def round_metrics(self) -> dict[str, float]:
        return dict(self._metrics)
