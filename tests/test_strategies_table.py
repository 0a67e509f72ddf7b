"""Every aggregation method against a dense float64 brute-force reference, in peft's TEST_CASES style.

`TEST_CASES` lists one row per (strategy, options, client ranks) with what its clients send and
receive. Each row is simulated for `ROUNDS` rounds on a toy model (two LoRA layers, 24×20 and
40×36, one head parameter), K = 3 clients of unequal size (p = 0.1, 0.3, 0.6) that "train" by
adding seeded noise and keep what they hold between rounds as `client/app.py` does. The tests
then check, per round and layer:

- the model the new global state stands for, ΔW_eff = D + s·B·A (D = the folded base-weight change,
  0 unless `changes_base`; W0 is left out, it is the same on both sides and would only hide errors),
  against the weighted mean of the clients' trained models Σ p_k (D + s_k B_k A_k), which is
  W_prev + Σ p_k s_k B_k A_k − (what the clients started from): within 1e-6 (relative) for
  `exact` methods, clearly not for inexact ones; plus each method's own algebra (`CHECKS`);
- what goes up and down (keys per client and round, and their bytes);
- that methods without `mixed_ranks` refuse mixed ranks with a clear error;
- that `state_dict` / `load_state_dict` reproduce the next aggregation bit for bit;
- `product_svd` and `BaseDelta` against `torch.linalg.svd` / dense sums, rank-deficient inputs included.
"""

from __future__ import annotations

import functools
import io
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import pytest
import torch

from fedlora.strategies import ClientSpec, LoraMethod, available_strategies, get_method, normalized_weights
from fedlora.strategies.base import A_SUFFIX, B_SUFFIX, HEAD_PREFIX, State, is_delta_key, layer_names
from fedlora.strategies.lorafair import FairProblem
from fedlora.strategies.lowrank import BaseDelta, dense_is_cheaper, product_svd

F64 = torch.float64
LAYERS = {"enc.0.query": (24, 20), "enc.0.value": (40, 36)}  # name: (m, n)
HEAD = {"head.out.weight": (3, 8)}
NUM_EXAMPLES = (10, 30, 60)  # p = 0.1, 0.3, 0.6
ALPHA = 16.0  # lora-alpha: s = 4 at r = 4, and s_k = 8, 4, 8/3 at r_k = 2, 4, 6
ROUNDS = 3
EQUAL, MIXED = (4, 4, 4), (2, 4, 6)
EXACT_TOL = 1e-6  # relative; the float64 server math reaches ~1e-15, float32 state arrays ~1e-7


class Case(NamedTuple):
    """One row: a strategy with run-config options, the clients' ranks, and the keys that travel.

    `up` are the kinds a client sends back; `down_first` / `down_later` what it receives on its
    first / a later contact: A, B, H (head). The base-weight change (kind D) is expected in every
    downlink of a `changes_base` method once something was folded.
    """

    id: str
    strategy: str
    config: dict[str, Any]
    ranks: tuple[int, ...]
    up: str
    down_first: str
    down_later: str


TEST_CASES = [
    Case("fedit", "fedit", {}, EQUAL, up="ABH", down_first="ABH", down_later="ABH"),
    Case("ffa", "ffa", {}, EQUAL, up="BH", down_first="ABH", down_later="BH"),  # A is sent once
    Case("fedsvd", "fedsvd", {}, EQUAL, up="BH", down_first="ABH", down_later="ABH"),  # A changes
    Case("lorafair", "lorafair", {"fair-lambda": 0.01}, EQUAL, up="ABH", down_first="ABH", down_later="ABH"),
    Case("lorafair-lam0", "lorafair", {"fair-lambda": 0.0}, EQUAL, up="ABH", down_first="ABH", down_later="ABH"),
    Case("fedex", "fedex", {}, EQUAL, up="ABH", down_first="ABH", down_later="ABH"),
    Case("flora", "flora", {"seed": 3}, EQUAL, up="ABH", down_first="ABH", down_later="ABH"),
    Case("flora-mixed", "flora", {"seed": 3}, MIXED, up="ABH", down_first="ABH", down_later="ABH"),
    Case("fedsa", "fedsa", {}, EQUAL, up="AH", down_first="ABH", down_later="AH"),  # B stays local
    Case("flexlora", "flexlora", {}, EQUAL, up="ABH", down_first="ABH", down_later="ABH"),
    Case("flexlora-mixed", "flexlora", {}, MIXED, up="ABH", down_first="ABH", down_later="ABH"),
]
CASES = {case.id: case for case in TEST_CASES}


