"""COCO 2017 instances reader (through pycocotools, the same API the COCO evaluation uses).

PROTOCOLS.md §7 (mmdet coco_instance.py: `annotations/instances_<split>.json`, images in `<split>/`).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pycocotools.coco import COCO

from densecl_bench.data.layout import layout_error, require_dir, require_file


@dataclass
class CocoImage:
    """One image and its instances. boxes are COCO xywh (absolute pixels); labels are contiguous 0..C-1."""

    id: int
    path: Path
    width: int
    height: int
    boxes: np.ndarray  # (K, 4) float32 x, y, w, h
    category_ids: np.ndarray  # (K,) int64 COCO category ids
    labels: np.ndarray  # (K,) int64 contiguous class index
    segmentations: list[Any]  # per instance: list of polygons [x0, y0, x1, y1, ...] or an RLE dict
    iscrowd: np.ndarray  # (K,) bool
    areas: np.ndarray  # (K,) float32


class CocoDataset:
    """A COCO split: sorted image ids, category mapping contiguous <-> COCO ids, per-image instances.

    `coco` is the pycocotools object itself, for the evaluator (COCOeval needs the ground truth as one).
    """

    def __init__(self, coco_root: Path, split: str, coco: COCO) -> None:
        self.root = coco_root
        self.split = split
        self.image_dir = coco_root / split
        self.coco = coco
        self.image_ids: list[int] = sorted(coco.getImgIds())
        self.category_ids: list[int] = sorted(coco.getCatIds())
        self.classes: list[str] = [coco.cats[c]["name"] for c in self.category_ids]
        self.cat_to_label: dict[int, int] = {c: i for i, c in enumerate(self.category_ids)}
        self.label_to_cat: dict[int, int] = dict(enumerate(self.category_ids))

    def __len__(self) -> int:
        return len(self.image_ids)

    def path(self, image_id: int) -> Path:
        return self.image_dir / self.coco.imgs[image_id]["file_name"]

    def __getitem__(self, index: int) -> CocoImage:
        image_id = self.image_ids[index]
        info = self.coco.imgs[image_id]
        anns = self.coco.imgToAnns.get(image_id, [])
        cats = np.array([a["category_id"] for a in anns], np.int64)
        return CocoImage(
            id=image_id,
            path=self.path(image_id),
            width=int(info["width"]),
            height=int(info["height"]),
            boxes=np.array([a["bbox"] for a in anns], np.float32).reshape(-1, 4),
            category_ids=cats,
            labels=np.array([self.cat_to_label[int(c)] for c in cats], np.int64),
            segmentations=[a.get("segmentation") for a in anns],
            iscrowd=np.array([bool(a.get("iscrowd", 0)) for a in anns], bool),
            areas=np.array([a.get("area", 0.0) for a in anns], np.float32),
        )


def coco_instances(coco_root: str | os.PathLike[str], split: str) -> CocoDataset:
    """Read `annotations/instances_<split>.json` (split e.g. train2017, val2017) with images in `<split>/`."""
    coco_root = Path(coco_root)
    ann_file = require_file(coco_root / "annotations" / f"instances_{split}.json", "coco2017")
    require_dir(coco_root / split, "coco2017")
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress to stdout
            coco = COCO(str(ann_file))
    except (json.JSONDecodeError, KeyError, TypeError, AssertionError) as err:
        raise layout_error("coco2017", f"malformed annotation file {ann_file}: {err!r}") from None
    unknown = {a["category_id"] for a in coco.anns.values()} - set(coco.cats)
    if unknown:
        raise layout_error("coco2017", f"malformed annotation file {ann_file}: unknown category ids {sorted(unknown)}")
    return CocoDataset(coco_root, split, coco)
