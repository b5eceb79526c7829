"""Places205 reader: the official train/val list files over the resized-256 image release.

PROTOCOLS.md §4.3 (MMSelfSup 0.x places205 config: data source type ImageNet, lines split on the last space).
"""

from __future__ import annotations

import os
from pathlib import Path

from densecl_bench.data.base import ImageList
from densecl_bench.data.imagenet import read_list_file
from densecl_bench.data.layout import PLACES_IMAGES, require_dir

CATEGORY_FILE = "categoryIndex_places205.csv"


def _category_names(root: Path, n_classes: int) -> list[str] | None:
    """Names from `categoryIndex_places205.csv` ('/a/abbey 0' lines), if present and complete."""
    path = root / CATEGORY_FILE
    if not path.is_file():
        return None
    names, labels = read_list_file(path, Path(), "places205")
    by_label = {int(label): str(name).lstrip("/") for name, label in zip(names, labels)}
    if sorted(by_label) != list(range(n_classes)):
        return None
    return [by_label[i] for i in range(n_classes)]


def places205(root: str | os.PathLike[str], split: str) -> ImageList:
    """Images and 0-based labels from `trainvalsplit_places205/<split>_places205.csv` (split: train or val)."""
    root = Path(root)
    images = require_dir(root / PLACES_IMAGES, "places205")
    paths, labels = read_list_file(root / "trainvalsplit_places205" / f"{split}_places205.csv", images, "places205")
    n_classes = int(labels.max()) + 1 if len(labels) else 0
    # without a category list the names are the label numbers, all of 0..max so that classes[label] holds
    classes = _category_names(root, n_classes) or [str(i) for i in range(n_classes)]
    return ImageList(f"places205_{split}", root, paths, labels, classes)
