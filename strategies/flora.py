"""FLoRA: stack the clients' adapters, merge their exact sum into the base weights, start afresh.

Wang et al., "FLoRA: Federated Fine-Tuning Large Language Models with Heterogeneous Low-Rank
Adaptations", NeurIPS 2024 (arXiv 2409.05976).

Clients train A and B, possibly at different ranks r_k. Stacking B_st = [p_1 s_1 B_1 | …] and
A_st = [A_1; …] gives ΔW = B_st A_st = Σ p_k s_k B_k A_k exactly for any mix of ranks. The server
adds ΔW to the cumulative base-weight change (as the FedSVD authors' implementation does,
rather than sending the stacks for each client to merge: the same model, and the cumulative form
also serves clients that missed rounds), then re-initialises the adapters: a fresh Kaiming A
(peft's init, U(−1/√n, 1/√n), seeded by run seed and round) and B = 0. Each client of rank r_k
gets the leading r_k rows of that A.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from .base import A_SUFFIX, AB_DEFAULTS, B_SUFFIX, State, head_average, layer_names, stacked_factors
from .lowrank import FoldingMethod

__all__ = ["FLoRA"]


class FLoRA(FoldingMethod):
    name = "flora"
    paper = "Wang et al., NeurIPS 2024, arXiv:2409.05976"
    trains_a = True
    mixed_ranks = True
    exact = True
    defaults = AB_DEFAULTS
    options = {"alpha": "lora-alpha", "seed": "seed"}

    def __init__(self, alpha: float = 8.0, seed: int = 0) -> None:
        super().__init__()
        self.alpha, self.seed = alpha, seed
        self.rounds = 0  # aggregations so far: seeds the next re-initialisation

    def aggregate(self, state: State, updates: Sequence[State], weights: torch.Tensor) -> State:
        new = dict(state)
        new.update(head_average(updates, weights))
        self.rounds += 1
        for i, layer in enumerate(layer_names(state)):
            a, b = state[layer + A_SUFFIX], state[layer + B_SUFFIX]
            self._fold(new, layer, *stacked_factors(updates, weights, layer, self.alpha), b.dtype)
            seed = np.random.SeedSequence([self.seed, self.rounds, i]).generate_state(1)[0]
            gen = torch.Generator().manual_seed(int(seed))
            bound = 1.0 / math.sqrt(a.shape[1])  # kaiming_uniform_(a=√5) on an r×n weight, as peft
            new[layer + A_SUFFIX] = (torch.rand(a.shape, generator=gen, dtype=torch.float64) * 2 - 1).mul(bound).to(a.dtype)
            new[layer + B_SUFFIX] = torch.zeros_like(b)
        return new

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "rounds": self.rounds}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        self.rounds = int(state["rounds"])
