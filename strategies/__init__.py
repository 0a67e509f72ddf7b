"""Federated LoRA aggregation methods, one file each, and the registry that picks one by name.

Adding a method: one new file with a `LoraMethod` subclass and one line in `_REGISTRY`.
The Flower adapter lives in `fedlora.strategies.flower` (imported lazily: the math stays Flower-free).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .base import ClientSpec, LoraMethod, State, normalized_weights, weighted_average
from .fedex import FedExLoRA
from .fedit import FedIT
from .fedsa import FedSALoRA
from .fedsvd import FedSVD, refactorize
from .ffa import FFALoRA
from .flexlora import FlexLoRA
from .flora import FLoRA
from .lorafair import LoRAFAIR

__all__ = [
    "ClientSpec",
    "FFALoRA",
    "FLoRA",
    "FedExLoRA",
    "FedIT",
    "FedSALoRA",
    "FedSVD",
    "FlexLoRA",
    "LoRAFAIR",
    "LoraMethod",
    "State",
    "available_strategies",
    "get_method",
    "method_class",
    "normalized_weights",
    "refactorize",
    "weighted_average",
]

_REGISTRY: dict[str, type[LoraMethod]] = {
    cls.name: cls for cls in (FedIT, FFALoRA, FedSVD, LoRAFAIR, FedExLoRA, FLoRA, FedSALoRA, FlexLoRA)
}


def available_strategies() -> list[str]:
    """Names accepted by the `strategy` run-config key."""
    return sorted(_REGISTRY)


def method_class(name: str) -> type[LoraMethod]:
    """The class registered as `name`; `ValueError` lists the allowed names."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"strategy={name!r} is unknown; choose one of {available_strategies()}") from None


def get_method(name: str, run_config: Mapping[str, Any] | None = None) -> LoraMethod:
    """A fresh method object for `name`, with its options read from a kebab-case run config."""
    cls = method_class(name)
    run_config = run_config or {}
    return cls(**{arg: run_config[key] for arg, key in cls.options.items() if key in run_config})
