"""Record-level DP: accounting and the ledger, the DP-SGD step (clipping, noise, empty Poisson
batches, hook clean-up, opacus #820), and the `fedlora privacy plan|report` commands.

The DP steps run on the tiny random BERT of conftest, CPU only; the exactness checks compare
Opacus against per-example gradients computed one example at a time.
"""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from opacus.accountants import PRVAccountant, RDPAccountant

from fedlora.core.config import RunConfig
from fedlora.core.data import client_data
from fedlora.core.model import build_model
from fedlora.core.train import train_local
from fedlora.privacy import (
    DPSettings,
    PrivacyError,
    PrivacyLedger,
    dp_sgd_steps,
    epsilon,
    ledger_path,
    noise_multiplier,
    poisson_batch,
    sample_rate,
)
from fedlora.simulations.cli import main as cli

DELTA = 1e-5


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The tiny model gains nothing from threads, and on a shared 2-core machine two threads
    spin against other processes (several times slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def cfg(tiny_overrides) -> RunConfig:
    return RunConfig.from_run_config({**tiny_overrides, "lora-dropout": 0.0})


def test_the_tiny_tokenizer_knows_the_words_of_the_texts(tiny_model_dir):
    """The learning tests below need texts that carry a signal: no word may become [UNK]."""
    from transformers import AutoTokenizer

    from synthetic import FILLER, WORDS

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    words = [*FILLER, *" ".join(WORDS.values()).split()]
    ids = tokenizer(" ".join(words), add_special_tokens=False)["input_ids"]
    assert len(ids) == len(words) and tokenizer.unk_token_id not in ids


@pytest.fixture
def train_data(cfg):
    return client_data(cfg, 0, 1).train  # one client: all 384 training texts


def _keys(bundle, which: str) -> list[str]:
    if which == "B":
        return [k for k in bundle.params if k.endswith("lora_B")]
    return list(bundle.params)  # A, B and the head


def _snapshot(bundle) -> dict[str, torch.Tensor]:
    return {k: p.detach().clone() for k, p in bundle.params.items()}


def _no_dropout(model: torch.nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0


# ---------------------------------------------------------------------------------------------
# accounting


def test_sample_rate_is_batch_over_n_and_one_for_small_clients():
    assert sample_rate(1000, 32) == 0.032
    assert sample_rate(20, 32) == 1.0 and sample_rate(32, 32) == 1.0
    with pytest.raises(PrivacyError, match="examples"):
        sample_rate(0, 32)
    # q = 1: every example is in every batch, no amplification by sampling
    assert poisson_batch(5, 1.0, np.random.default_rng(0)).tolist() == [0, 1, 2, 3, 4]


def test_noise_multiplier_reaches_the_target_and_epsilon_is_monotone():
    sigma = noise_multiplier(6.0, DELTA, 0.05, 50, "rdp")
    eps = epsilon([(sigma, 0.05, 50)], DELTA, "rdp")
    assert 6.0 - 0.01 <= eps <= 6.0
    assert epsilon([(sigma, 0.05, 25), (sigma, 0.05, 25)], DELTA, "rdp") == eps  # merged
    assert epsilon([(sigma, 0.05, 60)], DELTA, "rdp") > eps
    assert epsilon([], DELTA) == 0.0
    assert epsilon([(0.0, 0.05, 1)], DELTA) == math.inf
    with pytest.raises(PrivacyError, match="no noise multiplier"):
        noise_multiplier(1e-6, DELTA, 1.0, 10**6, "rdp")
    for bad in [{"delta": 0.0}, {"delta": 1.0}, {"accountant": "gdp"}]:
        with pytest.raises(PrivacyError):
            epsilon([(1.0, 0.1, 1)], **{"delta": DELTA, "accountant": "rdp", **bad})


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_ledger_epsilon_equals_an_independent_opacus_accountant(accountant):
    ledger = PrivacyLedger(target_epsilon=8.0, delta=DELTA, accountant=accountant)
    rounds = [(1, 1.1, 0.05, 10), (2, 1.1, 0.05, 10), (4, 0.9, 0.1, 5)]
    for rnd, sigma, q, steps in rounds:
        ledger.record(rnd, sigma, q, steps)
    independent = {"rdp": RDPAccountant, "prv": PRVAccountant}[accountant]()
    for _, sigma, q, steps in rounds:
        for _ in range(steps):
            independent.step(noise_multiplier=sigma, sample_rate=q)
    assert ledger.epsilon == pytest.approx(independent.get_epsilon(delta=DELTA), rel=1e-9)
    assert [p["round"] for p in ledger.participations] == [1, 2, 4]
    assert ledger.participations[0]["epsilon"] < ledger.participations[1]["epsilon"] < ledger.epsilon


def test_ledger_resumes_from_its_file_and_refuses_another_budget(tmp_path):
    path = tmp_path / "privacy" / "3.json"  # the parent directory does not exist yet
    ledger = PrivacyLedger(6.0, DELTA, "rdp")
    assert ledger.epsilon == 0.0 and ledger.remaining == 6.0
    ledger.record(1, 1.2, 0.1, 10)
    ledger.save(path)
    assert [p.name for p in path.parent.iterdir()] == ["3.json"]  # no temporary file left

    resumed = PrivacyLedger.open(path, 6.0, DELTA, "rdp")
    assert resumed.state_dict() == ledger.state_dict() and resumed.epsilon == ledger.epsilon
    assert resumed.record(2, 1.2, 0.1, 10) == ledger.record(2, 1.2, 0.1, 10)
    assert PrivacyLedger.open(tmp_path / "new.json", 6.0, DELTA, "rdp").participations == []

    for changed in [{"target_epsilon": 8.0}, {"delta": 1e-6}, {"accountant": "prv"}]:
        with pytest.raises(PrivacyError, match="re-spend privacy"):
            PrivacyLedger.load(path, **changed)
    with pytest.raises(PrivacyError, match="before the last recorded round"):
        resumed.record(1, 1.2, 0.1, 10)
    assert resumed.record(2, 1.2, 0.1, 10) > ledger.epsilon  # a retried round spends again
    path.write_text("{not json")
    with pytest.raises(PrivacyError, match="cannot read"):
        PrivacyLedger.load(path)
    with pytest.raises(PrivacyError, match="epsilon"):
        PrivacyLedger(0.0, DELTA)


def test_a_ledger_file_is_checked_against_the_accountant(tmp_path):
    path = tmp_path / "0.json"
    ledger = PrivacyLedger(6.0, DELTA, "rdp")
    for rnd in (1, 2):
        ledger.record(rnd, 1.1, 0.05, 10)
    ledger.save(path)
    assert PrivacyLedger.load(path).epsilon == ledger.epsilon  # an honest file loads

    state = json.loads(path.read_text())
    honest = state["participations"][-1]["epsilon"]
    for stored in (honest * 0.9, honest * (1 + 1e-5)):  # under-reported, or off beyond 1e-6
        state["participations"][-1]["epsilon"] = stored
        path.write_text(json.dumps(state))
        with pytest.raises(PrivacyError, match=rf"{path}: the stored ε = .* does not match ε = "):
            PrivacyLedger.load(path)
    state["participations"][-1]["epsilon"] = honest * (1 + 1e-7)  # within the tolerance
    path.write_text(json.dumps(state))
    assert PrivacyLedger.load(path).epsilon == pytest.approx(honest)
    state["participations"][-1]["epsilon"] = honest
    state["participations"][0]["sigma"] = 5.0  # the history changed under a stored ε
    path.write_text(json.dumps(state))
    with pytest.raises(PrivacyError, match="does not match"):
        PrivacyLedger.open(path, 6.0, DELTA, "rdp")
    state["participations"][0]["sigma"] = 1.1
    state["participations"][0]["epsilon"] = honest * 2  # ε can only grow
    path.write_text(json.dumps(state))
    with pytest.raises(PrivacyError, match="decrease"):
        PrivacyLedger.load(path)
    assert cli(["privacy", "report", str(tmp_path)]) == 2  # the report shows checked values only


def test_the_check_is_memoised_on_disk_across_processes(tmp_path, monkeypatch):
    """PRV costs about a second per ε: a client that recorded a history, a reload of its ledger
    and a report over many ledgers must not pay for it again, also in a fresh process."""
    from opacus.accountants import PRVAccountant

    from fedlora.privacy import cache

    monkeypatch.setenv("FEDLORA_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(cache, "_memory", {})
    calls = []
    original = PRVAccountant.get_epsilon
    monkeypatch.setattr(PRVAccountant, "get_epsilon", lambda self, delta, **kw: calls.append(1) or original(self, delta, **kw))
    ledger = PrivacyLedger(6.0, DELTA, "prv")
    assert ledger.epsilon_after(1.1, 0.05, 10) == ledger.record(1, 1.1, 0.05, 10)
    assert len(calls) == 1  # asking first, then recording the same history: one accountant call
    ledger.save(tmp_path / "privacy" / "0.json")
    monkeypatch.setattr(cache, "_memory", {})  # a new process: only the file remains
    assert PrivacyLedger.load(tmp_path / "privacy" / "0.json").epsilon == ledger.epsilon
    assert cli(["privacy", "report", str(tmp_path)]) == 0
    assert len(calls) == 1
    assert cache.cache_path() == tmp_path / "cache" / "accountant.json"
    cache.cache_path().write_text("{broken")  # an unreadable cache costs time, nothing else
    monkeypatch.setattr(cache, "_memory", {})
    assert PrivacyLedger.load(tmp_path / "privacy" / "0.json").epsilon == ledger.epsilon
    assert len(calls) == 2


def test_epsilon_after_detects_a_participation_over_budget():
    sigma = noise_multiplier(3.0, DELTA, 0.1, 20, "rdp")  # budget for two rounds of 10 steps
    ledger = PrivacyLedger(3.0, DELTA, "rdp")
    for rnd in (1, 2):
        assert ledger.epsilon_after(sigma, 0.1, 10) <= ledger.target_epsilon
        ledger.record(rnd, sigma, 0.1, 10)
    assert ledger.epsilon <= 3.0
    assert ledger.epsilon_after(sigma, 0.1, 10) > ledger.target_epsilon  # a third would overspend
    assert len(ledger.participations) == 2  # asking does not record


# ---------------------------------------------------------------------------------------------
# the DP-SGD step


def _reference_clipped_mean(model, named: dict[str, str], bundle, data, cfg, clip: float):
    """Per-example gradients one example at a time on `model` (a copy), each clipped to `clip`
    over all trainable tensors together; returns (their mean, their unclipped norms)."""
    live = dict(model.named_parameters())
    params = {k: live[name] for k, name in named.items()}
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params.values():
        p.requires_grad_(True)
    model.train()
    total = {k: torch.zeros_like(p) for k, p in params.items()}
    norms = []
    for text, label in zip(data.texts, data.labels):
        enc = bundle.tokenizer([text], truncation=True, max_length=cfg.max_length, return_tensors="pt")
        loss = F.cross_entropy(model(**enc).logits, torch.tensor([int(label)]))
        grads = dict(zip(params, torch.autograd.grad(loss, list(params.values()))))
        norm = torch.sqrt(sum(g.pow(2).sum() for g in grads.values()))
        factor = min(1.0, clip / (float(norm) + 1e-6))
        clipped = {k: g * factor for k, g in grads.items()}
        assert float(torch.sqrt(sum(g.pow(2).sum() for g in clipped.values()))) <= clip * (1 + 1e-6)
        for k in total:
            total[k] += clipped[k]
        norms.append(float(norm))
    return {k: v / len(data) for k, v in total.items()}, norms


@pytest.mark.parametrize("mode", ["hooks", "ghost"])
@pytest.mark.parametrize("which", ["B", "A+B+head"])
def test_per_sample_clipping_is_exact(cfg, train_data, mode, which):
    cfg = cfg.replace(optimizer="sgd", learning_rate=1.0, local_steps=1, batch_size=32)
    bundle = build_model(cfg, 3)
    _no_dropout(bundle.model)
    # B = 0 would give A no gradient at all, and the tiny random head (std 0.02) makes every
    # gradient tiny and alike: a unit-scale B and head give per-example norms that differ.
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for key, p in bundle.params.items():
            if key.endswith(("lora_B", "classifier.weight")):
                p.normal_(0.0, 1.0, generator=generator)
    data = train_data.subset(np.arange(6))
    keys = _keys(bundle, which)
    names = {id(p): n for n, p in bundle.model.named_parameters()}
    named = {k: names[id(bundle.params[k])] for k in keys}
    reference_model = copy.deepcopy(bundle.model)
    probe, norms = _reference_clipped_mean(copy.deepcopy(bundle.model), named, bundle, data, cfg, 1e9)
    clip = (min(norms) + max(norms)) / 2  # some examples are clipped, some are not
    expected, _ = _reference_clipped_mean(reference_model, named, bundle, data, cfg, clip)
    before = _snapshot(bundle)

    # q = 1 (batch larger than the data) makes the Poisson batch the whole fixed batch; σ = 0.
    dp = DPSettings(noise_multiplier=0.0, max_grad_norm=clip, sample_rate=sample_rate(len(data), 32),
                    grad_sample_mode=mode)
    train_local(bundle, data, cfg, keys, seed=(0, 1, 0), dp=dp)

    def flat(tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.cat([tensors[k].flatten() for k in keys])

    update = flat({k: before[k] - bundle.params[k].detach() for k in keys})  # SGD, lr = 1
    # 1e-6 absolute against updates up to ~1e-2: the float32 rounding of `before - after` at
    # weights of size ~1 is ~1e-7, while the clipping changes the mean by percents (B: ~30%).
    assert float((update - flat(expected)).abs().max()) <= 1e-6
    assert (flat(probe) - flat(expected)).norm() > 0.01 * flat(expected).norm()  # clipping mattered
    frozen = set(bundle.params) - set(keys)
    assert all(torch.equal(before[k], bundle.params[k]) for k in frozen)


def test_dp_training_moves_lora_and_lowers_the_loss(cfg, train_data):
    """Guards opacus #820 (LoRA weights silently frozen under DP): σ = 0.5, C = 1, 30 steps.

    Poisson batches of 64 expected out of 192 examples; Adam, because the tiny model's gradients
    are far below C (its weights have std 0.02) and plain SGD would need a huge learning rate.
    Over 5 seeds the loss fell by 0.46 to 0.88 from about 1.10.
    """
    cfg = cfg.replace(optimizer="adam", learning_rate=0.1, local_steps=30, batch_size=64)
    data = train_data.subset(np.arange(192))
    bundle = build_model(cfg, 3)
    keys = _keys(bundle, "A+B+head")
    before = _snapshot(bundle)
    dp = DPSettings(0.5, 1.0, sample_rate(len(data), cfg.batch_size))
    losses = train_local(bundle, data, cfg, keys, seed=(0, 1, 0), dp=dp)
    assert len(losses) == 30 and not any(math.isnan(x) for x in losses)
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.2, losses
    for key in keys:
        assert float((bundle.params[key] - before[key]).abs().max()) > 0, key


def test_hooks_and_ghost_take_the_same_noisy_poisson_steps(cfg, train_data):
    cfg = cfg.replace(local_steps=3, batch_size=32)
    results = []
    for mode in ("hooks", "ghost"):
        bundle = build_model(cfg, 3)
        dp = DPSettings(1.0, 0.5, sample_rate(len(train_data), cfg.batch_size), mode, reproducible=True)
        losses = train_local(bundle, train_data, cfg, _keys(bundle, "A+B+head"), seed=(3, 1, 0), dp=dp)
        results.append((losses, _snapshot(bundle)))
    (loss_h, state_h), (loss_g, state_g) = results
    assert loss_h == pytest.approx(loss_g, abs=1e-6)
    assert all(torch.allclose(state_h[k], state_g[k], atol=1e-5) for k in state_h)


@pytest.mark.parametrize("mode", ["hooks", "ghost"])
def test_micro_batches_accumulate_clipped_gradients_and_add_noise_once(cfg, train_data, mode):
    """Gradient accumulation under DP: the same Poisson batches in chunks of 5 rows take the same
    noisy steps as whole batches (one noise draw per logical step, not one per chunk)."""
    cfg = cfg.replace(local_steps=3, batch_size=32, dp=True)
    results = []
    for micro in (0, 5):
        bundle = build_model(cfg, 3)
        _no_dropout(bundle.model)
        dp = DPSettings(1.0, 0.5, sample_rate(len(train_data), cfg.batch_size), mode, reproducible=True)
        losses = train_local(bundle, train_data, cfg.replace(micro_batch_size=micro), _keys(bundle, "A+B+head"),
                             seed=(3, 1, 0), dp=dp)
        results.append((losses, _snapshot(bundle)))
    (loss_whole, whole), (loss_micro, micro) = results
    assert loss_whole == pytest.approx(loss_micro, abs=1e-5)
    assert all(torch.allclose(whole[k], micro[k], atol=1e-5) for k in whole)
    assert any(not torch.equal(whole[k], build_model(cfg, 3).params[k].detach()) for k in whole)  # it trained


def test_micro_batches_without_dp_take_the_whole_batch_step(cfg, train_data):
    cfg = cfg.replace(local_steps=3, batch_size=32, dp=False, max_grad_norm=0.5)
    states = []
    for micro in (0, 7):
        bundle = build_model(cfg, 3)
        _no_dropout(bundle.model)
        train_local(bundle, train_data, cfg.replace(micro_batch_size=micro), _keys(bundle, "A+B+head"), seed=(3, 1, 0))
        states.append(_snapshot(bundle))
    assert all(torch.allclose(states[0][k], states[1][k], atol=1e-6) for k in states[0])


def _recording_batches(monkeypatch) -> list[list[int]]:
    """Every Poisson batch that `dp_sgd_steps` draws from now on, as index lists."""
    from fedlora.privacy import dpsgd

    drawn: list[list[int]] = []

    def record(n, q, rng):
        idx = poisson_batch(n, q, rng)
        drawn.append(idx.tolist())
        return idx

    monkeypatch.setattr(dpsgd, "poisson_batch", record)
    return drawn


@pytest.mark.parametrize("mode", ["hooks", "ghost"])
def test_an_empty_poisson_batch_is_a_counted_noise_only_step(cfg, train_data, mode, monkeypatch):
    cfg = cfg.replace(optimizer="sgd", learning_rate=1e-3, local_steps=4)
    data = train_data.subset(np.arange(2))
    q = 0.01
    drawn = _recording_batches(monkeypatch)
    bundle = build_model(cfg, 3)
    keys = _keys(bundle, "A+B+head")
    before = _snapshot(bundle)
    sigma, clip = 1.0, 2.0
    dp = DPSettings(sigma, clip, q, mode, reproducible=True)  # with this seed every batch is empty
    losses = train_local(bundle, data, cfg, keys, seed=(0, 1, 0), dp=dp)
    assert drawn == [[]] * 4
    assert len(losses) == 4 and all(math.isnan(x) for x in losses)  # one entry per counted step
    # the update is pure noise N(0, σ²C²) per step, over the expected batch q·n, times lr
    noise = torch.cat([(before[k] - bundle.params[k].detach()).flatten() for k in keys])
    noise = noise / cfg.learning_rate * (q * len(data)) / (sigma * clip) / math.sqrt(4)
    assert 0.9 < float(noise.std()) < 1.1 and abs(float(noise.mean())) < 0.1

    still = _snapshot(bundle)
    losses = train_local(bundle, data, cfg, keys, seed=(0, 1, 0),
                         dp=DPSettings(0.0, clip, q, mode, reproducible=True))
    assert len(losses) == 4 and drawn[4:] == [[]] * 4
    assert all(torch.equal(still[k], bundle.params[k]) for k in keys)  # σ = 0: nothing to add


def test_dp_batches_and_noise_are_secret_unless_reproducible(cfg, train_data, monkeypatch):
    """Under DP the run seed (known to the server) must not tell which records a step used, nor
    the noise: two runs with the same seed differ; `reproducible` makes them identical."""
    cfg = cfg.replace(local_steps=3, batch_size=16)
    drawn = _recording_batches(monkeypatch)

    def run(seed, reproducible: bool) -> tuple[list[list[int]], torch.Tensor]:
        start = len(drawn)
        bundle = build_model(cfg, 3)
        dp = DPSettings(1.0, 1.0, sample_rate(len(train_data), cfg.batch_size), reproducible=reproducible)
        train_local(bundle, train_data, cfg, _keys(bundle, "B"), seed=seed, dp=dp)
        return drawn[start:], torch.cat([p.detach().flatten() for p in bundle.params.values()])

    secret = [run((0, 1, 0), reproducible=False) for _ in range(2)]
    assert secret[0][0] != secret[1][0]  # other records sampled
    assert not torch.equal(secret[0][1], secret[1][1])
    first = run((0, 1, 0), reproducible=True)
    again = run((0, 1, 0), reproducible=True)
    assert first[0] == again[0] and torch.equal(first[1], again[1])
    other = run((0, 2, 0), reproducible=True)
    assert other[0] != first[0] and not torch.equal(other[1], first[1])
    with pytest.raises(ValueError, match="needs a seed"):
        dp_sgd_steps(build_model(cfg, 3).model, torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))]),
                     DPSettings(1.0, 1.0, 0.5, reproducible=True), num_examples=4, steps=1,
                     forward=lambda idx: pytest.fail("must not run"))


