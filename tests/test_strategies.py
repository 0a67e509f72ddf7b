"""Guards the pure-torch aggregation math in `fedlora.strategies` (no Flower, no model, CPU only).

- `refactorize` (FedSVD's server step) against a brute-force dense float64 SVD of B̄·A: product
  preserved, orthonormal A rows, top-r singular values in B's column norms, the same factors up to
  the sign convention, exact zeros for a zero B̄, dtype kept, idempotent, bad shapes rejected.
- `FedSVD.aggregate` end to end on a two-layer state with a trainable head.
- FedIT / FFA-LoRA weighted means with unequal client sizes, and which keys go up and down.
- `normalized_weights`, `weighted_average` and `get_method` input validation.
- The byte count of a B-only uplink (what FFA-LoRA and FedSVD put on the wire).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import pytest
import torch

from fedlora.strategies import (
    ClientSpec,
    FedIT,
    FedSVD,
    FFALoRA,
    available_strategies,
    get_method,
    normalized_weights,
    refactorize,
    weighted_average,
)
from fedlora.strategies import fedsvd
from fedlora.strategies.base import A_SUFFIX, B_SUFFIX
from fedlora.strategies.lowrank import product_svd

# --------------------------------------------------------------------------------------------------
# helpers


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _kaiming_a(r: int, n: int, seed: int) -> torch.Tensor:
    """A initialised as peft does for lora_A: kaiming_uniform_(a=√5), i.e. U(-1/√n, 1/√n)."""
    a = torch.empty(r, n, dtype=torch.float64)
    torch.nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=_gen(seed))
    return a


def _make_a(kind: str, r: int, n: int, seed: int) -> torch.Tensor:
    if kind == "kaiming":
        return _kaiming_a(r, n, seed)
    if kind == "random":
        return torch.randn(r, n, dtype=torch.float64, generator=_gen(seed))
    if kind == "orthonormal":  # every round after the first: the previous round's Vᵀ
        return torch.linalg.qr(torch.randn(n, r, dtype=torch.float64, generator=_gen(seed))).Q.T
    raise AssertionError(kind)


def _make_b(kind: str, m: int, r: int, seed: int) -> torch.Tensor:
    if kind == "random":
        return torch.randn(m, r, dtype=torch.float64, generator=_gen(seed))
    if kind.startswith("rank"):  # e.g. "rank3": exactly rank 3 in float64
        k = int(kind[4:])
        g = _gen(seed)
        return torch.randn(m, k, dtype=torch.float64, generator=g) @ torch.randn(
            k, r, dtype=torch.float64, generator=g
        )
    if kind == "zero":
        return torch.zeros(m, r, dtype=torch.float64)
    raise AssertionError(kind)


def _apply_sign_convention(u_s: torch.Tensor, vh: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The convention `refactorize` documents: the largest-|entry| of each A row is positive."""
    pivot = vh.abs().argmax(dim=1, keepdim=True)
    sign = torch.sign(vh.gather(1, pivot)).squeeze(1)
    sign[sign == 0] = 1.0
    return u_s * sign, vh * sign[:, None]


