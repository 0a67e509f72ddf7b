"""The Flower adapter (`strategies/flower.py`) without a running Flower: seeded sampling by
partition, what goes down on first contact, and how bad replies are dropped and counted."""

from __future__ import annotations

import math

import pytest
import torch
from flwr.app import ConfigRecord, Error, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fedlora.strategies import get_method
from fedlora.strategies.flower import LoraStrategy, from_record, payload_bytes, to_record

PARTITIONS = {pid: 1000 + pid for pid in range(6)}  # partition-id -> node id


@pytest.fixture(autouse=True)
def task_identity(monkeypatch):
    """Messages need a run id, which Flower sets inside a real run."""
    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    monkeypatch.setattr(TaskIdentity, "_task_id", 0)


def _state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"l.lora_A": torch.randn(2, 5, generator=g), "l.lora_B": torch.zeros(4, 2),
            "head.w": torch.randn(3, 4, generator=g)}


def _strategy(name: str = "ffa", k: int = 3) -> LoraStrategy:
    return LoraStrategy(get_method(name), partitions=PARTITIONS, clients_per_round=k, seed=7)


def _reply(msg: Message, arrays: dict, num_examples: int = 10, loss: float = 1.0) -> Message:
    metrics = MetricRecord({"num-examples": num_examples, "train-loss": loss})
    return Message(RecordDict({"arrays": to_record(arrays), "metrics": metrics}), reply_to=msg)


def test_sampling_is_seeded_by_round_not_by_node_ids():
    a, b = _strategy(), _strategy()
    rounds = [a.sample(r) for r in range(1, 9)]
    assert rounds == [b.sample(r) for r in range(1, 9)]
    assert all(len(set(s)) == 3 and set(s) <= set(PARTITIONS) for s in rounds)
    assert len({tuple(s) for s in rounds}) > 1  # rounds differ
    other = LoraStrategy(get_method("ffa"), partitions=PARTITIONS, clients_per_round=3, seed=8)
    assert [other.sample(r) for r in range(1, 9)] != rounds


def test_ffa_sends_a_until_a_client_has_answered():
    strategy, state = _strategy(k=6), _state()
    msgs = list(strategy.configure_train(1, to_record(state), ConfigRecord(), grid=None))
    assert all("l.lora_A" in m.content["arrays"] for m in msgs)
    answered = msgs[:4]  # two clients never answer (lost message, timeout)
    b = {"l.lora_B": torch.ones(4, 2), "head.w": torch.zeros(3, 4)}
    strategy.aggregate_train(1, [_reply(m, b) for m in answered])
    msgs2 = {m.metadata.dst_node_id: m for m in strategy.configure_train(2, to_record(state), ConfigRecord(), None)}
    for m in answered:
        assert "l.lora_A" not in msgs2[m.metadata.dst_node_id].content["arrays"]
    for m in msgs[4:]:
        assert "l.lora_A" in msgs2[m.metadata.dst_node_id].content["arrays"]


def test_bad_replies_are_dropped_and_counted():
    strategy, state = _strategy("fedsvd", k=5), _state()
    msgs = list(strategy.configure_train(1, to_record(state), ConfigRecord(), None))
    good = {"l.lora_B": torch.full((4, 2), 2.0), "head.w": torch.ones(3, 4)}
    replies = [
        _reply(msgs[0], good, num_examples=30, loss=0.5),
        _reply(msgs[1], {**good, "l.lora_B": torch.full((4, 2), float("nan"))}),  # non-finite
        _reply(msgs[2], {**good, "l.lora_A": torch.zeros(2, 5)}),  # sends A under a B-only method
        _reply(msgs[3], {**good, "l.lora_B": torch.zeros(5, 2)}),  # wrong shape
        _reply(msgs[4], good, num_examples=0),  # no examples
    ]
    arrays, metrics = strategy.aggregate_train(1, replies)
    assert metrics["num_clients"] == 1 and metrics["num_rejected"] == 4
    assert metrics["train_loss"] == 0.5
    new = from_record(arrays)
    torch.testing.assert_close(new["l.lora_B"] @ new["l.lora_A"], good["l.lora_B"] @ state["l.lora_A"])
    assert metrics["bytes_up"] == payload_bytes(good)
    assert metrics["bytes_down"] == 5 * payload_bytes(state)


