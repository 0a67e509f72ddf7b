"""The fedlora ClientApp: trains the LoRA factors its strategy asks for on the local partition.

One process (a simulation worker or a deployment SuperNode's app process) loads the base model
once per LoRA rank and reuses it for every round and every virtual client: each message sets all
exchanged tensors (LoRA A, B and a trainable head) and the base weights (W0 plus the change the
message carries, if any; W0 itself is kept pristine), so nothing leaks from one client or round
to the next. What a client keeps between rounds lives in its node's `context.state`: the arrays
a method sends only once (FFA-LoRA's fixed A) and the factors it never sends (FedSA's own B).

Under `dp = true` a client trains with DP-SGD and keeps its privacy ledger (every participation:
round, σ, q, steps, ε after it) in its node state and in a JSON file, so the budget survives
restarts; it refuses to train, with an explicit refusal reply, once the next participation would
take it past `target-epsilon`. Its raw train loss is not sent.

Node config: `partition-id`, `num-partitions` (required), `lora-rank` (optional: overrides the
rank `lora-ranks` assigns to this partition), `privacy-dir` (where the ledger file lives;
default `<output-dir>/privacy`, which suits simulation; a deployment site should set it).
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedlora.core.config import ConfigError, RunConfig
from fedlora.core.data import ClientData, client_data, load_text_data, split_test
from fedlora.core.model import ModelBundle, build_model, load_state, pick_device, save_adapter
from fedlora.core.train import evaluate, train_local
from fedlora.privacy import DPSettings, PrivacyLedger, noise_multiplier, sample_rate
from fedlora.privacy.report import LEDGER_DIR
from fedlora.strategies import get_method
from fedlora.strategies.base import is_delta_key
from fedlora.strategies.flower import from_record, to_record

__all__ = ["app"]

app = ClientApp()

_KEPT = "fedlora.kept"  # context.state key: the client's copy of the adapter between rounds
_LEDGER = "fedlora.ledger"  # context.state key: the client's privacy ledger (JSON)


@functools.lru_cache(maxsize=4)  # one model per LoRA rank in use on this worker
def _bundle(cfg: RunConfig) -> ModelBundle:
    data = load_text_data(cfg)
    bundle = build_model(cfg, len(data.label_names), dict(enumerate(data.label_names)))
    bundle.model.to(pick_device())
    return bundle


def _identity(context: Context, cfg: RunConfig) -> tuple[int, int, int]:
    """(partition-id, num-partitions, LoRA rank) of this node."""
    try:
        pid, num = int(context.node_config["partition-id"]), int(context.node_config["num-partitions"])
    except KeyError as exc:
        raise ConfigError(f"node config lacks {exc}: start the SuperNode with "
                          "--node-config 'partition-id=<i> num-partitions=<n>'") from None
    rank = int(context.node_config.get("lora-rank", cfg.client_rank(pid)))
    if rank <= 0:
        raise ConfigError(f"node config lora-rank={rank} must be > 0")
    return pid, num, rank


def _setup(msg: Message, context: Context) -> tuple[RunConfig, ModelBundle, ClientData, int]:
    cfg = RunConfig.from_run_config(context.run_config)
    pid, num, rank = _identity(context, cfg)
    bundle = _bundle(cfg.replace(lora_rank=rank))
    received = from_record(msg.content["arrays"])
    # What the server did not send this time (FFA's fixed A, FedSA's own B) comes from the node's
    # copy; the base-weight change is never kept: every message carries the whole of it. A
    # sent-once or personal factor the node already holds is never overwritten: the server resends
    # it until it has seen a reply, and FedSA's resent initial B must not replace the client's own.
    kept = from_record(context.state[_KEPT]) if _KEPT in context.state else {}
    once = get_method(cfg.strategy).sent_once
    kept.update({k: v for k, v in received.items()
                 if not is_delta_key(k) and not (once and k.endswith(once) and k in kept)})
    missing = sorted(set(bundle.params) - set(kept))
    if missing:
        raise RuntimeError(f"client {pid} has no value for {missing[:3]}... (the server sends "
                           "them on first contact; was this node's state lost?)")
    context.state[_KEPT] = to_record(kept)
    load_state(bundle, {**kept, **{k: v for k, v in received.items() if is_delta_key(k)}})
    return cfg, bundle, client_data(cfg, pid, num), pid


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Tell the server which partition this node holds and its LoRA rank."""
    pid, num, rank = _identity(context, RunConfig.from_run_config(context.run_config))
    metrics = MetricRecord({"partition-id": pid, "num-partitions": num, "lora-rank": rank})
    return Message(RecordDict({"metrics": metrics}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train what the strategy trains for `local-steps` steps; send back what it shares."""
    cfg, bundle, data, pid = _setup(msg, context)
    method = get_method(cfg.strategy)
    server_round = int(msg.content["config"]["server-round"])
    dp = ledger = None
    if cfg.dp:
        ledger, ledger_file = _ledger(cfg, context, pid)
        dp = _dp_settings(cfg, len(data.train))
        eps_next = ledger.epsilon_after(dp.noise_multiplier, dp.sample_rate, cfg.local_steps)
        if eps_next > cfg.target_epsilon:
            reason = (f"client {pid}: one more round would spend ε = {eps_next:.3f} > target "
                      f"{cfg.target_epsilon:g} (spent {ledger.epsilon:.3f})")
            metrics = MetricRecord({"num-examples": 0, "refused": 1, "epsilon": ledger.epsilon})
            return Message(RecordDict({"arrays": ArrayRecord(), "metrics": metrics,
                                       "refusal": ConfigRecord({"reason": reason})}), reply_to=msg)
    losses = train_local(bundle, data.train, cfg, method.trainable_keys(bundle.params),
                         seed=(cfg.seed, server_round, pid), dp=dp)
    trained = {k: bundle.params[k].detach().cpu().clone() for k in method.trainable_keys(bundle.params)}
    kept = from_record(context.state[_KEPT])
    kept.update(trained)  # FedSA's B must survive to the next round; the rest is resent anyway
    context.state[_KEPT] = to_record(kept)
    uplink = {k: trained[k] for k in method.uplink_keys(bundle.params)}
    metrics = {"num-examples": len(data.train)}
    if ledger is not None:
        # Recorded (and saved) before the update leaves: the update is what spends the budget.
        metrics["epsilon"] = ledger.record(server_round, dp.noise_multiplier, dp.sample_rate, cfg.local_steps)
        _save_ledger(ledger, ledger_file, context)
    else:  # under DP the loss on private records would be an unprotected release
        metrics["train-loss"] = float(np.nanmean(losses))
    return Message(RecordDict({"arrays": to_record(uplink), "metrics": MetricRecord(metrics)}), reply_to=msg)


@functools.lru_cache(maxsize=64)
def _noise_multiplier(target_epsilon: float, delta: float, q: float, steps: int, accountant: str) -> float:
    return noise_multiplier(target_epsilon, delta, q, steps, accountant)


def _dp_settings(cfg: RunConfig, num_examples: int) -> DPSettings:
    """σ calibrated so that `dp-max-participations` rounds of `local-steps` steps at this client's
    sampling rate q = min(1, batch-size / n) spend at most `target-epsilon`."""
    q = sample_rate(num_examples, cfg.batch_size)
    sigma = _noise_multiplier(cfg.target_epsilon, cfg.target_delta, q,
                              cfg.dp_max_participations * cfg.local_steps, cfg.accountant)
    return DPSettings(sigma, cfg.max_grad_norm, q, cfg.grad_sample_mode, reproducible=cfg.dp_reproducible)


def _ledger(cfg: RunConfig, context: Context, pid: int) -> tuple[PrivacyLedger, Path]:
    """This client's ledger: from its node state, else from its file (a restarted node), else new."""
    folder = str(context.node_config.get("privacy-dir", "")) or (
        str(Path(cfg.output_dir) / LEDGER_DIR) if cfg.output_dir else "")
    if not folder:
        raise ConfigError("dp=true needs a place for the privacy ledger: set output-dir, or the node "
                          "config privacy-dir=<path on this site>")
    path = Path(folder) / f"{pid}.json"
    if _LEDGER in context.state:
        ledger = PrivacyLedger(cfg.target_epsilon, cfg.target_delta, cfg.accountant)
        ledger.load_state_dict(json.loads(str(context.state[_LEDGER]["json"])))
    else:
        ledger = PrivacyLedger.open(path, cfg.target_epsilon, cfg.target_delta, cfg.accountant)
    return ledger, path


def _save_ledger(ledger: PrivacyLedger, path: Path, context: Context) -> None:
    ledger.save(path)
    context.state[_LEDGER] = ConfigRecord({"json": json.dumps(ledger.state_dict())})


@app.evaluate()
def evaluate_local(msg: Message, context: Context) -> Message:
    """Evaluate the received model on this client's local test split.

    For a personalised method (the client's own B), on the last round also on the global test
    split (every client evaluating the whole split every round would cost more than training),
    and export this client's adapter to `<output-dir>/adapters/<partition-id>/`.
    """
    cfg, bundle, data, pid = _setup(msg, context)
    result = evaluate(bundle, data.test, cfg)
    metrics = {"num-examples": len(data.test), "accuracy": result["accuracy"], "loss": result["loss"]}
    if get_method(cfg.strategy).personalized and bool(msg.content["config"].get("final", False)):
        on_global = evaluate(bundle, split_test(cfg), cfg)
        metrics.update({"global-accuracy": on_global["accuracy"], "global-loss": on_global["loss"]})
        export_dir = str(msg.content["config"].get("export-dir", ""))
        if export_dir:
            save_adapter(bundle, Path(export_dir) / str(pid), cfg.to_run_config())
    return Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)
