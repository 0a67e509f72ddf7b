"""Bad input fails at start-up with an error that names the key and the allowed values.

Covers the typed run config, data and model checks, and `fedlora run` itself (exit 2, nothing
started)."""

from __future__ import annotations

import dataclasses
import os
import time
import tomllib

import pytest

from conftest import REPO, fedlora_run
from fedlora.core.config import AUTO, ConfigError, RunConfig
from fedlora.simulations.runner import preflight, resolve_config


def test_pyproject_declares_every_key_with_the_dataclass_default():
    declared = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    defaults = {f.name.replace("_", "-"): f.default for f in dataclasses.fields(RunConfig)}
    assert declared == {k: AUTO if v is None else v for k, v in defaults.items()}
    assert RunConfig.from_run_config(declared) == RunConfig()


@pytest.mark.parametrize("strategy, lr, evaluate_on", [
    ("fedsvd", 1.0, "server"), ("ffa", 1.0, "server"), ("fedit", 0.3, "server"), ("lorafair", 0.3, "server"),
    ("fedex", 0.3, "server"), ("flora", 0.3, "server"), ("flexlora", 0.3, "server"), ("fedsa", 0.3, "clients"),
])
def test_auto_values_come_from_the_strategy_and_explicit_ones_win(strategy, lr, evaluate_on):
    # non-private: fedsa's client-side evaluation cannot run under the default dp=true
    cfg = RunConfig.from_run_config({"strategy": strategy, "learning-rate": AUTO, "evaluate-on": AUTO, "dp": False})
    assert (cfg.learning_rate, cfg.evaluate_on) == (lr, evaluate_on)
    assert RunConfig.from_run_config({"strategy": strategy, "learning-rate": 0.05, "dp": False}).learning_rate == 0.05


def test_fedsa_can_only_be_evaluated_by_clients():
    with pytest.raises(ConfigError, match="only clients can evaluate"):
        RunConfig.from_run_config({"strategy": "fedsa", "evaluate-on": "server"})


def test_mixed_ranks_need_a_strategy_that_aggregates_them():
    cfg = RunConfig.from_run_config({"strategy": "flora", "lora-ranks": "4, 8,16"})
    assert [cfg.client_rank(pid) for pid in range(5)] == [4, 8, 16, 4, 8]
    assert cfg.max_rank == 16
    assert RunConfig().client_rank(3) == 8  # no lora-ranks: lora-rank for everyone
    with pytest.raises(ConfigError, match=r"strategy='fedsvd' cannot aggregate mixed LoRA ranks \[4, 8\]; "
                                          r"use one rank, or one of \['flexlora', 'flora'\]"):
        RunConfig.from_run_config({"strategy": "fedsvd", "lora-ranks": "4,8"})
    assert RunConfig.from_run_config({"strategy": "fedsvd", "lora-ranks": "4,4"}).client_rank(1) == 4
    for bad, message in (("4,x", "must be comma-separated integers"), ("4,0", "every rank must be > 0")):
        with pytest.raises(ConfigError, match=message):
            RunConfig.from_run_config({"strategy": "flora", "lora-ranks": bad})


BAD_PRIVACY = [  # the DP keys and how they combine with the rest
    ({"dp": "yes"}, "dp='yes' must be true or false"),
    ({"dp": True, "max-grad-norm": 0.0}, "per-sample clipping bound C"),
    ({"dp": True, "evaluate-on": "both"}, "client-side evaluation releases statistics"),
    ({"dp": True, "strategy": "fedsa"}, "'fedsa' has no global model"),
    ({"strategy": "fedsa"}, "or set dp=false"),  # the default job is private
    ({"target-delta": 1.0}, "target-delta=1.0 must be in (0, 1)"),
    ({"target-epsilon": 0.0}, "target-epsilon=0.0 must be > 0"),
    ({"accountant": "gdp"}, "accountant='gdp' is not allowed; choose one of ['prv', 'rdp']"),
    ({"grad-sample-mode": "ew"}, "choose one of ['hooks', 'ghost']"),
    ({"dp-max-participations": 0}, "dp-max-participations=0 must be > 0"),
    ({"dp-seeded-noise": True}, "run-config key 'dp-seeded-noise' was renamed: use 'dp-reproducible'"),
]


