"""The fedlora ClientApp: trains the LoRA factors its strategy asks for on the local partition.

One process (a simulation worker or a deployment SuperNode's app process) loads the base model
once and reuses it for every round and every virtual client: each message overwrites all
exchanged tensors (LoRA A, B and a trainable head), and the frozen base weights are never
trained, so nothing leaks from one client or round to the next. A method that sends A only on
first contact (FFA-LoRA) relies on the copy cached in the node's `context.state`.
"""

from __future__ import annotations

import functools

from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedlora.core.config import ConfigError, RunConfig
from fedlora.core.data import ClientData, client_data, load_text_data
from fedlora.core.model import ModelBundle, build_model, load_state, pick_device
from fedlora.core.train import evaluate, train_local
from fedlora.strategies import get_method
from fedlora.strategies.flower import from_record, to_record

__all__ = ["app"]

app = ClientApp()

_RECEIVED = "fedlora.received"  # context.state key: last arrays received from the server


@functools.lru_cache(maxsize=1)
def _bundle(cfg: RunConfig) -> ModelBundle:
    data = load_text_data(cfg)
    bundle = build_model(cfg, len(data.label_names), dict(enumerate(data.label_names)))
    bundle.model.to(pick_device())
    return bundle


def _partition(context: Context) -> tuple[int, int]:
    """(partition-id, num-partitions) of this node."""
    try:
        return int(context.node_config["partition-id"]), int(context.node_config["num-partitions"])
    except KeyError as exc:
        raise ConfigError(f"node config lacks {exc}: start the SuperNode with "
                          "--node-config 'partition-id=<i> num-partitions=<n>'") from None


def _setup(msg: Message, context: Context) -> tuple[RunConfig, ModelBundle, ClientData, int]:
    cfg = RunConfig.from_run_config(context.run_config)
    pid, num = _partition(context)
    bundle = _bundle(cfg)
    # Anything the server did not resend this time (FFA's fixed A) comes from the node's cache.
    received = from_record(context.state[_RECEIVED]) if _RECEIVED in context.state else {}
    received.update(from_record(msg.content["arrays"]))
    missing = sorted(set(bundle.params) - set(received))
    if missing:
        raise RuntimeError(f"client {pid} has no value for {missing[:3]}... (the server sends "
                           "them on first contact; was this node's state lost?)")
    context.state[_RECEIVED] = to_record(received)
    load_state(bundle, received)
    return cfg, bundle, client_data(cfg, pid, num), pid


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Tell the server which partition this node holds (sampling is by partition, not node id)."""
    pid, num = _partition(context)
    metrics = MetricRecord({"partition-id": pid, "num-partitions": num})
    return Message(RecordDict({"metrics": metrics}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train what the strategy trains for `local-steps` steps; send back only that."""
    cfg, bundle, data, pid = _setup(msg, context)
    method = get_method(cfg.strategy)
    keys = method.uplink_keys(bundle.params)
    server_round = int(msg.content["config"]["server-round"])
    losses = train_local(bundle, data.train, cfg, keys, seed=(cfg.seed, server_round, pid))
    trained = {k: bundle.params[k].detach().cpu().clone() for k in keys}
    metrics = MetricRecord({"num-examples": len(data.train), "train-loss": sum(losses) / len(losses)})
    return Message(RecordDict({"arrays": to_record(trained), "metrics": metrics}), reply_to=msg)


@app.evaluate()
def evaluate_local(msg: Message, context: Context) -> Message:
    """Evaluate the received global model on this client's local test split."""
    cfg, bundle, data, _ = _setup(msg, context)
    result = evaluate(bundle, data.test, cfg)
    metrics = MetricRecord({"num-examples": len(data.test), "accuracy": result["accuracy"],
                            "loss": result["loss"]})
    return Message(RecordDict({"metrics": metrics}), reply_to=msg)

