"""Accuracy of the kernel precisions (``train.kernel_precision``) against the fp32 eager reference.

Runs the fused memory-attention pooling, alignment loss and momentum statistics in Triton's CPU
interpreter at each precision (``ieee``, ``tf32``, ``bf16``) and compares forward outputs and
gradients with :mod:`momkd.kernels.reference` over several seeds. The interpreter cannot run tensor
cores: the tf32 and bf16 similarity products are emulated there by rounding both operands to
nearest-even at 10 or 7 mantissa bits and multiplying in fp32 (:mod:`momkd.kernels._dot`), which
is exact up to accumulation order and the hardware's own operand rounding.

Error of a tensor: ``max |x - ref| / max |ref|`` (the largest deviation relative to the tensor's
scale), maximum over seeds; arg-max flips: the fraction of rows whose nearest memory component
differs from the reference's (near-ties flip at reduced precision; a flipped row's score moves
only by the similarity gap, but its ``dp`` row switches to another component's difference).

Usage::

    python benches/kernel_precision_study.py [--seeds 5] [--markdown FILE]
"""

from __future__ import annotations

import argparse
import itertools
import math
import os
import sys
from pathlib import Path
from typing import Any

os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from momkd import kernels  # noqa: E402
from momkd.kernels import align_momentum as am  # noqa: E402
from momkd.kernels import memory_attention as ma  # noqa: E402
from momkd.kernels import reference as ref  # noqa: E402

PRECISIONS = ("ieee", "tf32", "bf16")
#: (bag sizes, K, S, H): the official preset's S = 64 and the paper's S = 128 at K = 16 and 64.
ATTN_SHAPES = (([300, 211, 97, 40], 16, 64, 64), ([200, 77], 64, 128, 64))
#: (B, K, S) of the alignment loss and (M, K, S) of the momentum statistics.
ALIGN_SHAPES = ((64, 16, 64), (32, 64, 128))
MOMENTUM_SHAPES = ((256, 16, 64), (128, 64, 128))


def rel_err(x: torch.Tensor, want: torch.Tensor) -> float:
    scale = want.float().abs().max().item()
    return (x.float() - want.float()).abs().max().item() / max(scale, 1e-30)


def _attention(seed: int, sizes: list[int], k: int, s: int, h: int) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed)
    n = sum(sizes)
    p0 = F.normalize(torch.randn(n, s, generator=g), dim=1)
    f0 = torch.randn(n, h, generator=g)
    cp = F.normalize(torch.randn(k, s, generator=g), dim=1)
    cn = F.normalize(torch.randn(k, s, generator=g), dim=1)
    lt0 = torch.tensor(math.log(0.2))
    off = torch.tensor([0, *itertools.accumulate(sizes)], dtype=torch.int64)
    w_pool = torch.randn(len(sizes), h, generator=g)
    w_attn = torch.randn(n, generator=g)

    def run(fn: Any) -> dict[str, torch.Tensor]:
        p, f, lt = (t.clone().requires_grad_() for t in (p0, f0, lt0))
        pooled, attn, score, amax_pos, amax_neg = fn(p, f, cp, cn, lt, off)[:5]
        ((pooled * w_pool).sum() + (attn * w_attn).sum()).backward()
        assert p.grad is not None and f.grad is not None and lt.grad is not None
        return {
            "attention": attn, "pooled": pooled, "score": score, "dp": p.grad, "df": f.grad,
            "dlog_tau": lt.grad.reshape(1), "amax": torch.stack([amax_pos, amax_neg]),
        }  # fmt: skip

    return {
        "want": run(ref.memory_attention_pool_reference),
        "run": lambda: run(ma.memory_attention_pool),
    }


def _align(seed: int, b: int, k: int, s: int) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed)
    z0 = F.normalize(torch.randn(b, s, generator=g), dim=1)
    y = torch.randint(0, 2, (b,), generator=g)
    cp0 = F.normalize(torch.randn(k, s, generator=g), dim=1)
    cn0 = F.normalize(torch.randn(k, s, generator=g), dim=1)
    w = torch.randn(b, generator=g)

    def run(fn: Any) -> dict[str, torch.Tensor]:
        z, cp, cn = (t.clone().requires_grad_() for t in (z0, cp0, cn0))
        loss = fn(z, y, cp, cn, 0.3, 20.0, 5.0)
        (loss * w).sum().backward()
        assert z.grad is not None and cp.grad is not None and cn.grad is not None
        return {"align loss": loss, "dz": z.grad, "dc": torch.cat([cp.grad, cn.grad])}

    return {"want": run(ref.align_loss_reference), "run": lambda: run(am.align_loss)}


def _momentum(seed: int, m: int, k: int, s: int) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed)
    mems_hat = F.normalize(torch.randn(2, k, s, generator=g), dim=-1)
    emb = F.normalize(torch.randn(m, s, generator=g), dim=1)
    labels = torch.randint(0, 2, (m,), generator=g)

    def run(fn: Any) -> dict[str, torch.Tensor]:
        sums, counts = fn(mems_hat, emb, labels)
        return {"momentum sums": sums, "counts": counts}

    return {"want": run(ref.momentum_stats_reference), "run": lambda: run(am.momentum_stats)}


def study(seeds: int, log: Any = None) -> dict[str, dict[str, float]]:
    """``{precision: {quantity: worst error over seeds and shapes}}``."""
    table: dict[str, dict[str, float]] = {p: {} for p in PRECISIONS}

    def note(prec: str, key: str, value: float) -> None:
        table[prec][key] = max(table[prec].get(key, 0.0), value)

    cases = [
        *(("attention", _attention, shape) for shape in ATTN_SHAPES),
        *(("align", _align, shape) for shape in ALIGN_SHAPES),
        *(("momentum", _momentum, shape) for shape in MOMENTUM_SHAPES),
    ]
    for seed in range(seeds):
        for name, build, shape in cases:
            case = build(seed, *shape)
            want = case["want"]
            for prec in PRECISIONS:
                with kernels.kernel_precision(prec):
                    got = case["run"]()
                if "amax" in got:
                    kept = (got["amax"] == want["amax"]).all(dim=0)
                    note(
                        prec, "dp, rows without a flip", rel_err(got["dp"][kept], want["dp"][kept])
                    )
                for key, value in got.items():
                    if key == "amax":
                        note(prec, "arg-max flips", (value != want[key]).float().mean().item())
                    elif key == "counts":
                        flips = (value - want[key]).abs().sum().item() / 2 / max(shape[0], 1)
                        note(prec, "momentum assignment flips", flips)
                    else:
                        note(prec, key, rel_err(value, want[key]))
            if log is not None:
                log(f"seed {seed} {name} {shape}: done")
    return table


ORDER = (
    "attention", "pooled", "score", "dp", "dp, rows without a flip", "df", "dlog_tau", "arg-max flips",
    "align loss", "dz", "dc", "momentum sums", "momentum assignment flips",
)  # fmt: skip


def markdown(table: dict[str, dict[str, float]]) -> str:
    lines = ["| quantity | " + " | ".join(PRECISIONS) + " |", "|---|" + "---:|" * len(PRECISIONS)]
    for key in ORDER:
        cells = []
        for prec in PRECISIONS:
            v = table[prec].get(key)
            cells.append("" if v is None else ("0" if v == 0 else f"{v:.1e}"))
        lines.append(f"| {key} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--markdown", type=Path, default=None, help="write the table here")
    args = ap.parse_args(argv)
    table = study(args.seeds, lambda s: print(s, file=sys.stderr, flush=True))
    text = markdown(table)
    if args.markdown:
        args.markdown.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
