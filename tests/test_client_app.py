"""The ClientApp's train and evaluate handlers called directly, without Flower running: the DP
settings a client derives, where its ledger comes from, its refusal, and what it keeps between
messages (sent-once and personal factors)."""

from __future__ import annotations

import json

import pytest
import torch
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from opacus.accountants import PRVAccountant
from opacus.accountants.utils import get_noise_multiplier

from fedlora.client import app as client_app
from fedlora.core.config import RunConfig
from fedlora.core.data import client_data
from fedlora.core.model import build_model, global_state
from fedlora.privacy import PrivacyLedger, ledger_path
from fedlora.strategies.flower import from_record, to_record

pytestmark = pytest.mark.usefixtures("task_identity")

NUM = 3  # partitions


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def run_config(tiny_overrides, tmp_path) -> dict:
    return {**tiny_overrides, "dp": True, "output-dir": str(tmp_path), "local-steps": 2}


def _context(run_config: dict, pid: int = 0) -> Context:
    return Context(run_id=1, node_id=100 + pid, node_config={"partition-id": pid, "num-partitions": NUM},
                   state=RecordDict(), run_config=dict(run_config))


def _init(run_config: dict) -> dict[str, torch.Tensor]:
    cfg = RunConfig.from_run_config(run_config)
    return global_state(build_model(cfg, 3, {0: "neg", 1: "neu", 2: "pos"}))


def _message(arrays: dict, server_round: int, kind: str = MessageType.TRAIN) -> Message:
    return Message(RecordDict({"arrays": to_record(arrays), "config": ConfigRecord({"server-round": server_round})}),
                   message_type=kind, dst_node_id=100)


def _train(run_config: dict, context: Context, server_round: int, arrays: dict | None = None) -> Message:
    return client_app.train(_message(arrays if arrays is not None else _init(run_config), server_round), context)


def _fresh_ledger(cfg: RunConfig) -> PrivacyLedger:
    return PrivacyLedger(cfg.target_epsilon, cfg.target_delta, cfg.accountant)


def test_sigma_is_opacus_answer_for_this_clients_rate_and_planned_steps(run_config):
    cfg = RunConfig.from_run_config({**run_config, "dp-max-participations": 3})
    n = len(client_data(cfg, 0, NUM).train)
    dp, why_not = client_app._dp_settings(cfg, _fresh_ledger(cfg), "job", n)
    assert why_not == ""
    q = min(1.0, cfg.batch_size / n)
    assert dp.sample_rate == q and dp.max_grad_norm == cfg.max_grad_norm and not dp.reproducible
    assert dp.noise_multiplier == pytest.approx(get_noise_multiplier(
        target_epsilon=cfg.target_epsilon, target_delta=cfg.target_delta, sample_rate=q,
        steps=3 * cfg.local_steps, accountant="prv"), rel=1e-12)
    assert client_app._dp_settings(cfg.replace(dp_reproducible=True), _fresh_ledger(cfg), "job", n)[0].reproducible


def test_a_dp_reply_carries_the_ledgers_epsilon_and_no_loss(run_config, tmp_path):
    context = _context(run_config)
    reply = _train(run_config, context, 1)
    metrics = reply.content["metrics"]
    assert "train-loss" not in metrics and int(metrics["num-examples"]) > 0
    cfg = RunConfig.from_run_config(run_config)
    dp, _ = client_app._dp_settings(cfg, _fresh_ledger(cfg), "", int(metrics["num-examples"]))
    independent = PRVAccountant()
    for _ in range(cfg.local_steps):
        independent.step(noise_multiplier=dp.noise_multiplier, sample_rate=dp.sample_rate)
    assert float(metrics["epsilon"]) == pytest.approx(independent.get_epsilon(delta=cfg.target_delta), rel=1e-6)
    on_disk = PrivacyLedger.load(ledger_path(tmp_path, 0))
    assert [p["round"] for p in on_disk.participations] == [1]
    assert sorted(from_record(reply.content["arrays"])) == sorted(
        k for k in _init(run_config) if k.endswith("lora_B") or k.startswith("head."))  # fedsvd: B + head


def test_the_ledger_comes_from_node_state_else_from_its_file(run_config, tmp_path):
    run_config = {**run_config, "dp-max-participations": 4}
    first = _context(run_config)
    _train(run_config, first, 1)
    spent = PrivacyLedger.load(ledger_path(tmp_path, 0)).epsilon
    # A restarted node (empty state) continues from the file: round 2 adds to round 1's budget.
    restarted = _context(run_config)
    eps2 = float(_train(run_config, restarted, 2).content["metrics"]["epsilon"])
    assert eps2 > spent
    assert [p["round"] for p in PrivacyLedger.load(ledger_path(tmp_path, 0)).participations] == [1, 2]
    # A node with state uses it, not the file: a lost file does not reset what it has spent.
    ledger_path(tmp_path, 0).unlink()
    eps3 = float(_train(run_config, restarted, 3).content["metrics"]["epsilon"])
    assert eps3 > eps2
    assert [p["round"] for p in PrivacyLedger.load(ledger_path(tmp_path, 0)).participations] == [1, 2, 3]
    # An altered file is refused with an error that names it.
    fresh = _context(run_config)
    state = json.loads(ledger_path(tmp_path, 0).read_text())
    state["participations"][-1]["epsilon"] /= 2
    ledger_path(tmp_path, 0).write_text(json.dumps(state))
    with pytest.raises(Exception, match=f"{ledger_path(tmp_path, 0)}: the stored ε"):
        _train(run_config, fresh, 4)


