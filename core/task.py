"""The task seam: what a run fine-tunes the model *for*, behind one small interface.

The apps, the privacy layer and the strategies do not know the task. A run's `task` key picks a
`Task`, which owns everything that differs between tasks:

* the model (`build_model`; `core.model.check_model` checks either at start-up without weights):
  a sequence classifier with its head, or a causal LM whose LM head stays frozen;
* the rows (`load_shared`, `read_file`): labelled texts (`TextData`), or instruction data
  (`InstructionData`: prompt and answer token ids, `core/instructions.py`). Splitting, partitioning
  and holding out local test rows are the same for both (`core/data.py`);
* the forward pass on a batch and the per-record loss (`forward`, `loss`): cross-entropy of the
  logits, or a sequence's mean over its answer tokens. `core/train.py` trains with them, with and
  without DP-SGD, and DP-SGD clips each record's gradient of that loss;
* evaluation and the final files (`evaluate`, `save_final`): accuracy and loss with
  predictions.json, or loss, perplexity, exact match of greedy answers and samples.jsonl.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from .config import ConfigError, RunConfig
from .data import DataReport, TextData, label_names, load_labelled, read_labelled
from .model import ModelBundle, build_causal_lm, build_model, precision_context, save_adapter

__all__ = ["CausalLM", "Classification", "Task", "get_task"]


class Task(ABC):
    """What one kind of fine-tuning needs besides what every run shares."""

    name: ClassVar[str]

    @abstractmethod
    def build_model(self, cfg: RunConfig) -> ModelBundle:
        """The peft-wrapped model of this task, seeded alike in every process."""

    @abstractmethod
    def load_shared(self, cfg: RunConfig) -> tuple[Any, DataReport]:
        """The whole shared dataset `cfg.dataset` and what loading it dropped or altered."""

    @abstractmethod
    def read_file(self, cfg: RunConfig, path: str, *, key: str, text_column: str | None = None,
                  label_column: str | None = None) -> Any:
        """One site's file (or the server's test file), validated; errors name `key`."""

    @abstractmethod
    def forward(self, bundle: ModelBundle, data: Any, cfg: RunConfig, device: torch.device):
        """A function: row indices -> (model output, target) on `device`, in training mode."""

    @staticmethod
    @abstractmethod
    def loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """One loss per record, shape (batch,)."""

    @abstractmethod
    def evaluate(self, bundle: ModelBundle, data: Any, cfg: RunConfig) -> dict[str, Any]:
        """Metrics of the model on `data` ("accuracy" and "loss" among them where defined) and,
        under "predictions", what the final files need."""

    @abstractmethod
    def save_final(self, bundle: ModelBundle, out_dir: Path, test: Any, cfg: RunConfig, predictions: Any) -> None:
        """The adapter in `out_dir/adapter` and the final model's answers on the test data."""


