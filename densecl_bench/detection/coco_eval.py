"""COCO box and mask AP (PROTOCOLS.md §7): detections -> COCO json results -> pycocotools `COCOeval`.

The evaluator follows detectron2's `COCOEvaluator` and mmdet's `CocoDataset.evaluate`: boxes go to
the results as xywh in the original image, masks as RLE of the box-relative probabilities pasted
into the image and thresholded at 0.5 (detectron2 `paste_masks_in_image`, mmdet `_do_paste_mask`:
bilinear sampling at the pixel centres, `grid_sample` with align_corners=False). The pasting is one
batched `grid_sample` per chunk of masks, not a Python call per mask. `COCOeval` then scores `bbox`
and `segm` over the images processed; the six numbers (×100) are `bbox_mAP`, `bbox_AP50`,
`bbox_AP75`, `segm_mAP`, `segm_AP50`, `segm_AP75`, the COCO2017 table's columns.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torch import Tensor

from densecl_bench import dist
from densecl_bench.engine.evaluator import DatasetEvaluator, gather
from densecl_bench.paths import atomic_write_text

log = logging.getLogger(__name__)

TASKS = ("bbox", "segm")
FIELDS = {"bbox": "bbox", "segm": "segmentation"}  # a task's field in a COCO result
STATS = ("mAP", "AP50", "AP75")  # COCOeval.stats[0:3]
PASTE_CHUNK_PIXELS = 1 << 26  # masks x image pixels per grid_sample call (256 MiB of float32)


def paste_masks(masks: Tensor, boxes: Tensor, height: int, width: int, threshold: float = 0.5) -> Tensor:
    """(N, M, M) box-relative probabilities -> (N, height, width) bool image masks.

    Pixel (x, y) of the image reads the mask bilinearly at its centre (x + 0.5, y + 0.5) mapped into
    the box, zero outside it; the result is `>= threshold` (detectron2, mmdet).
    """
    n = len(masks)
    out = torch.zeros(n, height, width, dtype=torch.bool, device=masks.device)
    if n == 0:
        return out
    ys = torch.arange(height, device=masks.device, dtype=torch.float32) + 0.5
    xs = torch.arange(width, device=masks.device, dtype=torch.float32) + 0.5
    chunk = max(1, PASTE_CHUNK_PIXELS // max(height * width, 1))
    for start in range(0, n, chunk):
        b = boxes[start: start + chunk].float()
        gx = (xs[None, :] - b[:, 0:1]) / (b[:, 2:3] - b[:, 0:1]) * 2 - 1  # (n, W)
        gy = (ys[None, :] - b[:, 1:2]) / (b[:, 3:4] - b[:, 1:2]) * 2 - 1  # (n, H)
        grid = torch.stack([gx[:, None, :].expand(-1, height, -1), gy[:, :, None].expand(-1, -1, width)], dim=3)
        pasted = F.grid_sample(masks[start: start + chunk, None].float(), grid, align_corners=False)
        out[start: start + chunk] = pasted[:, 0] >= threshold
    return out


def encode_masks(masks: Tensor) -> list[dict[str, Any]]:
    """(N, H, W) bool -> COCO RLEs with str counts (json-ready), in one pycocotools call."""
    if len(masks) == 0:
        return []
    rles = mask_utils.encode(np.asfortranarray(masks.permute(1, 2, 0).cpu().numpy().astype(np.uint8)))
    return [{"size": r["size"], "counts": r["counts"].decode("ascii")} for r in rles]


def instances_to_coco_json(output: Mapping[str, Tensor], image_id: int, image_size: tuple[int, int],
                           label_to_category: Mapping[int, int]) -> list[dict[str, Any]]:
    """One image's detections as COCO results.

    output: boxes (N, 4) xyxy in the original image, scores (N,), labels (N,) 1..C, and optionally
    masks: (N, 1, M, M) box-relative probabilities (the model's; pasted here) or (N, H, W) image masks
    (taken as they are, bool or thresholded at 0.5).
    """
    boxes, scores = output["boxes"].float().cpu(), output["scores"].float().cpu()
    categories = [label_to_category[int(c) - 1] for c in output["labels"].cpu()]
    xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], 1).tolist()
    results = [{"image_id": image_id, "category_id": c, "bbox": b, "score": s}
               for c, b, s in zip(categories, xywh, scores.tolist(), strict=True)]
    if "masks" in output:
        masks = output["masks"]
        if masks.dim() == 4:
            masks = paste_masks(masks[:, 0], output["boxes"], *image_size)
        for r, rle in zip(results, encode_masks(masks >= 0.5 if masks.is_floating_point() else masks), strict=True):
            r["segmentation"] = rle
    return results


def coco_stats(gt: COCO, results: Sequence[dict[str, Any]], task: str, image_ids: Sequence[int]) -> dict[str, float]:
    """`COCOeval` of `task` over `image_ids`: {"mAP", "AP50", "AP75"} x 100 (0 when nothing was detected)."""
    if not results:
        log.warning("COCO %s: no detections; every AP is 0", task)
        return dict.fromkeys(STATS, 0.0)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):  # pycocotools prints its progress and the summary
        evaluation = COCOeval(gt, gt.loadRes(list(results)), task)
        evaluation.params.imgIds = sorted(image_ids)
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    log.info("COCO %s:\n%s", task, printed.getvalue())
    return {name: 100.0 * float(evaluation.stats[i]) for i, name in enumerate(STATS)}


class COCOEvaluator(DatasetEvaluator):
    """reset / process(inputs, outputs) / evaluate() over one COCO split; every rank returns the whole result.

    image_info(inputs) gives each image's (COCO image id, (height, width)) of a batch; outputs are the
    model's detections in original coordinates (`instances_to_coco_json`). output_file: where rank 0
    writes the COCO json results (atomically), or None.
    """

    def __init__(self, gt: COCO, label_to_category: Mapping[int, int],
                 image_info: Callable[[Any], Sequence[tuple[int, tuple[int, int]]]],
                 tasks: Sequence[str] = TASKS, output_file: Path | None = None) -> None:
        self.gt, self.label_to_category, self.image_info = gt, dict(label_to_category), image_info
        self.tasks, self.output_file = tuple(tasks), output_file
        self.reset()

    def reset(self) -> None:
        self.results: list[dict[str, Any]] = []
        self.image_ids: list[int] = []

    def process(self, inputs: Any, outputs: Sequence[Mapping[str, Tensor]]) -> None:
        for (image_id, size), output in zip(self.image_info(inputs), outputs, strict=True):
            self.image_ids.append(int(image_id))
            self.results += instances_to_coco_json(output, int(image_id), size, self.label_to_category)

    def evaluate(self) -> dict[str, Any]:
        results = [r for part in gather(self.results) for r in part]
        image_ids = sorted({i for part in gather(self.image_ids) for i in part})
        if self.output_file is not None and dist.is_main():
            atomic_write_text(self.output_file, json.dumps(results))
        out: dict[str, Any] = {"images": len(image_ids)}
        for task in self.tasks:
            # each task sees only its own field: with a bbox beside the mask, `loadRes` would take the
            # box's area for the mask's (detectron2 and mmdet drop it too); copies, as `loadRes` writes into them
            own, other = FIELDS[task], FIELDS["segm" if task == "bbox" else "bbox"]
            scored = [{k: v for k, v in r.items() if k != other} for r in results if own in r]
            for name, value in coco_stats(self.gt, scored, task, image_ids).items():
                out[f"{task}_{name}"] = value
        return out