def _hook_counts(model: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._backward_hooks) for m in model.modules())


def test_hooks_are_removed_also_after_an_exception_mid_step(cfg, train_data):
    bundle = build_model(cfg, 3)
    keys = _keys(bundle, "A+B+head")
    hooks_before = _hook_counts(bundle.model)
    dp = DPSettings(1.0, 1.0, 0.5, reproducible=True)  # this seed's first batch is not empty

    def failing_forward(idx):
        bundle.model(**bundle.tokenizer(["good"] * len(idx), return_tensors="pt"))  # activations kept
        raise RuntimeError("data loader broke")

    for p in bundle.model.parameters():
        p.requires_grad_(False)
    for key in keys:
        bundle.params[key].requires_grad_(True)
    bundle.model.train()
    optimizer = torch.optim.SGD([bundle.params[k] for k in keys], lr=0.1)
    with pytest.raises(RuntimeError, match="data loader broke"):
        dp_sgd_steps(bundle.model, optimizer, dp, num_examples=8, steps=2, forward=failing_forward, seed=(0,))
    assert _hook_counts(bundle.model) == hooks_before
    assert not hasattr(bundle.model, "autograd_grad_sample_hooks")
    assert not any("activations" in m.__dict__ for m in bundle.model.modules())
    assert not any(hasattr(p, "grad_sample") or hasattr(p, "summed_grad") for p in bundle.model.parameters())
    # the same model object trains again (no "Trying to add hooks twice")
    for mode in ("hooks", "ghost"):
        dp = DPSettings(1.0, 1.0, sample_rate(len(train_data), 32), mode)
        assert len(train_local(bundle, train_data, cfg, keys, seed=(0, 1, 0), dp=dp)) == cfg.local_steps
    assert _hook_counts(bundle.model) == hooks_before


