"""VOC07+12 detection data for the C4 benchmark (PROTOCOLS.md §6.1, §12), read through `data.voc`.

Training: VOC2007 trainval + VOC2012 trainval; evaluation: VOC2007 test. Each training image gets a
shorter side drawn from `train_sizes` (480..800 step 32, detectron2's "choice" sampling and mmdet's
`multiscale_mode="value"`), the longer side capped at `max_size` (1333), and a horizontal flip with
probability 0.5, decoded and resized (PIL bilinear, as detectron2) in the loader workers. Under
`engine.SeededDataset` each sample's draw depends on (seed, epoch, index) only. Batches are grouped
by aspect ratio (`AspectRatioGroupedSampler`, shared with the COCO FPN benchmark).

The flavours differ in the training boxes (PROTOCOLS.md §12): `mmdet` leaves difficult boxes out
(mmdet puts them in `bboxes_ignore`) and keeps the XML coordinates; `d2` keeps them and moves
xmin / ymin one pixel down (detectron2 `data/datasets/pascal_voc.py`; its evaluator moves the
predictions back). Boxes with no width or height in the model's coordinates (x2 <= x1 or
y2 <= y1, which torchvision refuses) are dropped and counted. The evaluation images keep their
ground truth as the XML states it; `VOCDetectionEvaluator` applies each flavour's convention.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset, Sampler

from densecl_bench.data.base import load_rgb
from densecl_bench.data.voc import DetectionRecord, voc_detection
from densecl_bench.detection.voc_eval import FLAVOURS

TRAIN_SIZES = tuple(range(480, 801, 32))  # 11 sizes
TEST_SIZE = 800
MAX_SIZE = 1333


@dataclass
class TrainingBoxes:
    """The training records of one flavour, and what was left out of them."""

    records: list[DetectionRecord]
    difficult_dropped: int = 0
    degenerate_dropped: int = 0
    # images without any object in their XML are left out (mmdet `filter_empty_gt`, detectron2
    # `FILTER_EMPTY_ANNOTATIONS`); images whose boxes were all left out train as background (mmdet)
    images_without_objects: list[str] = field(default_factory=list)
    background_images: list[str] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        """What the ledger records."""
        return {"difficult_dropped": self.difficult_dropped, "degenerate_dropped": self.degenerate_dropped,
                "images_without_objects": len(self.images_without_objects),
                "background_images": len(self.background_images)}


def training_boxes(records: Sequence[DetectionRecord], flavour: str) -> TrainingBoxes:
    """Each record's boxes as the flavour trains on them (module docstring)."""
    if flavour not in FLAVOURS:
        raise ValueError(f"unknown VOC detection flavour {flavour!r}; choose from {', '.join(FLAVOURS)}")
    out = TrainingBoxes([])
    for r in records:
        if len(r.boxes) == 0:
            out.images_without_objects.append(r.image_id)
            continue
        keep = ~r.difficult if flavour == "mmdet" else np.ones(len(r.boxes), bool)
        out.difficult_dropped += int((~keep).sum())
        boxes = r.boxes.astype(np.float32).copy()
        if flavour == "d2":
            boxes[:, :2] -= 1.0
        proper = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        out.degenerate_dropped += int((keep & ~proper).sum())
        keep &= proper
        if not keep.any():
            out.background_images.append(r.image_id)
        out.records.append(replace(r, boxes=boxes[keep], labels=r.labels[keep], difficult=r.difficult[keep]))
    return out


def resized_shape(h: int, w: int, short: int, max_size: int) -> tuple[int, int]:
    """(h, w) with the shorter side `short` and the longer at most `max_size`, rounded half up
    (detectron2 `ResizeShortestEdge.get_output_shape`; mmdet `rescale_size` gives the same sizes)."""
    scale = short / min(h, w)
    if max(h, w) * scale > max_size:
        scale = max_size / max(h, w)
    return int(h * scale + 0.5), int(w * scale + 0.5)


def to_tensor(img: Image.Image) -> Tensor:
    """RGB 0..255 float (3, H, W); `common.PadBatch` normalises on the device."""
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).float()


def resize(img: Image.Image, size: int | None, max_size: int) -> Image.Image:
    """`img` at shorter side `size` (None: as it is), the longer at most `max_size`; PIL bilinear."""
    if size is None:
        return img
    h, w = resized_shape(img.height, img.width, size, max_size)
    return img if (h, w) == (img.height, img.width) else img.resize((w, h), Image.Resampling.BILINEAR)


@dataclass(frozen=True)
class Geometry:
    """One training sample's draw: the resize from (w, h) to (out_w, out_h), then a flip or not."""

    w: int
    h: int
    out_w: int
    out_h: int
    flip: bool

    def boxes(self, boxes: Tensor) -> Tensor:
        """xyxy boxes scaled per axis, then mirrored: x' = W - x (detectron2 HFlipTransform, mmdet 2.x bbox_flip)."""
        boxes = boxes * boxes.new_tensor([self.out_w / self.w, self.out_h / self.h] * 2)
        if self.flip:
            boxes = torch.stack([self.out_w - boxes[:, 2], boxes[:, 1], self.out_w - boxes[:, 0], boxes[:, 3]], 1)
        return boxes


