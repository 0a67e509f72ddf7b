"""A site's own data, folder and policy, enforced by its ClientApp (handlers called directly,
without Flower running): the node config, the first query's answer (identity, version, data
sizes or a refusal), refusals by policy, a lifetime budget across jobs, what it logs as sent."""

from __future__ import annotations

import json
import re

import pandas as pd
import pytest
import torch
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict

from fedlora.client import app as client_app
from fedlora.client.site import Site
from fedlora.core.config import ConfigError, RunConfig
from fedlora.core.model import build_model, global_state
from fedlora.core.version import VERSION
from fedlora.privacy import PrivacyLedger
from fedlora.strategies.flower import from_record, to_record

pytestmark = pytest.mark.usefixtures("task_identity")


@pytest.fixture
def site_file(tmp_path):
    rows = [(f"text number {i} {'good' if i % 2 else 'bad'}", "pos" if i % 2 else "neg") for i in range(60)]
    path = tmp_path / "site.csv"
    pd.DataFrame(rows, columns=["note", "dx"]).to_csv(path, index=False)
    return path


@pytest.fixture
def run_config(tiny_overrides, tmp_path) -> dict:
    return {**tiny_overrides, "dataset": "", "labels": "neg,pos", "output-dir": str(tmp_path / "server"),
            "local-steps": 2, "dp": False}


def _context(run_config: dict, **node: object) -> Context:
    return Context(run_id=1, node_id=100, node_config={"partition-id": 0, "num-partitions": 2, **node},
                   state=RecordDict(), run_config=dict(run_config))


def _message(run_config: dict, kind: str, server_round: int = 1, job: str = "job-a") -> Message:
    cfg = RunConfig.from_run_config(run_config)
    arrays = {} if kind == MessageType.QUERY else global_state(build_model(cfg, 2, {0: "neg", 1: "pos"}))
    return Message(RecordDict({"arrays": to_record(arrays),
                               "config": ConfigRecord({"server-round": server_round, "job": job})}),
                   message_type=kind, dst_node_id=100)


def _node(site_file, tmp_path, **extra) -> dict:
    return {"data": str(site_file), "text-column": "note", "label-column": "dx",
            "site-dir": str(tmp_path / "site"), **extra}


@pytest.mark.parametrize(("node", "message"), [
    ({"privacy-dir": "/x"}, "replaced by site-dir"),
    ({"colour": 1}, r"unknown node config key\(s\) \['colour'\]"),
    ({"require-dp": "yes"}, "require-dp='yes' must be bool"),
    ({"site-epsilon": -1}, "site-epsilon=-1.0 must be a number > 0"),
    ({"site-dir": "relative/dir"}, "site-dir='relative/dir' must be an absolute path"),
    ({"partition-id": 2}, "partition-id=2 is outside 0..1"),
])
def test_a_bad_node_config_is_an_error_naming_the_key(node, message):
    with pytest.raises(ConfigError, match=message):
        Site.from_node_config({"partition-id": 0, "num-partitions": 2, **node})


def test_the_first_query_reports_identity_version_and_data_sizes(run_config, site_file, tmp_path):
    reply = client_app.query(_message(run_config, MessageType.QUERY), _context(run_config, **_node(site_file, tmp_path)))
    metrics = reply.content["metrics"]
    assert "refusal" not in reply.content
    assert str(reply.content["site"]["version"]) == VERSION
    assert int(metrics["partition-id"]) == 0 and int(metrics["num-examples"]) == 60  # its whole file
    logged = [json.loads(line) for line in (tmp_path / "site" / "sent.jsonl").read_text().splitlines()]
    assert logged[0]["kind"] == MessageType.QUERY and logged[0]["job"] == "job-a"


