"""Device helper shared by the Triton kernels: the similarity product at the kernel precision.

``PRECISION`` is the constexpr code of ``train.kernel_precision``
(:data:`momkd.kernels._triton_utils.PRECISIONS`): 0 ``ieee`` (fp32 FMA), 1 ``tf32`` and 2 ``bf16``
(tensor cores). Accumulation is fp32 in every case.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def sim_dot(a, b, acc, PRECISION: tl.constexpr):
    """``acc + a @ b`` for fp32 tiles ``a`` (M, R) and ``b`` (R, N) at the similarity precision."""
    if PRECISION == 2:
        out = tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16), acc, out_dtype=tl.float32)
    elif PRECISION == 1:
        out = tl.dot(a, b, acc, input_precision="tf32")
    else:
        out = tl.dot(a, b, acc, input_precision="ieee")
    return out
