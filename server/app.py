"""The fedlora ServerApp: the round loop, evaluation of the global model, and the run's outputs.

Per round: sample partitions, send each its share of the global LoRA state, aggregate the valid
replies with the configured method, evaluate on the held-out test split, append one line to
`metrics.jsonl`. A round without a usable reply is skipped (the model stays as it was); the run
stops early, cleanly, once every client has spent its privacy budget, and fails after
`MAX_FAILED_ROUNDS` rounds in a row whose replies all failed. `status.json` says how it ended. At
the end the global adapter is written in peft format (`adapter/`).
"""

from __future__ import annotations

import time
from datetime import datetime, timezone
from logging import INFO, WARNING
from pathlib import Path

from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

from fedlora.core.config import RunConfig, check_ranks
from fedlora.core.data import client_data, data_report, load_text_data, split_test
from fedlora.core.model import build_model, global_state, load_state, pick_device
from fedlora.core.train import evaluate
from fedlora.privacy import REPRODUCIBLE_WARNING
from fedlora.strategies import LoraMethod, get_method
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


class RoundsFailed(RuntimeError):
    """Several rounds in a row produced no usable reply although clients were asked: the
    federation is broken (clients crash or time out), so the run fails instead of going on
    with an unchanged model."""


#: consecutive rounds with dropped or missing replies and nothing aggregated before the run fails
MAX_FAILED_ROUNDS = 3


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run `num-server-rounds` rounds of federated LoRA fine-tuning and write the outputs.

    `<output-dir>/status.json` says how the run ended: `completed`, `budget-exhausted` (every
    client that could still train refused: a clean, early end) or `failed` (this function raised).
    """
    cfg = RunConfig.from_run_config(context.run_config)
    out_dir = Path(cfg.output_dir or Path.cwd() / "outputs" / datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ"))
    outputs = RunOutputs(out_dir, cfg)
    log(INFO, "fedlora: %s, %d rounds, outputs in %s", cfg.strategy, cfg.num_server_rounds, out_dir)
    if cfg.dp and cfg.dp_reproducible:
        log(WARNING, "fedlora: %s", REPRODUCIBLE_WARNING)
    try:
        state, reason = _run(grid, cfg, outputs)
    except BaseException as exc:
        outputs.set_status("failed", f"{type(exc).__name__}: {exc}")
        raise
    outputs.set_status(state, reason)
    log(INFO, "fedlora: %s (%s)", state, reason)


def _run(grid: Grid, cfg: RunConfig, outputs: RunOutputs) -> tuple[str, str]:
    """The round loop; returns the final state and why."""
    partitions, ranks = discover_partitions(grid, timeout=cfg.round_timeout)
    cfg.check_federation(len(partitions))
    check_ranks(cfg.strategy, list(ranks.values()))  # node configs may set ranks of their own
    method = get_method(cfg.strategy, cfg.to_run_config())
    server = _Server(cfg, grid, method, partitions, ranks, outputs.dir)
    server.strategy.summary()
    outputs.save_data(data_report(cfg), len(server.test),
                      {pid: client_data(cfg, pid, len(partitions)) for pid in partitions})

    t0 = time.perf_counter()
    outputs.write_round({"round": 0, "strategy": cfg.strategy, **server.evaluate(),
                         "seconds": time.perf_counter() - t0})
    failed_rounds = 0
    ending = ("completed", f"all {cfg.num_server_rounds} rounds ran")
    for rnd in range(1, cfg.num_server_rounds + 1):
        if not server.strategy.eligible():
            ending = ("budget-exhausted", f"stopped before round {rnd}: every client has spent its "
                      f"privacy budget ({'; '.join(server.strategy.exhausted.values())})")
            break
        row = server.round(rnd, final=rnd == cfg.num_server_rounds)
        outputs.write_round(row)
        failed_rounds = failed_rounds + 1 if row.get("skipped") and server.strategy.rejected else 0
        if failed_rounds >= MAX_FAILED_ROUNDS:
            raise RoundsFailed(f"{failed_rounds} rounds in a row without a usable reply; last: "
                               f"{'; '.join(server.strategy.rejected)}")

    if cfg.dp:
        outputs.save_privacy(server.strategy)
    if method.personalized:
        outputs.plot()
        log(INFO, "fedlora: each client's adapter in %s", outputs.dir / "adapters")
    else:
        outputs.save_final(server.bundle, server.test, server.predictions, merged=method.changes_base)
        log(INFO, "fedlora: adapter in %s%s", outputs.dir / "adapter",
            f", merged model in {outputs.dir / 'merged'}" if method.changes_base else "")
    return ending


class _Server:
    """What one round needs: the global model, the test split, the Flower strategy, the grid."""

    def __init__(self, cfg: RunConfig, grid: Grid, method: LoraMethod, partitions: dict[int, int],
                 ranks: dict[int, int], out_dir: Path) -> None:
        self.cfg, self.grid, self.method, self.out_dir = cfg, grid, method, out_dir
        data = load_text_data(cfg)
        self.test = split_test(cfg)
        # The global adapter has the largest rank in use; each client gets its share (FlexLoRA, FLoRA).
        self.bundle = build_model(cfg.replace(lora_rank=max(ranks.values())), len(data.label_names),
                                  dict(enumerate(data.label_names)))
        self.bundle.model.to(pick_device())
        self.arrays = to_record(global_state(self.bundle))
        self.strategy = LoraStrategy(method, partitions=partitions, ranks=ranks,
                                     clients_per_round=cfg.clients_per_round, seed=cfg.seed,
                                     evaluate_clients=cfg.evaluate_on in ("clients", "both"))
        self.predictions = None  # of the latest server evaluation, reused for predictions.json

    def evaluate(self) -> dict:
        """The global model on the server's test split (if the server evaluates)."""
        if self.cfg.evaluate_on not in ("server", "both"):
            return {}
        res = evaluate(self.bundle, self.test, self.cfg)
        self.predictions = res["predictions"]
        return {"test_accuracy": res["accuracy"], "test_loss": res["loss"]}

    def round(self, rnd: int, *, final: bool) -> dict:
        """Train, aggregate and evaluate; the row for metrics.jsonl.

        A round without a usable reply leaves the model as it was and is marked `skipped`; it
        evaluates nothing unless it is the last (whose row carries the final model's metrics).
        """
        t0 = time.perf_counter()
        strategy, cfg = self.strategy, self.cfg
        log(INFO, "fedlora: round %d: training", rnd)
        replies = self.grid.send_and_receive(strategy.configure_train(rnd, self.arrays, ConfigRecord(), self.grid),
                                             timeout=cfg.round_timeout)
        new_arrays, train_metrics = strategy.aggregate_train(rnd, replies)
        row = {"round": rnd, "strategy": cfg.strategy, **dict(train_metrics)}
        if cfg.dp:
            row.update(strategy.privacy_metrics())
        if new_arrays is None:
            row["skipped"] = True
            row["skip_reason"] = "; ".join(strategy.rejected) or "every sampled client refused (privacy budget spent)"
            log(WARNING, "fedlora: round %d skipped, the model is unchanged: %s", rnd, row["skip_reason"])
        else:
            self.arrays = new_arrays
        if new_arrays is not None or final:
            self._evaluate_round(rnd, final, row)
        row["seconds"] = time.perf_counter() - t0
        return row

    def _evaluate_round(self, rnd: int, final: bool, row: dict) -> None:
        """Client-side evaluation (if any) and the server's, of the current global model, into `row`."""
        eval_cfg = {"final": final}
        if self.method.personalized and final:  # each client writes its own adapter
            eval_cfg["export-dir"] = str(self.out_dir / "adapters")
        eval_msgs = list(self.strategy.configure_evaluate(rnd, self.arrays, ConfigRecord(eval_cfg), self.grid))
        row["bytes_down"] += sum(payload_bytes(from_record(m.content["arrays"])) for m in eval_msgs)
        if eval_msgs:  # a log line per wait, so that `fedlora run` sees the run is alive
            log(INFO, "fedlora: round %d: %d clients evaluate", rnd, len(eval_msgs))
            client_metrics = dict(self.strategy.aggregate_evaluate(
                rnd, self.grid.send_and_receive(eval_msgs, timeout=self.cfg.round_timeout)) or {})
            row.update(_personalized_names(client_metrics) if self.method.personalized else client_metrics)
        load_state(self.bundle, from_record(self.arrays))
        row.update(self.evaluate())


def _personalized_names(metrics: dict) -> dict:
    """A personalised method's client metrics under the names a reader compares: `test_*` is each
    client's own model on the global test split (averaged), `personalized_*` on its local split."""
    names = {"global_accuracy": "test_accuracy", "global_loss": "test_loss",
             "client_accuracy": "personalized_accuracy", "client_loss": "personalized_loss"}
    return {names.get(k, k): v for k, v in metrics.items()}
