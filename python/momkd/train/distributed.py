"""Data-parallel training with ``torch.distributed``, launched by ``torchrun`` (docs/METHOD.md §7).

momkd has no launcher and no communication layer of its own: ``torchrun`` starts one process per
device and sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``;
:func:`init_distributed` reads them, picks the backend (``nccl`` on CUDA, ``gloo`` on CPU, or
``train.dist_backend``) and creates the default process group with ``train.dist_timeout_s`` as the
timeout of every collective. Without those variables (or with ``WORLD_SIZE=1``) everything here is a
no-op and training runs in one process as before.

:class:`Dist` is the handle the trainer uses. The rules it supports:

* every rank runs the same collectives in the same order (no collective inside a rank-0-only
  branch);
* rank 0 alone writes the run directory (:attr:`Dist.is_main`); what the other ranks need from disk
  (a checkpoint to resume, the kept model) rank 0 reads and broadcasts, so the ranks need not share a
  file system;
* a failed collective (a peer rank stopped, or ``train.dist_timeout_s`` passed) becomes a one-line
  :class:`DistributedError` (exit code 2 on the command line), never a hang.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, TypeVar

import torch
from torch import Tensor, nn

from momkd.errors import ConfigError, DistributedError, MomkdError

__all__ = [
    "Dist",
    "DistributedError",
    "init_distributed",
    "launched_by_torchrun",
    "shutdown_distributed",
    "state_checksums",
]

log = logging.getLogger(__name__)

T = TypeVar("T")

BACKENDS = ("auto", "nccl", "gloo")


def launched_by_torchrun() -> bool:
    """Whether this process was started by ``torchrun`` (or another launcher setting its variables)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(f"environment variable {name}={raw!r} is not an integer") from None


