"""The ServerApp's round loop against real ClientApp handlers, in one process, through a fake
Grid (no Flower processes): how sites join or are left out, bad updates and crashing clients,
and checkpoint + exact resume after a crash at any point of a round."""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Iterable

import pytest
import torch
from flwr.app import ConfigRecord, Context, Error, Message, MessageType, MetricRecord, RecordDict
from safetensors.torch import load_file

from fedlora.client import app as client_app
from fedlora.core.status import read_status
from fedlora.server import app as server_app
from fedlora.server.checkpoint import load_checkpoint
from fedlora.strategies.flower import from_record, to_record

pytestmark = pytest.mark.usefixtures("task_identity")

HANDLERS = {MessageType.QUERY: client_app.query, MessageType.TRAIN: client_app.train,
            MessageType.EVALUATE: client_app.evaluate_local}


class Crash(Exception):
    """The server process dies here (as a kill -9 would: nothing after it runs)."""


class FakeGrid:
    """Delivers each message to the ClientApp handler of its node, with that node's Context.

    `tamper(msg, reply) -> reply` may replace a reply (a malicious or broken site); `crash_at`
    = (message type, how many such requests) raises `Crash` when that request is made, before
    (`"before"`) or after (`"after"`) the clients ran.
    """

    def __init__(self, run_config: dict, node_configs: dict[int, dict], *,
                 tamper: Callable[[Message, Message], Message] | None = None,
                 crash_at: tuple[str, int, str] | None = None) -> None:
        self.contexts = {node: Context(run_id=7, node_id=node, node_config=dict(nc), state=RecordDict(),
                                       run_config=dict(run_config)) for node, nc in node_configs.items()}
        self.tamper = tamper or (lambda msg, reply: reply)
        self.crash_at = crash_at
        self.requests: dict[str, int] = {}
        self.outbox: dict[str, Message] = {}  # message id -> its reply

    def get_node_ids(self) -> list[int]:
        return list(self.contexts)

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        """Runs the clients at once; their replies wait for `pull_messages`."""
        messages = list(messages)
        if not messages:
            return []
        kind = messages[0].metadata.message_type
        self.requests[kind] = self.requests.get(kind, 0) + 1
        when = self.crash_at and self.crash_at[:2] == (kind, self.requests[kind]) and self.crash_at[2]
        if when == "before":
            raise Crash(f"{kind} #{self.requests[kind]}")
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = str(uuid.uuid4())  # as Flower's grids do
            try:
                reply = HANDLERS[kind](msg, self.contexts[msg.metadata.dst_node_id])
            except Exception as exc:  # as Flower does: the client's exception becomes an error reply
                reply = Message(Error(code=0, reason=f"{type(exc).__name__}: {exc}"), reply_to=msg)
            self.outbox[msg.metadata.message_id] = self.tamper(msg, reply)
        if when == "after":
            raise Crash(f"{kind} #{self.requests[kind]}")
        return [m.metadata.message_id for m in messages]

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        return [self.outbox.pop(i) for i in list(message_ids) if i in self.outbox]


@pytest.fixture
def run_config(tiny_overrides, tmp_path) -> dict:
    return {**tiny_overrides, "output-dir": str(tmp_path / "run"), "num-server-rounds": 3, "local-steps": 2,
            "clients-per-round": 2, "connect-timeout": 5.0}


def _nodes(n: int = 3, **extra) -> dict[int, dict]:
    return {1000 + pid: {"partition-id": pid, "num-partitions": n, **extra} for pid in range(n)}


def _run(run_config: dict, grid: FakeGrid) -> None:
    server_app.main(grid, Context(run_id=7, node_id=0, node_config={}, state=RecordDict(),
                                  run_config=dict(run_config)))


