"""What every LoRA aggregation method shares: the state layout, weights, averaging and stacking.

The global state is a flat `dict[str, torch.Tensor]`: for each LoRA layer `<module>` the keys
`<module>.lora_A` (r×n) and `<module>.lora_B` (m×r), `head.<param>` for a trainable
classification head, and, for methods that fold updates into the frozen base weights (FedEx-LoRA,
FLoRA), the cumulative change of that base weight: `<module>.base_delta_U` (m×q) and
`<module>.base_delta_V` (q×n) while it is cheaper factored, else `<module>.base_delta` (m×n).
A receiver sets its base weight to W0 + that change, so its own W0 stays pristine.

A method is a small object: it says what clients train and send, what goes down to each client
and how replies become the next global state. Everything here is pure torch: no Flower, no
model, no data, so it is testable with plain tensors.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

__all__ = [
    "AB_DEFAULTS",
    "A_SUFFIX",
    "B_ONLY_DEFAULTS",
    "B_SUFFIX",
    "DELTA_SUFFIXES",
    "HEAD_PREFIX",
    "ClientSpec",
    "LoraMethod",
    "State",
    "head_average",
    "is_delta_key",
    "layer_names",
    "lora_rank",
    "normalized_weights",
    "stacked_factors",
    "weighted_average",
]

State = dict[str, torch.Tensor]
A_SUFFIX = ".lora_A"
B_SUFFIX = ".lora_B"
HEAD_PREFIX = "head."
# Per-strategy learning rates (used where `learning-rate = "auto"`). Methods that train only B
# against a fixed or orthonormal A take much larger SGD steps than those that train both factors
# (FFA-LoRA paper, §5: LoRA lr 0.01-0.1, FFA-LoRA 0.1-1.0; algorithms.md §1.3); measured on the
# default job in BENCHMARKS.md ("Learning-rate defaults").
B_ONLY_DEFAULTS: dict[str, Any] = {"learning-rate": 1.0}
AB_DEFAULTS: dict[str, Any] = {"learning-rate": 0.3}
#: factored (U, V) and dense forms of a layer's cumulative base-weight change
DELTA_SUFFIXES = (".base_delta_U", ".base_delta_V", ".base_delta")


def is_delta_key(key: str) -> bool:
    return key.endswith(DELTA_SUFFIXES)


def layer_names(state: Mapping[str, torch.Tensor]) -> list[str]:
    """The LoRA layers of a state (sorted), i.e. the prefixes of its `.lora_B` or `.lora_A` keys."""
    return sorted({k.rsplit(".", 1)[0] for k in state if k.endswith((A_SUFFIX, B_SUFFIX))})


def lora_rank(state: Mapping[str, torch.Tensor]) -> int:
    """The rank of a state's LoRA factors (the number of rows of its A matrices)."""
    ranks = {int(v.shape[0]) for k, v in state.items() if k.endswith(A_SUFFIX)}
    ranks |= {int(v.shape[1]) for k, v in state.items() if k.endswith(B_SUFFIX)}
    if len(ranks) != 1:
        raise ValueError(f"a state must have one LoRA rank, found {sorted(ranks)}")
    return ranks.pop()


@dataclass(frozen=True)
class ClientSpec:
    """What a method may know about the client it sends to."""

    pid: int  # partition id
    rank: int  # the client's LoRA rank
    first_contact: bool  # True until the client has answered once


def normalized_weights(num_examples: Sequence[int]) -> torch.Tensor:
    """p_k = n_k / Σ_j n_j over the replies being aggregated (float64)."""
    n = torch.as_tensor(list(num_examples), dtype=torch.float64)
    if n.numel() == 0 or bool((n <= 0).any()):
        raise ValueError(f"num-examples must be positive for every aggregated reply, got {n.tolist()}")
    return n / n.sum()


def weighted_average(updates: Sequence[Mapping[str, torch.Tensor]], weights: torch.Tensor,
                     keys: Iterable[str] | None = None) -> State:
    """Σ_k p_k u_k for every key (or the given ones), returned in the input dtype.

    Accumulated in the input dtype, float32 at least: K float32 adds are within K·eps₃₂ (relative,
    before cancellation) of the float64 sum, and run 3× faster than adding into float64 (BENCHMARKS.md).
    """
    if len(updates) != len(weights):
        raise ValueError(f"{len(updates)} updates but {len(weights)} weights")
    if not updates:
        raise ValueError("nothing to aggregate: no updates")
    if keys is None:
        keys = set(updates[0])
        for i, u in enumerate(updates[1:], start=1):
            if set(u) != keys:
                raise ValueError(f"update {i} has keys {sorted(set(u) ^ keys)} that update 0 does not share")
    out: State = {}
    ws = weights.tolist()
    for key in sorted(keys):
        shapes = {tuple(u[key].shape) for u in updates}
        if len(shapes) > 1:
            raise ValueError(f"{key}: clients sent different shapes {sorted(shapes)}; this method "
                             "cannot average mixed LoRA ranks")
        first = updates[0][key]
        # at least float32 (bf16 and fp16 uplinks are summed in float32), as Flower's FedAvg does; one
        # in-place add per client, no temporaries (BENCHMARKS.md, `weighted_average`)
        acc = first.to(torch.promote_types(first.dtype, torch.float32)) * ws[0]
        for w, u in zip(ws[1:], updates[1:]):
            acc.add_(u[key], alpha=w)
        out[key] = acc.to(first.dtype)
    return out


