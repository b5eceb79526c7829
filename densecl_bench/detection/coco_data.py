"""COCO 2017 instance data for Mask R-CNN FPN (PROTOCOLS.md §7), read through `data.coco`.

Training images (mmdet `CocoDataset` in training mode, detectron2 `DatasetMapper`):

- crowd instances are not ground truth (mmdet puts them in `bboxes_ignore`, which the 1x config
  ignores; detectron2 drops them), nor are boxes narrower or lower than one pixel, of zero area or
  outside the image (mmdet `_parse_ann_info`); both are counted;
- images without any annotation are left out (mmdet `filter_empty_gt`); detectron2 also leaves out
  images whose annotations are all crowd (`drop_crowd_only`, the d2 flavour), where mmdet trains
  on them as background;
- a shorter side drawn per image from `sizes` (640..800 step 32), the longer at most 1333, a
  horizontal flip with probability 0.5 (`detection.data.augment`, the C4 pipeline), in the workers;
- each instance's mask is rasterised in the workers only inside its box (the polygons are scaled
  and mirrored first, as mmdet `PolygonMasks` and detectron2 do; RLE masks are resized nearest),
  with a one-pixel margin that repeats the image's edge where the box meets it. The model RoI-aligns
  the targets from these crops exactly as from a full-image mask (`fpn.mask_targets`), and the
  batch carries box-sized crops instead of one image-sized mask per instance.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from torch import Tensor
from torch.utils.data import Dataset

from densecl_bench.data.base import load_rgb
from densecl_bench.data.coco import CocoDataset, CocoImage
from densecl_bench.detection.data import MAX_SIZE, Geometry, augment, to_tensor

TRAIN_SIZES = tuple(range(640, 801, 32))  # 6 sizes (mmdet img_scale list, detectron2 MIN_SIZE_TRAIN)
TEST_SIZE = 800


@dataclass
class CocoTraining:
    """The training images of one flavour, and what was left out of them."""

    images: list[CocoImage]
    crowd_dropped: int = 0
    degenerate_dropped: int = 0
    images_without_annotations: int = 0
    crowd_only_images: list[int] = field(default_factory=list)  # kept as background (mmdet) or dropped (d2)

    def counts(self) -> dict[str, int]:
        """What the ledger records."""
        return {"images": len(self.images), "crowd_dropped": self.crowd_dropped,
                "degenerate_dropped": self.degenerate_dropped,
                "images_without_annotations": self.images_without_annotations,
                "crowd_only_images": len(self.crowd_only_images)}


def training_images(dataset: CocoDataset, drop_crowd_only: bool = False) -> CocoTraining:
    """Each image's ground truth as training uses it (module docstring)."""
    out = CocoTraining([])
    for index in range(len(dataset)):
        image = dataset[index]
        if len(image.boxes) == 0:
            out.images_without_annotations += 1
            continue
        x, y, w, h = image.boxes.T
        overlap_w = np.minimum(x + w, image.width) - np.maximum(x, 0)
        overlap_h = np.minimum(y + h, image.height) - np.maximum(y, 0)
        proper = (w >= 1) & (h >= 1) & (image.areas > 0) & (overlap_w > 0) & (overlap_h > 0)
        out.crowd_dropped += int(image.iscrowd.sum())
        out.degenerate_dropped += int((~image.iscrowd & ~proper).sum())
        keep = ~image.iscrowd & proper
        if not keep.any():
            out.crowd_only_images.append(image.id)
            if drop_crowd_only:
                continue
        out.images.append(replace(
            image, boxes=image.boxes[keep], category_ids=image.category_ids[keep], labels=image.labels[keep],
            segmentations=[s for s, k in zip(image.segmentations, keep, strict=True) if k],
            iscrowd=image.iscrowd[keep], areas=image.areas[keep]))
    return out


def _crop_region(box: np.ndarray) -> tuple[int, int, int, int]:
    """The box's pixels with a one-pixel margin, (x0, y0, x1, y1) in image pixels (may leave the image by 1)."""
    return (math.floor(box[0]) - 1, math.floor(box[1]) - 1, math.ceil(box[2]) + 1, math.ceil(box[3]) + 1)


