"""What every LoRA aggregation method shares: the state layout, weights and weighted averaging.

The global state is a flat `dict[str, torch.Tensor]`: for each LoRA layer `<module>` the keys
`<module>.lora_A` (r×n) and `<module>.lora_B` (m×r), plus `head.<param>` for a trainable
classification head. A method is a small stateless-by-default object: it says what clients train,
what goes down to each client and how replies become the next global state. Everything here is
pure torch: no Flower, no model, no data, so it is testable with plain tensors.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch

__all__ = [
    "A_SUFFIX",
    "B_SUFFIX",
    "HEAD_PREFIX",
    "LoraMethod",
    "State",
    "layer_names",
    "normalized_weights",
    "weighted_average",
]

State = dict[str, torch.Tensor]
A_SUFFIX = ".lora_A"
B_SUFFIX = ".lora_B"
HEAD_PREFIX = "head."


def layer_names(state: Mapping[str, torch.Tensor]) -> list[str]:
    """The LoRA layers of a state (sorted), i.e. the prefixes of its `.lora_B` keys."""
    return sorted(k[: -len(B_SUFFIX)] for k in state if k.endswith(B_SUFFIX))


def normalized_weights(num_examples: Sequence[int]) -> torch.Tensor:
    """p_k = n_k / Σ_j n_j over the replies being aggregated (float64)."""
    n = torch.as_tensor(list(num_examples), dtype=torch.float64)
    if n.numel() == 0 or bool((n <= 0).any()):
        raise ValueError(f"num-examples must be positive for every aggregated reply, got {n.tolist()}")
    return n / n.sum()


def weighted_average(updates: Sequence[Mapping[str, torch.Tensor]], weights: torch.Tensor) -> State:
    """Σ_k p_k u_k for every key, accumulated in float64 and returned in the input dtype."""
    if len(updates) != len(weights):
        raise ValueError(f"{len(updates)} updates but {len(weights)} weights")
    if not updates:
        raise ValueError("nothing to aggregate: no updates")
    keys = set(updates[0])
    for i, u in enumerate(updates[1:], start=1):
        if set(u) != keys:
            raise ValueError(f"update {i} has keys {sorted(set(u) ^ keys)} that update 0 does not share")
    out: State = {}
    for key in sorted(keys):
        acc = torch.zeros(updates[0][key].shape, dtype=torch.float64)
        for w, u in zip(weights.tolist(), updates):
            acc += w * u[key].to(torch.float64)
        out[key] = acc.to(updates[0][key].dtype)
    return out


class LoraMethod:
    """Base class of an aggregation method: subclasses set the class attributes and override
    `aggregate` / `downlink` where they differ from plain averaging of what clients send.

    `trains_a` says whether clients train (and send) `lora_A`; `b-only` methods send no A at all.
    """

    name: ClassVar[str]
    paper: ClassVar[str]
    trains_a: ClassVar[bool]
    #: constructor argument -> run-config key, for methods with options of their own
    options: ClassVar[dict[str, str]] = {}

    def uplink_keys(self, state: Mapping[str, torch.Tensor]) -> list[str]:
        """The keys a client sends back: what it trained."""
        return sorted(k for k in state if self.trains_a or not k.endswith(A_SUFFIX))

    def downlink(self, state: State, *, first_contact: bool) -> State:
        """What the server sends to one client; `first_contact` is True the first time it is sampled."""
        return dict(state)

    def aggregate(self, state: State, updates: Sequence[State], weights: torch.Tensor) -> State:
        """The next global state: what clients sent, weight-averaged; everything else kept."""
        new = dict(state)
        new.update(weighted_average(updates, weights))
        return new

    def round_metrics(self) -> dict[str, float]:
        """Extra per-round numbers of the last `aggregate`, written to metrics.jsonl."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        """Method state that must survive a restart (none for stateless methods)."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state:
            raise ValueError(f"{self.name} keeps no state, got keys {sorted(state)}")