def head_average(updates: Sequence[Mapping[str, torch.Tensor]], weights: torch.Tensor) -> State:
    """The weighted mean of the head parameters alone (for methods whose factors are not averaged)."""
    return weighted_average(updates, weights, keys=[k for k in updates[0] if k.startswith(HEAD_PREFIX)])


def stacked_factors(updates: Sequence[Mapping[str, torch.Tensor]], weights: torch.Tensor, layer: str,
                    alpha: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(B_st, A_st) with B_st A_st = Σ_k p_k s_k B_k A_k, never forming the m×n product (float64).

    B_st = [p_1 s_1 B_1 | … | p_K s_K B_K] (m × Σr_k), A_st = [A_1; …; A_K] (Σr_k × n), where
    s_k = alpha / r_k; ranks may differ. `alpha=None` leaves out the scales (s_k = 1).
    """
    bs, as_ = [], []
    for p, u in zip(weights.tolist(), updates):
        b, a = u[layer + B_SUFFIX].to(torch.float64), u[layer + A_SUFFIX].to(torch.float64)
        s = 1.0 if alpha is None else alpha / a.shape[0]
        bs.append(p * s * b)
        as_.append(a)
    return torch.cat(bs, dim=1), torch.cat(as_, dim=0)


class LoraMethod:
    """Base class of an aggregation method: subclasses set the class attributes and override
    `aggregate` / `downlink` where they differ from plain averaging of what clients send.

    - `trains_a`: clients train (and send) `lora_A`; otherwise A stays as the server sent it.
    - `personalized`: each client keeps its own B and never sends it (FedSA); there is no global model.
    - `mixed_ranks`: clients may use different LoRA ranks (`lora-ranks`); others refuse them.
    - `changes_base`: the method folds updates into the base weights (the run exports a merged model).
    - `sent_once`: a factor (suffix) sent only until the client first answers without an error;
      the client keeps its copy and never overwrites it (FFA-LoRA's A, FedSA's own B).
    - `defaults`: run-config values this method prefers where the user left them `"auto"`.
    """

    name: ClassVar[str]
    paper: ClassVar[str]
    trains_a: ClassVar[bool]
    personalized: ClassVar[bool] = False
    mixed_ranks: ClassVar[bool] = False
    changes_base: ClassVar[bool] = False
    #: exact: the aggregate's model update equals Σ p_k s_k B_k A_k (see the README's table)
    exact: ClassVar[bool]
    #: the server step needs only Σ p_k u_k of what clients send (everything after it is
    #: post-processing), so it could run under secure aggregation, which fedlora does not provide;
    #: the README's strategy table states it per method (tests/test_docs.py checks the two agree)
    weighted_sums_only: ClassVar[bool] = False
    sent_once: ClassVar[str | None] = None
    defaults: ClassVar[dict[str, Any]] = {}
    #: constructor argument -> run-config key, for methods with options of their own
    options: ClassVar[dict[str, str]] = {}

    def trainable_keys(self, state: Mapping[str, torch.Tensor]) -> list[str]:
        """The keys a client trains: B, A when `trains_a`, and the head when it is exchanged."""
        return sorted(k for k in state if k.endswith(B_SUFFIX) or k.startswith(HEAD_PREFIX)
                      or (self.trains_a and k.endswith(A_SUFFIX)))

    def uplink_keys(self, state: Mapping[str, torch.Tensor]) -> list[str]:
        """The keys a client sends back: what it trained, less what it keeps to itself."""
        return [k for k in self.trainable_keys(state) if not (self.personalized and k.endswith(B_SUFFIX))]

    def downlink(self, state: State, client: ClientSpec) -> State:
        """What the server sends to one client: the global state at the client's rank, less the
        `sent_once` factor after first contact.

        A client of lower rank r_k gets the leading r_k rows of A and columns of B, with B rescaled
        by s / s_k so that s_k B_k A_k is the leading part of s B A (exact for FlexLoRA's SVD
        factors, harmless for FLoRA's zero B). With equal ranks this is the state itself.
        """
        if self.sent_once and not client.first_contact:
            state = {k: v for k, v in state.items() if not k.endswith(self.sent_once)}
        rank = lora_rank(state)
        if client.rank == rank:
            return dict(state)
        if client.rank > rank:
            raise ValueError(f"client {client.pid} has rank {client.rank} above the global rank {rank}")
        out = dict(state)
        for layer in layer_names(state):
            if layer + A_SUFFIX in state:
                out[layer + A_SUFFIX] = state[layer + A_SUFFIX][: client.rank].clone()
            if layer + B_SUFFIX in state:
                b = state[layer + B_SUFFIX][:, : client.rank]
                out[layer + B_SUFFIX] = (b.to(torch.float64) * (client.rank / rank)).to(b.dtype)
        return out

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