def _polygons(segmentation: list[list[float]], g: Geometry) -> list[np.ndarray]:
    """The instance's polygons in the resized (and flipped) image, as (n, 2) float64 arrays."""
    out = []
    for poly in segmentation:
        pts = np.asarray(poly, np.float64).reshape(-1, 2) * (g.out_w / g.w, g.out_h / g.h)
        if g.flip:
            pts[:, 0] = g.out_w - pts[:, 0]
        out.append(pts)
    return out


def _rle_mask(rle: dict[str, Any], g: Geometry) -> np.ndarray:
    """An RLE instance mask in the resized (and flipped) image: nearest resize (mmdet `BitmapMasks.rescale`)."""
    if isinstance(rle["counts"], list):
        rle = mask_utils.frPyObjects(rle, *rle["size"])
    mask = Image.fromarray(mask_utils.decode(rle)).resize((g.out_w, g.out_h), Image.Resampling.NEAREST)
    return np.asarray(mask.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if g.flip else mask, np.uint8)


def crop_mask(segmentation: Any, g: Geometry, box: np.ndarray) -> tuple[np.ndarray, tuple[int, int]]:
    """One instance's mask inside its (transformed) xyxy box and margin, and the crop's origin (x0, y0).

    Inside the image the crop equals the full-image mask's pixels there; a margin outside the image
    repeats the image's edge, as `roi_align` clamps a sample that falls less than a pixel outside.
    """
    x0, y0, x1, y1 = _crop_region(box)
    ix0, iy0, ix1, iy1 = max(x0, 0), max(y0, 0), min(x1, g.out_w), min(y1, g.out_h)
    if isinstance(segmentation, dict):
        inner = _rle_mask(segmentation, g)[iy0:iy1, ix0:ix1]
    else:
        polys = [(p - (ix0, iy0)).ravel().tolist() for p in _polygons(segmentation, g)]
        rles = mask_utils.frPyObjects(polys, iy1 - iy0, ix1 - ix0)
        inner = mask_utils.decode(rles).max(axis=2) if rles else np.zeros((iy1 - iy0, ix1 - ix0), np.uint8)
    crop = np.pad(inner, ((iy0 - y0, y1 - iy1), (ix0 - x0, x1 - ix1)), mode="edge")
    return crop, (x0, y0)


def stack_crops(crops: Sequence[np.ndarray]) -> Tensor:
    """(K, Hmax, Wmax) uint8, each crop at the top-left and zeros after it (never sampled: see `fpn.mask_targets`)."""
    hm = max((c.shape[0] for c in crops), default=1)
    wm = max((c.shape[1] for c in crops), default=1)
    out = torch.zeros(len(crops), hm, wm, dtype=torch.uint8)
    for o, c in zip(out, crops, strict=True):
        o[: c.shape[0], : c.shape[1]] = torch.from_numpy(c)
    return out


class CocoTrainSet(Dataset):
    """(image, target) with multi-scale resize, flip and box-local masks; draws from torch's RNG
    (wrap in `engine.SeededDataset`).

    target: boxes (K, 4) xyxy float32 in the resized image, labels (K,) 1..C (0 is the background),
    masks (K, Hm, Wm) uint8 crops, mask_origins (K, 2) float32 their top-left (x, y), image_id.
    """

    def __init__(self, images: Sequence[CocoImage], sizes: Sequence[int] | None = TRAIN_SIZES,
                 max_size: int = MAX_SIZE, flip_prob: float = 0.5) -> None:
        self.images, self.sizes, self.max_size, self.flip_prob = list(images), sizes, max_size, flip_prob

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[Tensor, dict[str, Any]]:
        r = self.images[index]
        out, g = augment(load_rgb(r.path), self.sizes, self.max_size, self.flip_prob)
        xyxy = torch.from_numpy(np.concatenate([r.boxes[:, :2], r.boxes[:, :2] + r.boxes[:, 2:]], 1))
        boxes = g.boxes(xyxy.reshape(-1, 4))
        crops, origins = zip(*(crop_mask(s, g, b) for s, b in zip(r.segmentations, boxes.numpy(), strict=True)),
                             strict=True) if len(r.segmentations) else ((), ())
        target = {"boxes": boxes, "labels": torch.from_numpy(r.labels + 1), "masks": stack_crops(crops),
                  "mask_origins": torch.tensor(origins, dtype=torch.float32).reshape(-1, 2), "image_id": r.id}
        return to_tensor(out), target