def _refusal(msg: Message) -> Message:
    metrics = MetricRecord({"num-examples": 0, "refused": 1, "epsilon": 5.9})
    return Message(RecordDict({"arrays": to_record({}), "metrics": metrics,
                               "refusal": ConfigRecord({"reason": "budget spent"})}), reply_to=msg)


def test_a_round_without_a_usable_reply_is_skipped_not_an_error():
    strategy, state = _strategy("fedit", k=3), _state()
    msgs = list(strategy.configure_train(1, to_record(state), ConfigRecord(), None))
    # One client refuses (budget spent), one sends nothing usable, one fails: no update at all.
    replies = [_refusal(msgs[0]), _reply(msgs[1], state, num_examples=0),
               Message(Error(code=0, reason="out of memory"), reply_to=msgs[2])]
    arrays, metrics = strategy.aggregate_train(1, replies)
    assert arrays is None  # the ServerApp keeps the model and marks the round skipped
    assert metrics["num_clients"] == 0 and metrics["num_rejected"] == 2 and metrics["bytes_up"] == 0
    assert any("reported no training examples" in r for r in strategy.rejected)
    assert any("out of memory" in r for r in strategy.rejected)
    assert strategy.privacy_metrics()["refused"] == 1 and len(strategy.exhausted) == 1


def test_a_client_whose_last_update_says_its_budget_is_spent_is_aggregated_then_never_sampled():
    strategy, state = _strategy("fedsvd", k=3), _state()
    msgs = list(strategy.configure_train(1, to_record(state), ConfigRecord(), None))
    b = {"l.lora_B": torch.ones(4, 2), "head.w": torch.zeros(3, 4)}
    last = _reply(msgs[0], b)
    last.content["budget-spent"] = ConfigRecord({"reason": "client 0: one more round would spend ε = 6.2"})
    arrays, metrics = strategy.aggregate_train(1, [last, *(_reply(m, b) for m in msgs[1:])])
    assert arrays is not None and metrics["num_clients"] == 3  # its update counts: it is within budget
    spent = msgs[0].metadata.dst_node_id - 1000  # PARTITIONS: partition k is node 1000 + k
    assert strategy.exhausted == {spent: "client 0: one more round would spend ε = 6.2"}
    assert strategy.privacy_metrics()["refused"] == 0
    later = [strategy.sample(r) for r in range(2, 12)]
    assert all(len(s) == 3 and spent not in s for s in later)  # the round keeps its size without it


def test_missing_and_failed_replies_are_named_by_the_message_they_answer():
    """A reply is attributed through the message it answers (Flower sets message ids when it
    sends), so an error made by the SuperLink for a vanished node names the right client, and a
    client that never answered is counted too."""
    strategy, state = _strategy("fedit", k=3), _state()
    msgs = list(strategy.configure_train(1, to_record(state), ConfigRecord(), None))
    pid_of = {node: pid for pid, node in PARTITIONS.items()}
    for i, m in enumerate(msgs):
        m.metadata.__dict__["_message_id"] = f"msg-{i}"
    lost = Message(Error(code=0, reason="node went away"), reply_to=msgs[0])
    lost.metadata.__dict__["_src_node_id"] = 0  # what a SuperLink-made error carries
    _, metrics = strategy.aggregate_train(1, [lost, _reply(msgs[1], state)])
    assert metrics["num_clients"] == 1 and metrics["num_rejected"] == 2
    first, last = pid_of[msgs[0].metadata.dst_node_id], pid_of[msgs[2].metadata.dst_node_id]
    assert f"client {first}: error node went away" in strategy.rejected
    assert f"client {last}: no reply within round-timeout" in strategy.rejected


def test_state_dict_round_trip():
    strategy = _strategy()
    strategy.contacted = {1, 4}
    clone = _strategy()
    clone.load_state_dict(strategy.state_dict())
    assert clone.contacted == {1, 4}


def _big_state(rank: int = 4) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {"l.lora_A": torch.randn(rank, 6, generator=g), "l.lora_B": torch.randn(5, rank, generator=g),
            "head.w": torch.randn(3, 4, generator=g)}


