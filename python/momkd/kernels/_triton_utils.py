"""Host-side helpers shared by the Triton kernels of :mod:`momkd.kernels`.

Nothing here launches a kernel; these functions pick block sizes, build the bag -> chunk maps the
segmented kernels use, and validate inputs with messages that name the offending argument.
"""

from __future__ import annotations

import functools
import os

import torch

from momkd.errors import DataError

__all__ = [
    "PRECISIONS",
    "block_size",
    "chunk_map",
    "interpreting",
    "precision_code",
    "triton_available",
    "validate_offsets",
]


#: Input precision of the similarity products (``train.kernel_precision``), by constexpr code:
#: ``ieee`` (fp32 FMA, bit-faithful arg-maxima), ``tf32`` (tensor cores, fp32 operands rounded to
#: 10 mantissa bits), ``bf16`` (tensor cores, bf16 operands); accumulation is fp32 in every case.
PRECISIONS = ("ieee", "tf32", "bf16")

#: The precision the launchers read; set through :func:`momkd.kernels.set_kernel_precision`.
_PRECISION = ["ieee"]


def precision_code() -> int:
    """The constexpr code (index into :data:`PRECISIONS`) of the current kernel precision."""
    return PRECISIONS.index(_PRECISION[0])


def interpreting() -> bool:
    """Whether Triton kernels run in the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.cache
def _triton_importable() -> bool:
    try:
        import triton.language  # noqa: F401
    except (ImportError, OSError, RuntimeError):  # pragma: no cover - depends on the installation
        return False
    return True


def triton_available(device: torch.device | str | None = None) -> bool:
    """Whether the Triton kernels can run for tensors on ``device``.

    True for CUDA devices when Triton imports, and for CPU tensors when the Triton interpreter is
    switched on (``TRITON_INTERPRET=1``, used by the tests).

    Parameters
    ----------
    device
        Device of the tensors the kernel would receive; ``None`` means the default CUDA device.
    """
    if not _triton_importable():
        return False
    dev = torch.device("cuda" if device is None else device)
    if dev.type == "cuda":
        return torch.cuda.is_available()
    return dev.type == "cpu" and interpreting()


def block_size(n: int, minimum: int = 16, maximum: int | None = None) -> int:
    """Smallest power of two >= ``n``, clipped to ``[minimum, maximum]``.

    ``tl.dot`` needs every tile dimension >= 16, hence the default minimum.
    """
    b = max(minimum, 1 << max(0, int(n) - 1).bit_length())
    if maximum is not None:
        b = min(b, maximum)
    return b


def validate_offsets(offsets: torch.Tensor, n_rows: int, name: str = "segment_offsets") -> None:
    """Check a CSR offset vector: 1-D integer, from 0 to ``n_rows``, strictly increasing.

    Every bag must hold at least one row, as in the eager reference. One device synchronisation (a
    single boolean is copied to the host).

    Raises
    ------
    DataError
        If the vector is malformed or a bag is empty; the message names ``name``.
    """
    if offsets.dim() != 1 or offsets.numel() < 2:
        raise DataError(
            f"{name}: expected a 1-D tensor of B+1 >= 2 offsets, got shape {tuple(offsets.shape)}"
        )
    if offsets.dtype not in (torch.int64, torch.int32):
        raise DataError(f"{name}: expected an integer tensor, got {offsets.dtype}")
    ok = (offsets[0] == 0) & (offsets[-1] == n_rows) & (offsets[1:] > offsets[:-1]).all()
    if not bool(ok):
        raise DataError(
            f"{name}: offsets must run from 0 to the number of rows ({n_rows}) and strictly "
            f"increase (every bag needs >= 1 row)"
        )


def chunk_map(
    offsets: torch.Tensor, block_n: int, n_rows: int
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Split every bag into chunks of ``block_n`` rows, without a host synchronisation.

    Chunks never straddle two bags, so a kernel program owns rows of exactly one bag. The number of
    chunks is at most ``ceil(N / block_n) + B``; the grid is launched with that bound and programs
    past the real count find a bag id ``>= B`` and idle.

    Parameters
    ----------
    offsets
        ``(B+1,)`` int64 segment offsets.
    block_n
        Rows per chunk.
    n_rows
        ``N``, the total number of rows.

    Returns
    -------
    chunk_bag
        ``(G,)`` int64, the bag of each chunk (``B`` for idle chunks).
    chunk_start
        ``(B+1,)`` int64, index of the first chunk of each bag (CSR over chunks).
    grid
        ``G``, the number of programs to launch.
    """
    n_bags = offsets.numel() - 1
    grid = max(1, -(-n_rows // block_n) + n_bags)
    sizes = offsets[1:] - offsets[:-1]
    per_bag = torch.div(sizes + (block_n - 1), block_n, rounding_mode="floor")
    chunk_start = torch.zeros(n_bags + 1, dtype=torch.int64, device=offsets.device)
    chunk_start[1:] = torch.cumsum(per_bag, 0)
    pids = torch.arange(grid, dtype=torch.int64, device=offsets.device)
    chunk_bag = torch.searchsorted(chunk_start[1:].contiguous(), pids, right=True)
    return chunk_bag, chunk_start, grid
