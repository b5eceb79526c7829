"""ImageNet reader: class folders `<split>/<wnid>/*`, or MMSelfSup's `meta/<split>.txt` lists.

PROTOCOLS.md §4, §5 (MMSelfSup 0.x ImageNet data source: folder scan, or a list file of
'<relative path> <label>' lines; Places205 uses the same list format, §4.3).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from densecl_bench.data.base import ImageList
from densecl_bench.data.layout import IMAGE_SUFFIXES, layout_error, require_dir, require_file


def read_list_file(list_file: Path, image_root: Path, dataset: str) -> tuple[list[Path], np.ndarray]:
    """Parse '<relative path> <label>' lines, split on the LAST space (paths may contain spaces)."""
    paths, labels = [], []
    with open(require_file(list_file, dataset)) as f:
        for lineno, line in enumerate(f, 1):
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            rel, _, label = line.rpartition(" ")
            try:
                if not rel:
                    raise ValueError
                labels.append(int(label))
            except ValueError:
                raise layout_error(dataset, f"{list_file}:{lineno}: expected '<path> <label>', got {line!r}") from None
            paths.append(image_root / rel)
    return paths, np.array(labels, np.int64)


def _class_folders(folder: Path) -> list[str]:
    with os.scandir(folder) as entries:
        return sorted(e.name for e in entries if e.is_dir())


def imagenet(root: str | os.PathLike[str], split: str) -> ImageList:
    """Images and 0-based labels of one split; classes are the sorted wnids (the standard label order).

    With `root/meta/<split>.txt` present (MMSelfSup's lists), it defines the images and labels; the class
    names then come from the `root/train` folders when their count matches, else they are the label numbers.
    """
    root = Path(root)
    split_dir = root / split
    meta = root / "meta" / f"{split}.txt"
    if meta.is_file():
        paths, labels = read_list_file(meta, split_dir, "imagenet")
        n_classes = int(labels.max()) + 1 if len(labels) else 0
        wnids = _class_folders(root / "train") if (root / "train").is_dir() else []
        classes = wnids if len(wnids) == n_classes else [str(i) for i in range(n_classes)]
        return ImageList(f"imagenet_{split}", root, paths, labels, classes)
    classes = _class_folders(require_dir(split_dir, "imagenet"))
    if not classes:
        raise layout_error("imagenet", f"no class folders in {split_dir} and no list file {meta}")
    paths, labels = [], []
    for label, wnid in enumerate(classes):
        with os.scandir(split_dir / wnid) as entries:
            names = sorted(e.name for e in entries if e.name.lower().endswith(IMAGE_SUFFIXES))
        paths += [split_dir / wnid / n for n in names]
        labels += [label] * len(names)
    return ImageList(f"imagenet_{split}", root, paths, np.array(labels, np.int64), classes)
