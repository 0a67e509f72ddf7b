"""The typed, validated run configuration shared by the ServerApp, the ClientApp and `fedlora run`.

Flower hands every app the run config as a flat dict of kebab-case keys (declared with their
defaults in `[tool.flwr.app.config]` of `pyproject.toml`, overridable with `--run-config`). This
module turns that dict into one frozen dataclass and rejects bad input once, at start-up, with an
error that names the key and the allowed values, so that nothing fails mid-run.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["AUTO", "EVALUATE_ON", "HEAD_POLICIES", "LR_SCHEDULES", "OPTIMIZERS", "PARTITIONERS", "PROMPT_FORMATS",
           "TASKS", "ConfigError", "RunConfig", "check_ranks"]

TASKS = ("classification", "causal-lm")
PARTITIONERS = ("iid", "dirichlet", "pathological", "natural")
OPTIMIZERS = ("sgd", "adam")
HEAD_POLICIES = ("trainable", "frozen")
EVALUATE_ON = ("server", "clients", "both")
ACCOUNTANTS = ("prv", "rdp")
GRAD_SAMPLE_MODES = ("hooks", "ghost")
PRECISIONS = ("fp32", "bf16")
PROMPT_FORMATS = ("auto", "chat", "alpaca")
LR_SCHEDULES = ("constant", "cosine")
#: `max-length` when left "auto": a tweet fits 64 tokens; a prompt and its answer need more
DEFAULT_MAX_LENGTH = {"classification": 64, "causal-lm": 256}
#: the run-config value that means "the default for this strategy, task or model" (learning-rate,
#: evaluate-on, head, max-length, target-modules, prompt-format, ...)
AUTO = "auto"


class ConfigError(ValueError):
    """A run-config value is missing, of the wrong type or out of range."""


def _key(name: str) -> str:
    return name.replace("_", "-")


@dataclass(frozen=True)
class RunConfig:
    """Every run-config key of fedlora; field `foo_bar` is the key `foo-bar`.

    Defaults here equal those in `pyproject.toml`; the README's Configuration table explains each key.
    """

    strategy: str = "fedsvd"
    task: str = "classification"  # "causal-lm": supervised instruction tuning of a decoder LM
    num_server_rounds: int = 5
    clients_per_round: int = 10
    seed: int = 0
    output_dir: str = ""
    resume: bool = False  # continue the run in output-dir from its checkpoint (`fedlora run --resume`)
    # model + LoRA
    model: str = "all-MiniLM-L6-v2"
    max_length: int | None = None  # "auto": DEFAULT_MAX_LENGTH of the task
    target_modules: str = AUTO  # "auto": peft's LoRA targets for the architecture
    lora_rank: int = 8
    lora_ranks: str = ""  # mixed ranks: client k uses lora-ranks[k mod len] (e.g. "4,8,16")
    lora_alpha: float = 8.0
    lora_dropout: float = 0.05
    head: str = AUTO  # "auto": trainable for classification, frozen (the LM head) for causal-lm
    gguf_file: str = ""  # a GGUF file in the `model` folder, loaded through transformers (dequantised)
    init_adapter: str = ""  # warm start: a peft adapter folder whose LoRA factors start the run
    precision: str = "fp32"  # "bf16": bfloat16 autocast on CUDA, without DP
    # data
    dataset: str = "tweets"  # "" when every site brings its own file (node config data=<path>)
    labels: str = ""  # the run's label set, e.g. "negative,neutral,positive"; "" = the dataset's values
    server_test_data: str = ""  # a labelled file the server evaluates on ("" = the dataset's test split, if any)
    text_column: str = "text"
    label_column: str = "label"
    test_size: int = 2000
    partitioner: str = "dirichlet"
    dirichlet_alpha: float = 0.5
    min_partition_size: int | None = None  # "auto": the partitioner's own rule
    classes_per_client: int = 2
    partition_column: str = ""  # partitioner = "natural": one client per distinct value of this column
    local_test_fraction: float = 0.2
    # instruction data (task = causal-lm): Alpaca rows, prompt/completion pairs or chat messages
    prompt_format: str = AUTO  # "chat" (the tokenizer's template), "alpaca"; auto: chat if the tokenizer has one
    instruction_column: str = "instruction"
    input_column: str = "input"
    output_column: str = "output"
    prompt_column: str = "prompt"
    completion_column: str = "completion"
    messages_column: str = "messages"
    max_truncated_share: float = 0.05  # a file where more rows must lose response tokens is refused
    # local training
    local_steps: int = 10
    batch_size: int = 32
    optimizer: str = "sgd"
    learning_rate: float | None = None  # "auto" in the run config: the strategy's default
    max_grad_norm: float = 1.0
    micro_batch_size: int = 0  # > 0: gradient accumulation over chunks of this many rows (0: whole batches)
    lr_schedule: str = "constant"  # "cosine": from learning-rate in round 1 down to min-learning-rate
    min_learning_rate: float = 0.0
    # differential privacy: DP-SGD on every client, per-client budget ledger (fedlora.privacy)
    dp: bool = True
    target_epsilon: float = 6.0
    target_delta: float = 1e-5
    accountant: str = "prv"
    grad_sample_mode: str = "hooks"
    dp_max_participations: int | None = None  # "auto": num-server-rounds
    dp_reproducible: bool = False  # batches and noise from `seed`: no guarantee against whoever knows it
    # strategy options
    fair_lambda: float = 0.01
    fair_steps: int = 500
    fair_lr: float = 0.05
    # evaluation
    evaluate_on: str = AUTO  # the strategy's default: "clients" for FedSA, else "server"
    eval_batch_size: int = 128
    max_new_tokens: int = 32  # greedy generation (causal-lm): samples, and exact match on label-like outputs
    num_samples: int = 5  # generated answers of the final model written to samples.jsonl (causal-lm)
    round_timeout: float = 3600.0
    connect_timeout: float = 600.0
    # bad updates and dropouts
    max_update_norm: float = 1000.0
    min_clients: int = 1
    max_failed_rounds: int = 3

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> RunConfig:
        """Build and validate a config from Flower's kebab-case run config.

        Unknown keys are an error (a typo must not silently fall back to a default).
        """
        known = {_key(f.name): f for f in dataclasses.fields(cls)}
        for old, (new, why) in _RENAMED.items():
            if old in run_config:
                raise ConfigError(f"run-config key {old!r} was renamed: use {new!r} ({why})")
        unknown = sorted(set(run_config) - set(known))
        if unknown:
            raise ConfigError(
                f"unknown run-config key(s) {unknown}; known keys: {sorted(known)}"
            )
        values: dict[str, Any] = {}
        for key, value in run_config.items():
            f = known[key]
            if value == AUTO and key in _AUTO_KEYS:
                continue  # the dataclass default: resolved from the strategy in __post_init__
            values[f.name] = _coerce(key, value, f.type)
        cfg = cls(**values)
        cfg.validate()
        return cfg

    def __post_init__(self) -> None:
        """Fill the values left "auto" from the strategy's defaults (a frozen dataclass, hence
        object.__setattr__). `replace` keeps resolved values: pass them again for a new strategy."""
        from fedlora.strategies import method_class

        try:
            defaults = method_class(self.strategy).defaults
        except ValueError:
            return  # validate() reports the unknown strategy
        if self.learning_rate is None:
            object.__setattr__(self, "learning_rate", float(defaults["learning-rate"]))
        if self.evaluate_on == AUTO:
            object.__setattr__(self, "evaluate_on", defaults.get("evaluate-on", "server"))
        if self.dp_max_participations is None:
            object.__setattr__(self, "dp_max_participations", self.num_server_rounds)
        if self.task in TASKS:
            if self.max_length is None:
                object.__setattr__(self, "max_length", DEFAULT_MAX_LENGTH[self.task])
            if self.head == AUTO:
                object.__setattr__(self, "head", "trainable" if self.task == "classification" else "frozen")

    def to_run_config(self) -> dict[str, Any]:
        """The kebab-case dict Flower expects (inverse of `from_run_config`); a value still left to
        its default rule (None) is written as "auto": TOML has no null."""
        return {_key(f.name): AUTO if getattr(self, f.name) is None else getattr(self, f.name)
                for f in dataclasses.fields(self)}

    def replace(self, **changes: Any) -> RunConfig:
        """A validated copy with some fields changed."""
        cfg = dataclasses.replace(self, **changes)
        cfg.validate()
        return cfg

    @property
    def target_module_list(self) -> list[str]:
        return [m.strip() for m in self.target_modules.split(",") if m.strip()]

    @property
    def label_list(self) -> list[str]:
        """`labels` as names, in the order that gives their class ids (empty: the dataset decides)."""
        return [name.strip() for name in self.labels.split(",")] if self.labels.strip() else []

    @property
    def rank_list(self) -> list[int]:
        """`lora-ranks` as integers (empty: every client uses `lora-rank`)."""
        try:
            ranks = [int(r) for r in self.lora_ranks.split(",") if r.strip()]
        except ValueError:
            raise ConfigError(f"lora-ranks={self.lora_ranks!r} must be comma-separated integers, e.g. '4,8,16'") from None
        if any(r <= 0 for r in ranks):
            raise ConfigError(f"lora-ranks={self.lora_ranks!r}: every rank must be > 0")
        return ranks

    def client_rank(self, partition_id: int) -> int:
        """The LoRA rank of a client: lora-ranks[partition-id mod len], else lora-rank."""
        ranks = self.rank_list
        return ranks[partition_id % len(ranks)] if ranks else self.lora_rank

    @property
    def max_rank(self) -> int:
        return max(self.rank_list or [self.lora_rank])

    def validate(self) -> None:
        """Raise `ConfigError` naming the first bad key and its allowed values."""
        from fedlora.strategies import available_strategies, method_class

        def choice(key: str, value: str, allowed: tuple[str, ...] | list[str]) -> None:
            if value not in allowed:
                raise ConfigError(f"{key}={value!r} is not allowed; choose one of {list(allowed)}")

        def positive(key: str, value: float, *, zero_ok: bool = False) -> None:
            if not math.isfinite(value):
                raise ConfigError(f"{key}={value!r} must be a finite number")
            if value < 0 or (value == 0 and not zero_ok):
                bound = ">= 0" if zero_ok else "> 0"
                raise ConfigError(f"{key}={value!r} must be {bound}")

        choice("strategy", self.strategy, available_strategies())
        choice("task", self.task, TASKS)
        choice("prompt-format", self.prompt_format, PROMPT_FORMATS)
        choice("lr-schedule", self.lr_schedule, LR_SCHEDULES)
        method = method_class(self.strategy)
        choice("head", self.head, HEAD_POLICIES)
        choice("partitioner", self.partitioner, PARTITIONERS)
        choice("optimizer", self.optimizer, OPTIMIZERS)
        choice("evaluate-on", self.evaluate_on, EVALUATE_ON)
        choice("accountant", self.accountant, ACCOUNTANTS)
        choice("grad-sample-mode", self.grad_sample_mode, GRAD_SAMPLE_MODES)
        choice("precision", self.precision, PRECISIONS)
        for key in ("num-server-rounds", "clients-per-round", "max-length", "lora-rank",
                    "test-size", "local-steps", "batch-size", "eval-batch-size",
                    "classes-per-client", "fair-steps", "dp-max-participations", "target-epsilon",
                    "min-clients", "max-failed-rounds", "max-new-tokens"):
            positive(key, getattr(self, key.replace("-", "_")))
        for key in ("lora-alpha", "learning-rate", "dirichlet-alpha", "round-timeout", "fair-lr",
                    "connect-timeout", "max-update-norm"):
            positive(key, getattr(self, key.replace("-", "_")))
        positive("max-grad-norm", self.max_grad_norm, zero_ok=True)
        positive("fair-lambda", self.fair_lambda, zero_ok=True)
        for key in ("micro-batch-size", "num-samples", "min-learning-rate"):
            positive(key, getattr(self, key.replace("-", "_")), zero_ok=True)
        if self.min_learning_rate > self.learning_rate:
            raise ConfigError(f"min-learning-rate={self.min_learning_rate!r} exceeds learning-rate={self.learning_rate!r}")
        if not 0.0 <= self.max_truncated_share <= 1.0:
            raise ConfigError(f"max-truncated-share={self.max_truncated_share!r} must be in [0, 1]")
        if self.partitioner == "natural" and not self.partition_column:
            raise ConfigError("partitioner='natural' needs partition-column: the column whose values name the clients")
        self._validate_task()
        if self.min_partition_size is not None:
            positive("min-partition-size", self.min_partition_size, zero_ok=True)
        positive("seed", self.seed, zero_ok=True)
        if not 0.0 < self.target_delta < 1.0:
            raise ConfigError(f"target-delta={self.target_delta!r} must be in (0, 1)")
        if self.dp and self.precision != "fp32":
            raise ConfigError(f"precision={self.precision!r} needs dp=false: DP-SGD trains in float32 (its "
                              "per-sample gradients are clipped and noised as computed; no autocast under DP)")
        if self.dp and self.max_grad_norm == 0:
            raise ConfigError("dp=true needs max-grad-norm > 0: it is DP-SGD's per-sample clipping bound C")
        if self.dp and self.evaluate_on != "server":
            raise ConfigError(f"dp=true with evaluate-on={self.evaluate_on!r}: client-side evaluation releases "
                              "statistics of the clients' local data that DP-SGD does not cover; evaluate on "
                              "the server, or set dp=false (strategy 'fedsa' has no global model, so it cannot run under dp)")
        check_ranks(self.strategy, self.rank_list)
        if method.personalized and self.evaluate_on != "clients":
            raise ConfigError(f"strategy={self.strategy!r} keeps each client's B on the client, so only clients "
                              f"can evaluate: use evaluate-on='clients' (or 'auto'), not {self.evaluate_on!r}")
        if self.evaluate_on != "server" and self.local_test_fraction == 0:
            raise ConfigError(f"evaluate-on={self.evaluate_on!r} needs local-test-fraction > 0 "
                              "(clients evaluate on the share of their data they hold out)")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ConfigError(f"lora-dropout={self.lora_dropout!r} must be in [0, 1)")
        if not 0.0 <= self.local_test_fraction < 1.0:
            raise ConfigError(
                f"local-test-fraction={self.local_test_fraction!r} must be in [0, 1)"
            )
        if self.labels:
            names = self.label_list
            if len(names) < 2 or len(set(names)) != len(names) or "" in names:
                raise ConfigError(f"labels={self.labels!r} must name at least 2 distinct labels, comma-separated, "
                                  "e.g. 'negative,neutral,positive'")
        elif not self.dataset and self.task == "classification":
            raise ConfigError("dataset='''' (every site brings its own file) needs the run's label set: "
                              "set labels, e.g. labels='negative,neutral,positive'")
        if self.min_clients > self.clients_per_round:
            raise ConfigError(f"min-clients={self.min_clients} exceeds clients-per-round={self.clients_per_round}: "
                              "no round could ever run")
        if self.target_modules != AUTO and not self.target_module_list:
            raise ConfigError("target-modules is empty; give comma-separated module names, e.g. 'query,value', "
                              "or 'auto' (peft's choice for the architecture)")
        if self.output_dir and not os.path.isabs(self.output_dir):
            # The ServerApp runs in the SuperLink's working directory, not the user's:
            # a relative path would land somewhere surprising. `fedlora run` makes it absolute.
            raise ConfigError(
                f"output-dir={self.output_dir!r} must be an absolute path "
                "(`fedlora run` resolves relative paths for you)"
            )

    def _validate_task(self) -> None:
        """Keys that belong to one task. A causal LM has no classification head to train or send
        (its LM head is the embedding's twin and stays frozen), and no label set."""
        if self.task == "causal-lm":
            if self.head != "frozen":
                raise ConfigError(f"head={self.head!r} with task='causal-lm': the LM head stays frozen and nothing "
                                  "is exchanged for it; use head='auto' (or 'frozen')")
            if self.labels:
                raise ConfigError(f"labels={self.labels!r} applies to task='classification'; a causal LM answers "
                                  "in text (exact match is scored on the output column)")
        elif self.prompt_format != AUTO:
            raise ConfigError(f"prompt-format={self.prompt_format!r} applies to task='causal-lm' only")

    def check_federation(self, num_clients: int) -> None:
        """Checks that need the number of clients (SuperNodes / partitions)."""
        if num_clients < 1:
            raise ConfigError("the federation has no clients (num-supernodes must be >= 1)")
        if self.clients_per_round > num_clients:
            raise ConfigError(
                f"clients-per-round={self.clients_per_round} is larger than the number of "
                f"clients ({num_clients}); use at most {num_clients} or add SuperNodes"
            )


def check_ranks(strategy: str, ranks: list[int]) -> None:
    """Mixed LoRA ranks only with a strategy that can aggregate them."""
    from fedlora.strategies import available_strategies, method_class

    if len(set(ranks)) > 1 and not method_class(strategy).mixed_ranks:
        able = [s for s in available_strategies() if method_class(s).mixed_ranks]
        raise ConfigError(f"strategy={strategy!r} cannot aggregate mixed LoRA ranks {sorted(set(ranks))}; "
                          f"use one rank, or one of {able}")


_AUTO_KEYS = ("learning-rate", "evaluate-on", "dp-max-participations", "min-partition-size", "max-length")
#: keys of earlier versions -> their replacement (an old config must fail loudly, not be ignored)
_RENAMED = {"dp-seeded-noise": ("dp-reproducible", "one switch for both the DP batch sampling and the noise; tests only")}


def _coerce(key: str, value: Any, annotation: Any) -> Any:
    """Check one value's type; TOML ints are accepted where a float is expected."""
    name = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", "")
    kind = {"int": int, "float": float, "str": str, "bool": bool}.get(name.removesuffix(" | None"))
    if kind is None:
        return value
    if kind is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}={value!r} must be true or false")
        return value
    if isinstance(value, bool):
        raise ConfigError(f"{key}={value!r} must be a {kind.__name__}, not a bool")
    if kind is float and isinstance(value, int):
        return float(value)
    if kind is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if not isinstance(value, kind):
        raise ConfigError(f"{key}={value!r} must be a {kind.__name__}")
    return value
