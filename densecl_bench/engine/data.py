"""Training data the trainer can resume mid-epoch: the batches of epoch e, from batch i on.

The trainer asks its data for `epoch(e, start)`. Resuming is exact when the order of epoch e is a
function of (seed, e) alone, as torch's DistributedSampler(shuffle=True, seed=...) with
`set_epoch(e)` is, and when each sample's randomness is too (seed augmentations per sample with
`data.augment.sample_seed(seed, epoch, index)`): skipping i batches then lands on the same images
and the same views as the uninterrupted run.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator
from typing import Any, Protocol

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from densecl_bench.data.augment import sample_seed


class TrainData(Protocol):
    """What the trainer iterates: `len()` batches per epoch, and an epoch's batches from `start` on."""

    def __len__(self) -> int: ...

    def epoch(self, epoch: int, start: int = 0) -> Iterable[Any]: ...


class SkipSampler(Sampler[int]):
    """An epoch-deterministic sampler (one with `set_epoch`) that begins `skip` samples into the epoch."""

    def __init__(self, sampler: Sampler[int]) -> None:
        self.sampler, self.skip = sampler, 0

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return max(len(self.sampler) - self.skip, 0)

    def __iter__(self) -> Iterator[int]:
        return itertools.islice(iter(self.sampler), self.skip, None)


class EpochLoader:
    """A DataLoader over `sampler` that serves any epoch from any batch.

    A dataset with `set_epoch` (per-sample seeds that depend on the epoch) is told the epoch before
    the loader's workers start; keep `persistent_workers` off for such datasets, or pass the epoch
    through the sampler instead. `drop_last` decides whether a short last batch counts. The workers'
    base seed comes from the loader's own generator, never from the global RNG, so starting an
    epoch's iterator (again, on resume) leaves the global RNG where the checkpoint put it.
    """

    def __init__(self, dataset: Dataset, sampler: Sampler[int], batch_size: int, *, drop_last: bool = False,
                 **loader_kwargs: Any) -> None:
        self.dataset, self.batch_size, self.drop_last = dataset, batch_size, drop_last
        self.sampler = SkipSampler(sampler)
        loader_kwargs.setdefault("generator", torch.Generator().manual_seed(0))
        self.loader = DataLoader(dataset, batch_size=batch_size, sampler=self.sampler, drop_last=drop_last,
                                 **loader_kwargs)

    def __len__(self) -> int:
        n = len(self.sampler.sampler)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def epoch(self, epoch: int, start: int = 0) -> Iterator[Any]:
        self.sampler.set_epoch(epoch)
        self.sampler.skip = start * self.batch_size
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)
        return iter(self.loader)


class SeededDataset(Dataset):
    """Draws each item inside torch's RNG seeded by `sample_seed(seed, epoch, index)`.

    A sample's augmentation then depends on nothing else: not the worker count, not the world size,
    not whether the run was resumed. The caller's RNG state is left as it was.
    """

    def __init__(self, base: Dataset, seed: int) -> None:
        self.base, self.seed, self.epoch = base, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> Any:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(sample_seed(self.seed, self.epoch, index))
            return self.base[index]


def per_rank_batch(total: int, world: int) -> int:
    """A protocol's total batch split evenly over the processes (16 on 4 GPUs: 4 each).

    An uneven split is refused, not rounded: the batch is part of the protocol (BN statistics, LR).
    """
    if total % world:
        from densecl_bench.errors import UserError

        raise UserError(f"total_batch_size {total} does not split evenly over {world} processes")
    return total // world

