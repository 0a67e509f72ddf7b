"""The thin Flower adapter: one `flwr` Strategy that drives any pure `LoraMethod`.

It does what Flower's FedAvg would get wrong for LoRA: it samples partitions (not Flower's random
node ids) with a generator seeded by (seed, round), sends each client only what its method needs,
validates replies itself (error replies, wrong keys or shapes, non-finite or oversized updates and
implausible example counts are dropped and counted, with their reason and client, rather than
averaged), aggregates in partition order so that runs
are bit-for-bit reproducible, and keeps per-client values out of Flower's metric averaging.

A round in which no reply can be used (every sampled client refused, failed or timed out) is not
an error: `aggregate_train` returns no arrays, the model stays as it was, and the ServerApp marks
the round as skipped. Sent-once factors (FFA-LoRA's A, FedSA's initial B) go in every train or
evaluate message to a client until that client's first non-error reply.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from logging import INFO, WARNING
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from .base import ClientSpec, LoraMethod, State, lora_rank, normalized_weights

__all__ = ["MAX_EXAMPLES", "LoraStrategy", "from_record", "payload_bytes", "rejection_counts", "to_record"]

#: the largest num-examples a reply may report (a larger one is a bug or an attempt to dominate the average)
MAX_EXAMPLES = 10**9


def rejection_counts(rejections: Iterable[tuple[int, str]]) -> dict[str, list[int]]:
    """reason → the clients dropped for it (metrics.jsonl's `rejected`)."""
    out: dict[str, list[int]] = {}
    for pid, why in rejections:
        out.setdefault(why, []).append(pid)
    return {why: sorted(pids) for why, pids in out.items()}


def payload_bytes(state: Mapping[str, torch.Tensor]) -> int:
    """Σ numel × itemsize of the arrays of one message."""
    return sum(t.numel() * t.element_size() for t in state.values())


def to_record(state: Mapping[str, torch.Tensor]) -> ArrayRecord:
    return ArrayRecord(torch_state_dict={k: v.detach().cpu() for k, v in state.items()})


def from_record(record: ArrayRecord) -> State:
    return dict(record.to_torch_state_dict())


class LoraStrategy(Strategy):
    """Flower strategy over a `LoraMethod`.

    Parameters
    ----------
    method : LoraMethod
        The pure aggregation method (see `fedlora.strategies`).
    partitions : Mapping[int, int]
        partition-id → Flower node id of every connected client.
    ranks : Mapping[int, int] | None
        partition-id → the client's LoRA rank (default: the global state's rank for all).
    clients_per_round : int
        Clients sampled for training (and for client-side evaluation) each round; all of them
        when fewer are connected (sites may be left out of a job).
    seed : int
        Seeds client sampling: round t samples with a generator seeded by (seed, t).
    evaluate_clients : bool (default: False)
        Ask sampled clients to evaluate the global model on their local test split. A personalised
        method (FedSA) always evaluates on clients: those that trained in the round, and every
        client that ever trained when the config says `final` (they also export their adapter).
    max_update_norm : float (default: inf)
        An update whose L2 norm (over all its tensors) exceeds this is rejected: a finite but huge
        update would otherwise dominate the average.
    min_clients : int (default: 1)
        A round with fewer usable updates aggregates nothing (the model stays as it was).
    """

    def __init__(self, method: LoraMethod, *, partitions: Mapping[int, int], clients_per_round: int,
                 seed: int, evaluate_clients: bool = False, ranks: Mapping[int, int] | None = None,
                 max_update_norm: float = float("inf"), min_clients: int = 1) -> None:
        if not partitions:
            raise ValueError("no client to train: the federation is empty")
        self.method = method
        self.partitions = dict(partitions)
        self._pid_of_node = {node: pid for pid, node in self.partitions.items()}
        self.clients_per_round = clients_per_round
        self.seed = seed
        self.evaluate_clients = evaluate_clients or method.personalized
        self.ranks = dict(ranks or {})
        self.max_update_norm = max_update_norm
        self.min_clients = min_clients
        # Partitions that have answered a message without an error at least once: they surely hold
        # what is sent only once. Any non-error reply counts, a refusal and an evaluation too.
        self.contacted: set[int] = set()
        self.trained: list[int] = []  # partitions whose update was aggregated in the last round
        #: (partition, why) of each dropped reply of the last `aggregate_train` / `aggregate_evaluate`
        self.rejections: list[tuple[int, str]] = []
        self.eval_rejections: list[tuple[int, str]] = []
        # Privacy: each client's ε as it last reported it, its aggregated participations, and the
        # clients whose budget is spent (never sampled again): they refused, or said so with their
        # last update.
        self.epsilon: dict[int, float] = {}
        self.site_epsilon: dict[int, float] = {}
        self.participations: dict[int, int] = {}
        self.exhausted: dict[int, str] = {}  # partition -> the client's reason
        self._refused_now = 0
        self._state: State = {}
        self._sent: dict[int, State] = {}  # what each client of the current round was sent
        self._outbox: list[tuple[int, Message]] = []  # (partition, message) of the current request
        self._bytes_down = 0

    @property
    def rejected(self) -> list[str]:
        """Why each train reply of the last round was dropped, one line per client."""
        return [f"client {pid}: {why}" for pid, why in self.rejections]

    @property
    def eval_rejected(self) -> list[str]:
        return [f"client {pid}: {why}" for pid, why in self.eval_rejections]

    def eligible(self) -> list[int]:
        """Partitions that may still be sampled: all but those whose privacy budget is spent."""
        return sorted(set(self.partitions) - set(self.exhausted))

    def sample(self, server_round: int, stream: int = 0) -> list[int]:
        """Partition ids for a round, reproducible from (seed, round) and the eligible set alone;
        all eligible ones when fewer are left than `clients-per-round`."""
        rng = np.random.default_rng([self.seed, server_round, stream])
        pids = self.eligible()
        size = min(self.clients_per_round, len(pids))
        return sorted(int(p) for p in rng.choice(pids, size=size, replace=False)) if size else []

    def _message(self, pid: int, content: RecordDict, kind: str) -> Message:
        msg = Message(content, message_type=kind, dst_node_id=self.partitions[pid])
        self._outbox.append((pid, msg))
        return msg

    def _received(self, replies: Iterable[Message]) -> tuple[list[tuple[int, Message]], list[tuple[int, str]]]:
        """(partition, reply) of every reply without an error, and why the others count as dropped:
        error replies and partitions that sent none. Every partition that answered without an
        error is marked as contacted.

        A reply's partition is found by the message it answers (Flower sets message ids when it
        sends), else by its source node: an error made by the SuperLink for a node that went away
        carries no useful source node, but it still answers one of our messages."""
        by_id = {msg.metadata.message_id: pid for pid, msg in self._outbox if msg.metadata.message_id}
        got, dropped, answered = [], [], set()
        for reply in replies:
            pid = by_id.get(reply.metadata.reply_to_message_id,
                            self._pid_of_node.get(reply.metadata.src_node_id, -1))
            answered.add(pid)
            if reply.has_error():
                dropped.append((pid, f"error {reply.error.reason}"))
            else:
                got.append((pid, reply))
        self.contacted.update(pid for pid, _ in got if pid in self.partitions)
        dropped += [(pid, "no reply within round-timeout") for pid, _ in self._outbox if pid not in answered]
        self._outbox = []
        return got, dropped

    def _client(self, pid: int, *, first_contact: bool) -> ClientSpec:
        return ClientSpec(pid, self.ranks.get(pid, lora_rank(self._state)), first_contact)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        """One message per sampled partition, carrying only what its method sends down."""
        self._state = from_record(arrays)
        self._bytes_down = 0
        self._sent = {}
        self._outbox = []
        messages = []
        for pid in self.sample(server_round):
            payload = self.method.downlink(self._state, self._client(pid, first_contact=pid not in self.contacted))
            self._sent[pid] = payload
            self._bytes_down += payload_bytes(payload)
            cfg = ConfigRecord({**dict(config), "server-round": server_round})
            messages.append(self._message(pid, RecordDict({"arrays": to_record(payload), "config": cfg}),
                                          MessageType.TRAIN))
        return messages

    def _valid_updates(self, replies: Iterable[Message]) -> list[tuple[int, State, int, float | None]]:
        ok = []
        got, rejected = self._received(replies)
        for pid, reply in got:
            if pid not in self._sent:
                rejected.append((pid, "answered although it was not sampled"))
                continue
            sent = self._sent[pid]
            expected = self.method.uplink_keys(sent)
            metrics = reply.content["metrics"]
            if "train-seconds" in metrics:  # private clients do not release it (client/app.py)
                self._client_seconds = (self._client_seconds or 0.0) + float(metrics["train-seconds"])
            if "epsilon" in metrics:
                self.epsilon[pid] = float(metrics["epsilon"])
            if "site-epsilon" in metrics:  # the site's lifetime spend, all its jobs together
                self.site_epsilon[pid] = float(metrics["site-epsilon"])
            if "budget-spent" in reply.content:  # trained its last affordable round: counted, not sampled again
                self.exhausted[pid] = str(reply.content["budget-spent"]["reason"])
            if int(metrics.get("refused", 0)):
                # An explicit refusal (its privacy budget is spent): filtered out, never sampled again.
                self.exhausted[pid] = str(reply.content["refusal"]["reason"]) if "refusal" in reply.content else ""
                self._refused_now += 1
                continue
            update = from_record(reply.content["arrays"])
            problem = self._problem(update, sent, expected, metrics.get("num-examples"))
            if problem:
                rejected.append((pid, problem))
                continue
            ok.append((pid, update, int(metrics["num-examples"]), metrics.get("train-loss")))
        ok.sort(key=lambda item: item[0])  # a fixed order makes the float sums reproducible
        self.rejections = rejected
        return ok

    def _problem(self, update: State, sent: State, expected: list[str], num_examples: Any) -> str | None:
        """Why an update cannot be aggregated (None if it can). Checked in order of cost."""
        if isinstance(num_examples, bool) or not isinstance(num_examples, (int, float)) \
                or not float(num_examples).is_integer():
            return f"reported num-examples={num_examples!r}, not an integer"
        if not 0 < num_examples <= MAX_EXAMPLES:
            return (f"reported num-examples={int(num_examples)}, outside 1..{MAX_EXAMPLES:.0e}" if num_examples
                    else "reported no training examples")
        if sorted(update) != sorted(expected):
            return f"sent keys {sorted(set(update) ^ set(expected))[:4]} out of line with {self.method.name}"
        if any(update[k].shape != sent[k].shape for k in expected):
            return "sent arrays of the wrong shape"
        if not all(bool(torch.isfinite(update[k]).all()) for k in expected):
            return "sent non-finite values"
        norm = float(torch.sqrt(sum(update[k].double().square().sum() for k in expected)))
        if norm > self.max_update_norm:
            return f"sent an update of norm {norm:.4g} > max-update-norm {self.max_update_norm:g}"
        return None

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord]:
        """Validate replies, then aggregate the valid ones with the method.

        Returns no arrays when no reply can be used (refusals, dropped or missing replies): the
        global state stays as it was, and `self.rejected` says why each reply was dropped.
        """
        self._refused_now, self._client_seconds = 0, None
        ok = self._valid_updates(replies)
        for reason in self.rejected:
            log(WARNING, "round %d: dropped reply from %s", server_round, reason)
        if 0 < len(ok) < self.min_clients:
            # Too few to aggregate (a small average would reveal too much of one client, or too
            # little of the federation): the round is skipped, and these clients say why.
            self.rejections += [(pid, f"one of {len(ok)} usable replies, fewer than min-clients={self.min_clients}")
                                for pid, *_ in ok]
            ok = []
        self.trained = [pid for pid, *_ in ok]
        for pid in self.trained:
            self.participations[pid] = self.participations.get(pid, 0) + 1
        counts = {"num_clients": len(ok), "num_rejected": len(self.rejections), "bytes_down": self._bytes_down}
        if self._client_seconds is not None:  # the replies' own training time, summed: the rest is the harness's
            counts["client_train_seconds"] = self._client_seconds
        if not ok:
            return None, MetricRecord({**counts, "bytes_up": 0})
        weights = normalized_weights([n for _, _, n, _ in ok])
        self._state = self.method.aggregate(self._state, [u for _, u, _, _ in ok], weights)
        losses = [loss for *_, loss in ok]
        metrics = MetricRecord({
            # absent when clients keep their loss to themselves (DP: it is computed from private records)
            **({"train_loss": float(sum(w * float(x) for w, x in zip(weights.tolist(), losses)))}
               if None not in losses else {}),
            **counts,
            "bytes_up": sum(payload_bytes(u) for _, u, _, _ in ok),
            **self.method.round_metrics(),
        })
        return to_record(self._state), metrics

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        """Client-side evaluation, if enabled: each client gets the global state at its rank.

        A personalised method evaluates the clients that trained this round (their own B is
        fresh), and every client that ever trained when `config["final"]` is set.
        """
        if not self.evaluate_clients:
            return []
        self._state = from_record(arrays)
        self._outbox = []
        if self.method.personalized:
            pids = sorted(self.contacted) if config.get("final", False) else self.trained
        else:
            pids = self.sample(server_round, stream=1)
        cfg = ConfigRecord({**dict(config), "server-round": server_round})
        return [self._message(pid, RecordDict({
            "arrays": to_record(self.method.downlink(
                self._state, self._client(pid, first_contact=pid not in self.contacted))),
            "config": cfg}), MessageType.EVALUATE) for pid in pids]

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Example-weighted means of the clients' accuracy and loss (those every reply has), and
        for a causal LM the perplexity of that mean loss.

        `client_*` on their local test splits; for a personalised method also `global_*`: each
        client's own model on the global test split, a plain mean over clients (same split).
        Dropped replies (errors, missing, no examples) are counted in `client_eval_rejected` and
        named in `self.eval_rejected`, as dropped train replies are.
        """
        got, rejected = self._received(replies)
        rows = []
        seconds = sum(float(reply.content["metrics"].get("eval-seconds", 0.0)) for _, reply in got
                      if "metrics" in reply.content)
        for pid, reply in got:
            if "refusal" in reply.content:  # the site does not let its local metrics leave it
                rejected.append((pid, f"refused: {reply.content['refusal']['reason']}"))
            elif int(reply.content["metrics"].get("num-examples", 0)) <= 0:
                rejected.append((pid, "evaluated no examples"))
            else:
                rows.append(reply.content["metrics"])
        self.eval_rejections = rejected
        for reason in self.eval_rejected:
            log(WARNING, "round %d: dropped evaluation reply from %s", server_round, reason)
        if not rows:
            return MetricRecord({"client_evaluated": 0, "client_eval_rejected": len(rejected),
                                 "client_eval_seconds": seconds}) if rejected else None
        n = np.array([int(m["num-examples"]) for m in rows], dtype=np.float64)
        out = {"client_evaluated": len(rows), "client_eval_rejected": len(rejected), "client_eval_seconds": seconds}
        for key in ("accuracy", "loss"):  # a causal LM without label-like answers has no accuracy
            if all(key in m for m in rows):
                out[f"client_{key}"] = float(n @ np.array([float(m[key]) for m in rows]) / n.sum())
            if all(f"global-{key}" in m for m in rows):
                out[f"global_{key}"] = float(np.mean([float(m[f"global-{key}"]) for m in rows]))
        if "client_loss" in out and all("perplexity" in m for m in rows):
            # the perplexity of the mean loss per answer token, not a mean of perplexities
            out["client_perplexity"] = math.exp(min(out["client_loss"], 700.0))
        return MetricRecord(out)

    def summary(self) -> None:
        log(INFO, "\t├── method: %s (%s); clients train %s", self.method.name, self.method.paper,
            "A and B" if self.method.trains_a else "B only")
        log(INFO, "\t└── %d of %d clients per round, seed %d", self.clients_per_round,
            len(self.partitions), self.seed)

    def privacy_metrics(self) -> dict[str, Any]:
        """Per-client ε (kept out of Flower's metric averaging: a mean ε would hide the worst
        client), its max and mean, and how many sampled clients refused this round."""
        eps = {str(pid): e for pid, e in sorted(self.epsilon.items())}
        return {"epsilon": eps, "epsilon_max": max(eps.values(), default=0.0),
                "epsilon_mean": float(np.mean(list(eps.values()))) if eps else 0.0, "refused": self._refused_now}

    def state_dict(self) -> dict[str, Any]:
        return {"method": self.method.state_dict(), "contacted": sorted(self.contacted), "trained": self.trained,
                "epsilon": dict(self.epsilon), "site_epsilon": dict(self.site_epsilon),
                "participations": dict(self.participations),
                "exhausted": dict(self.exhausted)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.method.load_state_dict(state["method"])
        self.contacted = set(state["contacted"])
        self.trained = list(state["trained"])
        self.epsilon = {int(k): float(v) for k, v in state["epsilon"].items()}
        self.site_epsilon = {int(k): float(v) for k, v in state.get("site_epsilon", {}).items()}
        self.participations = {int(k): int(v) for k, v in state["participations"].items()}
        self.exhausted = {int(k): str(v) for k, v in state["exhausted"].items()}
