"""Training augmentations of the linear probes, scaled like `transforms.py` for small demo images.

PROTOCOLS.md §4.2; MMSelfSup 0.x `configs/benchmarks/classification/{imagenet,places205}/*.py` and
`mmselfsup/datasets/pipelines/transforms.py` (Lighting). Evaluation reuses `transforms.center_crop`.
Every random choice draws from torch's global generator, so a caller that seeds it per sample
(see `linear.SeededDataset`) gets augmentations independent of worker count and world size.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor
from torchvision import transforms as T

from densecl_bench.data.transforms import IMAGENET_MEAN, IMAGENET_STD, resize_for, center_crop

def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A well-mixed 63-bit seed for one sample of one epoch: seeding torch with it around a sample's
    augmentation makes the views independent of worker count, world size and resumption."""
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(2, np.uint64)[0] >> np.uint64(1))


# AlexNet's PCA of ImageNet RGB pixels (Krizhevsky et al. 2012), the constants every Lighting uses.
IMAGENET_EIGVAL = (0.2175, 0.0188, 0.0045)
IMAGENET_EIGVEC = (
    (-0.5675, 0.7192, 0.4009),
    (-0.5808, -0.0045, -0.8140),
    (-0.5836, -0.6948, 0.4203),
)


class Lighting:
    """AlexNet PCA lighting noise on a [0, 1] tensor image (applied after ToTensor, before Normalize).

    Draws alpha ~ N(0, alphastd) per eigenvector and adds eigvec @ (alpha * eigval) to every pixel.
    """

    def __init__(self, alphastd: float = 0.1, eigval=IMAGENET_EIGVAL, eigvec=IMAGENET_EIGVEC) -> None:
        self.alphastd = alphastd
        self.eigval = torch.tensor(eigval, dtype=torch.float32)
        self.eigvec = torch.tensor(eigvec, dtype=torch.float32)

    def __call__(self, img: Tensor) -> Tensor:
        if self.alphastd == 0:
            return img
        alpha = torch.normal(0.0, self.alphastd, size=(3,))
        rgb = self.eigvec.to(img.dtype) @ (alpha * self.eigval).to(img.dtype)
        return img + rgb.view(3, 1, 1)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(alphastd={self.alphastd})"


def _normalize() -> T.Normalize:
    return T.Normalize(IMAGENET_MEAN, IMAGENET_STD)


def imagenet_mhead(size: int = 224) -> T.Compose:
    """IN multi-head train aug: RandomResizedCrop, HFlip, ColorJitter(0.4, 0.4, 0.4), ToTensor, Lighting."""
    return T.Compose([
        T.RandomResizedCrop(size),
        T.RandomHorizontalFlip(),
        T.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.4, hue=0.0),
        T.ToTensor(),
        Lighting(alphastd=0.1),
        _normalize(),
    ])


def imagenet_linear(size: int = 224) -> T.Compose:
    """IN AvgPool-linear train aug (MoCo v1/v2 setting): RandomResizedCrop, HFlip."""
    return T.Compose([T.RandomResizedCrop(size), T.RandomHorizontalFlip(), T.ToTensor(), _normalize()])


def places205(size: int = 224) -> T.Compose:
    """Places205 train aug: Resize 256, CenterCrop 256, RandomCrop 224, HFlip."""
    resize = resize_for(size)
    return T.Compose([
        T.Resize(resize),
        T.CenterCrop(resize),
        T.RandomCrop(size),
        T.RandomHorizontalFlip(),
        T.ToTensor(),
        _normalize(),
    ])


TRAIN_AUGS = {
    "imagenet_mhead": imagenet_mhead,
    "imagenet_linear": imagenet_linear,
    "places205": places205,
    "inat18": imagenet_linear,  # inaturalist2018.py: RandomResizedCrop 224, HFlip (no ColorJitter, no Lighting)
    # deterministic; used where a test needs training free of augmentation noise
    "center_crop": center_crop,
}


def build_train(name: str, size: int = 224) -> T.Compose:
    """Build a training augmentation by the name a linear-probe config gives (`train_aug`)."""
    try:
        return TRAIN_AUGS[name](size)
    except KeyError:
        raise ValueError(f"unknown train_aug {name!r}: expected one of {', '.join(TRAIN_AUGS)}") from None
