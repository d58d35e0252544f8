"""Triton kernels against the eager references of :mod:`momkd.kernels.reference`.

Without CUDA the kernels run in Triton's CPU interpreter on small shapes; with CUDA the same grid
runs compiled on the GPU, and the tests marked ``gpu`` add larger shapes. ``torch.empty`` /
``torch.empty_like`` return NaN-filled (integer: sentinel-filled) tensors in every test, so an
output element a kernel forgets to write shows up as a mismatch.

The interpreter is chosen when Triton is imported (``TRITON_INTERPRET=1``; ``@triton.jit`` reads it
at decoration, also for Triton's own ``tl.max`` etc.). This module sets it if Triton is not yet
imported. If another module imported Triton first (PyG does), the CPU grid cannot run in this
process: it is skipped here and run once in a fresh interpreter by
``test_cpu_grid_in_fresh_process``.
"""

from __future__ import annotations

import itertools
import math
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

CUDA = torch.cuda.is_available()
if not CUDA and "triton" not in sys.modules:
    os.environ["TRITON_INTERPRET"] = "1"

pytest.importorskip("triton")

from momkd import losses
from momkd.errors import DataError
from momkd.kernels import align_momentum as am
from momkd.kernels import memory_attention as ma
from momkd.kernels import reference as ref
from momkd.memory import ClassMemory
from triton.runtime.interpreter import InterpretedFunction

# CPU only, and the kernels (or Triton) were decorated for compilation: nothing can run here.
STALE = not CUDA and not isinstance(ma._memory_attention_fwd_kernel, InterpretedFunction)

DEVICE = torch.device("cuda" if CUDA else "cpu")
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA device")


@pytest.fixture(autouse=True)
def _interpreter_or_skip(request: pytest.FixtureRequest) -> None:
    if STALE and request.node.originalname != "test_cpu_grid_in_fresh_process":
        pytest.skip(
            "Triton was imported without TRITON_INTERPRET in this process; the CPU grid "
            "runs in test_cpu_grid_in_fresh_process"
        )


@pytest.mark.skipif(not STALE, reason="the CPU grid runs in this process")
def test_cpu_grid_in_fresh_process() -> None:
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", str(Path(__file__)), "-q", "-p", "no:cacheprovider",
         "-m", "not gpu and not slow", "-W", "ignore::pytest.PytestUnknownMarkWarning"],
        env=env, capture_output=True, text=True, timeout=900, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    assert " passed" in proc.stdout


TOL: dict[torch.dtype, dict[str, float]] = {
    torch.float32: {"rtol": 1e-5, "atol": 1e-5},
    torch.float16: {"rtol": 2e-3, "atol": 2e-3},
    torch.bfloat16: {"rtol": 2e-2, "atol": 2e-2},
}
_INT_POISON = -123456