@pytest.mark.parametrize("overrides, message", [
    ({"strategy": "fedavgx"}, "strategy='fedavgx' is not allowed; choose one of ['fedex', 'fedit', 'fedsa', "
                              "'fedsvd', 'ffa', 'flexlora', 'flora', 'lorafair']"),
    ({"partitioner": "zipf"}, "choose one of ['iid', 'dirichlet', 'pathological', 'natural']"),
    ({"lora-rank": 0}, "lora-rank=0 must be > 0"),
    ({"lora-rank": -4}, "lora-rank=-4 must be > 0"),
    ({"optimizer": "lion"}, "optimizer='lion'"),
    ({"head": "maybe"}, "['trainable', 'frozen']"),
    ({"evaluate-on": "nowhere"}, "evaluate-on"),
    ({"learning-rate": "fast"}, "learning-rate='fast' must be a float"),
    ({"lora-rank": 8.5}, "lora-rank=8.5 must be a int"),
    ({"lora-dropout": 1.0}, "lora-dropout"),
    ({"fair-lambda": -0.1}, "fair-lambda=-0.1 must be >= 0"),
    ({"fair-steps": 0}, "fair-steps=0 must be > 0"),
    ({"output-dir": "relative/path"}, "must be an absolute path"),
    ({"learning-rate": float("nan")}, "learning-rate=nan must be a finite number"),
    ({"round-timeout": float("inf")}, "round-timeout=inf must be a finite number"),
    ({"evaluate-on": "clients", "local-test-fraction": 0.0, "dp": False}, "needs local-test-fraction > 0"),
    ({"lora-rnak": 8}, "unknown run-config key(s) ['lora-rnak']"),
] + BAD_PRIVACY)
def test_bad_values_name_the_key(overrides, message):
    with pytest.raises(ConfigError) as err:
        RunConfig.from_run_config(overrides)
    assert message in str(err.value)


def test_a_config_survives_the_toml_file_fedlora_run_hands_to_flower():
    import json

    for cfg in (RunConfig(), RunConfig.from_run_config({"min-partition-size": 12, "strategy": "ffa"})):
        text = "".join(f"{k} = {json.dumps(v)}\n" for k, v in cfg.to_run_config().items())  # as the runner writes it
        assert RunConfig.from_run_config(tomllib.loads(text)) == cfg


def test_ints_are_accepted_for_floats():
    assert RunConfig.from_run_config({"learning-rate": 1}).learning_rate == 1.0


def test_clients_per_round_cannot_exceed_clients():
    with pytest.raises(ConfigError, match="clients-per-round=10 is larger than the number of clients \\(3\\)"):
        RunConfig().check_federation(3)


def test_relative_output_dir_is_made_absolute(tmp_path):
    cfg = resolve_config(REPO, {"output-dir": "outs/x"}, cwd=tmp_path)
    assert cfg.output_dir == str(tmp_path / "outs" / "x")
    assert resolve_config(REPO, {}, cwd=tmp_path).output_dir.startswith(str(tmp_path / "outputs"))


def _cfg(tiny_overrides, **kw) -> RunConfig:
    return RunConfig.from_run_config({**tiny_overrides, **kw})


@pytest.mark.parametrize("change, message", [
    ({"dataset": "/nonexistent/data.csv"}, "is neither a built-in dataset ['tweets'] nor an existing file"),
    ({"text-column": "body"}, "text-column='body' is not a column"),
    ({"label-column": "y"}, "label-column='y' is not a column"),
    ({"min-partition-size": 400}, "min-partition-size=400 cannot be met"),
    ({"partitioner": "pathological", "classes-per-client": 5}, "classes-per-client=5 exceeds the 3 classes"),
    ({"test-size": 600}, "test-size=600 leaves no training rows"),
    ({"model": "/nonexistent/model"}, "is not a model directory"),
    ({"partitioner": "pathological", "classes-per-client": 1, "min-partition-size": 0},
     "classes-per-client=1 × 2 clients cannot cover the 3 classes"),
    ({"lora-rank": 40}, "lora-rank=40 exceeds the size of"),
    ({"max-length": 100}, "max-length=100 exceeds the model's 64 positions"),
    ({"target-modules": "LayerNorm"}, "target-modules='LayerNorm'"),
])
def test_preflight_rejects_bad_data_and_models(tiny_overrides, change, message):
    with pytest.raises(ConfigError) as err:
        preflight(_cfg(tiny_overrides, **{"clients-per-round": 2, **change}), 2)
    assert message in str(err.value)


