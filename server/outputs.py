"""What a run leaves in `output-dir`: metrics.jsonl, a progress line per round, the peft adapter,
the final test predictions and an accuracy plot.

    output-dir/
      run_config.json       resolved run config (kebab-case keys)
      metrics.jsonl         round 0 = initial evaluation, then one object per round
      predictions.json      final global model on the test split: labels and predictions
      accuracy.png          test accuracy / loss per round (if matplotlib is installed)
      adapter/              PeftModel.from_pretrained(base, adapter/) gives the server's model
                            (not for fedsa: no global model; not enough for fedex/flora: see merged/)
      merged/               fedex, flora: AutoModelForSequenceClassification.from_pretrained(merged/)
                            gives the server's model, base-weight changes included
      adapters/<partition>/ fedsa: each client's own adapter (Ā with its B), written by the client
      privacy.json          dp: δ, accountant, target ε and each client's ε and participations
      privacy/<partition>.json  dp, simulation: each client's own ledger, written by the client
"""

from __future__ import annotations

import json
from logging import INFO
from pathlib import Path

import numpy as np
from flwr.common.logger import log

from fedlora.core.config import RunConfig
from fedlora.core.data import TextData
from fedlora.core.model import ModelBundle, save_adapter, save_merged
from fedlora.core.train import evaluate
from fedlora.strategies.flower import LoraStrategy

__all__ = ["RunOutputs"]


class RunOutputs:
    """Writes one run's files; creating it creates the folder and records the config."""

    def __init__(self, out_dir: Path, cfg: RunConfig) -> None:
        self.dir = Path(out_dir)
        self.cfg = cfg
        self.dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.dir / "metrics.jsonl"
        if self.metrics_path.exists():  # never mix two runs' files, never overwrite a finished run
            raise FileExistsError(f"output-dir {self.dir} already holds a run; choose another folder")
        self.metrics_path.write_text("")
        self.rows: list[dict] = []
        (self.dir / "run_config.json").write_text(json.dumps(cfg.to_run_config(), indent=2) + "\n")

    def write_round(self, row: dict) -> None:
        self.rows.append(row)
        with self.metrics_path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        parts = [f"round {row['round']}/{self.cfg.num_server_rounds}"]
        for key, fmt in (("test_accuracy", "acc {:.3f}"), ("test_loss", "loss {:.3f}"),
                         ("client_accuracy", "client acc {:.3f}"), ("train_loss", "train loss {:.3f}"),
                         ("num_clients", "{} clients"), ("epsilon_max", "ε max {:.2f}")):
            if key in row:
                parts.append(fmt.format(row[key]))
        if "bytes_up" in row:
            parts.append(f"up {row['bytes_up'] / 1e6:.2f} MB, down {row['bytes_down'] / 1e6:.2f} MB")
        parts.append(f"{row['seconds']:.1f} s")
        log(INFO, "fedlora: %s", " | ".join(parts))

    def save_final(self, bundle: ModelBundle, test: TextData, predictions: np.ndarray | None, *,
                   merged: bool) -> None:
        """The global adapter (with head), tokenizer, labels and config; predictions; plot; and,
        with `merged`, the full model with everything merged into its weights (last: the merge
        happens in place).

        `predictions` are the final global model's on `test` when the server already has them.
        """
        save_adapter(bundle, self.dir / "adapter", self.cfg.to_run_config())
        if predictions is None:
            predictions = evaluate(bundle, test, self.cfg)["predictions"]
        (self.dir / "predictions.json").write_text(json.dumps(
            {"labels": test.labels.tolist(), "predictions": predictions.tolist()}))
        self.plot()
        if merged:
            save_merged(bundle, self.dir / "merged")

    def save_privacy(self, strategy: LoraStrategy) -> None:
        """privacy.json: the budget and each client's ε as its ledger last reported it."""
        cfg = self.cfg
        clients = {str(pid): {"epsilon": strategy.epsilon.get(pid, 0.0),
                              "participations": strategy.participations.get(pid, 0),
                              "exhausted": pid in strategy.exhausted,
                              **({"reason": strategy.exhausted[pid]} if pid in strategy.exhausted else {})}
                   for pid in sorted(strategy.partitions)}
        summary = {"target_epsilon": cfg.target_epsilon, "delta": cfg.target_delta, "accountant": cfg.accountant,
                   "dp_max_participations": cfg.dp_max_participations, "local_steps": cfg.local_steps,
                   "max_grad_norm": cfg.max_grad_norm, "clients": clients,
                   "epsilon_max": max((c["epsilon"] for c in clients.values()), default=0.0)}
        (self.dir / "privacy.json").write_text(json.dumps(summary, indent=2) + "\n")
        if strategy.exhausted:
            log(INFO, "fedlora: clients that spent their privacy budget: %s", sorted(strategy.exhausted))

    def plot(self) -> None:
        """accuracy.png from the rows so far (if matplotlib is installed)."""
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            return  # the plot is a convenience; metrics.jsonl holds the same numbers
        rows = [r for r in self.rows if "test_accuracy" in r]
        if not rows:
            return
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.5))
        rounds = [r["round"] for r in rows]
        ax1.plot(rounds, [r["test_accuracy"] for r in rows], marker="o")
        ax1.set(xlabel="round", ylabel="test accuracy", title=f"{self.cfg.strategy}: test accuracy")
        ax2.plot(rounds, [r["test_loss"] for r in rows], marker="o", label="test")
        train = [(r["round"], r["train_loss"]) for r in rows if "train_loss" in r]
        if train:
            ax2.plot(*zip(*train), marker="s", label="train (clients)")
        ax2.set(xlabel="round", ylabel="cross-entropy", title="loss")
        ax2.legend()
        for ax in (ax1, ax2):
            ax.grid(alpha=0.3)
            ax.xaxis.get_major_locator().set_params(integer=True)
        fig.tight_layout()
        fig.savefig(self.dir / "accuracy.png", dpi=120)
        plt.close(fig)