def _params(cases: Sequence[Case] = TEST_CASES) -> list:
    return [pytest.param(case, id=case.id) for case in cases]


def _method(case: Case) -> LoraMethod:
    return get_method(case.strategy, {"lora-alpha": ALPHA, **case.config})


# --------------------------------------------------------------------------------------------------
# the simulated federation


def _gen(*seed: int) -> torch.Generator:
    """A generator for a tuple of small ints (round, client, ...), distinct for distinct tuples."""
    return torch.Generator().manual_seed(sum(s * 1009**i for i, s in enumerate(seed)))


def _kind(key: str) -> str:
    if is_delta_key(key):
        return "D"
    if key.startswith(HEAD_PREFIX):
        return "H"
    return {A_SUFFIX: "A", B_SUFFIX: "B"}[key[key.rindex(".") :]]


def _kinds(state: Mapping[str, torch.Tensor]) -> set[str]:
    return {_kind(k) for k in state}


def _keys(state: Mapping[str, torch.Tensor], kind: str) -> set[str]:
    return {k for k in state if _kind(k) == kind}


def _initial_state(rank: int) -> State:
    """peft's init: Kaiming-uniform A (U(−1/√n, 1/√n)), B = 0; a random head; float32."""
    g = _gen(0)
    state: State = {}
    for layer, (m, n) in LAYERS.items():
        state[layer + A_SUFFIX] = (torch.rand(rank, n, generator=g) * 2 - 1) / math.sqrt(n)
        state[layer + B_SUFFIX] = torch.zeros(m, rank)
    for key, shape in HEAD.items():
        state[key] = torch.randn(*shape, generator=g)
    return state


def _train(start: State, keys: Sequence[str], *seed: int) -> State:
    """Local training stand-in: seeded noise on every trainable key, large enough for A to drift."""
    g = _gen(*seed)
    out = dict(start)
    for key in keys:
        v = start[key]
        scale = {"A": 0.5 / math.sqrt(v.shape[-1]), "B": 0.05, "H": 0.1}[_kind(key)]
        out[key] = (v.to(F64) + scale * torch.randn(v.shape, generator=g, dtype=F64)).to(v.dtype)
    return out