def test_stale_or_inert_optimizer_parameters_are_refused(cfg):
    """The two faces of opacus #820: an optimizer over tensors the model does not use, and a step
    that leaves the trainable weights unchanged."""
    bundle = build_model(cfg, 3)
    key = next(k for k in bundle.params if k.endswith("lora_B"))
    param = bundle.params[key]
    param.requires_grad_(True)
    bundle.model.train()
    dp = DPSettings(1.0, 1.0, 0.5)
    kwargs = {"num_examples": 4, "steps": 1, "forward": lambda idx: pytest.fail("must not run"), "seed": (0,)}
    stale = torch.nn.Parameter(param.detach().clone())
    with pytest.raises(ValueError, match="not trainable parameters of the model"):
        dp_sgd_steps(bundle.model, torch.optim.SGD([stale], lr=0.1), dp, **kwargs)
    with pytest.raises(RuntimeError, match="opacus #820"):  # lr 0: the noisy step changes nothing
        dp_sgd_steps(bundle.model, torch.optim.SGD([param], lr=0.0),
                     DPSettings(1.0, 1.0, 1e-6, reproducible=True), **kwargs)
    assert not hasattr(bundle.model, "autograd_grad_sample_hooks")


@pytest.mark.parametrize("bad, match", [
    ({"noise_multiplier": -1.0}, "noise multiplier"), ({"noise_multiplier": math.nan}, "noise"),
    ({"max_grad_norm": 0.0}, "max grad norm"), ({"sample_rate": 0.0}, "sample rate"),
    ({"sample_rate": 1.5}, "sample rate"), ({"grad_sample_mode": "ew"}, "grad sample mode"),
])
def test_dp_settings_are_validated(bad, match):
    with pytest.raises(PrivacyError, match=match):
        DPSettings(**{"noise_multiplier": 1.0, "max_grad_norm": 1.0, "sample_rate": 0.1, **bad})