def augment(img: Image.Image, sizes: Sequence[int] | None, max_size: int, flip_prob: float
            ) -> tuple[Image.Image, Geometry]:
    """Draw a shorter side from `sizes` (None: keep the size) and a flip from torch's RNG; apply both."""
    size = None if sizes is None else sizes[int(torch.randint(len(sizes), ()))]
    out = resize(img, size, max_size)
    flip = bool(torch.rand(()) < flip_prob)
    geometry = Geometry(img.width, img.height, out.width, out.height, flip)
    return (out.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if flip else out), geometry


class DetectionTrainSet(Dataset):
    """(image, target) with multi-scale resize and flip; draws from torch's RNG (wrap in `SeededDataset`).

    sizes: the shorter sides to choose from, or None to keep each image's own size (the demo).
    target: boxes (float32, in the resized image), labels (1..20; 0 is the background), image_id.
    """

    def __init__(self, records: Sequence[DetectionRecord], sizes: Sequence[int] | None = TRAIN_SIZES,
                 max_size: int = MAX_SIZE, flip_prob: float = 0.5) -> None:
        self.records, self.sizes, self.max_size, self.flip_prob = list(records), sizes, max_size, flip_prob

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> tuple[Tensor, dict[str, Any]]:
        r = self.records[index]
        out, geometry = augment(load_rgb(r.image), self.sizes, self.max_size, self.flip_prob)
        boxes = geometry.boxes(torch.from_numpy(r.boxes.copy()).reshape(-1, 4))
        target = {"boxes": boxes, "labels": torch.from_numpy(r.labels + 1), "image_id": r.image_id}
        return to_tensor(out), target


class DetectionTestSet(Dataset):
    """(image, target) resized to `size` (None: as stored); target: image_id and the original (h, w).

    images: (path, image id) pairs, VOC's or COCO's.
    """

    def __init__(self, images: Sequence[tuple[Path, Any]], size: int | None = TEST_SIZE,
                 max_size: int = MAX_SIZE) -> None:
        self.images, self.size, self.max_size = list(images), size, max_size

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[Tensor, dict[str, Any]]:
        path, image_id = self.images[index]
        img = load_rgb(path)
        return to_tensor(resize(img, self.size, self.max_size)), {"image_id": image_id,
                                                                    "orig_size": (img.height, img.width)}


class AspectRatioGroupedSampler(Sampler[int]):
    """One rank's sample order for an epoch, in which every run of `batch_size` indices shares an aspect group.

    Images wider than tall form one group, the others the second (detectron2
    `AspectRatioGroupedDataset`, mmdet `GroupSampler`), so a padded batch wastes little. The epoch's
    permutation depends on (seed, epoch) only, as `DistributedSampler`'s: walking it, each group
    fills its own bucket and a full bucket becomes the next batch (detectron2's rule). The batches
    are dealt to the ranks in turn; the remainder of each bucket and the batches that do not fill a
    round of the ranks wait for the next epoch's draw (dropped here), so the length is known up front
    (sum over groups of floor(n_g / batch_size), down to a multiple of the world size) and
    `engine.EpochLoader` resumes mid-epoch by skipping whole batches.
    """

    def __init__(self, wide: Sequence[bool], batch_size: int, world: int = 1, rank: int = 0, seed: int = 0) -> None:
        self.wide = [bool(w) for w in wide]
        self.batch_size, self.world, self.rank, self.seed, self.epoch = batch_size, world, rank, seed, 0
        full = sum(n // batch_size for n in (sum(self.wide), len(self.wide) - sum(self.wide)))
        self.batches_per_rank = full // world

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.batches_per_rank * self.batch_size

    def __iter__(self) -> Iterator[int]:
        order = torch.randperm(len(self.wide), generator=torch.Generator().manual_seed(self.seed + self.epoch))
        buckets: tuple[list[int], list[int]] = ([], [])
        batches: list[list[int]] = []
        for i in order.tolist():
            bucket = buckets[self.wide[i]]
            bucket.append(i)
            if len(bucket) == self.batch_size:
                batches.append(bucket.copy())
                bucket.clear()
        mine = batches[self.rank: self.batches_per_rank * self.world: self.world]
        return iter([i for batch in mine for i in batch])


def collate(batch: Sequence[tuple[Tensor, dict[str, Any]]]) -> tuple[list[Tensor], list[dict[str, Any]]]:
    """Images of different sizes stay a list; `c4.PadBatch` pads them on the device."""
    return [b[0] for b in batch], [b[1] for b in batch]


def to_original(outputs: Sequence[dict[str, Tensor]], images: Sequence[Tensor],
                targets: Sequence[dict[str, Any]]) -> list[dict[str, Tensor]]:
    """Detections of the resized inputs scaled per axis to the original images (detectron2
    `detector_postprocess`, mmdet `rescale=True`)."""
    result = []
    for out, img, target in zip(outputs, images, targets, strict=True):
        (h, w), (rh, rw) = target["orig_size"], img.shape[-2:]
        scale = out["boxes"].new_tensor([w / rw, h / rh, w / rw, h / rh])
        result.append({**out, "boxes": out["boxes"] * scale})
    return result


def voc0712(data_root: Path) -> tuple[list[DetectionRecord], list[DetectionRecord]]:
    """(VOC2007 trainval + VOC2012 trainval, VOC2007 test) under `data_root/VOCdevkit`."""
    devkit = Path(data_root) / "VOCdevkit"
    train = voc_detection(devkit / "VOC2007", "trainval") + voc_detection(devkit / "VOC2012", "trainval")
    return train, voc_detection(devkit / "VOC2007", "test")