def test_mixed_ranks_go_down_and_are_checked_at_each_clients_rank():
    ranks = {pid: (2, 4)[pid % 2] for pid in PARTITIONS}
    strategy = LoraStrategy(get_method("flexlora"), partitions=PARTITIONS, clients_per_round=4, seed=7,
                            ranks=ranks)
    msgs = list(strategy.configure_train(1, to_record(_big_state()), ConfigRecord(), None))
    pid_of = {node: pid for pid, node in PARTITIONS.items()}
    replies = []
    for m in msgs:
        sent = from_record(m.content["arrays"])
        r = ranks[pid_of[m.metadata.dst_node_id]]
        assert sent["l.lora_A"].shape == (r, 6) and sent["l.lora_B"].shape == (5, r)
        replies.append(_reply(m, {k: v + 1 for k, v in sent.items()}))
    wrong = {k: v + 1 for k, v in from_record(msgs[0].content["arrays"]).items()}
    wrong["l.lora_A"] = torch.zeros(3, 6)  # a rank this client does not have
    arrays, metrics = strategy.aggregate_train(1, [_reply(msgs[0], wrong), *replies[1:]])
    assert metrics["num_rejected"] == 1 and metrics["num_clients"] == len(msgs) - 1
    assert from_record(arrays)["l.lora_A"].shape == (4, 6)  # the global adapter keeps the largest rank


def test_fedsa_never_sends_b_after_first_contact_and_evaluates_its_trained_clients():
    strategy = _strategy("fedsa", k=2)
    state = _big_state()
    msgs = list(strategy.configure_train(1, to_record(state), ConfigRecord(), None))
    assert all("l.lora_B" in m.content["arrays"] for m in msgs)  # first contact: B = the init
    up = {"l.lora_A": torch.ones(4, 6), "head.w": torch.ones(3, 4)}
    arrays, _ = strategy.aggregate_train(1, [_reply(m, up) for m in msgs])
    torch.testing.assert_close(from_record(arrays)["l.lora_B"], state["l.lora_B"])  # B is not aggregated
    evals = list(strategy.configure_evaluate(1, arrays, ConfigRecord({"final": False}), None))
    assert sorted(m.metadata.dst_node_id for m in evals) == sorted(m.metadata.dst_node_id for m in msgs)
    assert all("l.lora_B" not in m.content["arrays"] for m in evals)
    later = list(strategy.configure_train(2, arrays, ConfigRecord(), None))
    trained = {m.metadata.dst_node_id for m in msgs}
    assert all("l.lora_B" not in m.content["arrays"] for m in later if m.metadata.dst_node_id in trained)
    final = list(strategy.configure_evaluate(2, arrays, ConfigRecord({"final": True}), None))
    assert {m.metadata.dst_node_id for m in final} == {PARTITIONS[p] for p in strategy.contacted}


def test_a_reply_from_a_client_that_was_not_sampled_is_dropped():
    strategy, state = _strategy("fedit", k=2), _state()
    msgs = list(strategy.configure_train(1, to_record(state), ConfigRecord(), None))
    stranger = Message(RecordDict({"config": ConfigRecord({})}), message_type="train",
                       dst_node_id=next(n for n in PARTITIONS.values()
                                        if n not in {m.metadata.dst_node_id for m in msgs}))
    arrays, metrics = strategy.aggregate_train(1, [_reply(msgs[0], state), _reply(stranger, state)])
    assert metrics["num_clients"] == 1 and metrics["num_rejected"] == 2  # the stranger, and msgs[1]'s silence
    assert any("answered although it was not sampled" in r for r in strategy.rejected)


def test_ffa_evaluators_that_never_trained_get_a_until_they_answer():
    """Client-side evaluation with partial participation: an evaluator that has not answered yet
    must get the sent-once A with the model, and failed evaluation replies are counted."""
    strategy = LoraStrategy(get_method("ffa"), partitions=PARTITIONS, clients_per_round=2, seed=2,
                            evaluate_clients=True)  # seed 2: trains [1, 5], evaluates [0, 2]
    state = _state()
    trained = list(strategy.configure_train(1, to_record(state), ConfigRecord(), None))
    b = {"l.lora_B": torch.ones(4, 2), "head.w": torch.zeros(3, 4)}
    arrays, _ = strategy.aggregate_train(1, [_reply(m, b) for m in trained])
    trained_nodes = {m.metadata.dst_node_id for m in trained}
    evals = list(strategy.configure_evaluate(1, arrays, ConfigRecord({"final": False}), None))
    assert any(m.metadata.dst_node_id not in trained_nodes for m in evals[1:])  # this seed's sample
    for m in evals:
        assert ("l.lora_A" in m.content["arrays"]) == (m.metadata.dst_node_id not in trained_nodes)
    ok = Message(RecordDict({"metrics": MetricRecord({"num-examples": 5, "accuracy": 0.5, "loss": 1.0})}),
                 reply_to=evals[0])
    failed = [Message(Error(code=0, reason="no A"), reply_to=m) for m in evals[1:]]
    metrics = strategy.aggregate_evaluate(1, [ok, *failed])
    assert metrics["client_evaluated"] == 1 and metrics["client_eval_rejected"] == len(failed)
    assert all("no A" in r for r in strategy.eval_rejected)
    # The evaluator that answered holds A now; those that failed still get it.
    again = {m.metadata.dst_node_id: m for m in strategy.configure_evaluate(1, arrays, ConfigRecord({}), None)}
    assert "l.lora_A" not in again[evals[0].metadata.dst_node_id].content["arrays"]
    for m in evals[1:]:
        held = m.metadata.dst_node_id in trained_nodes
        assert ("l.lora_A" in again[m.metadata.dst_node_id].content["arrays"]) != held


