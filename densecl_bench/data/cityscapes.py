"""Cityscapes reader and our labelIds -> trainIds converter (PROTOCOLS.md §13).

Layout (the official `leftImg8bit_trainvaltest.zip` + `gtFine_trainvaltest.zip`, as mmseg 0.x's
CityscapesDataset reads it): `leftImg8bit/<split>/<city>/<stem>_leftImg8bit.png` with the label map
`gtFine/<split>/<city>/<stem>_gtFine_labelTrainIds.png` (19 classes, 255 = ignore).

The official download ships `*_gtFine_labelIds.png` (ids 0..33) and polygons, not the trainIds maps.
mmseg's `tools/convert_datasets/cityscapes.py` renders them from the polygons with cityscapesscripts;
`convert_label_ids` maps the labelIds PNGs through the published label table instead. The two agree:
the labelIds PNG is rendered from the same polygons in the same order, each polygon filled with its
label's id, and the trainId is a function of the id (license plates, id -1, are not drawn in either).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image

from densecl_bench.data.layout import (
    CITYSCAPES_IMAGE_SUFFIX, CITYSCAPES_LABEL_IDS_SUFFIX, CITYSCAPES_TRAIN_IDS_SUFFIX, cityscapes_label_path,
    layout_error, require_dir,
)
from densecl_bench.paths import atomic_path

IGNORE_INDEX = 255

# (name, id, trainId) of the cityscapesScripts label table (`cityscapesscripts/helpers/labels.py`) for the
# ids that occur in gtFine (0..33). Every other id has trainId 255: the void classes below, and anything
# outside the table (license plate has id -1 and is never drawn).
LABELS: tuple[tuple[str, int, int], ...] = (
    ("unlabeled", 0, 255), ("ego vehicle", 1, 255), ("rectification border", 2, 255), ("out of roi", 3, 255),
    ("static", 4, 255), ("dynamic", 5, 255), ("ground", 6, 255), ("road", 7, 0), ("sidewalk", 8, 1),
    ("parking", 9, 255), ("rail track", 10, 255), ("building", 11, 2), ("wall", 12, 3), ("fence", 13, 4),
    ("guard rail", 14, 255), ("bridge", 15, 255), ("tunnel", 16, 255), ("pole", 17, 5), ("polegroup", 18, 255),
    ("traffic light", 19, 6), ("traffic sign", 20, 7), ("vegetation", 21, 8), ("terrain", 22, 9), ("sky", 23, 10),
    ("person", 24, 11), ("rider", 25, 12), ("car", 26, 13), ("truck", 27, 14), ("bus", 28, 15),
    ("caravan", 29, 255), ("trailer", 30, 255), ("train", 31, 16), ("motorcycle", 32, 17), ("bicycle", 33, 18),
)  # fmt: skip

CLASSES = tuple(name for name, _, train_id in sorted(LABELS, key=lambda label: label[2]) if train_id != IGNORE_INDEX)
"""The 19 evaluated classes in trainId order (road, sidewalk, ..., bicycle), as mmseg's CityscapesDataset."""

_ID_TO_TRAIN_ID = np.full(256, IGNORE_INDEX, np.uint8)  # a lookup table over every 8-bit value
_ID_TO_TRAIN_ID[[label_id for _, label_id, _ in LABELS]] = [train_id for _, _, train_id in LABELS]


def to_train_ids(label_ids: np.ndarray) -> np.ndarray:
    """Map a uint8 labelIds array to trainIds (0..18, 255 for void and unknown ids)."""
    if label_ids.dtype != np.uint8:
        raise ValueError(f"labelIds maps are 8-bit, got {label_ids.dtype}")
    return _ID_TO_TRAIN_ID[label_ids]


def convert_label_ids(root: str | os.PathLike[str], overwrite: bool = False) -> tuple[int, int]:
    """Write `<stem>_gtFine_labelTrainIds.png` beside every `<stem>_gtFine_labelIds.png` under `root/gtFine`.

    Existing trainIds files are kept unless `overwrite`. Each file is written atomically. Returns
    (written, kept).
    """
    gt = require_dir(Path(root) / "gtFine", "cityscapes")
    sources = sorted(gt.rglob(f"*{CITYSCAPES_LABEL_IDS_SUFFIX}"))
    if not sources:
        raise layout_error("cityscapes", f"no *{CITYSCAPES_LABEL_IDS_SUFFIX} files under {gt}")
    written = kept = 0
    for src in sources:
        dst = src.with_name(src.name[: -len(CITYSCAPES_LABEL_IDS_SUFFIX)] + CITYSCAPES_TRAIN_IDS_SUFFIX)
        if dst.exists() and not overwrite:
            kept += 1
            continue
        with Image.open(src) as img:
            if img.mode != "L":
                raise layout_error("cityscapes", f"{src} is a {img.mode} image; labelIds maps are 8-bit greyscale")
            train_ids = to_train_ids(np.asarray(img))
        with atomic_path(dst) as tmp:
            Image.fromarray(train_ids, "L").save(tmp, "PNG")
        written += 1
    return written, kept


def cityscapes_pairs(root: str | os.PathLike[str], split: str) -> list[tuple[Path, Path]]:
    """Sorted (image, trainIds label) pairs of one split (`train` or `val`), every city folder.

    A missing label names its path and, when the labelIds file is there, the command that writes it.
    """
    root = Path(root)
    images = require_dir(root / "leftImg8bit" / split, "cityscapes")
    labels = require_dir(root / "gtFine" / split, "cityscapes")
    pairs = []
    for image in sorted(images.rglob(f"*{CITYSCAPES_IMAGE_SUFFIX}")):
        label = cityscapes_label_path(image, images, labels)
        if not label.is_file():
            hint = ""
            if cityscapes_label_path(image, images, labels, CITYSCAPES_LABEL_IDS_SUFFIX).is_file():
                hint = f"; write the trainIds maps with `densecl-bench data cityscapes-trainids --root {root}`"
            raise layout_error("cityscapes", f"missing file {label}{hint}")
        pairs.append((image, label))
    if not pairs:
        raise layout_error("cityscapes", f"no *{CITYSCAPES_IMAGE_SUFFIX} images under {images}")
    return pairs
