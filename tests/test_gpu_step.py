"""benchmarks/gpu_step.py, on CPU: its vmap per-sample clipping against a per-sample backward loop,
its noise against a fixed seed, and the script end to end (JSON out, bf16-on-CPU refusal)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_step.py"
sys.path.insert(0, str(REPO / "benchmarks"))

import gpu_step  # noqa: E402  (benchmarks/ is not a package)

TINY = ["--batch-size", "4", "--seq-len", "8", "--steps", "2", "--warmup", "1"]


def _brute_force_clipped_sum(model, names, ids, labels, C):
    """One ordinary backward pass per sample, clip its gradient (L2 over all trainable tensors) to C,
    sum; also each sample's unclipped norm."""
    params = dict(model.named_parameters())
    total = {n: torch.zeros_like(params[n]) for n in names}
    norms = []
    for i in range(len(ids)):
        model.zero_grad(set_to_none=True)
        logits = model(ids[i:i + 1]).logits
        torch.nn.functional.cross_entropy(logits, labels[i:i + 1]).backward()
        norm = torch.sqrt(sum(params[n].grad.pow(2).sum() for n in names))
        scale = min(1.0, C / (norm.item() + 1e-6))
        for n in names:
            total[n] += params[n].grad * scale
        norms.append(norm.item())
    return total, norms


@pytest.fixture(scope="module")
def ab_model():
    """MiniLM-shaped model, A and B trainable, B non-zero so that A's gradient is too."""
    torch.manual_seed(0)
    model, names = gpu_step.build_model("ab")
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("lora_B"):
                p.normal_(0, 0.05)
    return model, names


def test_vmap_clipped_sum_matches_a_per_sample_backward_loop(ab_model):
    model, names = ab_model
    assert any(n.endswith("lora_A") for n in names) and any(n.endswith("lora_B") for n in names)
    assert {"classifier.weight", "classifier.bias"} <= set(names)
    assert all(p.requires_grad == (n in names) for n, p in model.named_parameters())
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 30522, (4, 8), generator=g)
    labels = torch.tensor([0, 1, 2, 1])
    _, norms = _brute_force_clipped_sum(model, names, ids, labels, C=1e9)
    s = sorted(norms)
    C = (s[1] + s[2]) / 2  # between the norms: two samples clipped, two not
    assert sum(x > C for x in norms) == 2
    expected, _ = _brute_force_clipped_sum(model, names, ids, labels, C)
    got = gpu_step.clipped_grad_sum(model, names, (ids, labels), C)
    assert set(got) == set(names)
    for n in names:
        assert expected[n].abs().max() > 0, n  # a zero gradient would make the comparison vacuous
        torch.testing.assert_close(got[n], expected[n], rtol=1e-5, atol=1e-5 * expected[n].abs().max().item())
    # each clipped sample contributes at most C, so the sum is bounded by C per sample
    total_norm = torch.sqrt(sum(got[n].pow(2).sum() for n in names)).item()
    assert total_norm <= C * len(ids) + 1e-4


def test_noise_is_not_seeded_from_anything_fixed():
    grad_sum = {"w": torch.zeros(1000)}
    torch.manual_seed(0)  # a noise that followed the global RNG would repeat after this
    a = gpu_step.noisy_mean(grad_sum, batch_size=4, sigma=1.0, C=1.0)["w"]
    torch.manual_seed(0)
    b = gpu_step.noisy_mean(grad_sum, batch_size=4, sigma=1.0, C=1.0)["w"]
    assert not torch.equal(a, b)
    assert 0.15 < a.std().item() < 0.35  # N(0, (σC)²) / 4: std 0.25
    # and with σ = 0 it is the plain mean
    assert torch.equal(gpu_step.noisy_mean({"w": torch.ones(3)}, 4, sigma=0.0)["w"], torch.full((3,), 0.25))


def test_script_on_cpu_writes_json_with_both_step_times(tmp_path):
    out = tmp_path / "gpu-step.json"
    res = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", *TINY, "--out", str(out)],
                         capture_output=True, text=True, timeout=300, cwd=REPO)
    assert res.returncode == 0, res.stderr
    data = json.loads(out.read_text())
    assert data["non_private_ms"] > 0 and data["dp_ms"] > 0
    assert data["dp_over_non_private"] == pytest.approx(data["dp_ms"] / data["non_private_ms"])
    assert len(data["non_private_ms_all"]) == len(data["dp_ms_all"]) == 2
    assert data["device"] == "cpu" and data["torch"] == torch.__version__
    assert data["settings"]["batch_size"] == 4 and data["settings"]["trainable"] == "b"
    assert data["dp_peak_mem_mib"] > 0
    assert "non-private" in res.stdout and "ratio" in res.stdout


def test_bf16_on_cpu_exits_2_naming_bf16_and_cuda(tmp_path):
    out = tmp_path / "never.json"
    res = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--precision", "bf16", *TINY,
                          "--out", str(out)], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert res.returncode == 2
    assert "bf16" in res.stderr and "CUDA" in res.stderr
    assert not out.exists()


def test_script_imports_only_stdlib_torch_and_transformers():
    """The lent GPU machine has no fedlora/flwr/opacus/peft/ray."""
    import ast

    tree = ast.parse(SCRIPT.read_text())
    roots = {a.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import) for a in node.names}
    roots |= {node.module.split(".")[0] for node in ast.walk(tree)
              if isinstance(node, ast.ImportFrom) and node.module and node.level == 0}
    third_party = roots - set(sys.stdlib_module_names) - {"__future__"}
    assert third_party == {"torch", "transformers"}
