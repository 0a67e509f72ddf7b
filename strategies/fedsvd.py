"""FedSVD: FFA-style B-only training plus an exact SVD re-factorisation of B̄·A every round.

Lee et al., "FedSVD: Adaptive Orthogonalization for Private Federated Learning with LoRA",
NeurIPS 2025 (arXiv 2505.12805); behaviour follows the official code (seanie12/fed-svd).

Clients train only B against the broadcast A. The server averages B̄ = Σ p_k B_k (exact, since A is
shared), then re-factorises the product B̄A = U Σ Vᵀ and sets A ← Vᵀ (orthonormal rows) and
B ← UΣ, so the model function is unchanged while A adapts to the data. Round 1 trains against
peft's Kaiming A, as the official code does.

The official code runs a dense SVD of the m×n product: O(mn·min(m, n)) time and O(mn) memory.
`refactorize` gives the same factors from two thin QRs and an r×r SVD, O((m+n)r²), never forming
m×n (shared/notes/algorithms.md §4):  Aᵀ = Q_A R_A,  B̄ = Q_B R_B,  R_B R_Aᵀ = U_c Σ V_cᵀ  ⇒
B̄A = (Q_B U_c) Σ (Q_A V_c)ᵀ. From the second round on A has orthonormal rows (it is the previous
round's Vᵀ) and the eigenvectors W of the r×r Gram B̄ᵀB̄ suffice: B̄A = (B̄W)(WᵀA), no QR at all.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .base import A_SUFFIX, B_ONLY_DEFAULTS, B_SUFFIX, LoraMethod, State, layer_names
from .lowrank import product_svd

__all__ = ["FedSVD", "refactorize"]


def refactorize(B: torch.Tensor, A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact thin SVD factors of B·A without forming it: returns (UΣ, Vᵀ) with Vᵀ orthonormal rows.

    Sign convention (for reproducibility across implementations): the largest-magnitude entry
    of each row of the new A is positive (where the largest positive and negative entries tie in
    magnitude, the row keeps the sign it has). Singular values are in descending order. Returned in
    B's and A's dtype. A zero B gives B = 0 and an orthonormal A, never NaN.
    """
    m, r = B.shape
    r_a, n = A.shape
    if r_a != r:
        raise ValueError(f"B is {m}×{r} but A is {r_a}×{n}: ranks differ")
    if r > min(m, n):
        raise ValueError(f"rank {r} exceeds the layer size {m}×{n}")
    if _has_orthonormal_rows(A):
        # Every round after the first, A came out of this function: with orthonormal rows, B = U Σ Wᵀ
        # makes B·A = U Σ (WᵀA) an SVD already, and W comes from the r×r Gram BᵀB, formed and
        # decomposed in float64 (its eigenvectors are the singular vectors). The two thin products
        # then run in the factors' own dtype, float32 at least: W is orthogonal, so each output entry
        # is a sum of r well-scaled terms and B·A is kept to two ulps (tests/test_strategies.py).
        dtype = torch.promote_types(torch.promote_types(B.dtype, A.dtype), torch.float32)
        b64 = B.to(torch.float64)
        w = torch.linalg.eigh(b64.T @ b64).eigenvectors.flip(1).to(dtype)  # singular values descending
        new_b, new_a = (B.to(dtype) @ w).to(B.dtype), (w.T @ A.to(dtype)).to(A.dtype)
    else:
        # round 1 (peft's Kaiming A) or an A that drifted: two thin QRs and an r×r SVD, in float64
        u, s, v_t = product_svd(B, A)
        new_b, new_a = (u * s).to(B.dtype), v_t.to(A.dtype)
    sign = _row_signs(new_a)
    return new_b.mul_(sign.to(new_b.dtype)), new_a.mul_(sign[:, None])


def _row_signs(x: torch.Tensor) -> torch.Tensor:
    """±1 per row: the sign of its largest-magnitude entry, +1 where max and -min tie (or the row is 0).

    max + min > 0 exactly when the largest magnitude is the positive entry: two vectorised
    reductions, with no |x| temporary and no argmax.
    """
    return torch.copysign(torch.ones((), dtype=x.dtype), x.amax(dim=1) + x.amin(dim=1))


def _has_orthonormal_rows(A: torch.Tensor) -> bool:
    """A·Aᵀ = I to 64 ulps of A's dtype (its Gram in that dtype, float32 at least: the previous
    round's Vᵀ passes)."""
    a = A.to(torch.promote_types(A.dtype, torch.float32))
    gram = a @ a.T
    gram.diagonal().sub_(1.0)
    return float(gram.abs().amax()) <= 64 * torch.finfo(A.dtype).eps


class FedSVD(LoraMethod):
    name = "fedsvd"
    paper = "Lee et al., NeurIPS 2025, arXiv:2505.12805"
    trains_a = False
    exact = True  # B̄A is exact (A is shared) and the re-factorisation preserves it
    weighted_sums_only = True  # the server needs only Σ p_k B_k; the SVD is post-processing
    defaults = B_ONLY_DEFAULTS

    def aggregate(self, state: State, updates: Sequence[State], weights: torch.Tensor) -> State:
        new = super().aggregate(state, updates, weights)  # B̄ = Σ p_k B_k, A kept
        for layer in layer_names(new):
            new[layer + B_SUFFIX], new[layer + A_SUFFIX] = refactorize(
                new[layer + B_SUFFIX], new[layer + A_SUFFIX]
            )
        return new
