"""FFA-LoRA: A frozen at its seeded initialisation, clients train and send only B.

Sun et al., "Improving LoRA in Privacy-preserving Federated Learning", ICLR 2024 (arXiv 2403.12313).
Aggregation is exact because A is shared: Σ p_k B_k A = B̄ A. A never changes, so the server sends
it to a client only the first time that client is sampled (the client caches it).
"""

from __future__ import annotations

from .base import A_SUFFIX, LoraMethod, State

__all__ = ["FFALoRA"]


class FFALoRA(LoraMethod):
    name = "ffa"
    paper = "Sun et al., ICLR 2024, arXiv:2403.12313"
    trains_a = False

    def downlink(self, state: State, *, first_contact: bool) -> State:
        if first_contact:
            return dict(state)
        return {k: v for k, v in state.items() if not k.endswith(A_SUFFIX)}
