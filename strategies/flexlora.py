"""FlexLoRA: mixed ranks; the exact weighted sum of the clients' updates, re-split by SVD per rank.

Bai et al., "Federated Fine-tuning of Large Language Models under Heterogeneous Tasks and Client
Resources", NeurIPS 2024 (arXiv 2402.11505).

Clients train A and B at their own ranks r_k. The server forms ΔW = Σ p_k s_k B_k A_k (s_k =
lora-alpha / r_k) as the stacked product B_st A_st and takes its SVD U Σ Vᵀ through two thin QRs
and a (Σr_k)×(Σr_k) SVD: no m×n matrix. The global adapter has the largest rank r: B = U Σ_{:r} / s,
A = V_{:r}ᵀ (the evaluated and exported model); client k gets its leading r_k part, i.e.
B_k = U Σ_{:r_k} / s_k, A_k = V_{:r_k}ᵀ (all of Σ in B, as FedSVD does). Truncation to r (and to
r_k) drops the smallest singular directions, so this is the best rank-r approximation, not exact.
When the clients offer fewer than r directions (a round with one small-rank client), A's missing
rows are completed orthonormally from a generator seeded by the run `seed` and the layer.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from .base import A_SUFFIX, AB_DEFAULTS, B_SUFFIX, LoraMethod, State, head_average, layer_names, stacked_factors
from .lowrank import product_svd

__all__ = ["FlexLoRA"]


class FlexLoRA(LoraMethod):
    name = "flexlora"
    paper = "Bai et al., NeurIPS 2024, arXiv:2402.11505"
    trains_a = True
    mixed_ranks = True
    exact = False
    defaults = AB_DEFAULTS
    options = {"alpha": "lora-alpha", "seed": "seed"}

    def __init__(self, alpha: float = 8.0, seed: int = 0) -> None:
        self.alpha, self.seed = alpha, seed

    def aggregate(self, state: State, updates: Sequence[State], weights: torch.Tensor) -> State:
        new = dict(state)
        new.update(head_average(updates, weights))
        for i, layer in enumerate(layer_names(state)):
            a = state[layer + A_SUFFIX]
            r, n = a.shape
            left, sigma, right = product_svd(*stacked_factors(updates, weights, layer, self.alpha))
            k = min(r, sigma.numel())
            new_b = torch.zeros(left.shape[0], r, dtype=torch.float64)
            new_b[:, :k] = left[:, :k] * sigma[:k] / (self.alpha / r)
            new_a = torch.empty(r, n, dtype=torch.float64)
            new_a[:k] = right[:k]
            if k < r:  # fewer directions than the global rank: complete A with orthonormal rows
                gen = torch.Generator().manual_seed(int(np.random.SeedSequence([self.seed, i]).generate_state(1)[0]))
                fill = torch.randn(n, r - k, generator=gen, dtype=torch.float64)
                q, _ = torch.linalg.qr(torch.cat([right[:k].T, fill], dim=1))
                new_a[k:] = q[:, k:].T
            new[layer + B_SUFFIX], new[layer + A_SUFFIX] = new_b.to(a.dtype), new_a.to(a.dtype)
        return new
