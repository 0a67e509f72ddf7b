"""What a run leaves in `output-dir`: how it ended, metrics.jsonl, a progress line per round, the
peft adapter, the final test predictions and an accuracy plot.

    output-dir/
      status.json           {state, last_round, reason}: running, completed, budget-exhausted or
                            failed (`fedlora.core.status`), rewritten atomically every round
      run_config.json       resolved run config (kebab-case keys)
      data.json             what loading the server's data dropped or altered, each site's row
                            counts as it reported them, and the sites left out and why
      metrics.jsonl         round 0 = initial evaluation, then one object per round (a round
                            without a usable reply: `skipped` and `skip_reason`, model unchanged)
      predictions.json      classification: final global model on the test split: labels and predictions
      samples.jsonl         causal-lm: the final model's greedy answers to the first num-samples test prompts
      accuracy.png          test accuracy / loss per round
      adapter/              PeftModel.from_pretrained(base, adapter/) gives the server's model
                            (not for fedsa: no global model; not enough for fedex/flora: see merged/)
      merged/               fedex, flora: AutoModelFor{SequenceClassification,CausalLM}.from_pretrained(merged/)
                            gives the server's model, base-weight changes included
      adapters/<partition>/ fedsa: each client's own adapter (Ā with its B), written by the client
      privacy.json          dp: δ, accountant, target ε, each client's ε and participations, and
                            whether the guarantee holds against whoever knows `seed`
      privacy/<partition>.json  dp, simulation: each client's own ledger, written by the client
      sites/<partition>/    simulation: what a site keeps between rounds (FedSA's own B), by job
      checkpoint/           the last complete round (`server/checkpoint.py`), for `--resume`
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from logging import INFO
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from flwr.common.logger import log

from fedlora.core.config import RunConfig
from fedlora.core.data import DataReport, TextData
from fedlora.core.files import write_text_atomic
from fedlora.core.model import ModelBundle, save_merged
from fedlora.core.status import RunStatus, check_fresh, write_status
from fedlora.core.task import get_task
from fedlora.privacy import REPRODUCIBLE_WARNING
from fedlora.strategies.flower import LoraStrategy

from .checkpoint import Checkpoint, check_resume

if TYPE_CHECKING:
    from .app import Federation

__all__ = ["RunOutputs"]


#: what leaves a site in a DP run (privacy.json; the README's "What leaves a site")
RELEASED = ["the LoRA/head updates of the rounds it trained in (covered by ε)",
            "n_k, its number of training examples, for weighting (not covered)",
            "its ε: this job's and its lifetime's (not covered)",
            "refusals and their reasons, and that its budget cannot fund another round (not covered)",
            "at the first query: its id, LoRA rank, fedlora version and data sizes (not covered)",
            "local evaluation metrics, only where the site sets allow-evaluation (not covered)"]


class RunOutputs:
    """Writes one run's files; creating it creates the folder and records the config.

    With a `checkpoint` (a resumed run) metrics.jsonl is rewritten to exactly the checkpoint's rows
    (a round that ran after the checkpoint was written runs again), once the config is checked
    against the checkpoint's. Without one, a folder that holds a run is refused, unless that run
    failed before its first training round (nothing of it is worth keeping).
    """

    def __init__(self, out_dir: Path, cfg: RunConfig, checkpoint: Checkpoint | None = None) -> None:
        self.dir = Path(out_dir)
        self.cfg = cfg
        self.dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.dir / "metrics.jsonl"
        if checkpoint is None:
            check_fresh(self.dir)
            self.rows: list[dict] = []
        else:
            check_resume(_comparable(checkpoint.run_config), _comparable(cfg.to_run_config()), checkpoint.round)
            self.rows = list(checkpoint.rows)
        write_text_atomic(self.metrics_path, "".join(json.dumps(row) + "\n" for row in self.rows))
        self.set_status("running", f"resumed after round {checkpoint.round}" if checkpoint else "starting")
        (self.dir / "run_config.json").write_text(json.dumps(cfg.to_run_config(), indent=2) + "\n")

    def set_status(self, state: str, reason: str) -> None:
        """status.json: `state` after the last round written so far (-1: none yet)."""
        write_status(self.dir, RunStatus(state, self.rows[-1]["round"] if self.rows else -1, reason))

    def write_round(self, row: dict) -> None:
        """Append a row to metrics.jsonl, log a progress line and record the round in status.json."""
        self.rows.append(row)
        with self.metrics_path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        self.set_status("running", f"round {row['round']} of {self.cfg.num_server_rounds} done")
        parts = [f"round {row['round']}/{self.cfg.num_server_rounds}"]
        for key, fmt in (("test_accuracy", "acc {:.3f}"), ("test_loss", "loss {:.3f}"),
                         ("client_accuracy", "client acc {:.3f}"), ("train_loss", "train loss {:.3f}"),
                         ("num_clients", "{} clients"), ("epsilon_max", "ε max {:.2f}")):
            if key in row:
                parts.append(fmt.format(row[key]))
        if row.get("skipped"):
            parts.append("skipped: model unchanged")
        if "bytes_up" in row:
            parts.append(f"up {row['bytes_up'] / 1e6:.2f} MB, down {row['bytes_down'] / 1e6:.2f} MB")
        parts.append(f"{row['seconds']:.1f} s")
        log(INFO, "fedlora: %s", " | ".join(parts))

    def save_data(self, report: DataReport | None, test: TextData | None, fed: Federation, evaluation: str) -> None:
        """data.json: what loading the server's data dropped or altered (also logged; none when the
        sites hold all data), the server's test rows, each site's training and local test rows (as
        it reported them), the sites left out with their reasons, and who evaluates."""
        if report is not None:
            log(INFO, "fedlora: data: %s", report.summary())
        (self.dir / "data.json").write_text(json.dumps({
            **({"source": report.source, "rows_read": report.rows_read, "rows_kept": report.rows_kept,
                "dropped": report.dropped, "altered": report.altered} if report is not None else {}),
            "server_test_rows": None if test is None else len(test),
            "evaluation": evaluation,
            "clients": {str(pid): sizes for pid, sizes in sorted(fed.sizes.items())},
            "left_out": dict(sorted(fed.refused.items())),
        }, indent=2) + "\n")

    def save_final(self, bundle: ModelBundle, test: TextData | None, predictions: np.ndarray | None, *,
                   merged: bool) -> None:
        """The global adapter (with a classifier's head and labels), tokenizer and config; the final
        model's answers on the server's test data, if it has any (the task's: predictions.json or
        samples.jsonl); plot; and, with `merged`, the full model with everything merged into its
        weights (last: the merge happens in place).

        `predictions` are the final global model's on `test` when the server already has them.
        """
        get_task(self.cfg).save_final(bundle, self.dir, test, self.cfg, predictions)
        self.plot()
        if merged:
            save_merged(bundle, self.dir / "merged")

    def save_privacy(self, strategy: LoraStrategy) -> None:
        """privacy.json: the budget and each client's ε as its ledger last reported it."""
        cfg = self.cfg
        clients = {str(pid): {"epsilon": strategy.epsilon.get(pid, 0.0),
                              **({"site_epsilon": strategy.site_epsilon[pid]} if pid in strategy.site_epsilon else {}),
                              "participations": strategy.participations.get(pid, 0),
                              "exhausted": pid in strategy.exhausted,
                              **({"reason": strategy.exhausted[pid]} if pid in strategy.exhausted else {})}
                   for pid in sorted(strategy.partitions)}
        summary = {"target_epsilon": cfg.target_epsilon, "delta": cfg.target_delta, "accountant": cfg.accountant,
                   "dp_max_participations": cfg.dp_max_participations, "local_steps": cfg.local_steps,
                   "max_grad_norm": cfg.max_grad_norm,
                   # Whether the batches and noise were secret (OS entropy) or followed `seed`.
                   "reproducible": cfg.dp_reproducible,
                   "guarantee": (REPRODUCIBLE_WARNING if cfg.dp_reproducible else
                                 "record-level (ε, δ)-DP of each client's training examples against "
                                 "everything the client sent; batches and noise were drawn from the "
                                 "operating system's entropy"),
                   "released": RELEASED,
                   "clients": clients,
                   "epsilon_max": max((c["epsilon"] for c in clients.values()), default=0.0)}
        (self.dir / "privacy.json").write_text(json.dumps(summary, indent=2) + "\n")
        if strategy.exhausted:
            log(INFO, "fedlora: clients that spent their privacy budget: %s", sorted(strategy.exhausted))

    def plot(self) -> None:
        """accuracy.png from the rows so far."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        rows = [r for r in self.rows if "test_loss" in r]
        if not rows:
            return
        accuracy = [(r["round"], r["test_accuracy"]) for r in rows if "test_accuracy" in r]
        # a causal LM without label-like answers has a loss (and perplexity) but no accuracy
        fig, axes = plt.subplots(1, 2 if accuracy else 1, figsize=(9 if accuracy else 4.5, 3.5), squeeze=False)
        if accuracy:
            axes[0, 0].plot(*zip(*accuracy), marker="o")
            axes[0, 0].set(xlabel="round", ylabel="test accuracy", title=f"{self.cfg.strategy}: test accuracy")
        ax2 = axes[0, -1]
        ax2.plot([r["round"] for r in rows], [r["test_loss"] for r in rows], marker="o", label="test")
        train = [(r["round"], r["train_loss"]) for r in rows if "train_loss" in r]
        if train:
            ax2.plot(*zip(*train), marker="s", label="train (clients)")
        ax2.set(xlabel="round", ylabel="cross-entropy" + (" per answer token" if self.cfg.task == "causal-lm" else ""),
                title="loss")
        ax2.legend()
        for ax in axes[0]:
            ax.grid(alpha=0.3)
            ax.xaxis.get_major_locator().set_params(integer=True)
        fig.tight_layout()
        fig.savefig(self.dir / "accuracy.png", dpi=120)
        plt.close(fig)


def _comparable(run_config: Mapping[str, object]) -> dict:
    """A run config without `resume`, the one key that differs by design on a resumed run."""
    return {k: v for k, v in run_config.items() if k != "resume"}