def test_a_client_past_its_budget_refuses_without_training(run_config, tmp_path):
    config = {**run_config, "dp-max-participations": 1}
    context = _context(config)
    _train(config, context, 1)
    before = PrivacyLedger.load(ledger_path(tmp_path, 0)).state_dict()
    reply = _train(config, context, 2)
    metrics = reply.content["metrics"]
    assert int(metrics["refused"]) == 1 and int(metrics["num-examples"]) == 0
    assert len(reply.content["arrays"]) == 0
    assert "one more round would spend" in str(reply.content["refusal"]["reason"])
    assert float(metrics["epsilon"]) == before["participations"][-1]["epsilon"]
    assert PrivacyLedger.load(ledger_path(tmp_path, 0)).state_dict() == before  # nothing recorded
    sent, bundle = _init(config), client_app._bundle(RunConfig.from_run_config(config))
    assert all(torch.equal(bundle.params[k], sent[k]) for k in sent if k in bundle.params)  # nothing trained


def test_the_last_affordable_update_says_the_budget_is_spent(run_config, tmp_path):
    config = {**run_config, "dp-max-participations": 2, "num-server-rounds": 5}
    context = _context(config)
    first, second = _train(config, context, 1), _train(config, context, 2)
    assert "budget-spent" not in first.content
    assert "client 0: one more round would spend" in str(second.content["budget-spent"]["reason"])
    assert len(second.content["arrays"]) > 0 and "refused" not in second.content["metrics"]  # an update
    assert [p["round"] for p in PrivacyLedger.load(ledger_path(tmp_path, 0)).participations] == [1, 2]
    # In the run's last round there is no next round to ask about.
    last = {**config, "num-server-rounds": 1, "dp-max-participations": 1}
    assert "budget-spent" not in _train(last, _context(last, pid=1), 1).content


def test_a_sent_once_factor_the_client_holds_is_never_overwritten(run_config):
    """FFA-LoRA's A arrives on first contact and is resent until the server sees a reply; a
    resent (here: different) A must not replace the one the client trained against."""
    config = {**run_config, "dp": False, "strategy": "ffa"}
    context = _context(config)
    init = _init(config)
    _train(config, context, 1, init)
    other = {k: (v + 1 if k.endswith("lora_A") else v) for k, v in init.items()}
    _train(config, context, 2, other)
    kept = from_record(context.state[client_app._KEPT])
    assert all(torch.equal(kept[k], init[k]) for k in init if k.endswith("lora_A"))


@pytest.mark.parametrize("strategy, kept_suffix", [("fedsvd", None), ("fedit", None), ("ffa", "lora_A"),
                                                    ("fedsa", "lora_B")])
def test_a_nodes_state_holds_only_what_the_server_does_not_resend(run_config, strategy, kept_suffix):
    """With 1000 virtual clients every node's state stays in memory: it must hold the sent-once
    factor (FFA's A, FedSA's own B) and nothing else, not an adapter per client."""
    config = {**run_config, "dp": False, "strategy": strategy, "evaluate-on": "clients" if strategy == "fedsa" else "server"}
    context = _context(config)
    init = _init(config)
    _train(config, context, 1, init)
    kept = from_record(context.state[client_app._KEPT])
    expected = sorted(k for k in init if kept_suffix and k.endswith(kept_suffix))
    assert sorted(kept) == expected


def test_fedsa_keeps_its_own_b_when_the_initial_b_is_resent(run_config):
    config = {**run_config, "dp": False, "strategy": "fedsa", "evaluate-on": "clients"}
    context = _context(config)
    init = _init(config)
    _train(config, context, 1, init)  # first contact: B = 0, then trained
    own = {k: v for k, v in from_record(context.state[client_app._KEPT]).items() if k.endswith("lora_B")}
    assert all(float(v.abs().max()) > 0 for v in own.values())
    _train(config, context, 2, init)  # its reply was dropped: the server sends the initial B again
    kept = from_record(context.state[client_app._KEPT])
    b_trained_again = {k: v for k, v in kept.items() if k.endswith("lora_B")}
    # Round 2 started from the client's own B, not from zero: it differs from a fresh client's.
    fresh = _context(config)
    _train(config, fresh, 2, init)
    fresh_b = {k: v for k, v in from_record(fresh.state[client_app._KEPT]).items() if k.endswith("lora_B")}
    assert any(not torch.allclose(b_trained_again[k], fresh_b[k]) for k in fresh_b)


def test_evaluation_before_any_training_uses_the_sent_once_factor(run_config):
    """A client asked to evaluate before it ever trained gets FFA's A in that message and can
    evaluate (it used to be sent B alone and fail)."""
    config = {**run_config, "dp": False, "strategy": "ffa", "evaluate-on": "clients"}
    context = _context(config)
    reply = client_app.evaluate_local(_message(_init(config), 1, MessageType.EVALUATE), context)
    metrics = reply.content["metrics"]
    assert int(metrics["num-examples"]) > 0 and 0.0 <= float(metrics["accuracy"]) <= 1.0
