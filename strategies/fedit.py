"""FedIT: plain federated averaging of both LoRA factors.

Zhang et al., "Towards Building the Federated GPT: Federated Instruction Tuning", ICASSP 2024
(arXiv 2305.05644). Clients train A and B; the server sets A = Σ p_k A_k and B = Σ p_k B_k.
Inexact: B̄Ā ≠ Σ p_k B_k A_k in general. Linear, so it can run under secure aggregation.
"""

from __future__ import annotations

from .base import AB_DEFAULTS, LoraMethod

__all__ = ["FedIT"]


class FedIT(LoraMethod):
    name = "fedit"
    paper = "Zhang et al., ICASSP 2024, arXiv:2305.05644"
    trains_a = True  # and the base class averages A and B
    exact = False
    weighted_sums_only = True
    defaults = AB_DEFAULTS