@pytest.mark.parametrize(("change", "node", "reason"), [
    ({}, {"require-dp": True}, r"requires DP-SGD \(require-dp\) and this job has dp=false"),
    ({"labels": "", "dataset": "tweets"}, {}, "brings its own data .* but the job sets no `labels`"),
    ({"labels": "neg,neu"}, {}, "'pos' \\(30 rows\\)"),
    pytest.param({"precision": "bf16"}, {}, "precision='bf16' needs a CUDA GPU",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this site has CUDA")),
])
def test_a_site_refuses_a_job_it_does_not_accept(run_config, site_file, tmp_path, change, node, reason):
    config = {**run_config, **change}
    context = _context(config, **_node(site_file, tmp_path, **node))
    reply = client_app.query(_message(config, MessageType.QUERY), context)
    assert re.search(reason, str(reply.content["refusal"]["reason"])), reply.content["refusal"]["reason"]


def test_a_site_trains_on_its_own_file_and_logs_what_it_sent(run_config, site_file, tmp_path):
    context = _context(run_config, **_node(site_file, tmp_path))
    reply = client_app.train(_message(run_config, MessageType.TRAIN), context)
    assert int(reply.content["metrics"]["num-examples"]) == 60
    logged = json.loads((tmp_path / "site" / "sent.jsonl").read_text().splitlines()[-1])
    assert logged["kind"] == MessageType.TRAIN and logged["round"] == 1 and logged["bytes"] > 0
    assert logged["metrics"]["num-examples"] == 60 and all(k.endswith("lora_B") or k.startswith("head.")
                                                           for k in logged["arrays"])
    assert logged["refusal"] is None and logged["budget_spent"] is None


def test_a_site_logs_that_its_budget_is_spent_with_its_last_affordable_update(run_config, site_file, tmp_path):
    config = {**run_config, "dp": True, "accountant": "rdp", "dp-max-participations": 1, "num-server-rounds": 2}
    reply = client_app.train(_message(config, MessageType.TRAIN), _context(config, **_node(site_file, tmp_path)))
    logged = json.loads((tmp_path / "site" / "sent.jsonl").read_text().splitlines()[-1])
    assert logged["budget_spent"] == str(reply.content["budget-spent"]["reason"])
    assert "one more round would spend" in logged["budget_spent"] and logged["bytes"] > 0


def test_local_metrics_leave_only_where_the_site_allows(run_config, site_file, tmp_path):
    config = {**run_config, "evaluate-on": "clients"}
    allowed = client_app.evaluate_local(_message(config, MessageType.EVALUATE),
                                        _context(config, **_node(site_file, tmp_path)))
    assert 0 <= float(allowed.content["metrics"]["accuracy"]) <= 1  # dp=false: allowed by default
    kept = client_app.evaluate_local(_message(config, MessageType.EVALUATE),
                                     _context(config, **_node(site_file, tmp_path, **{"allow-evaluation": False})))
    assert "allow-evaluation is off" in str(kept.content["refusal"]["reason"])
    assert "accuracy" not in kept.content["metrics"]


def test_one_site_two_jobs_the_second_continues_the_sites_budget_and_stops_at_it(run_config, site_file, tmp_path):
    config = {**run_config, "dp": True, "accountant": "rdp", "target-epsilon": 4.0, "dp-max-participations": 2}
    node = _node(site_file, tmp_path, **{"site-epsilon": 5.0})
    ledger_file = tmp_path / "site" / "privacy-ledger.json"
    for rnd in (1, 2):
        reply = client_app.train(_message(config, MessageType.TRAIN, rnd, job="a"), _context(config, **node))
        assert "refusal" not in reply.content
    job_a = PrivacyLedger.load(ledger_file)
    assert 3.5 < job_a.epsilon <= 4.0  # the job's own target bounds it
    # Job b: planned against what the site has left of its 5, with more noise than a.
    replies = []
    for rnd in (1, 2, 3):
        replies.append(client_app.train(_message(config, MessageType.TRAIN, rnd, job="b"), _context(config, **node)))
    ledger = PrivacyLedger.load(ledger_file)
    sigmas = [p["sigma"] for p in ledger.participations]
    assert sigmas[2] > sigmas[0] and ledger.epsilon <= 5.0
    assert [p["job"] for p in ledger.participations] == ["a", "a", "b", "b"]
    assert "refusal" in replies[2].content  # past its plan (and the site's budget)
    # Job c: what is left funds only a far noisier job; the site never ends above its budget.
    client_app.train(_message(config, MessageType.TRAIN, 1, job="c"), _context(config, **node))
    ledger = PrivacyLedger.load(ledger_file)
    assert ledger.epsilon <= 5.0
    assert all(p["sigma"] > sigmas[2] for p in ledger.participations if p["job"] == "c")


def test_fedsa_finds_its_own_b_in_the_site_folder_after_the_node_state_is_lost(run_config, site_file, tmp_path):
    config = {**run_config, "strategy": "fedsa", "evaluate-on": "clients"}
    node = _node(site_file, tmp_path)
    first = _context(config, **node)
    client_app.train(_message(config, MessageType.TRAIN, 1), first)
    own = {k: v for k, v in from_record(first.state[client_app._KEPT]).items() if k.endswith("lora_B")}
    resumed = _context(config, **node)  # a resumed job: a new Flower run, empty node state
    client_app.evaluate_local(_message(config, MessageType.EVALUATE, 2), resumed)
    kept = from_record(resumed.state[client_app._KEPT])
    assert all(torch.equal(kept[k], own[k]) for k in own)  # not the resent initial B (zeros)


def test_privacy_report_on_a_site_dir_shows_its_one_ledger_over_all_jobs(run_config, site_file, tmp_path, capsys):
    from fedlora.simulations.cli import main as cli

    config = {**run_config, "dp": True, "accountant": "rdp"}
    node = _node(site_file, tmp_path)
    for job in ("a", "b"):
        client_app.train(_message(config, MessageType.TRAIN, 1, job=job), _context(config, **node))
    assert cli(["privacy", "report", str(tmp_path / "site"), "--json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)["clients"]
    assert row["partition"] == "site" and row["jobs"] == ["a", "b"] and row["participations"] == 2