# ---------------------------------------------------------------------------------------------
# the command line


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_privacy_plan_agrees_with_opacus(capsys, accountant):
    """σ for a target must be Opacus' own answer and reach the target (just below it) when Opacus
    accounts the steps itself; ε for a σ must be what Opacus' accountant says."""
    from opacus.accountants.utils import get_noise_multiplier

    q, steps = 0.05, 50
    assert cli(["privacy", "plan", "--epsilon", "6", "--delta", "1e-5", "--sample-rate", str(q),
                "--steps", str(steps), "--accountant", accountant, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["sigma"] == pytest.approx(get_noise_multiplier(
        target_epsilon=6.0, target_delta=DELTA, sample_rate=q, steps=steps, accountant=accountant), rel=1e-12)
    independent = {"rdp": RDPAccountant, "prv": PRVAccountant}[accountant]()
    for _ in range(steps):
        independent.step(noise_multiplier=out["sigma"], sample_rate=q)
    reached = independent.get_epsilon(delta=DELTA)
    assert 6.0 - 0.05 <= reached <= 6.0 and out["epsilon"] == pytest.approx(reached, rel=1e-6)

    assert cli(["privacy", "plan", "--sigma", "1.0", "--delta", "1e-5", "--num-examples", "1000",
                "--batch-size", "32", "--steps", "50", "--accountant", accountant, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["sample_rate"] == 0.032 and out["accountant"] == accountant
    independent = {"rdp": RDPAccountant, "prv": PRVAccountant}[accountant]()
    for _ in range(50):
        independent.step(noise_multiplier=1.0, sample_rate=0.032)
    assert out["epsilon"] == pytest.approx(independent.get_epsilon(delta=DELTA), rel=1e-6)

    assert cli(["privacy", "plan", "--sigma", "1.0", "--delta", "1e-5", "--sample-rate", "0.032",
                "--steps", "50", "--accountant", accountant]) == 0
    assert f"ε = {out['epsilon']:.6g}" in capsys.readouterr().out


@pytest.mark.parametrize("args, match", [
    (["--epsilon", "6", "--delta", "2", "--sample-rate", "0.1", "--steps", "5"], "delta"),
    (["--epsilon", "6", "--delta", "1e-5", "--steps", "5"], "--sample-rate"),
    (["--epsilon", "6", "--delta", "1e-5", "--sample-rate", "0.1", "--num-examples", "9",
      "--batch-size", "3", "--steps", "5"], "cannot be combined"),
    (["--sigma", "1", "--delta", "1e-5", "--sample-rate", "0.1", "--steps", "0"], "steps"),
])
def test_privacy_plan_rejects_bad_input(capsys, args, match):
    assert cli(["privacy", "plan", *args]) == 2
    assert match in capsys.readouterr().err


def test_privacy_plan_needs_exactly_one_of_epsilon_and_sigma(capsys):
    for both_or_none in (["--epsilon", "6", "--sigma", "1"], []):
        with pytest.raises(SystemExit) as exc:
            cli(["privacy", "plan", *both_or_none, "--delta", "1e-5", "--sample-rate", "0.1",
                 "--steps", "5"])
        assert exc.value.code == 2
    assert "--epsilon" in capsys.readouterr().err


def test_privacy_report_lists_every_client(tmp_path, capsys):
    for pid, rounds in {"0": [1, 2, 3], "2": [2], "10": []}.items():
        ledger = PrivacyLedger(6.0, DELTA, "rdp")
        for rnd in rounds:
            ledger.record(rnd, 1.1, 0.05, 10)
        ledger.save(ledger_path(tmp_path, pid))
    assert cli(["privacy", "report", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:3] == ["partition", "participations", "rounds"]
    assert [line.split()[0] for line in lines[2:5]] == ["0", "2", "10"]  # numeric order
    assert lines[2].split()[1:3] == ["3", "1-3"] and "rdp accountant" in lines[-1]

    assert cli(["privacy", "report", str(tmp_path), "--json"]) == 0
    clients = {c["partition"]: c for c in json.loads(capsys.readouterr().out)["clients"]}
    assert clients["0"]["epsilon"] == epsilon([(1.1, 0.05, 30)], DELTA, "rdp")
    assert clients["0"]["remaining"] == pytest.approx(6.0 - clients["0"]["epsilon"])
    assert clients["10"]["participations"] == 0 and clients["10"]["epsilon"] == 0.0


def test_privacy_report_without_ledgers_exits_2(tmp_path, capsys):
    assert cli(["privacy", "report", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert cli(["privacy", "report", str(tmp_path)]) == 2
    assert "no privacy ledgers" in capsys.readouterr().err
    (tmp_path / "privacy").mkdir()
    assert cli(["privacy", "report", str(tmp_path)]) == 2
    assert "no ledger files" in capsys.readouterr().err