def test_causal_lm_client_evaluations_average_the_loss_and_give_its_perplexity():
    """A causal LM without label-like answers reports loss and perplexity but no accuracy: the
    server averages what every reply has, weighted by examples, and the perplexity is that mean
    loss's (not a mean of perplexities)."""
    strategy = LoraStrategy(get_method("fedit"), partitions=PARTITIONS, clients_per_round=2, seed=2,
                            evaluate_clients=True)
    evals = list(strategy.configure_evaluate(1, to_record(_state()), ConfigRecord({"final": False}), None))
    losses, counts = (1.0, 3.0), (3, 1)
    replies = [Message(RecordDict({"metrics": MetricRecord({"num-examples": n, "loss": loss,
                                                            "perplexity": math.exp(loss)})}), reply_to=m)
               for m, loss, n in zip(evals, losses, counts)]
    metrics = strategy.aggregate_evaluate(1, replies)
    assert metrics["client_evaluated"] == 2 and "client_accuracy" not in metrics
    assert metrics["client_loss"] == pytest.approx(1.5)
    assert metrics["client_perplexity"] == pytest.approx(math.exp(1.5))


def test_a_fedsa_client_whose_reply_was_dropped_is_not_sent_the_initial_b_again():
    """Any reply without an error means the client holds the sent-once factor (FedSA: its own B
    from then on), even when the reply itself is rejected."""
    strategy = _strategy("fedsa", k=len(PARTITIONS))
    state = _big_state()
    msgs = list(strategy.configure_train(1, to_record(state), ConfigRecord(), None))
    bad = {"l.lora_A": torch.full((4, 6), float("nan")), "head.w": torch.ones(3, 4)}  # rejected
    good = {"l.lora_A": torch.ones(4, 6), "head.w": torch.ones(3, 4)}
    replies = [_reply(msgs[0], bad), *(_reply(m, good) for m in msgs[1:-1])]  # the last one is silent
    arrays, metrics = strategy.aggregate_train(1, replies)
    assert metrics["num_rejected"] == 2
    later = {m.metadata.dst_node_id: m for m in strategy.configure_train(2, arrays, ConfigRecord(), None)}
    for m in msgs[:-1]:
        assert "l.lora_B" not in later[m.metadata.dst_node_id].content["arrays"]
    assert "l.lora_B" in later[msgs[-1].metadata.dst_node_id].content["arrays"]  # it may not hold B


def test_client_training_time_is_summed_where_clients_report_it_and_absent_where_they_do_not():
    """Private clients do not release their training time (it follows their secret batch sizes):
    the round then has no `client_train_seconds`, rather than a misleading 0."""
    strategy, state = _strategy(k=2), _state()
    b = {"l.lora_B": torch.ones(4, 2), "head.w": torch.zeros(3, 4)}
    msgs = list(strategy.configure_train(1, to_record(state), ConfigRecord(), grid=None))
    replies = [_reply(m, b) for m in msgs]
    for reply, seconds in zip(replies, (1.5, 2.0), strict=True):
        reply.content["metrics"]["train-seconds"] = seconds
    _, metrics = strategy.aggregate_train(1, replies)
    assert metrics["client_train_seconds"] == pytest.approx(3.5)
    msgs = list(strategy.configure_train(2, to_record(state), ConfigRecord(), grid=None))
    _, metrics = strategy.aggregate_train(2, [_reply(m, b) for m in msgs])
    assert "client_train_seconds" not in metrics
