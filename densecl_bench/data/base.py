"""The types every reader returns, and the torch Dataset that loads their images."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor

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


def load_rgb(path: Path) -> Image.Image:
    """Open an image as RGB (the protocols load through PIL), naming the path on failure."""
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except (OSError, UnidentifiedImageError) as err:
        raise BadImageError(f"cannot read image {path}: {err}") from err


@dataclass
class ImageListDataset(torch.utils.data.Dataset):
    """Loads `image_list` images through `transform`; yields (image, index, ok).

    on_bad_image: `raise` fails with the path; `skip` logs it, yields a zero image with ok=False
    so that row order (and every feature cache index) is preserved, and counts it in `bad`.
    """

    image_list: ImageList
    transform: Callable[[Image.Image], Tensor]
    on_bad_image: str = "raise"
    bad: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.on_bad_image not in ("raise", "skip"):
            raise ValueError(f"on_bad_image must be 'raise' or 'skip', not {self.on_bad_image!r}")

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
            self.bad.append(index)
            probe = self.transform(Image.new("RGB", (256, 256)))
            return torch.zeros_like(probe), index, False
