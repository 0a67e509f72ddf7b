"""The fedlora ServerApp: the round loop, evaluation of the global model, and the run's outputs.

Per round: sample sites, send each its share of the global LoRA state, aggregate the valid
replies with the configured method, evaluate where there is labelled data, append one line to
`metrics.jsonl` and write a checkpoint (`server/checkpoint.py`). A round with fewer than
`min-clients` usable replies is skipped (the model stays as it was); the run stops early, cleanly,
once every client has spent its privacy budget, and fails after `max-failed-rounds` skipped rounds
in a row whose replies failed. Before each round it looks for a stop request (`fedlora stop`, a
first Ctrl-C: `core.status.request_stop`) and, if there is one, stops there, its last round
checkpointed. `status.json` says how it ended. A run started with `resume = true` continues from
the checkpoint in its `output-dir`. At the end the global adapter is written in peft format
(`adapter/`).
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from logging import INFO, WARNING
from pathlib import Path

from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

from fedlora.core.config import RunConfig, check_ranks
from fedlora.core.data import data_report, server_test
from fedlora.core.model import global_state, load_state, pick_device, warm_start
from fedlora.core.status import clear_stop, stop_request
from fedlora.core.task import get_task
from fedlora.core.version import VERSION
from fedlora.privacy import REPRODUCIBLE_WARNING
from fedlora.strategies import LoraMethod, get_method
from fedlora.strategies.flower import LoraStrategy, from_record, payload_bytes, rejection_counts, to_record

from .checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from .outputs import RunOutputs

__all__ = ["Federation", "app", "discover_sites", "exchange"]

app = ServerApp()

REPLY_POLL_S = 0.2  # how often the server asks the SuperLink for replies


def exchange(grid: Grid, messages: list[Message], timeout: float) -> list[Message]:
    """Send `messages` and collect their replies until all are in or `timeout` seconds pass.

    Flower's `Grid.send_and_receive` does the same but sleeps 3 s between pulls, up to 3 s that a
    deployment pays on every exchange; polling every 0.2 s costs the SuperLink a small request
    instead. Replies come back in the order their messages were sent, whenever each arrived.
    """
    order = {mid: i for i, mid in enumerate(grid.push_messages(messages))}
    pending, replies = set(order), []
    deadline = time.monotonic() + timeout
    while pending:
        got = list(grid.pull_messages(sorted(pending, key=order.get)))
        replies += got
        pending -= {m.metadata.reply_to_message_id for m in got}
        if not pending or time.monotonic() >= deadline:
            break
        time.sleep(REPLY_POLL_S)
    # What follows (float sums in aggregation) must not depend on which reply came first.
    return sorted(replies, key=lambda m: order.get(m.metadata.reply_to_message_id, len(order)))


@dataclass
class Federation:
    """The sites that answered the server's first query: partition-id → node id and LoRA rank of
    those that take part, why the others refused, and what they reported about their data."""

    nodes: dict[int, int] = field(default_factory=dict)
    ranks: dict[int, int] = field(default_factory=dict)
    refused: dict[str, str] = field(default_factory=dict)  # "site <pid>" or "node <id>" -> reason
    sizes: dict[int, dict[str, int]] = field(default_factory=dict)


def discover_sites(grid: Grid, job: str, timeout: float, poll: float = 1.0) -> Federation:
    """Query every node once: its site id, rank, fedlora version and data sizes, or its refusal.

    Waits (up to `timeout` seconds, `connect-timeout`) until every one of the `num-partitions`
    sites the nodes report has answered; after that it goes on with those that did, naming the
    missing ones. A site that refuses the job (its policy, a bad file) or runs another fedlora
    version is left out and named; two nodes claiming one site id are an error naming both.
    """
    deadline = time.monotonic() + timeout
    fed, queried, claimed = Federation(), set(), {}  # claimed: pid -> node id
    expected = None
    while True:
        new = [n for n in grid.get_node_ids() if n not in queried]
        queried.update(new)
        msgs = [Message(RecordDict({"config": ConfigRecord({"job": job})}), message_type=MessageType.QUERY,
                        dst_node_id=n) for n in new]
        for reply in exchange(grid, msgs, timeout=max(deadline - time.monotonic(), 1.0)) if msgs else []:
            node = reply.metadata.src_node_id
            if reply.has_error():  # e.g. a bad node config: said now, not after connect-timeout
                fed.refused[f"node {node}"] = f"failed to answer: {reply.error.reason}"
                log(WARNING, "fedlora: node %d failed to answer the first query: %s", node, reply.error.reason)
                continue
            m = reply.content["metrics"]
            pid, num = int(m["partition-id"]), int(m["num-partitions"])
            if pid in claimed:
                raise RuntimeError(f"partition-id {pid} is claimed by nodes {claimed[pid]} and {node}: "
                                   "each site needs its own partition-id")
            claimed[pid] = node
            if expected is not None and num != expected:
                raise RuntimeError(f"sites disagree on num-partitions: {expected}, and {num} from node {node} "
                                   f"(site {pid})")
            expected = num
            version = str(reply.content["site"]["version"]) if "site" in reply.content else "unknown"
            if version != VERSION:
                fed.refused[f"site {pid}"] = f"runs fedlora {version}, the server {VERSION}"
            elif "refusal" in reply.content:
                fed.refused[f"site {pid}"] = str(reply.content["refusal"]["reason"])
            else:
                fed.nodes[pid], fed.ranks[pid] = node, int(m["lora-rank"])
                fed.sizes[pid] = {"train_rows": int(m["num-examples"]), "local_test_rows": int(m["num-test-examples"])}
        if expected is not None and len(claimed) >= expected:
            break
        if time.monotonic() > deadline:
            if not fed.nodes:
                raise RuntimeError(f"no usable site joined within connect-timeout = {timeout:.0f} s "
                                   f"({len(claimed)} of {expected or '?'} answered; refused: {fed.refused})")
            missing = sorted(set(range(expected)) - set(claimed)) if expected else []
            log(WARNING, "fedlora: going on without sites %s: not connected within connect-timeout = %.0f s",
                missing, timeout)
            break
        time.sleep(poll)
    for who, reason in sorted(fed.refused.items()):
        if who.startswith("site"):
            log(WARNING, "fedlora: %s left out: %s", who, reason)
    if not fed.nodes:
        raise RuntimeError("no usable site: " + "; ".join(f"{who} left out: {why}" for who, why in sorted(fed.refused.items())))
    return fed


class RoundsFailed(RuntimeError):
    """Several rounds in a row produced no usable reply although clients were asked: the
    federation is broken (clients crash or time out), so the run fails instead of going on
    with an unchanged model."""


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run `num-server-rounds` rounds of federated LoRA fine-tuning and write the outputs.

    `<output-dir>/status.json` says how the run ended: `completed`, `budget-exhausted` (every
    client that could still train refused: a clean, early end), `stopped` (on request, between two
    rounds: resumable) or `failed` (this function raised).
    """
    cfg = RunConfig.from_run_config(context.run_config)
    out_dir = Path(cfg.output_dir or Path.cwd() / "outputs" / datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ"))
    checkpoint = load_checkpoint(out_dir) if cfg.resume else None
    outputs = RunOutputs(out_dir, cfg, checkpoint)
    log(INFO, "fedlora %s: %s, %d rounds, outputs in %s%s", VERSION, cfg.strategy, cfg.num_server_rounds, out_dir,
        f", resuming after round {checkpoint.round}" if checkpoint else "")
    if cfg.dp and cfg.dp_reproducible:
        log(WARNING, "fedlora: %s", REPRODUCIBLE_WARNING)
    try:
        state, reason = _run(grid, cfg, outputs, checkpoint)
    except BaseException as exc:
        outputs.set_status("failed", f"{type(exc).__name__}: {exc}")
        raise
    finally:
        clear_stop(out_dir)  # acted on, or come too late: either way not for the next start
    outputs.set_status(state, reason)
    log(INFO, "fedlora: %s (%s)", state, reason)


def _run(grid: Grid, cfg: RunConfig, outputs: RunOutputs, checkpoint: Checkpoint | None) -> tuple[str, str]:
    """The round loop; returns the final state and why."""
    job = checkpoint.job if checkpoint else uuid.uuid4().hex
    fed = discover_sites(grid, job, timeout=cfg.connect_timeout)
    if cfg.clients_per_round > len(fed.nodes):
        log(WARNING, "fedlora: clients-per-round=%d but only %d sites take part: each round samples all of them",
            cfg.clients_per_round, len(fed.nodes))
    check_ranks(cfg.strategy, list(fed.ranks.values()))  # node configs may set ranks of their own
    method = get_method(cfg.strategy, cfg.to_run_config())
    server = _Server(cfg, grid, method, fed, outputs.dir, job)
    server.strategy.summary()
    outputs.save_data(data_report(cfg), server.test, fed, server.evaluation)

    if checkpoint:
        server.restore(checkpoint)
    else:
        t0 = time.perf_counter()
        outputs.write_round({"round": 0, "strategy": cfg.strategy, **server.evaluate(),
                             "seconds": time.perf_counter() - t0})
    failed_rounds = 0
    ending = ("completed", f"all {cfg.num_server_rounds} rounds ran")
    for rnd in range(server.next_round, cfg.num_server_rounds + 1):
        if not server.strategy.eligible():
            ending = ("budget-exhausted", f"stopped before round {rnd}: every client has spent its "
                      f"privacy budget ({'; '.join(server.strategy.exhausted.values())})")
            break
        if (asked := stop_request(outputs.dir)) is not None:
            ending = ("stopped", f"stopped before round {rnd}, {asked}")
            break
        row = server.round(rnd, final=rnd == cfg.num_server_rounds)
        outputs.write_round(row)
        save_checkpoint(outputs.dir, server.checkpoint(rnd, outputs.rows))
        failed_rounds = failed_rounds + 1 if row.get("skipped") and server.strategy.rejections else 0
        if failed_rounds >= cfg.max_failed_rounds:
            raise RoundsFailed(f"{failed_rounds} rounds in a row without a usable reply; last: "
                               f"{'; '.join(server.strategy.rejected)}")

    if cfg.dp:
        outputs.save_privacy(server.strategy)
    if ending[0] != "stopped":  # a paused run's model is in its checkpoint; the outputs come at its end
        server.save_final(outputs)
    return ending


class _Server:
    """What one round needs: the global model, the test data, the Flower strategy, the grid."""

    def __init__(self, cfg: RunConfig, grid: Grid, method: LoraMethod, fed: Federation, out_dir: Path,
                 job: str) -> None:
        self.cfg, self.grid, self.method, self.out_dir, self.job = cfg, grid, method, out_dir, job
        # None when the server holds no labelled data: then only clients that may release their
        # local metrics evaluate, and under DP nobody does.
        self.test = server_test(cfg)
        self.task = get_task(cfg)
        # The global adapter has the largest rank in use; each client gets its share (FlexLoRA, FLoRA).
        self.bundle = self.task.build_model(cfg.replace(lora_rank=max(fed.ranks.values())))
        if cfg.init_adapter:  # the clients get these factors with their first message
            warm_start(self.bundle, cfg.init_adapter)
        self.bundle.model.to(pick_device())
        self.arrays = to_record(global_state(self.bundle))
        self.strategy = LoraStrategy(method, partitions=fed.nodes, ranks=fed.ranks,
                                     clients_per_round=cfg.clients_per_round, seed=cfg.seed,
                                     evaluate_clients=cfg.evaluate_on in ("clients", "both"),
                                     max_update_norm=cfg.max_update_norm, min_clients=cfg.min_clients)
        self.predictions = None  # of the latest server evaluation, reused for predictions.json
        self.next_round = 1
        self.evaluation = _evaluation(cfg, self.test is not None)
        log(INFO if self.test is not None else WARNING, "fedlora: evaluation: %s", self.evaluation)

    def restore(self, checkpoint: Checkpoint) -> None:
        """Continue after the checkpoint's round. The nodes' state did not survive (a new Flower
        run), so every sent-once factor is sent again until each client answers."""
        self.arrays = to_record(checkpoint.arrays)
        load_state(self.bundle, checkpoint.arrays)  # the final outputs, should no round be left to run
        self.strategy.load_state_dict(checkpoint.strategy)
        self.strategy.contacted.clear()
        self.next_round = checkpoint.round + 1

    def checkpoint(self, rnd: int, rows: list[dict]) -> Checkpoint:
        return Checkpoint(round=rnd, job=self.job, arrays=from_record(self.arrays),
                          strategy=self.strategy.state_dict(), rows=list(rows),
                          run_config=self.cfg.to_run_config(), extra={})

    def save_final(self, outputs: RunOutputs) -> None:
        """The ended run's model: the global adapter (merged model, predictions), or, for a
        personalised method, the plot beside each client's adapter (written by the clients)."""
        if self.method.personalized:
            outputs.plot()
            log(INFO, "fedlora: each client's adapter in %s", outputs.dir / "adapters")
            return
        outputs.save_final(self.bundle, self.test, self.predictions, merged=self.method.changes_base)
        log(INFO, "fedlora: adapter in %s%s", outputs.dir / "adapter",
            f", merged model in {outputs.dir / 'merged'}" if self.method.changes_base else "")

    def evaluate(self) -> dict:
        """The global model on the server's test data (if the server evaluates and has any)."""
        if self.cfg.evaluate_on not in ("server", "both") or self.test is None:
            return {}
        res = self.task.evaluate(self.bundle, self.test, self.cfg)
        self.predictions = res.get("predictions")
        return {f"test_{k}": res[k] for k in ("accuracy", "loss", "perplexity") if k in res}

    def round(self, rnd: int, *, final: bool) -> dict:
        """Train, aggregate and evaluate; the row for metrics.jsonl.

        A round without enough usable replies leaves the model as it was and is marked
        `skipped`; it evaluates nothing unless it is the last (whose row carries the final
        model's metrics).
        """
        t0 = time.perf_counter()
        strategy, cfg = self.strategy, self.cfg
        log(INFO, "fedlora: round %d: training", rnd)
        messages = strategy.configure_train(rnd, self.arrays, ConfigRecord({"job": self.job}), self.grid)
        replies = exchange(self.grid, list(messages), timeout=cfg.round_timeout)
        new_arrays, train_metrics = strategy.aggregate_train(rnd, replies)
        row = {"round": rnd, "strategy": cfg.strategy, **dict(train_metrics),
               "rejected": rejection_counts(strategy.rejections)}
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
        eval_cfg = {"final": final, "job": self.job}
        if self.method.personalized and final:  # each client writes its own adapter
            eval_cfg["export-dir"] = str(self.out_dir / "adapters")
        eval_msgs = list(self.strategy.configure_evaluate(rnd, self.arrays, ConfigRecord(eval_cfg), self.grid))
        row["bytes_down"] += sum(payload_bytes(from_record(m.content["arrays"])) for m in eval_msgs)
        if eval_msgs:  # a log line per wait, so that `fedlora run` sees the run is alive
            log(INFO, "fedlora: round %d: %d clients evaluate", rnd, len(eval_msgs))
            client_metrics = dict(self.strategy.aggregate_evaluate(
                rnd, exchange(self.grid, eval_msgs, timeout=self.cfg.round_timeout)) or {})
            row.update(_personalized_names(client_metrics) if self.method.personalized else client_metrics)
            row["eval_rejected"] = rejection_counts(self.strategy.eval_rejections)
        load_state(self.bundle, from_record(self.arrays))
        started = time.perf_counter()
        row.update(self.evaluate())
        row["server_eval_seconds"] = time.perf_counter() - started


def _evaluation(cfg: RunConfig, server_has_data: bool) -> str:
    """Who evaluates the global model, in words (logged, and in data.json)."""
    where = []
    if cfg.evaluate_on in ("server", "both") and server_has_data:
        where.append("the server, on its test data")
    if cfg.evaluate_on in ("clients", "both"):
        where.append("the clients, on their local test rows, where their site allows it")
    if where:
        return " and ".join(where)
    return ("none: the server holds no labelled data (set server-test-data)"
            + (" and under dp=true no site may release local metrics" if cfg.dp else
               ", and evaluate-on is 'server'"))


def _personalized_names(metrics: dict) -> dict:
    """A personalised method's client metrics under the names a reader compares: `test_*` is each
    client's own model on the global test split (averaged), `personalized_*` on its local split."""
    names = {"global_accuracy": "test_accuracy", "global_loss": "test_loss",
             "client_accuracy": "personalized_accuracy", "client_loss": "personalized_loss"}
    return {names.get(k, k): v for k, v in metrics.items()}