@pytest.fixture(autouse=True)
def poisoned_empty(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Make torch.empty / torch.empty_like return garbage-filled tensors."""
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def poison(t: torch.Tensor) -> torch.Tensor:
        if t.is_floating_point():
            t.fill_(float("nan"))
        elif t.dtype != torch.bool:
            t.fill_(_INT_POISON)
        return t

    monkeypatch.setattr(torch, "empty", lambda *a, **k: poison(real_empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: poison(real_empty_like(*a, **k)))
    yield


def close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype = torch.float32) -> None:
    torch.testing.assert_close(actual.float(), expected.float(), **TOL[dtype])


# --------------------------------------------------------------------------------------------------
# memory attention pooling
# --------------------------------------------------------------------------------------------------


def attn_inputs(
    sizes: list[int],
    k: int,
    s: int,
    h: int,
    dtype: torch.dtype = torch.float32,
    tau: float = 0.2,
    seed: int = 0,
) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed)
    n = sum(sizes)
    inputs = {
        "p": F.normalize(torch.randn(n, s, generator=g), dim=1).to(dtype),
        "f": torch.randn(n, h, generator=g).to(dtype),
        "cp": F.normalize(torch.randn(k, s, generator=g), dim=1),
        "cn": F.normalize(torch.randn(k, s, generator=g), dim=1),
        "lt": torch.tensor(math.log(tau)),
        "off": torch.tensor([0, *itertools.accumulate(sizes)], dtype=torch.int64),
        "craw_pos": 0.7 * torch.randn(k, s, generator=g),
        "craw_neg": 0.7 * torch.randn(k, s, generator=g),
        "labels": torch.randint(0, 2, (len(sizes),), generator=g),
    }
    out = {key: v.to(DEVICE) for key, v in inputs.items()}
    out["weights"] = {
        "pooled": torch.randn(len(sizes), h, generator=g).to(DEVICE),
        "attention": torch.randn(n, generator=g).to(DEVICE),
        "score": torch.randn(n, generator=g).to(DEVICE),
        "commit": torch.rand(len(sizes), generator=g).to(DEVICE) + 0.5,
    }
    return out


def leaves(x: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    p, f, lt = (x[key].detach().clone().requires_grad_() for key in ("p", "f", "lt"))
    return p, f, lt


def weighted(
    outputs: dict[str, torch.Tensor], w: dict[str, torch.Tensor], which: str
) -> torch.Tensor:
    if which == "pooled":
        return (outputs["pooled"] * w["pooled"]).sum()
    total = torch.zeros((), device=DEVICE)
    for key in outputs.keys() & w.keys():
        total = total + (outputs[key] * w[key]).sum()
    return total


def run_fused(x: dict[str, Any], which: str, commit: bool = False) -> dict[str, torch.Tensor]:
    p, f, lt = leaves(x)
    if commit:
        res = ma.memory_attention_pool_commit(
            p, f, x["cp"], x["cn"], lt, x["off"], x["craw_pos"], x["craw_neg"], x["labels"]
        )
    else:
        res = ma.memory_attention_pool(p, f, x["cp"], x["cn"], lt, x["off"])
    names = ["pooled", "attention", "score", "argmax_pos", "argmax_neg", "commit"]
    outputs = dict(zip(names, res, strict=False))
    diff = {key: v for key, v in outputs.items() if v.is_floating_point()}
    weighted(diff, x["weights"], which).backward()
    return {**outputs, "dp": p.grad, "df": f.grad, "dlt": lt.grad}


def run_reference(x: dict[str, Any], which: str, commit: bool = False) -> dict[str, torch.Tensor]:
    p, f, lt = leaves(x)
    res = ref.memory_attention_pool_reference(p, f, x["cp"], x["cn"], lt, x["off"])
    outputs = dict(
        zip(["pooled", "attention", "score", "argmax_pos", "argmax_neg"], res, strict=True)
    )
    if commit:
        per_bag = []
        for b in range(len(x["labels"])):
            lo, hi = int(x["off"][b]), int(x["off"][b + 1])
            c_y = x["craw_pos"] if int(x["labels"][b]) == 1 else x["craw_neg"]
            per_bag.append(losses.commitment_loss(p[lo:hi], c_y))
        outputs["commit"] = torch.stack(per_bag)
    diff = {key: v for key, v in outputs.items() if v.is_floating_point()}
    weighted(diff, x["weights"], which).backward()
    grad_lt = lt.grad if lt.grad is not None else torch.zeros_like(lt)
    return {**outputs, "dp": p.grad, "df": f.grad, "dlt": grad_lt}


def check_same(
    got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], dtype: torch.dtype
) -> None:
    assert torch.equal(got["argmax_pos"], want["argmax_pos"])
    assert torch.equal(got["argmax_neg"], want["argmax_neg"])
    assert got["argmax_pos"].dtype == torch.int64
    for key in ("pooled", "attention", "score", "commit", "dp", "df", "dlt"):
        if key in want:
            assert torch.isfinite(got[key]).all(), key
            close(got[key], want[key], dtype)
    assert got["dp"].dtype == dtype and got["df"].dtype == dtype


ATTN_CASES = {
    "one-patch": ([1], 1, 8, 8),
    "ragged-bag": ([37], 3, 8, 20),
    "bags-1-16-23": ([5, 16, 1, 23], 4, 16, 24),
    "k1-odd-dims": ([19, 2], 1, 5, 7),
    "h-over-block": ([17, 33], 16, 8, 130),
    # K and S past one tile: the similarity sums loop over K tiles of 16 and S chunks of 16.
    "k17-s40": ([21, 4], 17, 40, 12),
    "k33-s40": ([9, 30], 33, 40, 10),
}


@pytest.mark.parametrize("which", ["pooled", "all"])
@pytest.mark.parametrize("case", list(ATTN_CASES))
def test_memory_attention_fp32_matches_reference(case: str, which: str) -> None:
    x = attn_inputs(*ATTN_CASES[case], seed=len(case))
    got, want = run_fused(x, which), run_reference(x, which)
    check_same(got, want, torch.float32)
    sums = torch.zeros(len(x["labels"]), device=DEVICE).index_add_(
        0, ref.segment_ids(x["off"], x["p"].shape[0])[0], got["attention"]
    )
    close(sums, torch.ones_like(sums))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", ["ragged-bag", "bags-1-16-23", "k17-s40"])
def test_memory_attention_low_precision_inputs(case: str, dtype: torch.dtype) -> None:
    x = attn_inputs(*ATTN_CASES[case], dtype=dtype, seed=3)
    check_same(run_fused(x, "all"), run_reference(x, "all"), dtype)


@pytest.mark.parametrize("tau", [0.2, 1e-3, 5.0])
def test_memory_attention_temperature_clamp(tau: float) -> None:
    x = attn_inputs([9, 14], 3, 8, 12, tau=tau, seed=11)
    got, want = run_fused(x, "all"), run_reference(x, "all")
    check_same(got, want, torch.float32)
    if tau < 0.01 or tau > 2.0:
        assert got["dlt"].item() == 0.0
    else:
        assert got["dlt"].abs().item() > 0.0


def test_memory_attention_ties_pick_lowest_index() -> None:
    # Entries in {0, 0.5} make every similarity exact, so ties are exact in any summation order.
    half = 0.5
    c0 = torch.tensor([half, half, half, half, 0, 0, 0, 0])
    c1 = torch.tensor([0, 0, 0, 0, half, half, half, half])
    c3 = torch.tensor([half, 0, half, 0, half, 0, half, 0])
    cp = torch.stack([c1, c0, c3, c0, c1])  # duplicates at (0, 4) and (1, 3)
    cn = F.pad(torch.stack([c3, c3, c0]), (0, 0, 0, 2))  # duplicates and two zero rows
    patterns = list(itertools.product([0.0, half], repeat=8))[::7]  # 37 patches
    p = torch.tensor(patterns, dtype=torch.float32)
    x = attn_inputs([len(patterns)], 5, 8, 6, seed=5)
    x.update(p=p.to(DEVICE), cp=cp.to(DEVICE), cn=cn.to(DEVICE))
    got, want = run_fused(x, "all"), run_reference(x, "all")
    check_same(got, want, torch.float32)
    for mem, idx in ((cp, got["argmax_pos"]), (cn, got["argmax_neg"])):
        sims = p @ mem.T
        first = torch.tensor([int((row == row.max()).nonzero()[0]) for row in sims])
        assert torch.equal(idx.cpu(), first)
    assert (got["argmax_pos"] != 4).all() and (got["argmax_pos"] != 3).all()


@pytest.mark.parametrize(
    "case", ["one-patch", "bags-1-16-23", "k1-odd-dims", "h-over-block", "k33-s40"]
)
def test_memory_attention_commit_matches_reference(case: str) -> None:
    x = attn_inputs(*ATTN_CASES[case], seed=7 + len(case))
    got, want = run_fused(x, "all", commit=True), run_reference(x, "all", commit=True)
    check_same(got, want, torch.float32)
    assert got["commit"].shape == (len(ATTN_CASES[case][0]),)


def test_memory_attention_commit_gradient_only_from_commit() -> None:
    x = attn_inputs([6, 10], 4, 8, 8, seed=2)
    p = x["p"].detach().clone().requires_grad_()
    f = x["f"].detach().clone().requires_grad_()
    res = ma.memory_attention_pool_commit(
        p, f, x["cp"], x["cn"], x["lt"], x["off"], x["craw_pos"], x["craw_neg"], x["labels"]
    )
    res[5].sum().backward()
    assert f.grad is not None and torch.count_nonzero(f.grad) == 0
    expected = losses.batched_commitment_loss(
        x["p"].detach().clone().requires_grad_(),
        x["craw_pos"],
        x["craw_neg"],
        x["labels"],
        x["off"],
    )
    close(res[5].mean(), expected)


@pytest.mark.parametrize("sizes,k,s", [([1], 1, 8), ([37], 3, 5), ([5, 16, 1, 23], 16, 16)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_batched_commitment_matches_losses(
    sizes: list[int], k: int, s: int, dtype: torch.dtype
) -> None:
    x = attn_inputs(sizes, k, s, 4, dtype=dtype, seed=sum(sizes))
    p1 = x["p"].detach().clone().requires_grad_()
    p2 = x["p"].detach().clone().requires_grad_()
    got = ma.batched_commitment_loss(p1, x["craw_pos"], x["craw_neg"], x["labels"], x["off"])
    want = losses.batched_commitment_loss(p2, x["craw_pos"], x["craw_neg"], x["labels"], x["off"])
    close(got, want, dtype)
    (3.0 * got).backward()
    (3.0 * want).backward()
    close(p1.grad, p2.grad, dtype)


@pytest.mark.parametrize(
    "offsets,match",
    [
        ([0, 5, 9], "segment_offsets"),  # does not end at N = 10
        ([1, 10], "segment_offsets"),  # does not start at 0
        ([0, 4, 4, 10], "segment_offsets"),  # empty bag
        ([10], "segment_offsets"),  # too short
    ],
)
def test_memory_attention_rejects_bad_offsets(offsets: list[int], match: str) -> None:
    x = attn_inputs([10], 2, 8, 4)
    with pytest.raises(DataError, match=match):
        ma.memory_attention_pool(
            x["p"], x["f"], x["cp"], x["cn"], x["lt"], torch.tensor(offsets, device=DEVICE)
        )


def test_memory_attention_rejects_bad_shapes() -> None:
    x = attn_inputs([10], 2, 8, 4)
    with pytest.raises(DataError, match="patch_proj/feats"):
        ma.memory_attention_pool(x["p"], x["f"][:9], x["cp"], x["cn"], x["lt"], x["off"])
    with pytest.raises(DataError, match="c_pos_hat"):
        ma.memory_attention_pool(x["p"], x["f"], x["cp"][:, :4], x["cn"], x["lt"], x["off"])
    with pytest.raises(DataError, match="labels"):
        ma.memory_attention_pool_commit(
            x["p"], x["f"], x["cp"], x["cn"], x["lt"], x["off"], x["craw_pos"], x["craw_neg"],
            torch.tensor([2], device=DEVICE),
        )  # fmt: skip


# --------------------------------------------------------------------------------------------------
# alignment loss
# --------------------------------------------------------------------------------------------------


def align_inputs(b: int, k: int, s: int, dtype: torch.dtype, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    cp = F.normalize(torch.randn(k, s, generator=g), dim=1)
    cn = F.normalize(torch.randn(k, s, generator=g), dim=1)
    z = F.normalize(torch.randn(b, s, generator=g), dim=1)
    y = torch.randint(0, 2, (b,), generator=g)
    if b >= 3:
        # Saturated rows: far on the wrong side (softplus in its linear range, x > 20) and far on
        # the right side (x << 0).
        z[0], y[0] = cn[0], 1
        z[1], y[1] = cn[-1], 0
        z[2], y[2] = cp[0], 1
    w = torch.randn(b, generator=g)
    return {
        k_: v.to(DEVICE) for k_, v in {"z": z.to(dtype), "y": y, "cp": cp, "cn": cn, "w": w}.items()
    }


def run_align(fn: Any, x: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    z, cp, cn = (x[key].detach().clone().requires_grad_() for key in ("z", "cp", "cn"))
    loss = fn(z, x["y"], cp, cn, 0.3, 20.0, 5.0)
    (loss * x["w"]).sum().backward()
    return {"loss": loss, "dz": z.grad, "dcp": cp.grad, "dcn": cn.grad}


@pytest.mark.parametrize(
    "b,k,s,dtype",
    [
        (1, 1, 5, torch.float32),
        (5, 3, 8, torch.float32),
        (37, 16, 16, torch.float32),
        (20, 4, 64, torch.float32),
        (11, 17, 40, torch.float32),  # K past 16, S in chunks of 16, S split over programs
        (6, 33, 40, torch.float32),
        (9, 3, 8, torch.float16),
        (7, 33, 40, torch.float16),
        (9, 3, 8, torch.bfloat16),
    ],
)
def test_align_loss_matches_reference(b: int, k: int, s: int, dtype: torch.dtype) -> None:
    x = align_inputs(b, k, s, dtype, seed=b * 100 + k)
    got, want = run_align(am.align_loss, x), run_align(ref.align_loss_reference, x)
    assert got["loss"].dtype == torch.float32 and got["dz"].dtype == dtype
    for key in want:
        assert torch.isfinite(got[key]).all(), key
        close(got[key], want[key], dtype)


def test_align_loss_hand_value() -> None:
    # K = 1: phi(z, C) = <z, c>, so Delta = <z, c+> - <z, c->.
    z = torch.tensor([[1.0, 0.0]], device=DEVICE)
    cp = torch.tensor([[0.6, 0.8]], device=DEVICE)
    cn = torch.tensor([[0.0, 1.0]], device=DEVICE)
    for label, sign in ((1, 1.0), (0, -1.0)):
        y = torch.tensor([label], device=DEVICE)
        expected = math.log1p(math.exp(20.0 * (0.3 - sign * 0.6)))
        assert am.align_loss(z, y, cp, cn).item() == pytest.approx(expected, rel=1e-5)


# --------------------------------------------------------------------------------------------------
# momentum update
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "m_rows,k,s", [(0, 3, 8), (1, 1, 8), (7, 3, 8), (40, 16, 16), (23, 17, 40), (37, 33, 40)]
)
def test_momentum_stats_and_apply_match_reference(m_rows: int, k: int, s: int) -> None:
    g = torch.Generator().manual_seed(m_rows + k)
    mems = torch.randn(2, k, s, generator=g).to(DEVICE)
    mems_hat = F.normalize(mems, dim=-1)
    emb = F.normalize(torch.randn(m_rows, s, generator=g), dim=1).to(DEVICE)
    labels = torch.randint(0, 2, (m_rows,), generator=g).to(DEVICE)
    sums, counts = am.momentum_stats(mems_hat, emb, labels)
    sums_ref, counts_ref = ref.momentum_stats_reference(mems_hat, emb, labels)
    assert torch.equal(counts, counts_ref)
    close(sums, sums_ref)
    new = am.momentum_apply(mems, sums, counts, 0.9)
    close(new, ref.momentum_apply_reference(mems, sums_ref, counts_ref, 0.9))
    untouched = counts == 0
    assert torch.equal(new[untouched], mems[untouched])


def _momentum_step_against_class_memory(
    k: int, s: int, schedule: list[tuple[int, int | None]]
) -> int:
    """Run ``schedule`` ((rows, only this class or None) per step) through ClassMemory and
    momentum_step side by side, compare the states after every step; returns the re-seeds seen."""
    dead_after, ring = 2, 3
    torch.manual_seed(0)
    eager = ClassMemory(k, s, mode="momentum", momentum=0.9, dead_after=dead_after, ring_size=ring)
    fused = ClassMemory(k, s, mode="momentum", momentum=0.9, dead_after=dead_after, ring_size=ring)
    eager.to(DEVICE)
    fused.to(DEVICE)
    fused.load_state_dict(eager.state_dict())
    g = torch.Generator().manual_seed(1)
    reseeds = 0
    for step, (m_rows, only) in enumerate(schedule):
        # Embeddings near component 0 of their class, so the other components go unused and die.
        labels = (
            torch.randint(0, 2, (m_rows,), generator=g)
            if only is None
            else torch.full((m_rows,), only, dtype=torch.int64)
        )
        anchor = torch.stack([eager.neg[0], eager.pos[0]]).cpu()[labels]
        emb = (anchor + 0.3 * torch.randn(m_rows, s, generator=g)).to(DEVICE)
        labels = labels.to(DEVICE)
        before = torch.stack([eager.neg, eager.pos]).clone()
        eager.momentum_update(emb, labels)
        am.momentum_step(
            fused.pos, fused.neg, fused.unused_steps, fused.recent, fused.recent_count,
            emb, labels, 0.9, dead_after,
        )  # fmt: skip
        after = torch.stack([eager.neg, eager.pos])
        for c in range(2):
            for row in range(k):
                if not torch.equal(after[c, row], before[c, row]) and any(
                    torch.equal(after[c, row], e) for e in eager.recent[c]
                ):
                    reseeds += 1
        for name, want in eager.state_dict().items():
            got = fused.state_dict()[name]
            if want.is_floating_point():
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=f"{name} @ {step}")
            else:
                assert torch.equal(got, want), f"{name} @ step {step}"
    return reseeds


def test_momentum_step_matches_class_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MOMKD_FORCE_EAGER", "1")  # the oracle must not dispatch to the kernels
    schedule = [(3, None), (0, None), (2, 1), (5, None), (1, 0), (0, None), (4, 1), (6, None),
                (2, 0), (3, 1), (1, None), (7, None)]  # fmt: skip
    assert _momentum_step_against_class_memory(4, 8, schedule) > 0, "must exercise re-seeding"


@pytest.mark.parametrize("k,s", [(17, 40), (33, 40)])
def test_momentum_step_k_and_s_loops(monkeypatch: pytest.MonkeyPatch, k: int, s: int) -> None:
    # K past one tile of 16 and S in chunks of 16 (the normalisation and similarity loops).
    monkeypatch.setenv("MOMKD_FORCE_EAGER", "1")
    _momentum_step_against_class_memory(k, s, [(9, None), (0, None), (6, 1), (11, None), (3, 0)])


def test_momentum_step_validates_state() -> None:
    mem = ClassMemory(3, 8, mode="momentum").to(DEVICE)
    with pytest.raises(DataError, match="unused_steps"):
        am.momentum_step(
            mem.pos, mem.neg, mem.unused_steps.to(torch.int32), mem.recent, mem.recent_count,
            torch.zeros(1, 8, device=DEVICE), torch.zeros(1, dtype=torch.int64, device=DEVICE),
            0.99, 5,
        )  # fmt: skip


# --------------------------------------------------------------------------------------------------
# kernel precision (train.kernel_precision): tf32 / bf16 similarity products
# --------------------------------------------------------------------------------------------------

#: Largest deviation from the fp32 reference relative to the tensor's scale, for outputs and
#: gradients and for the temperature gradient (a sum of cancelling terms), as stated in
#: docs/KERNELS.md ("Kernel precision"); under the interpreter the products are emulated
#: (momkd.kernels._dot).
PRECISION_TOL = {"tf32": 2e-3, "bf16": 2e-2}
PRECISION_TOL_DTAU = {"tf32": 1e-2, "bf16": 5e-2}


def _rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    scale = want.float().abs().max().item()
    return (got.float() - want.float()).abs().max().item() / max(scale, 1e-30)


@pytest.mark.parametrize("precision", ["tf32", "bf16"])
def test_kernel_precision_within_stated_tolerance(precision: str) -> None:
    from momkd import kernels

    x = attn_inputs([40, 23], 17, 40, 12, seed=21)
    want = run_reference(x, "all")
    with kernels.kernel_precision(precision):
        got = run_fused(x, "all")
    exact = run_fused(x, "all")
    same = (got["argmax_pos"] == want["argmax_pos"]) & (got["argmax_neg"] == want["argmax_neg"])
    assert same.float().mean().item() >= 0.95
    for key in ("pooled", "attention", "score", "df"):
        assert _rel_err(got[key], want[key]) <= PRECISION_TOL[precision], key
    assert _rel_err(got["dlt"], want["dlt"]) <= PRECISION_TOL_DTAU[precision]
    # A row whose arg-max flipped takes another component's gradient: compare the others.
    assert _rel_err(got["dp"][same], want["dp"][same]) <= PRECISION_TOL[precision]
    # The reduced precision is really in effect (emulated under the interpreter).
    assert _rel_err(got["score"], exact["score"]) > 1e-6

    xa = align_inputs(12, 17, 40, torch.float32, seed=4)
    want_a = run_align(ref.align_loss_reference, xa)
    with kernels.kernel_precision(precision):
        got_a = run_align(am.align_loss, xa)
    for key in want_a:
        assert _rel_err(got_a[key], want_a[key]) <= PRECISION_TOL[precision], key


# --------------------------------------------------------------------------------------------------
# GPU: compiled kernels at realistic shapes
# --------------------------------------------------------------------------------------------------


def _unambiguous(p: torch.Tensor, c_hat: torch.Tensor, gap: float = 1e-4) -> torch.Tensor:
    top2 = (p.float() @ c_hat.T).topk(min(2, c_hat.shape[0]), dim=1).values
    if top2.shape[1] < 2:
        return torch.ones(p.shape[0], dtype=torch.bool, device=p.device)
    return (top2[:, 0] - top2[:, 1]) > gap


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_memory_attention_large(dtype: torch.dtype) -> None:
    x = attn_inputs([20000, 7001, 3], 16, 64, 512, dtype=dtype, seed=42)
    got = run_fused(x, "all", commit=True)
    want = run_reference(x, "all", commit=True)
    clear = _unambiguous(x["p"], x["cp"]) & _unambiguous(x["p"], x["cn"])
    assert clear.float().mean() > 0.99
    assert torch.equal(got["argmax_pos"][clear], want["argmax_pos"][clear])
    assert torch.equal(got["argmax_neg"][clear], want["argmax_neg"][clear])
    tol = {"rtol": 1e-4, "atol": 1e-5} if dtype == torch.float32 else TOL[dtype]
    for key in ("pooled", "attention", "score", "commit", "df", "dlt"):
        torch.testing.assert_close(got[key].float(), want[key].float(), **tol, msg=key)
    torch.testing.assert_close(got["dp"][clear].float(), want["dp"][clear].float(), **tol)


@gpu
@needs_cuda
def test_gpu_align_and_momentum_large(monkeypatch: pytest.MonkeyPatch) -> None:
    x = align_inputs(512, 64, 128, torch.float32, seed=9)
    got, want = run_align(am.align_loss, x), run_align(ref.align_loss_reference, x)
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-4, atol=1e-5, msg=key)

    monkeypatch.setenv("MOMKD_FORCE_EAGER", "1")
    torch.manual_seed(3)
    eager = ClassMemory(64, 128, mode="momentum", momentum=0.99, dead_after=3).to(DEVICE)
    fused = ClassMemory(64, 128, mode="momentum", momentum=0.99, dead_after=3).to(DEVICE)
    fused.load_state_dict(eager.state_dict())
    for _ in range(6):
        emb = torch.randn(256, 128, device=DEVICE)
        labels = torch.randint(0, 2, (256,), device=DEVICE)
        eager.momentum_update(emb, labels)
        am.momentum_step(
            fused.pos, fused.neg, fused.unused_steps, fused.recent, fused.recent_count,
            emb, labels, 0.99, 3,
        )  # fmt: skip
    for name, want_t in eager.state_dict().items():
        got_t = fused.state_dict()[name]
        if want_t.is_floating_point():
            torch.testing.assert_close(got_t, want_t, rtol=1e-4, atol=1e-5, msg=name)
        else:
            assert torch.equal(got_t, want_t), name


@gpu
@needs_cuda
def test_gpu_dispatch_selects_fused(monkeypatch: pytest.MonkeyPatch) -> None:
    from momkd import kernels

    monkeypatch.delenv("MOMKD_FORCE_EAGER", raising=False)
    assert kernels.fused_available("memory_attention_pool")
    x = attn_inputs([300, 200], 16, 64, 128, seed=1)
    res = kernels.memory_attention_pool(x["p"], x["f"], x["cp"], x["cn"], x["lt"], x["off"])
    want = ref.memory_attention_pool_reference(x["p"], x["f"], x["cp"], x["cn"], x["lt"], x["off"])
    for a, b in zip(res, want, strict=True):
        torch.testing.assert_close(a.float(), b.float(), rtol=1e-4, atol=1e-5)