def _dense_reference(B: torch.Tensor, A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Brute force, as the official FedSVD code does: full SVD of the m×n product, truncated to r.

    Returns (UΣ, Vᵀ, top-r singular values) in float64 with the sign convention applied.
    """
    r = B.shape[1]
    u, s, vh = torch.linalg.svd(B.to(torch.float64) @ A.to(torch.float64), full_matrices=False)
    b_ref, a_ref = _apply_sign_convention(u[:, :r] * s[:r], vh[:r])
    return b_ref, a_ref, s[:r]


def _well_determined(s: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Mask of singular values whose singular vectors are unique: non-zero and separated.

    Non-zero: above √eps(dtype)·s_max (a float32 input is only known to float32 precision).
    Separated: relative gap > 1e-3 to both neighbours.
    """
    s_max = float(s.max()) if s.numel() else 0.0
    nonzero = s > math.sqrt(torch.finfo(dtype).eps) * s_max
    gap = torch.full_like(s, math.inf)
    if s.numel() > 1:
        diffs = (s[:-1] - s[1:]).abs()
        gap[:-1] = torch.minimum(gap[:-1], diffs)
        gap[1:] = torch.minimum(gap[1:], diffs)
    separated = gap > 1e-3 * s.clamp_min(torch.finfo(torch.float64).tiny)
    return nonzero & separated


def _orthonormality_error(A: torch.Tensor) -> float:
    a = A.to(torch.float64)
    return float((a @ a.T - torch.eye(a.shape[0], dtype=torch.float64)).abs().max())


def _tol(dtype: torch.dtype) -> float:
    """Relative tolerance for results that are computed in float64 and returned in `dtype`.

    float32: two ulps, so only the final rounding may cost accuracy (computing the QRs and the core
    SVD in float32 instead gives errors of 3e-7 to 6e-6 on these cases and fails). float64: limited
    by the dense reference SVD, not by `refactorize`.
    """
    return {torch.float32: 2 * torch.finfo(torch.float32).eps, torch.float64: 1e-10}[dtype]


def _nbytes(tensors: Iterable[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


# --------------------------------------------------------------------------------------------------
# refactorize vs the dense reference

# (id, m, n, r, A init, B̄ kind)
REFACTORIZE_CASES = [
    ("kaiming-64x48-r8", 64, 48, 8, "kaiming", "random"),
    ("random-64x48-r8", 64, 48, 8, "random", "random"),
    ("kaiming-128x256-r16", 128, 256, 16, "kaiming", "random"),
    ("random-128x256-r16", 128, 256, 16, "random", "random"),
    ("rank3-of-8-64x48", 64, 48, 8, "kaiming", "rank3"),
    ("rank3-of-16-128x256", 128, 256, 16, "random", "rank3"),
    ("zero-64x48-r8", 64, 48, 8, "kaiming", "zero"),
    ("zero-128x256-r16", 128, 256, 16, "random", "zero"),
]
# later rounds: A has orthonormal rows (the previous round's Vᵀ) and the Gram route runs, no QR
REFACTORIZE_CASES += [("orthonormal-" + name.removeprefix("random-"), m, n, r, "orthonormal", b_kind)
                      for name, m, n, r, a_kind, b_kind in REFACTORIZE_CASES if a_kind == "random"]
REFACTORIZE_CASES.append(("orthonormal-1024x768-r16", 1024, 768, 16, "orthonormal", "random"))
DTYPES = [torch.float32, torch.float64]


def _case(m: int, n: int, r: int, a_kind: str, b_kind: str, dtype: torch.dtype, seed: int = 0):
    return _make_b(b_kind, m, r, seed).to(dtype), _make_a(a_kind, r, n, seed + 1).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "m, n, r, a_kind, b_kind", [c[1:] for c in REFACTORIZE_CASES], ids=[c[0] for c in REFACTORIZE_CASES]
)
def test_refactorize_matches_dense_svd(m, n, r, a_kind, b_kind, dtype):
    B, A = _case(m, n, r, a_kind, b_kind, dtype)
    new_b, new_a = refactorize(B, A)
    tol = _tol(dtype)

    assert new_b.shape == (m, r) and new_a.shape == (r, n)
    assert new_b.dtype == dtype and new_a.dtype == dtype
    assert torch.isfinite(new_b).all() and torch.isfinite(new_a).all()
    assert _orthonormality_error(new_a) < tol

    b_ref, a_ref, s_ref = _dense_reference(B, A)
    product = B.to(torch.float64) @ A.to(torch.float64)
    new_product = new_b.to(torch.float64) @ new_a.to(torch.float64)

    if b_kind == "zero":
        assert torch.equal(new_b, torch.zeros_like(new_b))  # exactly zero, not merely small
        return

    # the function is unchanged
    rel_err = float(torch.linalg.matrix_norm(new_product - product) / torch.linalg.matrix_norm(product))
    assert rel_err < tol

    # singular values live in B: its column norms are the top-r singular values, descending
    col_norms = torch.linalg.vector_norm(new_b.to(torch.float64), dim=0)
    s_max = float(s_ref[0])
    torch.testing.assert_close(col_norms, s_ref, rtol=0, atol=tol * s_max)
    assert bool((col_norms[:-1] >= col_norms[1:] - tol * s_max).all())

    # the factors themselves, wherever they are unique (up to the shared sign convention)
    keep = _well_determined(s_ref, dtype)
    expected_rank = int(b_kind[4:]) if b_kind.startswith("rank") else r
    assert int(keep.sum()) >= 1 and keep[expected_rank:].sum() == 0
    torch.testing.assert_close(new_a.to(torch.float64)[keep], a_ref[keep], rtol=0, atol=tol)
    torch.testing.assert_close(new_b.to(torch.float64)[:, keep], b_ref[:, keep], rtol=0, atol=tol * s_max)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_refactorize_takes_the_gram_route_exactly_when_a_has_orthonormal_rows(dtype, monkeypatch):
    calls = []
    monkeypatch.setattr(fedsvd, "product_svd", lambda *a, **k: calls.append(1) or product_svd(*a, **k))
    B = _make_b("random", 128, 16, 0).to(dtype)
    refactorize(B, _make_a("orthonormal", 16, 256, 1).to(dtype))
    assert calls == []
    refactorize(B, _make_a("kaiming", 16, 256, 1).to(dtype))
    assert calls == [1]


def test_refactorize_keeps_bfloat16_factors_in_bfloat16_and_computes_in_float32_at_least():
    B, A = _make_b("random", 128, 8, 0), _make_a("orthonormal", 8, 96, 1)
    for a in (A, _make_a("kaiming", 8, 96, 1)):  # the Gram route and the QR route
        new_b, new_a = refactorize(B.to(torch.bfloat16), a.to(torch.bfloat16))
        assert new_b.dtype == new_a.dtype == torch.bfloat16
        product = B.to(torch.bfloat16).double() @ a.to(torch.bfloat16).double()
        rel = float(torch.linalg.matrix_norm(new_b.double() @ new_a.double() - product) / torch.linalg.matrix_norm(product))
        assert rel < 4 * torch.finfo(torch.bfloat16).eps  # the final rounding to bfloat16, nothing more
        assert _orthonormality_error(new_a) < 4 * torch.finfo(torch.bfloat16).eps


@pytest.mark.parametrize("row, sign", [([0.2, -0.6, 0.1], -1.0), ([0.6, -0.2], 1.0), ([0.5, -0.5, 0.1], 1.0),
                                       ([-0.5, 0.5], 1.0), ([0.0, 0.0], 1.0), ([-1e-30, 0.0], -1.0)])
def test_row_signs_follow_the_largest_magnitude_entry_and_ties_keep_plus_one(row, sign):
    assert fedsvd._row_signs(torch.tensor([row])).tolist() == [sign]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("b_kind", ["random", "rank3", "zero"])
def test_refactorize_is_idempotent(b_kind, dtype):
    B, A = _case(64, 48, 8, "kaiming", b_kind, dtype, seed=3)
    b1, a1 = refactorize(B, A)
    b2, a2 = refactorize(b1, a1)
    # the second call sees the first one's output rounded to `dtype`, which moves singular vectors by
    # up to ~eps/gap; so a float32 fixed point holds to 1e-5, not to the two ulps used elsewhere
    tol = {torch.float32: 1e-5, torch.float64: 1e-10}[dtype]
    scale = max(float(torch.linalg.matrix_norm(b1.to(torch.float64), ord=2)), 1.0)

    assert b2.dtype == dtype and a2.dtype == dtype
    assert _orthonormality_error(a2) < tol
    torch.testing.assert_close(
        b2.to(torch.float64) @ a2.to(torch.float64), b1.to(torch.float64) @ a1.to(torch.float64),
        rtol=0, atol=tol * scale,
    )
    # factors of well-determined directions are a fixed point (trailing null directions are arbitrary)
    keep = _well_determined(torch.linalg.vector_norm(b1.to(torch.float64), dim=0), dtype)
    torch.testing.assert_close(a2[keep], a1[keep], rtol=0, atol=tol)
    torch.testing.assert_close(b2[:, keep], b1[:, keep], rtol=0, atol=tol * scale)


def test_refactorize_does_not_modify_inputs():
    B, A = _case(64, 48, 8, "kaiming", "random", torch.float32)
    B0, A0 = B.clone(), A.clone()
    refactorize(B, A)
    assert torch.equal(B, B0) and torch.equal(A, A0)


@pytest.mark.parametrize(
    "b_shape, a_shape, match",
    [
        ((4, 8), (8, 16), "exceeds"),  # r = 8 > m = 4
        ((16, 8), (8, 4), "exceeds"),  # r = 8 > n = 4
        ((16, 8), (4, 32), "differ"),  # B has rank 8, A has rank 4
    ],
    ids=["rank>m", "rank>n", "mismatched-ranks"],
)
def test_refactorize_rejects_bad_shapes(b_shape, a_shape, match):
    with pytest.raises(ValueError, match=match):
        refactorize(torch.randn(*b_shape), torch.randn(*a_shape))


# --------------------------------------------------------------------------------------------------
# toy federated state: two LoRA layers and a trainable head

LAYERS = {"enc.0.attn.query": (32, 24, 4), "enc.0.attn.value": (16, 40, 4)}  # name: (m, n, r)
HEAD = {"head.classifier.weight": (3, 16), "head.classifier.bias": (3,)}
NUM_EXAMPLES = [10, 30, 60]  # p = 0.1, 0.3, 0.6


def _toy_state(seed: int, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    g = _gen(seed)
    state: dict[str, torch.Tensor] = {}
    for name, (m, n, r) in LAYERS.items():
        state[name + A_SUFFIX] = _kaiming_a(r, n, seed).to(dtype)
        state[name + B_SUFFIX] = torch.randn(m, r, generator=g).to(dtype)
    for key, shape in HEAD.items():
        state[key] = torch.randn(*shape, generator=g).to(dtype)
    return state


def _client_updates(method, state, seeds=(11, 12, 13)) -> list[dict[str, torch.Tensor]]:
    """What each client sends back: its own values for the method's uplink keys."""
    keys = method.uplink_keys(state)
    out = []
    for seed in seeds:
        trained = _toy_state(seed)
        out.append({k: trained[k] for k in keys})
    return out


def _hand_mean(updates, key) -> torch.Tensor:
    u = [x[key].to(torch.float64) for x in updates]
    return 0.1 * u[0] + 0.3 * u[1] + 0.6 * u[2]


def test_fedsvd_aggregate_is_exact_and_orthonormal():
    state = _toy_state(0)
    snapshot = {k: v.clone() for k, v in state.items()}
    method = FedSVD()
    updates = _client_updates(method, state)
    assert all(not k.endswith(A_SUFFIX) for k in updates[0])

    new = method.aggregate(state, updates, normalized_weights(NUM_EXAMPLES))

    assert set(new) == set(state)
    assert all(torch.equal(state[k], snapshot[k]) for k in state), "aggregate mutated its input"
    for name in LAYERS:
        a_old = state[name + A_SUFFIX].to(torch.float64)
        target = _hand_mean(updates, name + B_SUFFIX) @ a_old  # Σ p_k B_k A_old
        got = new[name + B_SUFFIX].to(torch.float64) @ new[name + A_SUFFIX].to(torch.float64)
        torch.testing.assert_close(got, target, rtol=0, atol=1e-5 * float(target.abs().max()))
        assert _orthonormality_error(new[name + A_SUFFIX]) < 1e-5
        assert new[name + A_SUFFIX].dtype == torch.float32 and new[name + B_SUFFIX].dtype == torch.float32
    for key in HEAD:
        torch.testing.assert_close(new[key].to(torch.float64), _hand_mean(updates, key), rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------------------------------
# FedIT and FFA-LoRA: weighted means with unequal n_k


def test_normalized_weights_values():
    torch.testing.assert_close(
        normalized_weights(NUM_EXAMPLES), torch.tensor([0.1, 0.3, 0.6], dtype=torch.float64)
    )


def test_weighted_average_constant_updates():
    # u_k ≡ k  ⇒  Σ p_k u_k = 0.1·1 + 0.3·2 + 0.6·3 = 2.5
    updates = [{"x": torch.full((2, 3), float(k))} for k in (1, 2, 3)]
    out = weighted_average(updates, normalized_weights(NUM_EXAMPLES))
    assert out["x"].dtype == torch.float32
    torch.testing.assert_close(out["x"], torch.full((2, 3), 2.5))


@pytest.mark.parametrize("dtype, k", [(torch.float32, 10), (torch.float32, 1000), (torch.bfloat16, 10),
                                      (torch.float64, 10)], ids=str)
def test_weighted_average_is_within_k_rounding_errors_of_the_float64_sum(dtype, k):
    """The documented bound: |computed − exact| ≤ K·eps·Σ_k |p_k u_k| per entry, eps of the
    accumulator (float32 for float32 and bfloat16 inputs), plus the final rounding to `dtype`."""
    g = _gen(7)
    updates = [{"x": torch.randn(64, 16, dtype=torch.float64, generator=g).to(dtype)} for _ in range(k)]
    weights = normalized_weights(torch.randint(1, 500, (k,), generator=g).tolist())
    terms = torch.stack([p * u["x"].to(torch.float64) for p, u in zip(weights.tolist(), updates)])
    exact = terms.sum(0)
    got = weighted_average(updates, weights)["x"]
    assert got.dtype == dtype
    eps_acc = torch.finfo(torch.promote_types(dtype, torch.float32)).eps
    bound = k * eps_acc * terms.abs().sum(0) + torch.finfo(dtype).eps / 2 * exact.abs()
    assert bool(((got.to(torch.float64) - exact).abs() <= bound).all())


def test_fedit_averages_both_factors_and_head():
    state = _toy_state(0)
    method = FedIT()
    updates = _client_updates(method, state)
    assert any(k.endswith(A_SUFFIX) for k in updates[0])

    new = method.aggregate(state, updates, normalized_weights(NUM_EXAMPLES))

    assert set(new) == set(state)
    for key in state:  # A, B and head keys are all plain weighted means
        torch.testing.assert_close(new[key].to(torch.float64), _hand_mean(updates, key), rtol=1e-6, atol=1e-6)
        assert new[key].dtype == state[key].dtype


def test_ffa_averages_b_and_head_and_keeps_a():
    state = _toy_state(0)
    method = FFALoRA()
    updates = _client_updates(method, state)

    new = method.aggregate(state, updates, normalized_weights(NUM_EXAMPLES))

    assert set(new) == set(state)
    for key in state:
        if key.endswith(A_SUFFIX):
            assert torch.equal(new[key], state[key])  # frozen, bit for bit
        else:
            torch.testing.assert_close(
                new[key].to(torch.float64), _hand_mean(updates, key), rtol=1e-6, atol=1e-6
            )


@pytest.mark.parametrize("name, sends_a", [("fedit", True), ("ffa", False), ("fedsvd", False)])
def test_uplink_keys(name, sends_a):
    state = _toy_state(0)
    keys = get_method(name).uplink_keys(state)
    assert any(k.endswith(A_SUFFIX) for k in keys) == sends_a
    assert {n + B_SUFFIX for n in LAYERS} <= set(keys)
    assert set(HEAD) <= set(keys)
    assert set(keys) <= set(state)


def _client(*, first_contact: bool) -> ClientSpec:
    """A client at the toy state's rank (every toy layer has r = 4)."""
    return ClientSpec(pid=0, rank=4, first_contact=first_contact)


def test_ffa_downlink_sends_a_only_on_first_contact():
    state = _toy_state(0)
    later = FFALoRA().downlink(state, _client(first_contact=False))
    assert not any(k.endswith(A_SUFFIX) for k in later)
    assert set(later) == {k for k in state if not k.endswith(A_SUFFIX)}
    first = FFALoRA().downlink(state, _client(first_contact=True))
    assert set(first) == set(state)
    assert all(torch.equal(first[k], state[k]) for k in state)


def test_fedsvd_downlink_always_sends_a():
    # A changes every round under FedSVD, so a cached copy would be stale
    state = _toy_state(0)
    assert set(FedSVD().downlink(state, _client(first_contact=False))) == set(state)


# --------------------------------------------------------------------------------------------------
# validation


@pytest.mark.parametrize("num_examples", [[], [0, 5], [10, -1], [0]], ids=["empty", "zero", "negative", "all-zero"])
def test_normalized_weights_rejects_non_positive(num_examples):
    with pytest.raises(ValueError, match="positive"):
        normalized_weights(num_examples)


def test_weighted_average_rejects_mismatched_keys():
    updates = [{"a": torch.zeros(2), "b": torch.zeros(2)}, {"a": torch.zeros(2), "c": torch.zeros(2)}]
    with pytest.raises(ValueError, match="keys"):
        weighted_average(updates, normalized_weights([1, 1]))


def test_weighted_average_rejects_wrong_number_of_weights():
    with pytest.raises(ValueError):
        weighted_average([{"a": torch.zeros(2)}] * 2, normalized_weights([1, 1, 1]))


def test_get_method_names_the_allowed_strategies():
    assert {"fedit", "ffa", "fedsvd"} <= set(available_strategies())
    with pytest.raises(ValueError, match="nope") as info:
        get_method("nope")
    for name in available_strategies():
        assert name in str(info.value)


@pytest.mark.parametrize("name, cls", [("fedit", FedIT), ("ffa", FFALoRA), ("fedsvd", FedSVD)])
def test_get_method_returns_a_fresh_instance(name, cls):
    first, second = get_method(name), get_method(name)
    assert type(first) is cls and first is not second


# --------------------------------------------------------------------------------------------------
# communication cost of a B-only uplink


@pytest.mark.parametrize("name", ["ffa", "fedsvd"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_b_only_uplink_bytes(name, dtype):
    state = _toy_state(0, dtype)
    method = get_method(name)
    uplink = {k: state[k] for k in method.uplink_keys(state)}

    itemsize = torch.finfo(dtype).bits // 8
    head_bytes = sum(math.prod(shape) for shape in HEAD.values()) * itemsize
    expected = sum(m * r * itemsize for m, _, r in LAYERS.values()) + head_bytes
    assert _nbytes(uplink.values()) == expected
    # and it is strictly less than what FedIT sends: exactly the A factors less
    fedit_uplink = [state[k] for k in FedIT().uplink_keys(state)]
    assert _nbytes(fedit_uplink) - expected == sum(r * n * itemsize for _, n, r in LAYERS.values())

    from fedlora.strategies.flower import payload_bytes

    assert payload_bytes(uplink) == expected


def test_flexlora_completes_a_with_rows_drawn_from_the_run_seed():
    """A round whose clients offer fewer directions than the global rank (one client of rank 2,
    global rank 4) completes A with orthonormal rows: from the run `seed`, not a fixed one."""
    from fedlora.strategies import get_method

    g = torch.Generator().manual_seed(0)
    state = {"l.lora_A": torch.randn(4, 12, generator=g), "l.lora_B": torch.zeros(10, 4)}
    update = {"l.lora_A": torch.randn(2, 12, generator=g), "l.lora_B": torch.randn(10, 2, generator=g)}
    weights = torch.ones(1, dtype=torch.float64)

    def a_after(seed: int) -> torch.Tensor:
        return get_method("flexlora", {"seed": seed}).aggregate(state, [update], weights)["l.lora_A"]

    a0, a1 = a_after(0), a_after(1)
    assert torch.equal(a0, a_after(0)) and torch.equal(a0[:2], a1[:2])  # the SVD directions agree
    assert not torch.allclose(a0[2:], a1[2:])  # the completion follows the seed
    for a in (a0, a1):
        torch.testing.assert_close(a @ a.T, torch.eye(4), atol=1e-5, rtol=0)
