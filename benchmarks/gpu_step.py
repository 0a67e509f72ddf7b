"""Time a non-private LoRA step against a DP-SGD step on one device (meant for a lent CUDA machine).

The GPU machine this is for has torch and an older transformers but no flwr/opacus/peft, so this
script times the CUDA path of a client step *standalone*: a BERT classifier with all-MiniLM-L6-v2's
shapes and random weights (nothing downloaded), its own LoRA (r = 8, α = 8) on every attention
query/value, random token ids, SGD lr 0.1. Two steps are timed:

  non-private  forward, cross-entropy, backward, optimizer step (optionally bf16 autocast forward);
  DP-SGD       per-sample gradients of the trainable tensors via torch.func (vmap(grad(...)) over
               the batch), each sample's gradient clipped to C = 1 in L2 over all trainable
               tensors, summed, plus N(0, σ²C²) noise (σ = 1, a generator seeded from
               `secrets`), divided by the (expected) batch size: the same math as Opacus' hooks
               mode, but not Opacus itself. Always fp32.

Its numbers are of this script, not of fedlora's `train_local` (no tokenisation, no peft, no
Opacus, no Poisson sampling): use them for the device's DP/non-private ratio and memory.

    python benchmarks/gpu_step.py [--device cuda|cpu] [--batch-size 32] [--seq-len 64] [--steps 10]
        [--warmup 3] [--trainable b|ab] [--precision fp32|bf16] [--out PATH]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import math
import platform
import resource
import secrets
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import transformers
from torch import nn
from torch.func import functional_call, grad, vmap

__all__ = ["LoRALinear", "build_model", "clipped_grad_sum", "noisy_mean", "secure_generator", "main"]

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "benchmarks/results/gpu-step.json"
RANK, ALPHA, CLIP, SIGMA, LR, NUM_LABELS = 8, 8.0, 1.0, 1.0, 0.1, 3


class LoRALinear(nn.Module):
    """Frozen `base` plus (α/r)·B·A, A (r × in) random / √in, B (out × r) zero: peft's LoRA init."""

    def __init__(self, base: nn.Linear, r: int = RANK, alpha: float = ALPHA) -> None:
        super().__init__()
        self.base, self.scaling = base, alpha / r
        self.lora_A = nn.Parameter(torch.randn(r, base.in_features) / math.sqrt(base.in_features))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + (x @ self.lora_A.T @ self.lora_B.T) * self.scaling


def build_model(trainable: str = "b", **config: object) -> tuple[nn.Module, list[str]]:
    """MiniLM-shaped random BERT classifier with LoRA on query/value; returns it and the names of
    its trainable tensors (lora_B [+ lora_A] + classifier head), the only ones with requires_grad."""
    shape = dict(vocab_size=30522, hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                 intermediate_size=1536, max_position_embeddings=512, num_labels=NUM_LABELS)
    # Dropout off (both steps, so the ratio is fair): vmap refuses random ops like dropout unless
    # told `randomness=...`, and a config-level 0 holds whatever train()/eval() mode the model is in.
    # pad_token_id=None: older transformers check `pad_token_id in input_ids[...]` when no attention
    # mask is given, a data-dependent Python branch that vmap cannot trace. Eager attention: the
    # fused SDPA kernels' backward has no vmap batching rule on every torch/device.
    cfg = transformers.BertConfig(**{**shape, **config}, hidden_dropout_prob=0.0,
                                  attention_probs_dropout_prob=0.0, pad_token_id=None,
                                  attn_implementation="eager")
    model = transformers.BertForSequenceClassification(cfg)
    model.requires_grad_(False)
    for layer in model.bert.encoder.layer:
        attn = layer.attention.self
        attn.query, attn.value = LoRALinear(attn.query), LoRALinear(attn.value)
    wanted = ("lora_B", "lora_A") if trainable == "ab" else ("lora_B",)
    names = [n for n, _ in model.named_parameters() if n.startswith("classifier.") or n.endswith(wanted)]
    for n, p in model.named_parameters():
        p.requires_grad_(n in names)
    return model, names


def clipped_grad_sum(model: nn.Module, trainable_names: list[str],
                     batch: tuple[torch.Tensor, torch.Tensor], C: float) -> dict[str, torch.Tensor]:
    """Σ_i clip_C(∇ loss_i) over the batch for the trainable tensors: per-sample gradients by
    vmap(grad) with the frozen parameters and buffers shared (not batched), one L2 norm per sample
    over all trainable tensors, scale min(1, C / (norm + 1e-6)), summed over samples."""
    params = dict(model.named_parameters())
    train = {n: params[n].detach() for n in trainable_names}
    frozen = {n: p.detach() for n, p in params.items() if n not in train}
    frozen.update(dict(model.named_buffers()))

    def loss(tr: dict[str, torch.Tensor], fr: dict[str, torch.Tensor], ids: torch.Tensor,
             label: torch.Tensor) -> torch.Tensor:  # one sample, as a batch of 1
        logits = functional_call(model, {**fr, **tr}, (ids.unsqueeze(0),)).logits
        return nn.functional.cross_entropy(logits, label.unsqueeze(0))

    ids, labels = batch
    # grad w.r.t. the trainable dict only; trainable and frozen tensors are shared (in_dims None),
    # the sample axis is the batch's: each result is (B, *shape)
    per_sample = vmap(grad(loss), in_dims=(None, None, 0, 0))(train, frozen, ids, labels)
    norms = torch.sqrt(sum(g.flatten(1).pow(2).sum(1) for g in per_sample.values()))
    scale = (C / (norms + 1e-6)).clamp(max=1.0)
    return {n: torch.einsum("b,b...->...", scale, g) for n, g in per_sample.items()}


