"""FedEx-LoRA: FedIT averaging made exact by folding the residual into the frozen base weights.

Singhal, Ponkshe, Vepakomma, "FedEx-LoRA: Exact Aggregation for Federated and Efficient
Fine-Tuning of Foundation Models", ACL 2025 (arXiv 2410.09432).

Clients train A and B. The server sets A = Ā, B = B̄ and adds the residual
s·(Σ p_k B_k A_k − B̄Ā) to the base weight, so that W0' + s B̄Ā = W0 + s Σ p_k B_k A_k exactly.
The residual of one round has rank ≤ (K+1)r; it is kept factored ([p_k s B_k | −s B̄]·[A_k; Ā]),
accumulated across rounds in float64 and re-compressed exactly (`BaseDelta`), and sent down as
the cumulative change of the base weight, factored while that is smaller than dense.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .base import A_SUFFIX, AB_DEFAULTS, B_SUFFIX, State, layer_names, stacked_factors
from .lowrank import FoldingMethod

__all__ = ["FedExLoRA"]


class FedExLoRA(FoldingMethod):
    name = "fedex"
    paper = "Singhal et al., ACL 2025, arXiv:2410.09432"
    trains_a = True
    exact = True
    defaults = AB_DEFAULTS
    options = {"alpha": "lora-alpha"}

    def __init__(self, alpha: float = 8.0) -> None:
        super().__init__()
        self.alpha = alpha

    def aggregate(self, state: State, updates: Sequence[State], weights: torch.Tensor) -> State:
        new = super().aggregate(state, updates, weights)  # Ā, B̄ (and the head), in the state's dtype
        for layer in layer_names(new):
            # The residual against the rounded Ā, B̄ the clients will load, so the sum stays exact.
            dtype = new[layer + B_SUFFIX].dtype
            b_bar, a_bar = new[layer + B_SUFFIX].to(torch.float64), new[layer + A_SUFFIX].to(torch.float64)
            s = self.alpha / a_bar.shape[0]
            b_st, a_st = stacked_factors(updates, weights, layer, self.alpha)
            self._fold(new, layer, torch.cat([b_st, -s * b_bar], dim=1), torch.cat([a_st, a_bar], dim=0), dtype)
        return new
