"""Exact low-rank algebra shared by the server steps: the SVD of a product of thin factors, and the
cumulative base-weight change that FedEx-LoRA and FLoRA fold into the frozen weights.

Nothing here forms an m×n matrix while the factors are thinner than the layer: the SVD of U·V
(m×q times q×n) comes from two thin QRs and a q×q SVD, O((m+n)q²) instead of O(mn·min(m, n))
(shared/notes/algorithms.md §4). All of it runs in float64.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from .base import DELTA_SUFFIXES, LoraMethod, State, is_delta_key

__all__ = ["BaseDelta", "FoldingMethod", "dense_is_cheaper", "product_svd"]


def product_svd(U: torch.Tensor, V: torch.Tensor, *, drop_zeros: bool = False
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD (L, σ, Rᵀ) of U·V without forming it: U = Q_U R_U, Vᵀ = Q_V R_V,
    R_U R_Vᵀ = W σ Zᵀ  ⇒  U·V = (Q_U W) σ (Q_V Z)ᵀ. Singular values descend.

    `drop_zeros` removes the singular values that are zero to float64 precision (below
    max(m, n)·eps·σ_max, as `numpy.linalg.matrix_rank` counts), which keeps the product exact.
    """
    if U.shape[1] != V.shape[0]:
        raise ValueError(f"U is {tuple(U.shape)} but V is {tuple(V.shape)}: inner sizes differ")
    q_u, r_u = torch.linalg.qr(U.to(torch.float64))
    q_v, r_v = torch.linalg.qr(V.to(torch.float64).T)
    w, s, zh = torch.linalg.svd(r_u @ r_v.T, full_matrices=False)
    left, right = q_u @ w, zh @ q_v.T
    if drop_zeros:
        tol = max(U.shape[0], V.shape[1]) * torch.finfo(torch.float64).eps * (float(s[0]) if s.numel() else 0.0)
        keep = int((s > tol).sum())
        left, s, right = left[:, :keep], s[:keep], right[:keep]
    return left, s, right


def dense_is_cheaper(m: int, n: int, q: int, k: int) -> bool:
    """Is adding a rank-k term to an m×n sum of rank q cheaper dense than factored?

    Dense: the m×k by k×n product, 2mnk flops. Factored: re-compressing q + k columns, two thin
    QRs with their Q formed, ≈ 4(m+n)(q+k)² flops, the products with their factors, 2(m+n)(q+k)²,
    and the (q+k)² SVD, ≈ 22(q+k)³ (Golub & Van Loan's counts). Both run at similar flop rates here
    (BENCHMARKS.md, FedEx-LoRA and FLoRA). Whenever the factored form needs more memory than
    dense, q(m+n) ≥ mn, it costs more too.
    """
    big_q = q + k
    return 6 * (m + n) * big_q**2 + 22 * big_q**3 > 2 * m * n * k


class BaseDelta:
    """The cumulative change D of one layer's frozen base weight (W = W0 + D), exact in float64.

    Kept factored, D = U·V (m×q, q×n), re-compressed to its numerical rank after every addition,
    while that costs fewer flops than adding densely (`dense_is_cheaper`); from then on kept dense
    (m×n). The factored form is the smaller message while it lasts: at 4096×4096 with 160 new
    columns a round it lasts one round, against twelve by memory alone, whose last
    re-compressions took seconds each. `arrays` gives the form to send: the receiver adds it to
    its pristine W0.
    """

    def __init__(self, m: int, n: int) -> None:
        self.m, self.n = m, n
        self.U = torch.zeros(m, 0, dtype=torch.float64)
        self.V = torch.zeros(0, n, dtype=torch.float64)
        self.dense: torch.Tensor | None = None

    @property
    def rank(self) -> int:
        return min(self.m, self.n) if self.dense is not None else self.U.shape[1]

    def add(self, U: torch.Tensor, V: torch.Tensor) -> None:
        """D ← D + U·V (U m×k, V k×n)."""
        if U.shape[0] != self.m or V.shape[1] != self.n or U.shape[1] != V.shape[0]:
            raise ValueError(f"cannot add {tuple(U.shape)}·{tuple(V.shape)} to a {self.m}×{self.n} weight")
        U, V = U.to(torch.float64), V.to(torch.float64)
        if self.dense is None and dense_is_cheaper(self.m, self.n, self.U.shape[1], U.shape[1]):
            self.dense, self.U, self.V = self.U @ self.V, self.U[:, :0], self.V[:0]
        if self.dense is not None:
            self.dense = self.dense + U @ V  # not in place: a state_dict() taken earlier stays as it was
            return
        left, s, right = product_svd(torch.cat([self.U, U], dim=1), torch.cat([self.V, V], dim=0),
                                     drop_zeros=True)
        self.U, self.V = left * s, right

    def to_dense(self) -> torch.Tensor:
        return self.dense.clone() if self.dense is not None else self.U @ self.V

    def arrays(self, layer: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """The state keys that carry D (none while D = 0)."""
        u_key, v_key, dense_key = (layer + s for s in DELTA_SUFFIXES)
        if self.dense is not None:
            return {dense_key: self.dense.to(dtype)}
        if self.U.shape[1] == 0:
            return {}
        return {u_key: self.U.to(dtype), v_key: self.V.to(dtype)}

    def state_dict(self) -> dict[str, Any]:
        return {"shape": (self.m, self.n), "U": self.U, "V": self.V, "dense": self.dense}

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any]) -> BaseDelta:
        delta = cls(*state["shape"])
        delta.U, delta.V, delta.dense = state["U"], state["V"], state["dense"]
        return delta


class FoldingMethod(LoraMethod):
    """A method that folds part of each round's update into the frozen base weights (FedEx-LoRA,
    FLoRA): it keeps one `BaseDelta` per layer and puts its current form into the global state."""

    changes_base = True

    def __init__(self) -> None:
        self._deltas: dict[str, BaseDelta] = {}

    def _fold(self, state: State, layer: str, U: torch.Tensor, V: torch.Tensor, dtype: torch.dtype) -> None:
        """D_layer ← D_layer + U·V, and refresh the layer's delta arrays in `state`."""
        delta = self._deltas.setdefault(layer, BaseDelta(U.shape[0], V.shape[1]))
        delta.add(U, V)
        for key in [k for k in state if is_delta_key(k) and k.rsplit(".", 1)[0] == layer]:
            del state[key]
        state.update(delta.arrays(layer, dtype))

    def base_delta(self, layer: str) -> torch.Tensor | None:
        """The layer's cumulative base-weight change, dense float64 (None while none was folded)."""
        return self._deltas[layer].to_dense() if layer in self._deltas else None

    def state_dict(self) -> dict[str, Any]:
        return {"deltas": {layer: d.state_dict() for layer, d in self._deltas.items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._deltas = {layer: BaseDelta.from_state_dict(d) for layer, d in state["deltas"].items()}