def _rows(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _adapter(out) -> dict[str, torch.Tensor]:
    return load_file(out / "adapter" / "adapter_model.safetensors")


class SlowGrid:
    """Replies arrive over several pulls, the last message's first; one message is never answered."""

    def __init__(self) -> None:
        self.pulls, self.sent = 0, []

    def push_messages(self, messages):
        self.sent = list(messages)
        for i, msg in enumerate(self.sent):
            msg.metadata.__dict__["_message_id"] = f"m{i}"
        return [m.metadata.message_id for m in self.sent]

    def pull_messages(self, ids):
        self.pulls += 1
        due = {1: ["m2"], 3: ["m0"]}.get(self.pulls, [])  # m1 never answers
        return [Message(RecordDict(), reply_to=m) for m in self.sent if m.metadata.message_id in due and
                m.metadata.message_id in ids]


def test_exchange_polls_until_every_reply_or_the_timeout_and_keeps_the_sent_order(task_identity, monkeypatch):
    monkeypatch.setattr(server_app, "REPLY_POLL_S", 0.01)
    grid = SlowGrid()
    msgs = [Message(RecordDict(), message_type=MessageType.QUERY, dst_node_id=n) for n in (5, 6, 7)]
    replies = server_app.exchange(grid, msgs, timeout=0.3)
    assert [r.metadata.reply_to_message_id for r in replies] == ["m0", "m2"]
    assert grid.pulls > 3  # went on pulling for m1 until the timeout


def test_sites_of_another_version_or_that_refuse_are_left_out_and_named(run_config, tmp_path, monkeypatch):
    def older_version(msg: Message, reply: Message) -> Message:
        if msg.metadata.message_type == MessageType.QUERY and msg.metadata.dst_node_id == 1002:
            reply.content["site"] = ConfigRecord({"version": "0.0.1"})
        return reply

    nodes = _nodes()
    nodes[1001]["require-dp"] = True  # this job is dp=false
    _run(run_config, FakeGrid(run_config, nodes, tamper=older_version))
    out = tmp_path / "run"
    left_out = json.loads((out / "data.json").read_text())["left_out"]
    assert "requires DP-SGD" in left_out["site 1"]
    assert "runs fedlora 0.0.1, the server" in left_out["site 2"]
    assert read_status(out).state == "completed"
    assert all(row.get("num_clients", 1) == 1 for row in _rows(out))  # only site 0 trains


def test_two_nodes_claiming_one_site_id_are_refused_naming_both(run_config):
    nodes = {1000: {"partition-id": 0, "num-partitions": 2}, 1001: {"partition-id": 0, "num-partitions": 2}}
    with pytest.raises(RuntimeError, match="partition-id 0 is claimed by nodes 1000 and 1001"):
        _run(run_config, FakeGrid(run_config, nodes))


@pytest.mark.parametrize(("bad", "reason"), [
    ({"num-examples": 2.5}, "num-examples=2.5, not an integer"),
    ({"num-examples": 0}, "reported no training examples"),
    ({"num-examples": 2 * 10**9}, "outside 1..1e+09"),
    ({"scale": 1e6}, "sent an update of norm"),
    ({"crash": True}, "error RuntimeError: the site's GPU caught fire"),
])
def test_a_bad_update_or_a_crashing_client_is_rejected_with_its_reason_and_the_round_completes(
        run_config, tmp_path, bad, reason):
    def site_2_misbehaves(msg: Message, reply: Message) -> Message:
        if msg.metadata.message_type != MessageType.TRAIN or msg.metadata.dst_node_id != 1002:
            return reply
        if bad.get("crash"):
            return Message(Error(code=0, reason="RuntimeError: the site's GPU caught fire"), reply_to=msg)
        arrays = {k: v * bad.get("scale", 1.0) for k, v in from_record(reply.content["arrays"]).items()}
        metrics = {**dict(reply.content["metrics"]), **{k: v for k, v in bad.items() if k == "num-examples"}}
        return Message(RecordDict({"arrays": to_record(arrays), "metrics": MetricRecord(metrics)}), reply_to=msg)

    config = {**run_config, "clients-per-round": 3, "num-server-rounds": 1}
    _run(config, FakeGrid(config, _nodes(), tamper=site_2_misbehaves))
    out = tmp_path / "run"
    (row,) = [r for r in _rows(out) if r["round"] == 1]
    assert row["num_clients"] == 2 and row["num_rejected"] == 1 and not row.get("skipped")
    ((why, sites),) = row["rejected"].items()
    assert reason in why and sites == [2]
    assert read_status(out).state == "completed"


def test_min_clients_skips_a_round_with_too_few_usable_replies(run_config, tmp_path):
    def only_site_0(msg: Message, reply: Message) -> Message:
        if msg.metadata.message_type == MessageType.TRAIN and msg.metadata.dst_node_id != 1000:
            return Message(Error(code=0, reason="site offline"), reply_to=msg)
        return reply

    config = {**run_config, "clients-per-round": 3, "min-clients": 2, "max-failed-rounds": 2}
    with pytest.raises(server_app.RoundsFailed, match="2 rounds in a row without a usable reply"):
        _run(config, FakeGrid(config, _nodes(), tamper=only_site_0))
    out = tmp_path / "run"
    rows = _rows(out)
    assert [r.get("skipped") for r in rows[1:]] == [True, True]
    assert any("fewer than min-clients=2" in why for why in rows[1]["rejected"])
    status = read_status(out)
    assert status.state == "failed" and status.last_round == 2


def _uninterrupted(run_config: dict, tmp_path, strategy: str) -> tuple[list[dict], dict]:
    config = {**run_config, "strategy": strategy, "output-dir": str(tmp_path / "whole")}
    _run(config, FakeGrid(config, _nodes()))
    return _rows(tmp_path / "whole"), _adapter(tmp_path / "whole")


def _without_time(rows: list[dict]) -> list[dict]:
    """Rows as a resumed run must reproduce them: all but the time taken and the bytes sent down
    (a resumed run sends sent-once factors again, since the nodes lost them)."""
    return [{k: v for k, v in row.items() if not k.endswith("seconds") and k != "bytes_down"} for row in rows]


@pytest.mark.parametrize(("strategy", "crash_at"), [
    ("fedsvd", (MessageType.TRAIN, 2, "before")),  # between rounds: round 1 checkpointed
    ("fedsvd", (MessageType.TRAIN, 3, "after")),  # during round 3: clients trained, nothing aggregated
    ("ffa", (MessageType.TRAIN, 2, "after")),  # the sent-once A must be sent again after the crash
    ("fedex", (MessageType.TRAIN, 3, "before")),  # the cumulative base change lives in the method state
])
def test_a_run_resumed_after_a_crash_ends_exactly_as_an_uninterrupted_one(run_config, tmp_path, strategy, crash_at):
    whole_rows, whole_adapter = _uninterrupted(run_config, tmp_path, strategy)
    config = {**run_config, "strategy": strategy}
    with pytest.raises(Crash):
        _run(config, FakeGrid(config, _nodes(), crash_at=crash_at))
    out = tmp_path / "run"
    done = load_checkpoint(out).round
    assert done == crash_at[1] - 1 and read_status(out).state == "failed"
    # The resumed run is a new Flower run: the nodes' state is gone.
    resumed = {**config, "resume": True}
    _run(resumed, FakeGrid(resumed, _nodes()))
    assert _without_time(_rows(out)) == _without_time(whole_rows)
    adapter = _adapter(out)
    assert sorted(adapter) == sorted(whole_adapter)
    assert all(torch.allclose(adapter[k], whole_adapter[k], atol=1e-6, rtol=0) for k in adapter)
    assert read_status(out).state == "completed"


def test_resume_refuses_a_changed_key_and_a_fresh_run_refuses_a_used_folder(run_config, tmp_path):
    with pytest.raises(Crash):
        _run(run_config, FakeGrid(run_config, _nodes(), crash_at=(MessageType.TRAIN, 2, "before")))
    with pytest.raises(FileExistsError, match="continue it with --resume"):
        _run(run_config, FakeGrid(run_config, _nodes()))
    changed = {**run_config, "resume": True, "lora-rank": 4}
    with pytest.raises(ValueError, match="lora-rank"):
        _run(changed, FakeGrid(changed, _nodes()))
    # More rounds are allowed; the privacy plan stays the checkpoint's ("auto" would follow the rounds).
    more = {**run_config, "resume": True, "num-server-rounds": 4, "dp-max-participations": 3}
    _run(more, FakeGrid(more, _nodes()))
    assert [r["round"] for r in _rows(tmp_path / "run")] == [0, 1, 2, 3, 4]


def test_a_run_that_failed_before_round_1_may_be_retried_into_its_folder(run_config, tmp_path):
    with pytest.raises(Crash):
        _run(run_config, FakeGrid(run_config, _nodes(), crash_at=(MessageType.TRAIN, 1, "before")))
    assert read_status(tmp_path / "run").last_round == 0
    _run(run_config, FakeGrid(run_config, _nodes()))
    assert read_status(tmp_path / "run").state == "completed"


def test_every_update_that_left_a_site_is_in_its_ledger_once_even_across_a_crash(run_config, tmp_path):
    config = {**run_config, "dp": True, "accountant": "rdp", "clients-per-round": 3, "dp-max-participations": 4}
    with pytest.raises(Crash):  # round 2's updates left the sites, then the server died
        _run(config, FakeGrid(config, _nodes(), crash_at=(MessageType.TRAIN, 2, "after")))
    resumed = {**config, "resume": True}
    _run(resumed, FakeGrid(resumed, _nodes()))
    ledger = json.loads((tmp_path / "run" / "privacy" / "0.json").read_text())
    # Round 2 ran twice (its first updates were lost with the server): both spends are recorded.
    assert [p["round"] for p in ledger["participations"]] == [1, 2, 2, 3]


def test_sites_with_their_own_files_and_a_server_without_labelled_data(run_config, tiny_csv, tmp_path):
    """Each site trains on its own file (different label mixes); the server has no data, so under
    DP nobody evaluates, and the run says so; a site whose file holds a label outside `labels` is
    left out with the file, column and values named."""
    import pandas as pd

    rows = pd.read_csv(tiny_csv)
    labels = sorted(rows["label"].unique())
    files = {}
    for pid, keep in enumerate([labels[:2], labels[1:]]):  # site 0 lacks one class, site 1 another
        files[pid] = tmp_path / f"site-{pid}.csv"
        rows[rows["label"].isin(keep)].head(80).to_csv(files[pid], index=False)
    files[2] = tmp_path / "site-2.csv"
    rows.head(40).assign(label="unknown").to_csv(files[2], index=False)
    config = {**run_config, "dataset": "", "labels": ",".join(labels), "dp": True, "accountant": "rdp",
              "num-server-rounds": 2}
    nodes = {1000 + pid: {"partition-id": pid, "num-partitions": 3, "data": str(path),
                          "site-dir": str(tmp_path / f"site-dir-{pid}")} for pid, path in files.items()}
    _run(config, FakeGrid(config, nodes))
    out = tmp_path / "run"
    data = json.loads((out / "data.json").read_text())
    assert data["server_test_rows"] is None and data["evaluation"].startswith("none: the server holds no labelled data")
    assert "holds values outside labels" in data["left_out"]["site 2"] and "'unknown' (40 rows)" in data["left_out"]["site 2"]
    assert data["clients"] == {"0": {"train_rows": 80, "local_test_rows": 0}, "1": {"train_rows": 80, "local_test_rows": 0}}
    assert all("test_accuracy" not in row for row in _rows(out)) and read_status(out).state == "completed"
    for pid in (0, 1):  # each site's ledger and log are in its own folder, none in the server's
        site = tmp_path / f"site-dir-{pid}"
        assert [p["round"] for p in json.loads((site / "privacy-ledger.json").read_text())["participations"]] == [1, 2]
        assert (site / "sent.jsonl").exists() and (site / "client.log").exists()
    assert not (out / "privacy").exists()
    assert (out / "adapter" / "adapter_model.safetensors").exists() and not (out / "predictions.json").exists()


def test_a_job_every_site_refuses_fails_naming_each_reason(run_config):
    nodes = _nodes(2, **{"require-dp": True})  # this job is dp=false
    with pytest.raises(RuntimeError, match="no usable site: site 0 left out: .*require-dp.*; site 1 left out"):
        _run(run_config, FakeGrid(run_config, nodes))
