"""Class-balanced sampling of training slides, reproducible per epoch and shardable per rank.

Every epoch draws ``num_samples`` (default: the training-set size) slide positions. With
``balanced=True`` the draw is with replacement and each class has the same probability mass (a
slide's weight is ``1 / count(its class)``), the protocol of the released MoMKD code; with
``balanced=False`` it is a plain permutation. The draw of epoch ``e`` depends only on ``(seed, e)``
(a fresh ``numpy`` generator from ``SeedSequence([seed, e])``), so a resumed run replays exactly the
epochs an uninterrupted run would have seen, and every rank of a distributed run computes the same
global draw and keeps its share ``draw[rank::world_size]``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from momkd.errors import ConfigError, DataError

__all__ = ["ClassBalancedSampler"]


class ClassBalancedSampler:
    """Per-epoch index sampler over a labelled training set.

    Parameters
    ----------
    labels : Sequence[int]
        (n,) class label of every training item.
    num_samples : int | None
        Items drawn per epoch over all ranks (default ``len(labels)``).
    balanced : bool
        Class-balanced draw with replacement (True) or a permutation (False).
    seed : int
        Base seed; epoch ``e`` uses ``SeedSequence([seed, e])``.
    rank, world_size : int
        Shard of a distributed run. The global draw is padded (by wrapping around) to a multiple of
        ``world_size`` so every rank gets the same number of items.
    """

    def __init__(
        self,
        labels: Sequence[int] | np.ndarray,
        *,
        num_samples: int | None = None,
        balanced: bool = True,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.labels = np.asarray(labels, dtype=np.int64)
        if self.labels.ndim != 1 or self.labels.size == 0:
            raise DataError("the sampler needs a non-empty 1-D label vector")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ConfigError(f"invalid rank {rank} for world_size {world_size}")
        self.num_samples = int(num_samples) if num_samples is not None else int(self.labels.size)
        if self.num_samples <= 0:
            raise ConfigError(f"num_samples must be positive, got {self.num_samples}")
        self.balanced = bool(balanced)
        self.seed = int(seed)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose draw ``__iter__`` yields."""
        self.epoch = int(epoch)

    def global_indices(self, epoch: int | None = None) -> np.ndarray:
        """The draw of one epoch over all ranks.

        Returns
        -------
        np.ndarray
            (ceil(num_samples / world_size) * world_size,) int64 positions into ``labels``.
        """
        ep = self.epoch if epoch is None else int(epoch)
        rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([self.seed, ep])))
        n = self.labels.size
        if self.balanced:
            _, inverse, counts = np.unique(self.labels, return_inverse=True, return_counts=True)
            weights = 1.0 / counts[inverse].astype(np.float64)
            weights /= weights.sum()
            idx = rng.choice(n, size=self.num_samples, replace=True, p=weights)
        else:
            reps = -(-self.num_samples // n)
            idx = np.concatenate([rng.permutation(n) for _ in range(reps)])[: self.num_samples]
        total = -(-idx.size // self.world_size) * self.world_size
        if total > idx.size:
            idx = np.concatenate([idx, idx[: total - idx.size]])
        return idx.astype(np.int64)

    def indices(self, epoch: int | None = None) -> list[int]:
        """This rank's share of the draw of ``epoch`` (default: the current epoch)."""
        return self.global_indices(epoch)[self.rank :: self.world_size].tolist()

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices())

    def __len__(self) -> int:
        return (self.num_samples + self.world_size - 1) // self.world_size

    def state_dict(self) -> dict[str, Any]:
        """Plain-python state (loadable with ``torch.load(weights_only=True)``)."""
        return {
            "seed": self.seed,
            "epoch": self.epoch,
            "num_samples": self.num_samples,
            "balanced": self.balanced,
            "n": int(self.labels.size),
            "world_size": self.world_size,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the epoch counter after checking that the state belongs to this sampler."""
        for key, mine in (
            ("seed", self.seed),
            ("num_samples", self.num_samples),
            ("balanced", self.balanced),
            ("n", int(self.labels.size)),
        ):
            if key in state and state[key] != mine:
                raise ConfigError(
                    f"sampler state does not match: {key} is {state[key]!r}, expected {mine!r}"
                )
        self.epoch = int(state["epoch"])
