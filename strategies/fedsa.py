"""FedSA-LoRA: share A, keep B: the A matrices learn what is common, each client's B what is its own.

Guo et al., "Selective Aggregation for Low-Rank Adaptation in Federated Learning", ICLR 2025
(arXiv 2410.01463).

Clients train A and B but send only A (and the trainable head); the server averages them. Each
client keeps its own B across rounds in its node state (it starts from the server's B = 0 on
first contact and is never overwritten), so the model is personalised: client k uses Ā with B_k.
There is no single global model; the run reports the personalised accuracy (each client on its
local test split) and the global one (each client's model on the global test split), averaged,
and exports every client's adapter. The server step is a weighted mean of what clients send.
"""

from __future__ import annotations

from .base import AB_DEFAULTS, B_SUFFIX, LoraMethod

__all__ = ["FedSALoRA"]


class FedSALoRA(LoraMethod):
    name = "fedsa"
    paper = "Guo et al., ICLR 2025, arXiv:2410.01463"
    trains_a = True
    personalized = True  # B stays on the client; the base class averages what is sent: A, head
    sent_once = B_SUFFIX  # the init, on first contact; after that the client's own B rules
    exact = None  # personalised: no single aggregate to be exact about
    weighted_sums_only = True
    defaults = {**AB_DEFAULTS, "evaluate-on": "clients"}