class Classification(Task):
    """Sequence classification with a trainable head (the default task)."""

    name = "classification"

    def build_model(self, cfg: RunConfig) -> ModelBundle:
        names = label_names(cfg)
        return build_model(cfg, len(names), dict(enumerate(names)))

    def load_shared(self, cfg: RunConfig) -> tuple[TextData, DataReport]:
        return load_labelled(cfg)

    def read_file(self, cfg: RunConfig, path: str, *, key: str, text_column: str | None = None,
                  label_column: str | None = None) -> TextData:
        return read_labelled(path, text_column or cfg.text_column, label_column or cfg.label_column,
                             label_names(cfg), key=key)[0]

    def forward(self, bundle: ModelBundle, data: TextData, cfg: RunConfig, device: torch.device):
        labels = torch.as_tensor(data.labels, device=device)

        def run(idx: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
            return bundle.model(**_encode(bundle, [data.texts[i] for i in idx], cfg.max_length, device)).logits, labels[idx]

        return run

    @staticmethod
    def loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(output, target, reduction="none")

    @torch.no_grad()
    def evaluate(self, bundle: ModelBundle, data: TextData, cfg: RunConfig) -> dict[str, Any]:
        """Accuracy, mean cross-entropy and the predicted labels on `data` (in its order)."""
        device = next(bundle.model.parameters()).device
        bundle.model.eval()
        # Batches of similar length waste less compute on padding.
        order = np.argsort([len(t) for t in data.texts], kind="stable")
        preds = np.empty(len(data), dtype=np.int64)
        total_loss = 0.0
        labels = torch.as_tensor(data.labels, device=device)
        precision = precision_context(cfg, device)
        for start in range(0, len(data), cfg.eval_batch_size):
            idx = order[start : start + cfg.eval_batch_size]
            enc = _encode(bundle, [data.texts[i] for i in idx], cfg.max_length, device)
            with precision:
                logits = bundle.model(**enc).logits.float()
            total_loss += float(F.cross_entropy(logits, labels[idx], reduction="sum"))
            preds[idx] = logits.argmax(-1).cpu().numpy()
        n = max(len(data), 1)
        return {"accuracy": float((preds == data.labels).mean()) if len(data) else 0.0,
                "loss": total_loss / n, "predictions": preds}

    def save_final(self, bundle: ModelBundle, out_dir: Path, test: TextData | None, cfg: RunConfig,
                   predictions: np.ndarray | None) -> None:
        """The adapter with the head and the label names; the test split's labels and predictions."""
        save_adapter(bundle, out_dir / "adapter", cfg.to_run_config())
        if test is not None:
            if predictions is None:  # e.g. a resumed run that evaluated nothing since
                predictions = self.evaluate(bundle, test, cfg)["predictions"]
            (out_dir / "predictions.json").write_text(json.dumps(
                {"labels": test.labels.tolist(), "predictions": predictions.tolist()}))


class CausalLM(Task):
    """Supervised instruction tuning of a decoder LM: the loss covers the answer tokens only."""

    name = "causal-lm"

    def build_model(self, cfg: RunConfig) -> ModelBundle:
        return build_causal_lm(cfg)

    def load_shared(self, cfg: RunConfig):
        from .instructions import load_instructions

        return load_instructions(cfg, tokenizer(cfg))

    def read_file(self, cfg: RunConfig, path: str, *, key: str, text_column: str | None = None,
                  label_column: str | None = None):
        from .instructions import read_instructions

        overrides = {k: v for k, v in (("text-column", text_column), ("label-column", label_column)) if v}
        if overrides:
            raise ConfigError(f"node-config {overrides} applies to task='classification'; an instruction file's "
                              "columns are the run's instruction-column, output-column, ... keys")
        return read_instructions(path, cfg, tokenizer(cfg), key=key)[0]

    def forward(self, bundle: ModelBundle, data, cfg: RunConfig, device: torch.device):
        from .causal_lm import forward

        return forward(bundle, data, device)

    @staticmethod
    def loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        from .causal_lm import sequence_loss

        return sequence_loss(output, target)

    def evaluate(self, bundle: ModelBundle, data, cfg: RunConfig) -> dict[str, Any]:
        from .causal_lm import evaluate

        return evaluate(bundle, data, cfg)

    def save_final(self, bundle: ModelBundle, out_dir: Path, test, cfg: RunConfig, predictions: Any) -> None:
        """The peft adapter with the tokenizer (`PeftModel.from_pretrained(AutoModelForCausalLM…)`
        loads it) and a few greedy answers of the final model (samples.jsonl)."""
        from .causal_lm import write_samples

        save_adapter(bundle, out_dir / "adapter", cfg.to_run_config())
        if test is not None and len(test) and cfg.num_samples:
            write_samples(bundle, test, cfg, out_dir / "samples.jsonl")


def tokenizer(cfg: RunConfig):
    """The causal LM's tokenizer alone (cached per process): data is tokenised before, and without,
    any model (the runner's start-up checks, the server's test split)."""
    from .model import causal_tokenizer, model_dir

    return causal_tokenizer(model_dir(cfg))


def _encode(bundle: ModelBundle, texts: list[str], max_length: int, device: torch.device) -> dict:
    enc = bundle.tokenizer(texts, truncation=True, max_length=max_length, padding=True, return_tensors="pt")
    return {k: v.to(device) for k, v in enc.items()}


_TASKS: dict[str, Task] = {t.name: t for t in (Classification(), CausalLM())}


def get_task(cfg: RunConfig) -> Task:
    return _TASKS[cfg.task]
