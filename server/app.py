"""The fedlora ServerApp: the round loop, evaluation of the global model, and the run's outputs.

Per round: sample partitions, send each its share of the global LoRA state, aggregate the valid
replies with the configured method, evaluate on the held-out test split, append one line to
`metrics.jsonl`. At the end the global adapter is written in peft format (`adapter/`).
"""

from __future__ import annotations

import time
from datetime import datetime, timezone
from logging import INFO
from pathlib import Path

from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

from fedlora.core.config import RunConfig, check_ranks
from fedlora.core.data import load_text_data, split_test
from fedlora.core.model import build_model, global_state, load_state, pick_device
from fedlora.core.train import evaluate
from fedlora.strategies import get_method
from fedlora.strategies.flower import LoraStrategy, from_record, payload_bytes, to_record

from .outputs import RunOutputs

__all__ = ["app", "discover_partitions"]

app = ServerApp()


def discover_partitions(grid: Grid, timeout: float, poll: float = 1.0) -> tuple[dict[int, int], dict[int, int]]:
    """partition-id → node id, and partition-id → LoRA rank, of every client (one QUERY message each).

    Waits (up to `timeout` seconds) until as many nodes are connected as they report partitions,
    so that a deployment whose SuperNodes are still joining does not start short-handed.
    """
    deadline = time.monotonic() + timeout
    known: dict[int, int] = {}  # node id -> partition id
    ranks: dict[int, int] = {}  # partition id -> LoRA rank
    expected = None
    while True:
        new = [n for n in grid.get_node_ids() if n not in known]
        if new:
            msgs = [Message(RecordDict({"config": ConfigRecord({})}), message_type=MessageType.QUERY,
                            dst_node_id=n) for n in new]
            for reply in grid.send_and_receive(msgs, timeout=max(deadline - time.monotonic(), 1.0)):
                if reply.has_error():
                    raise RuntimeError(f"node {reply.metadata.src_node_id} failed to report its "
                                       f"partition: {reply.error.reason}")
                m = reply.content["metrics"]
                known[reply.metadata.src_node_id] = int(m["partition-id"])
                ranks[int(m["partition-id"])] = int(m["lora-rank"])
                if expected is None:
                    expected = int(m["num-partitions"])
                elif expected != int(m["num-partitions"]):
                    raise RuntimeError(f"nodes disagree on num-partitions ({expected} vs {int(m['num-partitions'])})")
        pids = sorted(known.values())
        if len(pids) != len(set(pids)):
            raise RuntimeError(f"two nodes hold the same partition-id: {pids}")
        if expected is not None and len(pids) >= expected:
            return {pid: node for node, pid in known.items()}, ranks
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {len(pids)} of {expected or '?'} clients connected within {timeout:.0f} s")
        time.sleep(poll)


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run `num-server-rounds` rounds of federated LoRA fine-tuning and write the outputs."""
    cfg = RunConfig.from_run_config(context.run_config)
    out_dir = Path(cfg.output_dir or Path.cwd() / "outputs" / datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ"))
    outputs = RunOutputs(out_dir, cfg)
    log(INFO, "fedlora: %s, %d rounds, outputs in %s", cfg.strategy, cfg.num_server_rounds, out_dir)

    partitions, ranks = discover_partitions(grid, timeout=cfg.round_timeout)
    cfg.check_federation(len(partitions))
    check_ranks(cfg.strategy, list(ranks.values()))  # node configs may set ranks of their own
    method = get_method(cfg.strategy, cfg.to_run_config())

    data = load_text_data(cfg)
    test = split_test(cfg)
    # The global adapter has the largest rank in use; each client gets its share (FlexLoRA, FLoRA).
    bundle = build_model(cfg.replace(lora_rank=max(ranks.values())), len(data.label_names),
                         dict(enumerate(data.label_names)))
    bundle.model.to(pick_device())
    state = global_state(bundle)

    strategy = LoraStrategy(method, partitions=partitions, ranks=ranks,
                            clients_per_round=cfg.clients_per_round, seed=cfg.seed,
                            evaluate_clients=cfg.evaluate_on in ("clients", "both"))
    strategy.summary()
    evaluate_server = cfg.evaluate_on in ("server", "both")

    predictions = None  # of the latest server evaluation, reused for predictions.json

    def server_eval() -> dict:
        nonlocal predictions
        if not evaluate_server:
            return {}
        res = evaluate(bundle, test, cfg)
        predictions = res["predictions"]
        return {"test_accuracy": res["accuracy"], "test_loss": res["loss"]}

    t0 = time.perf_counter()
    outputs.write_round({"round": 0, "strategy": cfg.strategy, **server_eval(),
                         "seconds": time.perf_counter() - t0})
    arrays = to_record(state)
    for rnd in range(1, cfg.num_server_rounds + 1):
        if not strategy.eligible():
            log(INFO, "fedlora: stopping before round %d: every client has spent its privacy budget "
                "(%s)", rnd, "; ".join(strategy.exhausted.values()))
            break
        t0 = time.perf_counter()
        replies = grid.send_and_receive(strategy.configure_train(rnd, arrays, ConfigRecord(), grid),
                                        timeout=cfg.round_timeout)
        new_arrays, train_metrics = strategy.aggregate_train(rnd, replies)
        arrays = new_arrays or arrays  # None: every sampled client refused, the model is unchanged
        row = {"round": rnd, "strategy": cfg.strategy, **dict(train_metrics)}
        if cfg.dp:
            row.update(strategy.privacy_metrics())
        eval_cfg = {"final": rnd == cfg.num_server_rounds}
        if method.personalized and eval_cfg["final"]:  # each client writes its own adapter
            eval_cfg["export-dir"] = str(out_dir / "adapters")
        eval_msgs = list(strategy.configure_evaluate(rnd, arrays, ConfigRecord(eval_cfg), grid))
        row["bytes_down"] += sum(payload_bytes(from_record(m.content["arrays"])) for m in eval_msgs)
        if eval_msgs:
            client_metrics = dict(strategy.aggregate_evaluate(
                rnd, grid.send_and_receive(eval_msgs, timeout=cfg.round_timeout)) or {})
            row.update(_personalized_names(client_metrics) if method.personalized else client_metrics)
        load_state(bundle, from_record(arrays))
        row.update(server_eval())
        row["seconds"] = time.perf_counter() - t0
        outputs.write_round(row)

    if cfg.dp:
        outputs.save_privacy(strategy)
    if method.personalized:
        outputs.plot()
        log(INFO, "fedlora: done; each client's adapter in %s", out_dir / "adapters")
        return
    outputs.save_final(bundle, test, predictions, merged=method.changes_base)
    log(INFO, "fedlora: done; adapter in %s%s", out_dir / "adapter",
        f", merged model in {out_dir / 'merged'}" if method.changes_base else "")


def _personalized_names(metrics: dict) -> dict:
    """A personalised method's client metrics under the names a reader compares: `test_*` is each
    client's own model on the global test split (averaged), `personalized_*` on its local split."""
    names = {"global_accuracy": "test_accuracy", "global_loss": "test_loss",
             "client_accuracy": "personalized_accuracy", "client_loss": "personalized_loss"}
    return {names.get(k, k): v for k, v in metrics.items()}