def _serialize(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _deserialize(data: bytes) -> Any:
    return torch.load(io.BytesIO(data))


@dataclass
class Round:
    before: State  # the global state the round started from
    sent: list[State]  # what each client received
    trained: list[State]  # each client's adapter after training: its model
    updates: list[State]  # what each client sent back
    weights: torch.Tensor
    after: State  # the new global state
    delta_before: dict[str, torch.Tensor]  # per layer, float64 as the server holds it
    delta_after: dict[str, torch.Tensor]
    method_state: bytes  # method.state_dict() after the round, serialised as a checkpoint would be
    metrics: dict[str, float]


def _deltas(method: LoraMethod) -> dict[str, torch.Tensor]:
    out = {}
    for layer, (m, n) in LAYERS.items():
        d = method.base_delta(layer) if method.changes_base else None
        out[layer] = torch.zeros(m, n, dtype=F64) if d is None else d
    return out


def _play_round(method: LoraMethod, state: State, kept: list[State], ranks: Sequence[int], t: int) -> Round:
    """One round; `kept[pid]` is client pid's own copy of its adapter (replaced, never mutated:
    the previous rounds' records hold the old copies)."""
    delta_before = _deltas(method)
    sent, trained, updates = [], [], []
    for pid, rank in enumerate(ranks):
        received = method.downlink(state, ClientSpec(pid, rank, first_contact=t == 0))
        # as client/app.py: what was not sent this time comes from the client's own copy
        start = {**kept[pid], **{k: v for k, v in received.items() if not is_delta_key(k)}}
        kept[pid] = _train(start, method.trainable_keys(start), t, pid)
        sent.append(received)
        trained.append(kept[pid])
        updates.append({k: kept[pid][k] for k in method.uplink_keys(start)})
    weights = normalized_weights(NUM_EXAMPLES)
    after = method.aggregate(state, updates, weights)
    return Round(state, sent, trained, updates, weights, after, delta_before, _deltas(method),
                 _serialize(method.state_dict()), method.round_metrics())


@functools.cache
def simulate(case_id: str) -> tuple[Round, ...]:
    """`ROUNDS` rounds of one case, every client taking part in every round (cached per case)."""
    case = CASES[case_id]
    method = _method(case)
    state, kept = _initial_state(max(case.ranks)), [{} for _ in case.ranks]
    rounds = []
    for t in range(ROUNDS):
        rounds.append(_play_round(method, state, kept, case.ranks, t))
        state = rounds[-1].after
    return tuple(rounds)


# --------------------------------------------------------------------------------------------------
# dense float64 references


def _rel(got: torch.Tensor, ref: torch.Tensor) -> float:
    """‖got − ref‖_F / ‖ref‖_F (the absolute error where ref = 0)."""
    err = float(torch.linalg.norm(got.to(F64) - ref.to(F64)))
    scale = float(torch.linalg.norm(ref.to(F64)))
    return err / scale if scale > 0 else err


def _factors(adapter: Mapping[str, torch.Tensor], layer: str) -> tuple[torch.Tensor, torch.Tensor]:
    return adapter[layer + B_SUFFIX].to(F64), adapter[layer + A_SUFFIX].to(F64)


def _lora(adapter: Mapping[str, torch.Tensor], layer: str) -> torch.Tensor:
    """s·B·A with s = lora-alpha / r at the adapter's own rank (dense, float64)."""
    b, a = _factors(adapter, layer)
    return (ALPHA / a.shape[0]) * b @ a


def _mean(rnd: Round, key: str, source: str = "trained") -> torch.Tensor:
    """Σ p_k u_k[key] over the clients' trained adapters (or their updates), float64."""
    return sum(p * u[key].to(F64) for p, u in zip(rnd.weights.tolist(), getattr(rnd, source)))


def _client_mean_change(rnd: Round, layer: str) -> torch.Tensor:
    """Σ p_k (D + s_k B_k A_k): the weighted mean of the clients' trained models, less W0."""
    return rnd.delta_before[layer] + sum(p * _lora(u, layer) for p, u in zip(rnd.weights.tolist(), rnd.trained))


def _state_delta(state: Mapping[str, torch.Tensor], layer: str) -> torch.Tensor | None:
    """The base-weight change a receiver rebuilds from the state (None when it carries none)."""
    if layer + ".base_delta" in state:
        return state[layer + ".base_delta"].to(F64)
    if layer + ".base_delta_U" in state:
        return state[layer + ".base_delta_U"].to(F64) @ state[layer + ".base_delta_V"].to(F64)
    return None


def _orthonormality_error(a: torch.Tensor) -> float:
    a = a.to(F64)
    return float((a @ a.T - torch.eye(a.shape[0], dtype=F64)).abs().max())


def _truncated(x: torch.Tensor, k: int) -> torch.Tensor:
    """The best rank-k approximation of x (Eckart–Young), by a dense SVD."""
    u, s, vh = torch.linalg.svd(x, full_matrices=False)
    return (u[:, :k] * s[:k]) @ vh[:k]


def _cos(x: torch.Tensor, y: torch.Tensor) -> float:
    return float((x * y).sum() / (torch.linalg.norm(x) * torch.linalg.norm(y)))


# --------------------------------------------------------------------------------------------------
# each method's own algebra: check(case, rnd, layer)


def _check_fedit(case: Case, rnd: Round, layer: str) -> None:
    for suffix in (A_SUFFIX, B_SUFFIX):  # both factors are plain weighted means
        assert _rel(rnd.after[layer + suffix], _mean(rnd, layer + suffix)) < EXACT_TOL


def _check_ffa(case: Case, rnd: Round, layer: str) -> None:
    assert torch.equal(rnd.after[layer + A_SUFFIX], rnd.before[layer + A_SUFFIX])  # frozen, bit for bit
    assert _rel(rnd.after[layer + B_SUFFIX], _mean(rnd, layer + B_SUFFIX)) < EXACT_TOL


def _check_fedsvd(case: Case, rnd: Round, layer: str) -> None:
    b_bar, a_prev = _mean(rnd, layer + B_SUFFIX), rnd.before[layer + A_SUFFIX].to(F64)
    b_new, a_new = _factors(rnd.after, layer)
    assert _rel(b_new @ a_new, b_bar @ a_prev) < EXACT_TOL  # the product B̄A is preserved
    assert _orthonormality_error(a_new) < 1e-6  # and A has orthonormal rows (float32 state)


def _check_lorafair(case: Case, rnd: Round, layer: str) -> None:
    lam = case.config["fair-lambda"]
    b_new, a_new = _factors(rnd.after, layer)
    a_bar, b_bar = _mean(rnd, layer + A_SUFFIX), _mean(rnd, layer + B_SUFFIX)
    dw = sum(p * u[layer + B_SUFFIX].to(F64) @ u[layer + A_SUFFIX].to(F64)
             for p, u in zip(rnd.weights.tolist(), rnd.trained))  # equal ranks: s cancels in the cosine
    assert _rel(a_new, a_bar) < EXACT_TOL  # A ← Ā

    # the Gram form is the dense problem: G = ĀĀᵀ, P = ΔW Āᵀ, ‖ΔW‖, and loss and gradient halfway to
    # the solver's ΔB (at the optimum itself the gradient is mostly cancellation)
    problem = FairProblem.build(rnd.updates, layer, rnd.weights)
    assert _rel(problem.G, a_bar @ a_bar.T) < 1e-12 and _rel(problem.P, dw @ a_bar.T) < 1e-12
    assert problem.dw_norm == pytest.approx(float(torch.linalg.norm(dw)), rel=1e-12)
    delta = (0.5 * (b_new - b_bar)).requires_grad_(True)
    corrected = (b_bar + delta) @ a_bar
    dense_loss = 1 - (corrected * dw).sum() / (torch.linalg.norm(corrected) * torch.linalg.norm(dw))
    dense_loss = dense_loss + lam * (delta * delta).sum() / (b_bar * b_bar).sum()  # relative to ‖B̄‖² (B̄ ≠ 0 here)
    dense_loss.backward()
    loss, grad = problem.loss_and_grad(delta.detach(), lam)
    assert loss == pytest.approx(float(dense_loss.detach()), rel=1e-12)
    assert _rel(grad, delta.grad) < 1e-9

    before, after = _cos(dw, b_bar @ a_bar), _cos(dw, b_new @ a_bar)
    assert after >= before - 1e-7  # never worse than FedIT (B′ is rounded to float32)
    if lam == 0.0:  # the unregularised optimum: the projection of ΔW onto Ā's row space
        best = _cos(dw, dw @ torch.linalg.pinv(a_bar) @ a_bar)
        assert problem.best_cosine() == pytest.approx(best, abs=1e-10)
        assert after == pytest.approx(best, abs=1e-4)


def _check_fedex(case: Case, rnd: Round, layer: str) -> None:
    for suffix in (A_SUFFIX, B_SUFFIX):  # FedIT's factors; the residual went into the base weight
        assert _rel(rnd.after[layer + suffix], _mean(rnd, layer + suffix)) < EXACT_TOL


def _check_flora(case: Case, rnd: Round, layer: str) -> None:
    a_new = rnd.after[layer + A_SUFFIX]
    n = LAYERS[layer][1]
    assert torch.equal(rnd.after[layer + B_SUFFIX], torch.zeros_like(rnd.before[layer + B_SUFFIX]))
    assert a_new.shape == (max(case.ranks), n) and float(a_new.abs().max()) <= 1 / math.sqrt(n)
    assert not torch.equal(a_new, rnd.before[layer + A_SUFFIX])  # a fresh A every round


def _check_fedsa(case: Case, rnd: Round, layer: str) -> None:
    assert _rel(rnd.after[layer + A_SUFFIX], _mean(rnd, layer + A_SUFFIX)) < EXACT_TOL
    assert torch.equal(rnd.after[layer + B_SUFFIX], rnd.before[layer + B_SUFFIX])  # B is never aggregated


def _check_flexlora(case: Case, rnd: Round, layer: str) -> None:
    dw = sum(p * _lora(u, layer) for p, u in zip(rnd.weights.tolist(), rnd.trained))  # Σ p_k s_k B_k A_k
    rank = max(case.ranks)
    assert _rel(_lora(rnd.after, layer), _truncated(dw, rank)) < EXACT_TOL
    assert _orthonormality_error(rnd.after[layer + A_SUFFIX]) < 1e-6
    sigma = torch.linalg.svdvals(dw)
    for pid, r_k in enumerate(case.ranks):  # each client gets the best approximation at its own rank
        mine = _lora(_method(case).downlink(rnd.after, ClientSpec(pid, r_k, first_contact=False)), layer)
        assert _rel(mine, _truncated(dw, r_k)) < EXACT_TOL
        assert float(torch.linalg.norm(dw - mine)) == pytest.approx(float(sigma[r_k:].norm()), rel=1e-5)


CHECKS: dict[str, Callable[[Case, Round, str], None]] = {
    "fedit": _check_fedit, "ffa": _check_ffa, "fedsvd": _check_fedsvd, "lorafair": _check_lorafair,
    "fedex": _check_fedex, "flora": _check_flora, "fedsa": _check_fedsa, "flexlora": _check_flexlora,
}


# --------------------------------------------------------------------------------------------------
# the tests


def test_the_table_covers_every_strategy():
    assert {case.strategy for case in TEST_CASES} == set(available_strategies()) == set(CHECKS)


@pytest.mark.parametrize("case", _params())
def test_model_update_matches_the_dense_reference(case: Case):
    method = _method(case)
    for rnd in simulate(case.id):
        assert set(rnd.after) - _keys(rnd.after, "D") == set(rnd.before) - _keys(rnd.before, "D")
        for key in HEAD:  # every method averages the head
            assert _rel(rnd.after[key], _mean(rnd, key)) < EXACT_TOL
        for layer in LAYERS:
            got = rnd.delta_after[layer] + _lora(rnd.after, layer)  # ΔW_eff = D + s·B·A
            err = _rel(got, _client_mean_change(rnd, layer))
            if method.exact:
                assert err < EXACT_TOL, f"{layer}: not exact ({err:.2e})"
            elif method.exact is False:  # the flag is honest: these methods do lose something here
                assert err > 1e-3, f"{layer}: exact ({err:.2e}) although `exact` is False"
            CHECKS[case.strategy](case, rnd, layer)


@pytest.mark.parametrize("case", _params())
def test_base_delta_is_exact_and_sent_in_its_smaller_form(case: Case):
    """The folded change D (float64 on the server) travels in the state: factored U·V (m×q, q×n, q its
    numerical rank) while re-compressing is cheaper than adding densely (`dense_is_cheaper`, checked
    exactly in test_base_delta_against_a_dense_sum), dense from then on, and never factored when that
    is the bigger form; nothing for methods that keep W0."""
    method = _method(case)
    dense_since: dict[str, int] = {}
    for t, rnd in enumerate(simulate(case.id)):
        if not method.changes_base:
            assert not _keys(rnd.after, "D")
            continue
        for layer, (m, n) in LAYERS.items():
            d = rnd.delta_after[layer]
            assert _rel(_state_delta(rnd.after, layer), d) < EXACT_TOL  # float32 arrays of the float64 D
            q = int(torch.linalg.matrix_rank(d))
            keys = sorted(k for k in _keys(rnd.after, "D") if k.startswith(layer + "."))
            if keys == [layer + ".base_delta"]:
                assert rnd.after[keys[0]].shape == (m, n)
                dense_since.setdefault(layer, t)
            else:
                assert layer not in dense_since, f"{layer} went back to factored in round {t}"
                assert keys == [layer + ".base_delta_U", layer + ".base_delta_V"]
                assert rnd.after[keys[0]].shape == (m, q) and rnd.after[keys[1]].shape == (q, n)
                assert q * (m + n) < m * n


def _nbytes(state: Mapping[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in state.values())


def _expected_bytes(kinds: str, rank: int, itemsize: int = 4) -> int:
    sizes = {"A": lambda m, n: rank * n, "B": lambda m, n: m * rank}
    total = sum(sizes[k](m, n) for k in kinds if k in sizes for m, n in LAYERS.values())
    return (total + ("H" in kinds) * sum(math.prod(s) for s in HEAD.values())) * itemsize


@pytest.mark.parametrize("case", _params())
def test_what_goes_up_and_down(case: Case):
    method = _method(case)
    for t, rnd in enumerate(simulate(case.id)):
        folded = bool(_keys(rnd.before, "D"))
        for pid, (sent, update, trained) in enumerate(zip(rnd.sent, rnd.updates, rnd.trained)):
            rank = case.ranks[pid]
            down = case.down_first if t == 0 else case.down_later
            assert _kinds(sent) == set(down) | ({"D"} if folded else set()), f"round {t}, client {pid}"
            assert _kinds(update) == set(case.up), f"round {t}, client {pid}"
            # clients train what they send, and B even where they keep it (FedSA)
            assert _kinds({k: None for k in method.trainable_keys(trained)}) == set(case.up) | {"B"}
            assert _nbytes(update) == _expected_bytes(case.up, rank)
            delta_bytes = _nbytes({k: v for k, v in sent.items() if is_delta_key(k)})
            assert _nbytes(sent) == _expected_bytes(down, rank) + delta_bytes
            assert delta_bytes <= sum(m * n * 4 for m, n in LAYERS.values())  # never above dense


@pytest.mark.parametrize("case", _params([c for c in TEST_CASES if c.ranks == EQUAL]))
def test_mixed_ranks_are_aggregated_or_refused(case: Case):
    method = _method(case)
    state, kept = _initial_state(max(MIXED)), [{} for _ in MIXED]
    if method.mixed_ranks:
        new = _play_round(method, state, kept, MIXED, 0).after
        assert all(new[layer + A_SUFFIX].shape == (max(MIXED), n) for layer, (_, n) in LAYERS.items())
    else:
        with pytest.raises(ValueError, match="mixed LoRA ranks"):
            _play_round(method, state, kept, MIXED, 0)


@pytest.mark.parametrize("case", _params())
def test_state_dict_round_trip_gives_the_same_next_aggregation(case: Case):
    first, second = simulate(case.id)[:2]
    restored = _method(case)
    restored.load_state_dict(_deserialize(first.method_state))  # a restart between the rounds
    new = restored.aggregate(second.before, second.updates, second.weights)
    assert new.keys() == second.after.keys()
    assert all(torch.equal(new[k], second.after[k]) for k in new)
    if not _method(case).changes_base:
        assert restored.state_dict() == {}


@pytest.mark.parametrize("case", _params([c for c in TEST_CASES if _method(c).changes_base]))
def test_an_in_memory_snapshot_can_retry_a_round(case: Case):
    """Keep `state_dict()` in memory, run a round, restore the snapshot into a fresh method and run
    the same round again (a server retrying a failed round): the same result."""
    rounds = simulate(case.id)
    method = _method(case)
    method.load_state_dict(_deserialize(rounds[0].method_state))
    snapshot = method.state_dict()
    second = rounds[1]
    method.aggregate(second.before, second.updates, second.weights)
    retry = _method(case)
    retry.load_state_dict(snapshot)
    retry.aggregate(second.before, second.updates, second.weights)
    for layer in LAYERS:
        assert torch.equal(retry.base_delta(layer), second.delta_after[layer]), layer


def test_aggregate_leaves_its_inputs_alone():
    for case in TEST_CASES:
        rnd = simulate(case.id)[0]
        before = {k: v.clone() for k, v in rnd.before.items()}
        updates = [{k: v.clone() for k, v in u.items()} for u in rnd.updates]
        _method(case).aggregate(rnd.before, rnd.updates, rnd.weights)
        assert all(torch.equal(rnd.before[k], before[k]) for k in before), case.id
        assert all(torch.equal(u[k], c[k]) for u, c in zip(rnd.updates, updates) for k in c), case.id


def test_flora_reinitialisation_is_seeded():
    rnd = simulate("flora")[0]
    again = _method(CASES["flora"]).aggregate(rnd.before, rnd.updates, rnd.weights)
    other = get_method("flora", {"lora-alpha": ALPHA, "seed": 4}).aggregate(rnd.before, rnd.updates, rnd.weights)
    for layer in LAYERS:
        assert torch.equal(again[layer + A_SUFFIX], rnd.after[layer + A_SUFFIX])
        assert not torch.equal(other[layer + A_SUFFIX], rnd.after[layer + A_SUFFIX])


def test_lorafair_metrics_are_the_dense_cosines():
    for case_id in ("lorafair", "lorafair-lam0"):
        for rnd in simulate(case_id):
            before, after = [], []
            for layer in layer_names(rnd.after):
                dw = sum(p * u[layer + B_SUFFIX].to(F64) @ u[layer + A_SUFFIX].to(F64)
                         for p, u in zip(rnd.weights.tolist(), rnd.trained))
                a_bar = _mean(rnd, layer + A_SUFFIX)
                before.append(_cos(dw, _mean(rnd, layer + B_SUFFIX) @ a_bar))
                after.append(_cos(dw, rnd.after[layer + B_SUFFIX].to(F64) @ a_bar))
            assert rnd.metrics["fair_cos_before"] == pytest.approx(sum(before) / len(before), abs=1e-9)
            assert rnd.metrics["fair_cos_after"] == pytest.approx(sum(after) / len(after), abs=1e-6)


# --------------------------------------------------------------------------------------------------
# product_svd and BaseDelta against dense references


def _low_rank(m: int, n: int, rank: int, seed: int) -> torch.Tensor:
    g = _gen(seed)
    return torch.randn(m, rank, generator=g, dtype=F64) @ torch.randn(rank, n, generator=g, dtype=F64)


# (id, m, n, q, rank of U): U is m×q of that rank, V is q×n random
PRODUCT_SVD_CASES = [
    ("thin", 24, 20, 5, 5),
    ("rank-deficient", 24, 20, 6, 2),
    ("zero", 24, 20, 4, 0),
    ("inner-above-min", 24, 20, 30, 30),  # q > min(m, n): the product has rank 20
    ("wide-deficient", 36, 40, 30, 7),
]


@pytest.mark.parametrize("m, n, q, rank", [c[1:] for c in PRODUCT_SVD_CASES], ids=[c[0] for c in PRODUCT_SVD_CASES])
def test_product_svd_matches_the_dense_svd(m, n, q, rank):
    U, V = _low_rank(m, q, rank, 1), torch.randn(q, n, generator=_gen(2), dtype=F64)
    product = U @ V
    s_ref = torch.linalg.svdvals(product)
    true_rank = int(torch.linalg.matrix_rank(product))
    assert true_rank == min(rank, m, n)

    left, s, right = product_svd(U, V)
    k = min(m, n, q)
    assert s.shape == (k,) and right.shape == (k, n)
    left = left[:, :k]  # see test_product_svd_is_thin_when_the_inner_size_exceeds_the_layer
    assert _orthonormality_error(left.T) < 1e-12 and _orthonormality_error(right) < 1e-12
    assert bool((s[:-1] >= s[1:]).all())
    torch.testing.assert_close(s, s_ref[:k], rtol=0, atol=1e-12 * max(float(s_ref[0]), 1.0))
    assert _rel((left * s) @ right, product) < 1e-12

    left, s, right = product_svd(U, V, drop_zeros=True)
    assert s.shape == (true_rank,) and left.shape == (m, true_rank) and right.shape == (true_rank, n)
    assert _rel((left * s) @ right, product) < 1e-12
    # the singular subspaces are unique (unlike the vectors' signs): compare their projectors
    u_ref, _, vh_ref = torch.linalg.svd(product)
    assert _rel(left @ left.T, u_ref[:, :true_rank] @ u_ref[:, :true_rank].T) < 1e-10
    assert _rel(right.T @ right, vh_ref[:true_rank].T @ vh_ref[:true_rank]) < 1e-10


def test_product_svd_is_thin_when_the_inner_size_exceeds_the_layer():
    left, s, right = product_svd(torch.randn(24, 30, dtype=F64), torch.randn(30, 20, dtype=F64))
    assert left.shape == (24, 20) and s.shape == (20,) and right.shape == (20, 20)


def test_product_svd_rejects_mismatched_factors():
    with pytest.raises(ValueError, match="inner sizes differ"):
        product_svd(torch.zeros(4, 3), torch.zeros(2, 5))


def test_base_delta_against_a_dense_sum():
    """240×240, 8 columns added per step (dense: 2mnk = 922k flops): factored while re-compressing
    q + 8 columns costs less, 6(m+n)(q+8)² + 22(q+8)³ flops (q + 8 ≤ 17), dense from then on;
    cancellations shrink the rank, and with it the next step's cost."""
    m, n = 240, 240
    delta, dense = BaseDelta(m, n), torch.zeros(m, n, dtype=F64)
    assert delta.rank == 0 and delta.arrays("l", torch.float32) == {}
    x = _low_rank(m, n, 3, 10)
    # (added, rank of the sum, factored?): q + 8 = 8, 11, 15, 12 stay factored; 10 + 8 = 18 does not
    steps = [(x, 3, True), (_low_rank(m, n, 4, 11), 7, True), (-x, 4, True), (_low_rank(m, n, 6, 12), 10, True),
             (_low_rank(m, n, 1, 13), 11, False), (_low_rank(m, n, 2, 14), 13, False)]
    for i, (add, rank, factored) in enumerate(steps):
        assert dense_is_cheaper(m, n, delta.rank, 8) is not factored, i
        u, s, vh = torch.linalg.svd(add)  # any factorisation will do; a redundant one on purpose
        delta.add(u[:, :8] * s[:8], vh[:8])
        dense += add
        assert _rel(delta.to_dense(), dense) < 1e-12, i
        if factored:
            assert delta.rank == rank and delta.dense is None, i
            arrays = delta.arrays("l", torch.float32)
            assert {k: tuple(v.shape) for k, v in arrays.items()} == {"l.base_delta_U": (m, rank),
                                                                      "l.base_delta_V": (rank, n)}
        else:  # dense from here on
            assert delta.dense is not None and delta.rank == min(m, n), i
            assert list(delta.arrays("l", torch.float32)) == ["l.base_delta"]
        assert _rel(_state_delta(delta.arrays("l", torch.float32), "l"), dense) < 1e-6

    with pytest.raises(ValueError, match="cannot add"):
        delta.add(torch.zeros(m + 1, 2), torch.zeros(2, n))


def test_the_switch_to_dense_comes_before_the_factored_form_costs_more():
    """At 4096² with 160 columns a round (r = 16, K = 10): factored for one round; by memory alone
    (q(m+n) < mn) it would have been twelve. Whenever the factored form is bigger, it is dearer."""
    assert [dense_is_cheaper(4096, 4096, q, 160) for q in (0, 160, 1920)] == [False, True, True]
    assert not any(dense_is_cheaper(4096, 4096, q, 160) for q in range(0, 140))
    for m, n, k in ((384, 384, 80), (4096, 4096, 160), (24, 20, 3), (4096, 1024, 8)):
        for q in range(0, min(m, n) + 1, max(1, min(m, n) // 64)):
            if q * (m + n) >= m * n:
                assert dense_is_cheaper(m, n, q, k), (m, n, q, k)



@pytest.mark.parametrize("rank", [3, 15], ids=["factored", "dense"])
def test_base_delta_state_dict_round_trip(rank):
    delta = BaseDelta(24, 20)
    delta.add(_low_rank(24, rank, rank, 20), torch.randn(rank, 20, generator=_gen(21), dtype=F64))
    restored = BaseDelta.from_state_dict(_deserialize(_serialize(delta.state_dict())))
    more = (_low_rank(24, 2, 2, 22), torch.randn(2, 20, generator=_gen(23), dtype=F64))
    delta.add(*more)
    restored.add(*more)
    assert restored.rank == delta.rank and torch.equal(restored.to_dense(), delta.to_dense())
