"""The types every reader returns, and the torch Dataset that loads their images."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor
from torch.utils.data import default_collate

log = logging.getLogger(__name__)


class DataLayoutError(FileNotFoundError):
    """A dataset folder or file is missing or malformed; the message names it and the expected layout."""


class BadImageError(OSError):
    """An image could not be decoded; the message names its path."""


@dataclass
class ImageList:
    """A list of image files with labels, as read from a dataset's own index files.

    labels: shape (N,) int64 class indices for single-label datasets (ImageNet, Places205), or
    (N, C) int32 with 1 = present, 0 = absent, -1 = difficult-only for VOC07 classification.
    """

    name: str
    root: Path
    paths: list[Path]
    labels: np.ndarray
    classes: list[str]

    def __post_init__(self) -> None:
        if len(self.paths) != len(self.labels):
            raise ValueError(f"{self.name}: {len(self.paths)} paths but {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.paths)

    def without(self, indices: Sequence[int]) -> ImageList:
        """The same list less the images at `indices` (the unreadable ones), labels still row-aligned."""
        dropped = set(indices)
        return replace(self, paths=[p for i, p in enumerate(self.paths) if i not in dropped],
                       labels=np.delete(self.labels, list(dropped), axis=0))


def load_rgb(path: Path) -> Image.Image:
    """Open an image as RGB (the protocols load through PIL), naming the path on failure."""
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except (OSError, UnidentifiedImageError) as err:
        raise BadImageError(f"cannot read image {path}: {err}") from err


BAD_IMAGE_POLICIES = ("raise", "skip")


def check_bad_image_policy(policy: str) -> str:
    """`raise` (stop, naming the file) or `skip` (leave the image out); anything else is a caller's error."""
    if policy not in BAD_IMAGE_POLICIES:
        raise ValueError(f"on_bad_image must be one of {BAD_IMAGE_POLICIES}, not {policy!r}")
    return policy


@dataclass
class ImageListDataset(torch.utils.data.Dataset):
    """Loads `image_list` images through `transform`; yields (image, index, ok).

    on_bad_image: `raise` fails with the path; `skip` logs it and yields a zero placeholder with
    ok=False. Load through `collate_readable`, which drops the placeholder: it keeps the batch's
    shape known when every image of a batch is unreadable, and never reaches a model.
    """

    image_list: ImageList
    transform: Callable[[Image.Image], Tensor]
    on_bad_image: str = "raise"

    def __post_init__(self) -> None:
        check_bad_image_policy(self.on_bad_image)

    def __len__(self) -> int:
        return len(self.image_list)

    def __getitem__(self, index: int) -> tuple[Tensor, int, bool]:
        path = self.image_list.paths[index]
        try:
            return self.transform(load_rgb(path)), index, True
        except BadImageError:
            if self.on_bad_image == "raise":
                raise
            log.warning("skipping unreadable image %s", path)
            return torch.zeros_like(self.transform(Image.new("RGB", (256, 256)))), index, False


def collate_readable(batch: Sequence[tuple[Tensor, int, bool]]) -> tuple[Tensor, Tensor, Tensor]:
    """Batch `ImageListDataset` samples as (images, indices) of the readable ones plus the skipped indices.

    A batch whose images are all unreadable becomes an empty (0, C, H, W) batch: every rank still
    runs its forward, so DDP and synchronised BN see the same collectives on all ranks.
    """
    images, index, ok = default_collate(batch)
    return images[ok], index[ok], index[~ok]
