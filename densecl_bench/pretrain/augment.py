"""MoCo v2 augmentations, two independent views per image, reproducible per sample.

PROTOCOLS.md §1.2 (MMSelfSup 0.x `configs/selfsup/_base_/datasets/imagenet_mocov2.py`; DCL
`configs/selfsup/densecl/densecl_imagenet_200ep.py`).

Each sample's randomness is seeded from (seed, epoch, index) rather than drawn from whatever state
a worker process happens to be in. The views therefore do not depend on the number of loader
workers or on which worker got the batch, and a run interrupted mid-epoch resumes on exactly the
same views by skipping the batches it has already seen.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from PIL import Image, ImageFilter
from torch import Tensor
from torchvision import transforms as T

from densecl_bench.data.augment import sample_seed
from densecl_bench.data.base import BadImageError, ImageList, check_bad_image_policy, load_rgb
from densecl_bench.data.transforms import IMAGENET_MEAN, IMAGENET_STD

log = logging.getLogger(__name__)


class GaussianBlur:
    """PIL Gaussian blur with sigma ~ U(0.1, 2.0), applied with probability p (MMSS-0.x `GaussianBlur`).

    Draws from torch's RNG (like the torchvision ops around it), so one seed fixes a whole view.
    """

    def __init__(self, sigma_min: float = 0.1, sigma_max: float = 2.0, p: float = 0.5) -> None:
        self.sigma_min, self.sigma_max, self.p = sigma_min, sigma_max, p

    def __call__(self, img: Image.Image) -> Image.Image:
        if torch.rand(()).item() >= self.p:
            return img
        sigma = torch.empty(()).uniform_(self.sigma_min, self.sigma_max).item()
        return img.filter(ImageFilter.GaussianBlur(radius=sigma))

    def __repr__(self) -> str:
        return f"GaussianBlur(sigma=({self.sigma_min}, {self.sigma_max}), p={self.p})"


AUGMENTATION_DEFAULTS: dict[str, Any] = {
    "crop_scale": (0.2, 1.0),
    "color_jitter": (0.4, 0.4, 0.4, 0.1),
    "color_jitter_p": 0.8,
    "grayscale_p": 0.2,
    "blur_p": 0.5,
}


def augmentation(overrides: Mapping[str, Any] | None) -> dict[str, Any]:
    """§1.2's view parameters with a config's `data.augmentation` overrides applied (unknown keys fail).

    The recipe is the default; a config names a weaker one only where a schedule needs it (the demo
    pretraining), and the config, hence the checkpoint's fingerprint, records it.
    """
    overrides = dict(overrides or {})
    unknown = sorted(set(overrides) - set(AUGMENTATION_DEFAULTS))
    if unknown:
        raise ValueError(f"data.augmentation: unknown keys {unknown}; expected some of {sorted(AUGMENTATION_DEFAULTS)}")
    out = dict(AUGMENTATION_DEFAULTS, **overrides)
    out["crop_scale"], out["color_jitter"] = tuple(out["crop_scale"]), tuple(out["color_jitter"])
    if len(out["crop_scale"]) != 2 or len(out["color_jitter"]) != 4:
        raise ValueError("data.augmentation: crop_scale is [min, max], color_jitter is [brightness, contrast, saturation, hue]")
    return out


def mocov2(size: int = 224, augment: Mapping[str, Any] | None = None) -> T.Compose:
    """One MoCo v2 view (§1.2): RRC(0.2-1) -> ColorJitter p0.8 -> Gray p0.2 -> Blur p0.5 -> Flip -> Normalize.

    `augment`: overrides of `AUGMENTATION_DEFAULTS` (see `augmentation`); None is the recipe.
    """
    a = augmentation(augment)
    return T.Compose([
        T.RandomResizedCrop(size, scale=a["crop_scale"]),
        T.RandomApply([T.ColorJitter(*a["color_jitter"])], p=a["color_jitter_p"]),
        T.RandomGrayscale(p=a["grayscale_p"]),
        GaussianBlur(0.1, 2.0, p=a["blur_p"]),
        T.RandomHorizontalFlip(p=0.5),
        T.ToTensor(),
        T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


class TwoViewDataset(torch.utils.data.Dataset):
    """Yields (view_q, view_k) of `image_list[index]`; indexed by (index, epoch) pairs from `EpochSampler`.

    The views are drawn inside a forked torch RNG seeded by `sample_seed`, so the caller's RNG state
    is left untouched (the main process stays deterministic with num_workers=0 too).

    on_bad_image: `raise` fails with the path; `skip` never samples an unreadable image: its slot
    takes the next readable image of the list (with the slot's views seed). Dropping it from the batch
    is not an option here: the queues advance by whole global batches and the ranks all-gather
    equal-sized key batches.
    """

    def __init__(self, image_list: ImageList, transform: Callable[[Image.Image], Tensor], seed: int = 0,
                 on_bad_image: str = "raise") -> None:
        self.image_list, self.transform, self.seed = image_list, transform, seed
        self.on_bad_image = check_bad_image_policy(on_bad_image)

    def __len__(self) -> int:
        return len(self.image_list)

    def _load(self, index: int) -> Image.Image:
        paths = self.image_list.paths
        for step in range(len(paths)):
            try:
                return load_rgb(paths[(index + step) % len(paths)])
            except BadImageError:
                if self.on_bad_image == "raise":
                    raise
                if step == 0:
                    log.warning("skipping unreadable image %s: the next readable image takes its place", paths[index])
        raise BadImageError(f"{self.image_list.name}: none of its {len(paths)} images can be read")

    def __getitem__(self, item: tuple[int, int]) -> tuple[Tensor, Tensor]:
        index, epoch = item
        img = self._load(index)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(sample_seed(self.seed, epoch, index))
            return self.transform(img), self.transform(img)


class EpochSampler(torch.utils.data.Sampler):
    """This rank's (index, epoch) pairs for one epoch: a seeded permutation, cut to whole global
    batches (drop_last, as the reference), dealt round-robin to the ranks (like DistributedSampler).
    The order is a function of (seed, epoch) alone, so `engine.EpochLoader` can resume mid-epoch."""

    def __init__(self, n: int, batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1) -> None:
        self.n, self.batch_size, self.seed, self.epoch = n, batch_size, seed, 0
        self.rank, self.world_size = rank, world_size
        self.per_rank = (n // (batch_size * world_size)) * batch_size

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.per_rank

    def __iter__(self) -> Iterator[tuple[int, int]]:
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        perm = torch.randperm(self.n, generator=g)[: self.per_rank * self.world_size]
        mine = perm[self.rank :: self.world_size]
        return iter([(int(i), self.epoch) for i in mine])