def secure_generator(device: torch.device | str) -> torch.Generator:
    """A generator seeded from the OS CSPRNG: DP noise must never come from a fixed/global seed."""
    return torch.Generator(device=device).manual_seed(secrets.randbits(63))


def noisy_mean(grad_sum: dict[str, torch.Tensor], batch_size: int, sigma: float = SIGMA, C: float = CLIP,
               generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """(Σ clipped + N(0, (σC)²)) / batch_size per tensor; a fresh `secure_generator` if none given."""
    out = {}
    for n, g in grad_sum.items():
        gen = generator if generator is not None else secure_generator(g.device)
        noise = torch.randn(g.shape, generator=gen, device=g.device, dtype=g.dtype) * (sigma * C)
        out[n] = (g + noise) / batch_size
    return out


def _time(step: Callable[[], None], warmup: int, steps: int, cuda: bool) -> list[float]:
    """ms of each timed step; CUDA is asynchronous, so synchronise before reading each clock."""
    for _ in range(warmup):
        step()
    ms = []
    for _ in range(steps):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize()
        ms.append((time.perf_counter() - t0) * 1e3)
    return ms


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=("cuda", "cpu"), default=None)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--trainable", choices=("b", "ab"), default="b", help="b: B+head, ab: A+B+head")
    ap.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                    help="bf16: autocast the non-private forward (CUDA only); the DP step stays fp32")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    a = ap.parse_args(argv)
    if a.device is None:
        a.device = "cuda" if torch.cuda.is_available() else "cpu"
        if a.device == "cpu":
            print("gpu_step: CUDA is not available: falling back to CPU", flush=True)
    if a.device == "cuda" and not torch.cuda.is_available():
        print("gpu_step: error: --device cuda but CUDA is not available", file=sys.stderr)
        return 2
    if a.precision == "bf16" and a.device != "cuda":
        print("gpu_step: error: --precision bf16 needs --device cuda (CUDA autocast)", file=sys.stderr)
        return 2
    cuda, dev = a.device == "cuda", torch.device(a.device)

    model, names = build_model(a.trainable)
    model.to(dev).train()  # dropout is 0 in the config, so train() changes nothing numerically
    params = dict(model.named_parameters())
    opt = torch.optim.SGD([params[n] for n in names], lr=LR)
    ids = torch.randint(0, 30522, (a.batch_size, a.seq_len), device=dev)
    labels = torch.randint(0, NUM_LABELS, (a.batch_size,), device=dev)
    gen = secure_generator(dev)
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if a.precision == "bf16" \
        else contextlib.nullcontext

    def plain_step() -> None:
        opt.zero_grad(set_to_none=True)
        with autocast():
            loss = nn.functional.cross_entropy(model(ids).logits, labels)
        loss.backward()
        opt.step()

    def dp_step() -> None:
        # q = 1 here (the whole batch every step), so the expected batch size is the batch size.
        noisy = noisy_mean(clipped_grad_sum(model, names, (ids, labels), CLIP), a.batch_size, SIGMA, CLIP, gen)
        for n in names:
            params[n].grad = noisy[n]
        opt.step()

    result: dict[str, object] = {}
    for mode, step in (("non_private", plain_step), ("dp", dp_step)):
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        ms = _time(step, a.warmup, a.steps, cuda)
        result[f"{mode}_ms"], result[f"{mode}_ms_all"] = statistics.median(ms), ms
        result[f"{mode}_peak_mem_mib"] = (torch.cuda.max_memory_allocated() if cuda else
                                          resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 2**20
    ratio = result["dp_ms"] / result["non_private_ms"]
    out = {"benchmark": "gpu-step", "command": " ".join(["python", *sys.argv]),
           "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
           "device": a.device, "device_name": torch.cuda.get_device_name(dev) if cuda else platform.processor()
           or platform.machine(), "torch": torch.__version__, "transformers": transformers.__version__,
           "peak_mem_kind": "torch.cuda.max_memory_allocated" if cuda else "process ru_maxrss (cumulative)",
           "settings": {"model": "BERT, all-MiniLM-L6-v2 shapes, random weights", "batch_size": a.batch_size,
                        "seq_len": a.seq_len, "steps": a.steps, "warmup": a.warmup, "trainable": a.trainable,
                        "precision": a.precision, "rank": RANK, "alpha": ALPHA, "clip": CLIP, "sigma": SIGMA,
                        "lr": LR, "trainable_params": sum(params[n].numel() for n in names)},
           **result, "dp_over_non_private": ratio,
           "note": "numbers of benchmarks/gpu_step.py, not of fedlora's train_local"}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(out, indent=2) + "\n")
    print(f"gpu_step: {out['device_name']} {a.precision} trainable={a.trainable} B={a.batch_size} "
          f"L={a.seq_len}: non-private {result['non_private_ms']:.1f} ms, DP {result['dp_ms']:.1f} ms, "
          f"ratio {ratio:.2f}x, peak {result['dp_peak_mem_mib']:.0f} MiB -> {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
