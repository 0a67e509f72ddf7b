"""The fedlora ClientApp: trains the LoRA factors its strategy asks for on the local partition.

One process (a simulation worker or a deployment SuperNode's app process) loads the base model
once per LoRA rank and reuses it for every round and every virtual client: each message sets all
exchanged tensors (LoRA A, B and a trainable head) and the base weights (W0 plus the change the
message carries, if any; W0 itself is kept pristine), so nothing leaks from one client or round
to the next. What a client keeps between rounds lives in its node's `context.state`: the arrays
a method sends only once (FFA-LoRA's fixed A) and the factors it never sends (FedSA's own B).

Node config: `partition-id`, `num-partitions` (required), `lora-rank` (optional: overrides the
rank `lora-ranks` assigns to this partition).
"""

from __future__ import annotations

import functools
from pathlib import Path

from fedlora.core.config import ConfigError, RunConfig
from fedlora.core.data import ClientData, client_data, load_text_data, split_test
from fedlora.core.model import ModelBundle, build_model, load_state, pick_device, save_adapter
from fedlora.core.train import evaluate, train_local
from fedlora.strategies import get_method
from fedlora.strategies.base import is_delta_key
from fedlora.strategies.flower import from_record, to_record
from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

__all__ = ["app"]

app = ClientApp()

_KEPT = "fedlora.kept"  # context.state key: the client's copy of the adapter between rounds


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
    # copy; the base-weight change is never kept: every message carries the whole of it.
    kept = from_record(context.state[_KEPT]) if _KEPT in context.state else {}
    kept.update({k: v for k, v in received.items() if not is_delta_key(k)})
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
    losses = train_local(bundle, data.train, cfg, method.trainable_keys(bundle.params),
                         seed=(cfg.seed, server_round, pid))
    trained = {k: bundle.params[k].detach().cpu().clone() for k in method.trainable_keys(bundle.params)}
    kept = from_record(context.state[_KEPT])
    kept.update(trained)  # FedSA's B must survive to the next round; the rest is resent anyway
    context.state[_KEPT] = to_record(kept)
    uplink = {k: trained[k] for k in method.uplink_keys(bundle.params)}
    metrics = MetricRecord({"num-examples": len(data.train), "train-loss": sum(losses) / len(losses)})
    return Message(RecordDict({"arrays": to_record(uplink), "metrics": metrics}), reply_to=msg)


@app.evaluate()
def evaluate_local(msg: Message, context: Context) -> Message:
    """Evaluate the received model on this client's local test split.

    For a personalised method (the client's own B) also on the global test split, and on the
    last round export this client's adapter to `<output-dir>/adapters/<partition-id>/`.
    """
    cfg, bundle, data, pid = _setup(msg, context)
    result = evaluate(bundle, data.test, cfg)
    metrics = {"num-examples": len(data.test), "accuracy": result["accuracy"], "loss": result["loss"]}
    if get_method(cfg.strategy).personalized:
        on_global = evaluate(bundle, split_test(cfg), cfg)
        metrics.update({"global-accuracy": on_global["accuracy"], "global-loss": on_global["loss"]})
        export_dir = str(msg.content["config"].get("export-dir", ""))
        if export_dir:
            save_adapter(bundle, Path(export_dir) / str(pid), cfg.to_run_config())
    return Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)
