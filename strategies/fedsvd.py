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
    of each row of the new A is positive. Singular values are in descending order. Computed in
    float64, returned in B's dtype. A zero B gives B = 0 and an orthonormal A, never NaN.
    """
    m, r = B.shape
    r_a, n = A.shape
    if r_a != r:
        raise ValueError(f"B is {m}×{r} but A is {r_a}×{n}: ranks differ")
    if r > min(m, n):
        raise ValueError(f"rank {r} exceeds the layer size {m}×{n}")
    dtype = B.dtype
    a64 = A.to(torch.float64)
    gram_a = a64 @ a64.T
    if float((gram_a - torch.eye(r, dtype=torch.float64)).abs().max()) <= 64 * torch.finfo(A.dtype).eps:
        # Every round after the first, A came out of this function: with orthonormal rows, B̄ = U Σ Wᵀ
        # makes B̄A = U Σ (WᵀA) an SVD already, and W comes from the r×r Gram B̄ᵀB̄. Three thin
        # products and an r×r eigh instead of two QRs; the product is kept exactly (W is orthogonal).
        b64 = B.to(torch.float64)
        w = torch.linalg.eigh(b64.T @ b64).eigenvectors.flip(1)  # singular values descending
        new_b, new_a = b64 @ w, w.T @ a64
    else:
        u, s, new_a = product_svd(B, A)  # new A: r×n, orthonormal rows
        new_b = u * s  # m×r, = U Σ
    pivot = new_a.abs().argmax(dim=1)
    sign = torch.sign(new_a.gather(1, pivot[:, None])).squeeze(1)
    return (new_b * sign).to(dtype), (new_a * sign[:, None]).to(A.dtype)


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
