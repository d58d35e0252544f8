"""GPU benchmarks of the fused memory-attention kernels (docs/METHOD.md §5 "Kernels").

Each pytest-benchmark group puts three implementations of one workload side by side:

* ``fused``    — :func:`momkd.kernels.memory_attention.memory_attention_pool` (Triton);
* ``eager``    — :func:`momkd.kernels.reference.memory_attention_pool_reference` (PyTorch);
* ``compiled`` — ``torch.compile`` of the eager reference.

Workloads: one bag of N patches (the default one slide per step), S = 64, H = 512, fp32, for
N in {1k, 10k, 50k, 200k} and K in {16, 64}; ``fwd`` is an inference forward (no autograd graph),
``fwdbwd`` a training forward plus the backward to patch_proj, feats and log_tau. The peak CUDA
memory of one call above what the inputs already hold is recorded in ``extra_info`` (MiB). After
timing, every implementation's results are checked against the eager ones.

Run (skips without CUDA)::

    pytest benches/bench_kernels.py --benchmark-json=bench.json

Environment: ``MOMKD_BENCH_N`` / ``MOMKD_BENCH_K`` (comma-separated sizes), ``MOMKD_BENCH_COMPILE=0``
(drop the torch.compile column), ``MOMKD_BENCH_ROUNDS`` (timed rounds, default 20).
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="kernel benchmarks need CUDA")


def _ints(name: str, default: str) -> list[int]:
    return [int(v) for v in os.environ.get(name, default).split(",") if v.strip()]


N_VALUES = _ints("MOMKD_BENCH_N", "1000,10000,50000,200000")
K_VALUES = _ints("MOMKD_BENCH_K", "16,64")
IMPLS = ["fused", "eager"] + (
    ["compiled"] if os.environ.get("MOMKD_BENCH_COMPILE", "1") != "0" else []
)
ROUNDS = int(os.environ.get("MOMKD_BENCH_ROUNDS", "20"))
S, H = 64, 512


@functools.cache
def _impl(name: str) -> Callable[..., Any]:
    from momkd.kernels import memory_attention, reference

    if name == "fused":
        return memory_attention.memory_attention_pool
    if name == "eager":
        return reference.memory_attention_pool_reference
    return torch.compile(reference.memory_attention_pool_reference)


@functools.cache
def _inputs(n: int, k: int) -> dict[str, torch.Tensor]:
    g = torch.Generator(device="cuda").manual_seed(n + k)
    dev = torch.device("cuda")
    return {
        "p": F.normalize(torch.randn(n, S, device=dev, generator=g), dim=1),
        "f": torch.randn(n, H, device=dev, generator=g),
        "cp": F.normalize(torch.randn(k, S, device=dev, generator=g), dim=1),
        "cn": F.normalize(torch.randn(k, S, device=dev, generator=g), dim=1),
        "lt": torch.tensor(math.log(0.2), device=dev),
        "off": torch.tensor([0, n], device=dev),
        "w": torch.randn(1, H, device=dev, generator=g),
    }


def _workload(impl: str, mode: str, x: dict[str, torch.Tensor]) -> Callable[[], list[torch.Tensor]]:
    fn = _impl(impl)
    p = x["p"].detach().requires_grad_(mode == "fwdbwd")
    f = x["f"].detach().requires_grad_(mode == "fwdbwd")
    lt = x["lt"].detach().requires_grad_(mode == "fwdbwd")

    def run() -> list[torch.Tensor]:
        if mode == "fwd":
            with torch.no_grad():
                out = list(fn(p, f, x["cp"], x["cn"], lt, x["off"])[:3])
        else:
            pooled = fn(p, f, x["cp"], x["cn"], lt, x["off"])[0]
            out = [pooled.detach(), *torch.autograd.grad((pooled * x["w"]).sum(), [p, f, lt])]
        torch.cuda.synchronize()
        return out

    return run


def _peak_mib(run: Callable[[], list[torch.Tensor]]) -> float:
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = run()
    peak = torch.cuda.max_memory_allocated() - base
    del out
    return peak / 2**20


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("mode", ["fwd", "fwdbwd"])
@pytest.mark.parametrize("k", K_VALUES)
@pytest.mark.parametrize("n", N_VALUES)
def test_memory_attention(benchmark: Any, n: int, k: int, mode: str, impl: str) -> None:
    benchmark.group = f"memattn-{mode}-N{n}-K{k}"
    x = _inputs(n, k)
    run = _workload(impl, mode, x)
    got = benchmark.pedantic(run, rounds=ROUNDS, iterations=1, warmup_rounds=3)
    benchmark.extra_info.update(
        impl=impl, mode=mode, n=n, k=k, s=S, h=H, peak_mem_mib=round(_peak_mib(run), 3)
    )
    want = _workload("eager", mode, x)()
    if mode == "fwdbwd":
        # A patch whose two best memory rows are within rounding of each other may take the other
        # arg-max (and so another gradient row); compare d patch_proj on unambiguous patches only.
        clear = _unambiguous(x["p"], x["cp"]) & _unambiguous(x["p"], x["cn"])
        assert clear.float().mean() > 0.99
        got[1], want[1] = got[1][clear], want[1][clear]
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def _unambiguous(p: torch.Tensor, c_hat: torch.Tensor, gap: float = 1e-5) -> torch.Tensor:
    if c_hat.shape[0] < 2:
        return torch.ones(p.shape[0], dtype=torch.bool, device=p.device)
    top2 = (p @ c_hat.T).topk(2, dim=1).values
    return (top2[:, 0] - top2[:, 1]) > gap
