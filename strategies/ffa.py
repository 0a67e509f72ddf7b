"""FFA-LoRA: A frozen at its seeded initialisation, clients train and send only B.

Sun et al., "Improving LoRA in Privacy-preserving Federated Learning", ICLR 2024 (arXiv 2403.12313).
Aggregation is exact because A is shared: Σ p_k B_k A = B̄ A. A never changes, so the server sends
it to a client only the first time that client is sampled (the client caches it).
"""

from __future__ import annotations

from .base import A_SUFFIX, B_ONLY_DEFAULTS, LoraMethod

__all__ = ["FFALoRA"]


class FFALoRA(LoraMethod):
    name = "ffa"
    paper = "Sun et al., ICLR 2024, arXiv:2403.12313"
    trains_a = False
    exact = True
    weighted_sums_only = True
    defaults = B_ONLY_DEFAULTS
    sent_once = A_SUFFIX  # A never changes: the client keeps the copy it got on first contact