@dataclass
class Dist:
    """This process's place in a data-parallel run (the single-process defaults when not launched).

    Attributes
    ----------
    rank, world_size, local_rank : int
        From ``torchrun``'s ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``.
    backend : str | None
        ``nccl`` or ``gloo``; None in a single process.
    timeout_s : float
        Timeout of every collective (``train.dist_timeout_s``).
    device : torch.device
        Where collective tensors live (CUDA for nccl, CPU for gloo).
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None
    timeout_s: float = 1800.0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    owns_group: bool = False

    @property
    def enabled(self) -> bool:
        """Whether there is more than one rank."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the only rank that writes the run directory."""
        return self.rank == 0

    # ----------------------------------------------------------------------------- collectives

    @contextmanager
    def collective(self, what: str) -> Iterator[None]:
        """Turn a failed collective into a one-line :class:`DistributedError` naming ``what``."""
        try:
            yield
        except MomkdError:
            raise
        except RuntimeError as exc:
            if not self.enabled:
                raise
            raise DistributedError(
                f"rank {self.rank}: {what} failed: another rank stopped or the collective timed "
                f"out (train.dist_timeout_s={self.timeout_s:g}): {_first_line(exc)}"
            ) from exc

    def barrier(self, what: str = "barrier") -> None:
        """Wait for every rank (an all-reduce of one number, valid on gloo and nccl)."""
        if not self.enabled:
            return
        import torch.distributed as dist

        with self.collective(what):
            dist.all_reduce(torch.zeros(1, device=self.device))

    def all_reduce_sum(self, tensor: Tensor, what: str = "all-reduce") -> Tensor:
        """Sum of ``tensor`` over ranks (returned on the tensor's device; input unchanged)."""
        if not self.enabled:
            return tensor
        import torch.distributed as dist

        buf = tensor.detach().to(self.device).clone()
        with self.collective(what):
            dist.all_reduce(buf)
        return buf.to(tensor.device)

    def all_gather_object(self, obj: T, what: str = "all-gather") -> list[T]:
        """``[obj of rank 0, obj of rank 1, ...]`` on every rank."""
        if not self.enabled:
            return [obj]
        import torch.distributed as dist

        out: list[Any] = [None] * self.world_size
        with self.collective(what):
            dist.all_gather_object(out, obj)
        return out

    def gather_object(self, obj: T, what: str = "gather") -> list[T] | None:
        """``[obj of rank 0, ...]`` on rank 0, None on the other ranks."""
        if not self.enabled:
            return [obj]
        import torch.distributed as dist

        out: list[Any] | None = [None] * self.world_size if self.is_main else None
        with self.collective(what):
            dist.gather_object(obj, out, dst=0)
        return out

    def broadcast_object(self, obj: T, what: str = "broadcast") -> T:
        """Rank 0's ``obj`` on every rank (the other ranks' argument is ignored)."""
        if not self.enabled:
            return obj
        import torch.distributed as dist

        box: list[Any] = [obj if self.is_main else None]
        with self.collective(what):
            dist.broadcast_object_list(box, src=0)
        return box[0]  # type: ignore[no-any-return]

    def broadcast_module(self, module: nn.Module, what: str = "broadcast of the model") -> None:
        """Overwrite every parameter and buffer with rank 0's values."""
        if not self.enabled:
            return
        import torch.distributed as dist

        with self.collective(what), torch.no_grad():
            for t in list(module.parameters()) + list(module.buffers()):
                buf = t.detach().to(self.device).clone()
                dist.broadcast(buf, src=0)
                t.copy_(buf.to(t.device))

    def on_main(self, fn: Callable[[], T], what: str) -> T:
        """Run ``fn`` on rank 0 only and give its result, or raise its :class:`MomkdError`, on
        every rank (a check of the run directory, a file only rank 0 reads)."""
        if not self.enabled:
            return fn()
        result: Any = None
        error: tuple[str, str] | None = None
        if self.is_main:
            try:
                result = fn()
            except MomkdError as exc:
                error = (type(exc).__name__, str(exc))
        result, error = self.broadcast_object((result, error), what)
        if error is not None:
            from momkd import errors

            raise getattr(errors, error[0], MomkdError)(error[1])
        return result  # type: ignore[no-any-return]

    def memory_reduce_fn(self) -> Callable[[Tensor, Tensor], tuple[Tensor, Tensor]] | None:
        """The ``reduce_fn`` of :meth:`momkd.memory.ClassMemory.momentum_update`: all-reduced
        ``(sums, counts)``; None in a single process."""
        if not self.enabled:
            return None

        def reduce(sums: Tensor, counts: Tensor) -> tuple[Tensor, Tensor]:
            return (
                self.all_reduce_sum(sums, "all-reduce of the memory statistics"),
                self.all_reduce_sum(counts, "all-reduce of the memory statistics"),
            )

        return reduce

    def check_identical(self, module: nn.Module, what: str) -> None:
        """Verify that every parameter and buffer is bit-identical on all ranks.

        One all-gather of one int64 checksum per tensor (:func:`state_checksums`).

        Raises
        ------
        DistributedError
            Naming the first tensor that differs and the ranks involved.
        """
        if not self.enabled:
            return
        names, sums = state_checksums(module)
        gathered = self.all_gather_object(sums.tolist(), f"checksum of {what}")
        ref = gathered[0]
        for r, other in enumerate(gathered[1:], start=1):
            if other != ref:
                i = next(j for j, (a, b) in enumerate(zip(ref, other, strict=True)) if a != b)
                raise DistributedError(
                    f"{what}: {names[i]} differs between rank 0 and rank {r}; the ranks no longer "
                    "train the same model"
                )


def state_checksums(module: nn.Module) -> tuple[list[str], Tensor]:
    """One int64 checksum per parameter and buffer, sensitive to every bit.

    The raw bytes of each tensor, read as int32 words (or bytes), weighted by their position and
    summed in int64 arithmetic (wrapping): a change of any bit changes the sum.

    Returns
    -------
    names : list[str]
    sums : Tensor
        (n,) int64 on the CPU.
    """
    names: list[str] = []
    sums: list[int] = []
    for name, t in list(module.named_parameters()) + list(module.named_buffers()):
        raw = t.detach().contiguous().cpu().reshape(-1)
        if raw.element_size() == 4:
            words = raw.view(torch.int32).to(torch.int64)
        else:
            words = raw.view(torch.uint8).to(torch.int64)
        pos = torch.arange(1, words.numel() + 1, dtype=torch.int64)
        names.append(name)
        sums.append(int((words * pos).sum()))
    return names, torch.tensor(sums, dtype=torch.int64)


