"""The benchmark scripts still run against the current API (they are not imported anywhere else,
so an API change would otherwise break them silently) and their two LoRA-FAIR solvers agree."""

from __future__ import annotations

import sys

import pytest
import torch

from conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))

import aggregation  # noqa: E402  (benchmarks/ is not a package)
import lorafair  # noqa: E402


def test_every_measured_call_of_the_server_step_benchmark_runs_at_a_small_size():
    tasks = aggregation.plan((64,))
    assert {t.kind for t in tasks} == set(aggregation.SETUPS)
    for task in tasks:
        aggregation.SETUPS[task.kind](task)()


@pytest.mark.parametrize("m, r, k", [(48, 4, 3), (64, 8, 10)])
def test_the_gram_and_dense_lorafair_solvers_take_the_same_steps(m, r, k):
    bs, as_, w = lorafair._inputs(m, r, k)
    gram = lorafair.gram_solver(bs, as_, w, 20)
    dense = lorafair.dense_solver(bs, as_, w, 20)
    torch.testing.assert_close(gram, dense, rtol=1e-6, atol=1e-9)
    problem = lorafair.fair_problem(bs, as_, w)
    assert problem.cosine(gram) >= problem.cosine(problem.b_bar)
