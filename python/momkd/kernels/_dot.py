"""Device helper shared by the Triton kernels: the similarity product at the kernel precision.

``PRECISION`` is the constexpr code of ``train.kernel_precision``
(:data:`momkd.kernels._triton_utils.PRECISIONS`): 0 ``ieee`` (fp32 FMA), 1 ``tf32`` and 2 ``bf16``
(tensor cores). Accumulation is fp32 in every case.

Under Triton's CPU interpreter (``TRITON_INTERPRET=1``) ``input_precision`` is ignored (every
``tl.dot`` is an fp32 matmul), an fp32 -> bf16 cast truncates instead of rounding and a bf16
``tl.dot`` multiplies the raw storage. There the tf32 and bf16 products are emulated instead: both
operands are rounded to nearest-even at 10 (tf32) or 7 (bf16) mantissa bits and multiplied in fp32.
A product of two such values is exact in fp32, so the emulation differs from a tensor core only in
the accumulation order and in how the hardware rounds the operands (a tf32 MMA fed fp32 registers
may drop the low bits instead of rounding them). Compiled kernels never take the emulation branch.
"""

from __future__ import annotations

import triton
import triton.language as tl

from momkd.kernels._triton_utils import interpreting

#: Whether this module was decorated for the interpreter (read, like Triton does, at import).
_EMULATE: tl.constexpr = tl.constexpr(interpreting())


@triton.jit
def round_mantissa(x, DROP: tl.constexpr):
    """fp32 ``x`` rounded to nearest-even with its ``DROP`` low mantissa bits cleared (13: tf32,
    16: bf16). Finite values only (the similarity operands are normalised)."""
    bits = x.to(tl.uint32, bitcast=True)
    lsb = (bits >> DROP) & 1
    bits = (bits + ((1 << (DROP - 1)) - 1) + lsb) >> DROP << DROP
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def sim_dot(a, b, acc, PRECISION: tl.constexpr):
    """``acc + a @ b`` for fp32 tiles ``a`` (M, R) and ``b`` (R, N) at the similarity precision."""
    if PRECISION == 2:
        if _EMULATE:
            out = tl.dot(round_mantissa(a, 16), round_mantissa(b, 16), acc, input_precision="ieee")
        else:
            out = tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16), acc, out_dtype=tl.float32)
    elif PRECISION == 1:
        if _EMULATE:
            out = tl.dot(round_mantissa(a, 13), round_mantissa(b, 13), acc, input_precision="ieee")
        else:
            out = tl.dot(a, b, acc, input_precision="tf32")
    else:
        out = tl.dot(a, b, acc, input_precision="ieee")
    return out