def _first_line(exc: BaseException) -> str:
    """The first sentence of a backend error, without gloo's/NCCL's source location prefix."""
    lines = str(exc).strip().splitlines()
    if not lines:
        return type(exc).__name__
    text = re.sub(r"^\[[^\]]*\]\s*", "", lines[0])
    return text.split(". ")[0][:300]


def init_distributed(
    backend: str = "auto", device: str = "auto", timeout_s: float = 1800.0
) -> tuple[Dist, torch.device]:
    """Join the process group ``torchrun`` set up (when it did) and choose this rank's device.

    Parameters
    ----------
    backend : str
        ``auto`` (nccl on CUDA, gloo on CPU), ``nccl`` or ``gloo`` (``train.dist_backend``).
    device : str
        ``train.device``; under torchrun on CUDA, ``auto`` and ``cuda`` mean ``cuda:LOCAL_RANK``.
    timeout_s : float
        Timeout of every collective (``train.dist_timeout_s``).

    Returns
    -------
    Dist, torch.device

    Raises
    ------
    ConfigError
        An unknown backend, nccl without CUDA, or fewer CUDA devices than local ranks.
    """
    from momkd.train.device import select_device

    if backend not in BACKENDS:
        raise ConfigError(f"train.dist_backend: expected one of {BACKENDS}, got {backend!r}")
    world = _env_int("WORLD_SIZE", 1) if launched_by_torchrun() else 1
    if world <= 1:
        return Dist(timeout_s=timeout_s), select_device(device)
    import torch.distributed as dist

    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", 0)
    dev = select_device(device)
    if dev.type == "cuda":
        if dev.index is None:
            if local_rank >= torch.cuda.device_count():
                raise ConfigError(
                    f"LOCAL_RANK {local_rank}: only {torch.cuda.device_count()} CUDA devices on "
                    "this node; start at most that many processes per node (--nproc_per_node)"
                )
            dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    chosen = backend if backend != "auto" else ("nccl" if dev.type == "cuda" else "gloo")
    if chosen == "nccl" and dev.type != "cuda":
        raise ConfigError("train.dist_backend: nccl needs CUDA devices; use gloo on the CPU")
    comm = dev if chosen == "nccl" else torch.device("cpu")
    owns = False
    if not dist.is_initialized():
        try:
            dist.init_process_group(
                chosen, timeout=timedelta(seconds=float(timeout_s)), rank=rank, world_size=world
            )
        except RuntimeError as exc:
            raise DistributedError(
                f"rank {rank}: could not join the process group ({chosen}, MASTER_ADDR="
                f"{os.environ.get('MASTER_ADDR')}, MASTER_PORT={os.environ.get('MASTER_PORT')}): "
                f"{_first_line(exc)}"
            ) from exc
        owns = True
    d = Dist(
        rank=rank,
        world_size=world,
        local_rank=local_rank,
        backend=chosen,
        timeout_s=float(timeout_s),
        device=comm,
        owns_group=owns,
    )
    log.info("rank %d of %d (%s, device %s)", rank, world, chosen, dev)
    return d, dev


def shutdown_distributed(d: Dist) -> None:
    """Leave the process group created by :func:`init_distributed` (no-op otherwise)."""
    if d.owns_group:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
        d.owns_group = False


def shard(items: Sequence[T], d: Dist) -> list[T]:
    """Rank ``r``'s share ``items[r::world_size]``."""
    return list(items[d.rank :: d.world_size])


def unshard(parts: Sequence[Sequence[T]], n: int) -> list[T]:
    """Inverse of :func:`shard`: ``parts[r]`` is rank r's share of ``n`` items; the items in their
    original order."""
    out: list[Any] = [None] * n
    for r, part in enumerate(parts):
        out[r :: len(parts)] = list(part)
    return out
