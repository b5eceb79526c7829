"""iNaturalist 2018 reader: the competition's `train2018.json` / `val2018.json` (PROTOCOLS.md §13).

COCO-style files: `images` (id, file_name relative to the dataset folder, e.g.
`train_val2018/Plantae/7477/<hash>.jpg`), `annotations` (image_id, category_id; one per image) and
`categories` (8142 species, ids 0..8141). MMSelfSup 0.x reads a list made from the same json by
`tools/data_converters/convert_inaturalist.py` ('<file_name> <category_id>' per image); we read the
json directly. A label is the category's rank among the sorted category ids, which is the category id
itself for the published files.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from densecl_bench.data.base import ImageList
from densecl_bench.data.layout import INAT_ANNOTATIONS, layout_error, require_file


def inat2018(root: str | os.PathLike[str], split: str) -> ImageList:
    """Images (in the json's order) and labels of `split` (train or val); classes are the category names."""
    root = Path(root)
    path = require_file(root / INAT_ANNOTATIONS[split], "inat18")
    try:
        doc = json.loads(path.read_text())
        categories = sorted(doc["categories"], key=lambda c: c["id"])
        label_of = {c["id"]: k for k, c in enumerate(categories)}
        category_of: dict[int, int] = {}
        for ann in doc["annotations"]:
            if category_of.setdefault(ann["image_id"], ann["category_id"]) != ann["category_id"]:
                raise layout_error("inat18", f"{path}: image {ann['image_id']} has two categories")
        images = doc["images"]
        unlabelled = [image["id"] for image in images if image["id"] not in category_of]
        if unlabelled:
            raise layout_error("inat18", f"{path}: {len(unlabelled)} images have no annotation "
                                         f"(first id {unlabelled[0]})")
        paths = [root / image["file_name"] for image in images]
        labels = np.array([label_of[category_of[image["id"]]] for image in images], np.int64)
    except KeyError as err:
        raise layout_error("inat18", f"{path}: missing key {err}, or an annotation names an unknown "
                                     "category (expected COCO-style images, annotations and categories)") from None
    except json.JSONDecodeError as err:
        raise layout_error("inat18", f"{path}: not valid JSON ({err})") from None
    return ImageList(f"inat18_{split}", root, paths, labels, [str(c["name"]) for c in categories])