def test_relative_data_and_model_paths_are_anchored_at_the_callers_directory(tiny_overrides, tmp_path):
    cwd = tmp_path / "work"
    cwd.mkdir()
    overrides = {**tiny_overrides, "dataset": os.path.relpath(tiny_overrides["dataset"], cwd),
                 "model": os.path.relpath(tiny_overrides["model"], cwd)}
    cfg = resolve_config(REPO, overrides, cwd=cwd)
    assert cfg.dataset == tiny_overrides["dataset"] and cfg.model == tiny_overrides["model"]
    assert resolve_config(REPO, {"dataset": "tweets"}, cwd=cwd).dataset == "tweets"


def test_an_output_dir_holding_a_run_is_not_reused(tiny_overrides, tmp_path):
    (tmp_path / "metrics.jsonl").write_text("{}\n")
    with pytest.raises(ConfigError, match="already holds a run"):
        preflight(_cfg(tiny_overrides, **{"output-dir": str(tmp_path)}), 3)


def test_unreachable_hub_model_gives_a_clear_offline_error(tiny_overrides, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConfigError, match="could not be fetched from the Hugging Face hub"):
        preflight(_cfg(tiny_overrides, model="someone/some-model-that-is-not-cached"), 3)


def test_target_modules_must_exist(tiny_overrides):
    from fedlora.core.model import build_model

    cfg = _cfg(tiny_overrides, **{"target-modules": "query,q_proj"})
    for check in (lambda: preflight(cfg, 3), lambda: build_model(cfg, 3)):
        with pytest.raises(ConfigError, match=r"target-modules \['q_proj'\] do not name modules"):
            check()


def test_fedlora_run_rejects_bad_input_before_starting_anything(tiny_overrides, tmp_path):
    start = time.monotonic()
    res = fedlora_run({**tiny_overrides, "strategy": "nope", "output-dir": str(tmp_path / "o")})
    assert res.returncode == 2
    assert "strategy='nope' is not allowed; choose one of" in res.stderr
    assert not (tmp_path / "o").exists()
    res = fedlora_run({**tiny_overrides, "clients-per-round": 4}, num_supernodes=3)
    assert res.returncode == 2 and "clients-per-round=4 is larger" in res.stderr
    assert time.monotonic() - start < 120  # no hang: no SuperLink was started


def test_dp_max_participations_defaults_to_the_number_of_rounds():
    cfg = RunConfig.from_run_config({"num-server-rounds": 7, "dp-max-participations": AUTO})
    assert cfg.dp_max_participations == 7
    assert RunConfig.from_run_config({"dp-max-participations": 3}).dp_max_participations == 3


def test_bf16_needs_dp_false_a_gpu_where_it_runs_and_autocasts_there(tiny_overrides, tmp_path):
    import torch

    from fedlora.core.model import precision_context

    with pytest.raises(ConfigError, match="precision='bf16' needs dp=false"):
        _cfg(tiny_overrides, precision="bf16", dp=True)
    with pytest.raises(ConfigError, match="precision='fp16' is not allowed"):
        _cfg(tiny_overrides, precision="fp16")
    cfg = _cfg(tiny_overrides, precision="bf16", dp=False, **{"output-dir": str(tmp_path / "run")})
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="needs a CUDA GPU for the server and a GPU share"):
            preflight(cfg, 3, 0.0)
        with pytest.raises(ConfigError, match="needs a CUDA GPU, and this process runs on cpu"):
            precision_context(cfg, torch.device("cpu"))
    autocast = precision_context(cfg, torch.device("cuda"))  # configured, not entered: no GPU needed
    assert isinstance(autocast, torch.autocast) and autocast.device == "cuda" and autocast.fast_dtype == torch.bfloat16
    assert not isinstance(precision_context(cfg.replace(precision="fp32"), torch.device("cpu")), torch.autocast)
