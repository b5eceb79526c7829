"""PASCAL VOC readers: VOC07 classification labels, detection boxes, segmentation masks (+ SBD aug).

PROTOCOLS.md §2.1 (MMSelfSup 0.x tools/data_converters/create_voc_data_files.py) for the labels,
§6 (detectron2 data/datasets/pascal_voc.py) for the boxes, §8 (mmseg pascal_voc12_aug.py) for the masks.
"""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from densecl_bench.data.base import ImageList
from densecl_bench.data.layout import VOC_CLASSES, layout_error, read_ids, require_dir, require_file

# VOC per-class files say 1 present, -1 absent, 0 difficult-only; the SVM tools use 1 / 0 / -1 (ignore).
_VOC_TO_SVM = {1: 1, -1: 0, 0: -1}


def _dataset(voc_dir: Path) -> str:
    return "voc12aug" if voc_dir.name == "VOC2012" else "voc07"


def voc07_classification(voc_dir: str | os.PathLike[str], split: str) -> ImageList:
    """Image-level labels (N x 20 int32, 1 / 0 / -1) from `ImageSets/Main/<cls>_<split>.txt`.

    Images are in sorted-id order and classes in VOC_CLASSES order, as MMSelfSup's
    create_voc_data_files.py writes them (PROTOCOLS.md §2.1).
    """
    voc_dir = Path(voc_dir)
    main = require_dir(voc_dir / "ImageSets" / "Main", "voc07")
    per_class: list[dict[str, int]] = []
    for cls in VOC_CLASSES:
        path = require_file(main / f"{cls}_{split}.txt", "voc07")
        labels: dict[str, int] = {}
        for lineno, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                image_id, value = line.split()
                labels[image_id] = _VOC_TO_SVM[int(value)]
            except (ValueError, KeyError):
                raise layout_error("voc07", f"{path}:{lineno}: expected '<id> <1|0|-1>', got {line!r}") from None
        per_class.append(labels)
    ids = sorted(per_class[0])
    for cls, labels in zip(VOC_CLASSES, per_class):
        if labels.keys() != per_class[0].keys():
            raise layout_error("voc07", f"{main}/{cls}_{split}.txt lists other images than "
                                        f"{main}/{VOC_CLASSES[0]}_{split}.txt")
    matrix = np.array([[labels[i] for labels in per_class] for i in ids], dtype=np.int32).reshape(len(ids), 20)
    images = voc_dir / "JPEGImages"
    return ImageList(f"voc07_{split}", voc_dir, [images / f"{i}.jpg" for i in ids], matrix, list(VOC_CLASSES))


@dataclass
class DetectionRecord:
    """One image's boxes as the XML states them: 1-based pixel corners xmin, ymin, xmax, ymax."""

    image: Path
    image_id: str
    width: int
    height: int
    boxes: np.ndarray  # (M, 4) float32
    labels: np.ndarray  # (M,) int64 index into VOC_CLASSES
    difficult: np.ndarray  # (M,) bool


def _text(node: ET.Element, tag: str, path: Path, dataset: str) -> str:
    found = node.find(tag)
    if found is None or found.text is None:
        raise layout_error(dataset, f"malformed annotation {path}: no <{tag}>")
    return found.text.strip()


def _parse_annotation(path: Path, image: Path, image_id: str, dataset: str) -> DetectionRecord:
    try:
        root = ET.parse(require_file(path, dataset)).getroot()
    except ET.ParseError as err:
        raise layout_error(dataset, f"malformed annotation {path}: {err}") from None
    size = root.find("size")
    if size is None:
        raise layout_error(dataset, f"malformed annotation {path}: no <size>")
    boxes, labels, difficult = [], [], []
    try:
        for obj in root.iter("object"):
            name = _text(obj, "name", path, dataset)
            if name not in VOC_CLASSES:
                raise layout_error(dataset, f"malformed annotation {path}: unknown class {name!r}")
            box = obj.find("bndbox")
            if box is None:
                raise layout_error(dataset, f"malformed annotation {path}: object without <bndbox>")
            boxes.append([float(_text(box, tag, path, dataset)) for tag in ("xmin", "ymin", "xmax", "ymax")])
            labels.append(VOC_CLASSES.index(name))
            flag = obj.find("difficult")
            difficult.append(flag is not None and flag.text is not None and int(flag.text) == 1)
        width, height = int(_text(size, "width", path, dataset)), int(_text(size, "height", path, dataset))
    except ValueError as err:
        raise layout_error(dataset, f"malformed annotation {path}: {err}") from None
    return DetectionRecord(image, image_id, width, height, np.array(boxes, np.float32).reshape(-1, 4),
                           np.array(labels, np.int64), np.array(difficult, bool))


def voc_detection(voc_dir: str | os.PathLike[str], split: str) -> list[DetectionRecord]:
    """Boxes of every image in `ImageSets/Main/<split>.txt`, difficult ones flagged (not dropped)."""
    voc_dir = Path(voc_dir)
    dataset = _dataset(voc_dir)
    ids = read_ids(voc_dir / "ImageSets" / "Main" / f"{split}.txt", dataset)
    annotations = require_dir(voc_dir / "Annotations", dataset)
    return [_parse_annotation(annotations / f"{i}.xml", voc_dir / "JPEGImages" / f"{i}.jpg", i, dataset)
            for i in ids]


def voc_segmentation(
    voc_dir: str | os.PathLike[str], split: str, aug_dir: str | os.PathLike[str] | None = None
) -> list[tuple[Path, Path]]:
    """(image, mask) pairs of `ImageSets/Segmentation/<split>.txt`; masks hold class indices, 255 = ignore.

    aug_dir: the folder holding mmseg's voc_aug output (`SegmentationClassAug/`, `ImageSets/Segmentation/aug.txt`),
    normally the VOC2012 folder itself. It extends the train split only: train.txt with SegmentationClass
    followed by aug.txt with SegmentationClassAug, concatenated as mmseg's pascal_voc12_aug config does
    (PROTOCOLS.md §8). Aug images are read from `voc_dir/JPEGImages`.
    """
    voc_dir = Path(voc_dir)
    dataset = _dataset(voc_dir)
    sources = [(voc_dir, "SegmentationClass", split)]
    if aug_dir is not None and split == "train":
        sources.append((Path(aug_dir), "SegmentationClassAug", "aug"))
    images = require_dir(voc_dir / "JPEGImages", dataset)
    pairs = []
    for base, mask_folder, list_name in sources:
        ids = read_ids(base / "ImageSets" / "Segmentation" / f"{list_name}.txt", dataset)
        masks = require_dir(base / mask_folder, dataset)
        pairs += [(images / f"{i}.jpg", masks / f"{i}.png") for i in ids]
    return pairs
