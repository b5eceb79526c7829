"""PASCAL VOC 2007 detection AP (11-point), in the two flavours the published numbers come from.

`mmdet`: mmdetection 2.x `mmdet/core/evaluation/mean_ap.py` (`eval_map(..., dataset="voc07",
use_legacy_coordinate=True)`, `tpfp_default`, `average_precision(mode="11points")`), which produced
MMSelfSup 0.x's AP50 = 82.14. `d2`: detectron2 `detectron2/evaluation/pascal_voc_evaluation.py`
(`PascalVOCDetectionEvaluator`, `voc_eval`, `voc_ap(use_07_metric=True)`), the MoCo / DenseCL-repo
numbers. PROTOCOLS.md §6.3 and §12.

Rules both share: IoU with the +1 pixel convention (`w = x2 - x1 + 1`); per class, detections are
taken in descending score order and each is compared with *every* GT box of its image, difficult
ones included; the best-overlapping box decides: a hit on a difficult box is neither TP nor FP, a
second hit on an already matched box is FP, no hit is FP; difficult boxes are not counted in the
number of positives; AP = mean over recall thresholds `np.arange(0, 1.1, 0.1)` (those float values,
so 0.1 * 3 > 3 / 10) of the highest precision at recall >= threshold, 0 where none reaches it.

Where they differ (PROTOCOLS.md §12):

| rule | mmdet | d2 |
|---|---|---|
| hit | IoU >= thr | IoU > thr |
| thresholds | 0.5 only (`AP50`) | 0.50:0.95 step 0.05 (`AP` = their mean, `AP50`, `AP75`) |
| coordinates | as predicted; GT as in the XML | predictions written as `xmin+1 ymin+1 xmax ymax` with `%.1f` |
| scores | as predicted | written with `%.3f` (more ties) |
| mean over classes | classes with a non-difficult GT | all classes (one without GT counts 0) |

The d2 `+1` undoes the `-1` its loader applies to the training GT's xmin / ymin, so a model trained
on d2 data is scored against the XML boxes.

A class without positives has AP 0 in both. Scores that tie keep the order in which the detections
were processed (image order of `process`, then each image's output order): a stable sort, where the
sources' `np.argsort` leaves ties to numpy's default sort. mmdet matches image by image and sorts
globally afterwards, detectron2 sorts globally first; with a stable sort both give one ordering, so
one implementation serves both.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from densecl_bench.data.layout import VOC_CLASSES
from densecl_bench.data.voc import DetectionRecord
from densecl_bench.engine.evaluator import DatasetEvaluator, gather

FLAVOURS = ("mmdet", "d2")
RECALL_THRESHOLDS = np.arange(0.0, 1.1, 0.1)  # the sources' exact float values (0.30000000000000004, ...)


@dataclass(frozen=True)
class Flavour:
    """The rules that differ between mmdet `eval_map` and detectron2 `voc_eval` (module docstring)."""

    name: str
    iou_thresholds: tuple[float, ...]
    strict: bool  # a hit needs IoU > thr (d2), else IoU >= thr (mmdet)
    shift_and_round: bool  # d2 writes `xmin+1 ymin+1 xmax ymax` with %.1f and the score with %.3f
    mean_over_all_classes: bool

    @classmethod
    def of(cls, name: str) -> Flavour:
        if name == "mmdet":
            return cls("mmdet", (0.5,), strict=False, shift_and_round=False, mean_over_all_classes=False)
        if name == "d2":
            thresholds = tuple(t / 100 for t in range(50, 100, 5))
            return cls("d2", thresholds, strict=True, shift_and_round=True, mean_over_all_classes=True)
        raise ValueError(f"unknown VOC evaluation flavour {name!r}; choose from {', '.join(FLAVOURS)}")


def box_iou_plus1(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU matrix (len(a) x len(b)) of xyxy boxes whose corners are inclusive pixels (`w = x2 - x1 + 1`)."""
    iw = np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0]) + 1.0
    ih = np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1]) + 1.0
    inter = np.clip(iw, 0.0, None) * np.clip(ih, 0.0, None)
    area_a = (a[:, 2] - a[:, 0] + 1.0) * (a[:, 3] - a[:, 1] + 1.0)
    area_b = (b[:, 2] - b[:, 0] + 1.0) * (b[:, 3] - b[:, 1] + 1.0)
    return inter / np.maximum(area_a[:, None] + area_b[None, :] - inter, np.finfo(np.float64).eps)


def eleven_point_ap(recall: np.ndarray, precision: np.ndarray) -> float:
    """VOC07 AP: mean over the 11 recall thresholds of the best precision at recall >= threshold (0 if none)."""
    total = 0.0
    for t in RECALL_THRESHOLDS:
        reached = recall >= t
        total += float(precision[reached].max()) if reached.any() else 0.0
    return total / len(RECALL_THRESHOLDS)


@dataclass
class ClassMatches:
    """One class's detections, sorted by descending score (stable), against that class's GT.

    best_iou / best_gt: the largest IoU of each detection with any GT box of its image (-inf without
    one) and that box's index in `gt_difficult`; npos: the number of non-difficult GT boxes.
    """

    best_iou: np.ndarray
    best_gt: np.ndarray
    gt_difficult: np.ndarray
    npos: int

    def tp_fp(self, iou_thr: float, strict: bool) -> tuple[np.ndarray, np.ndarray]:
        """0/1 TP and FP flags in score order: the first hit of a non-difficult box is TP, later ones FP."""
        hit = self.best_iou > iou_thr if strict else self.best_iou >= iou_thr
        counted = hit.copy()
        counted[hit] = ~self.gt_difficult[self.best_gt[hit]]
        tp = np.zeros(len(hit), bool)
        hits = np.flatnonzero(counted)
        _, first = np.unique(self.best_gt[hits], return_index=True)
        tp[hits[first]] = True
        fp = ~hit | (counted & ~tp)
        return tp, fp

    def ap(self, iou_thr: float, strict: bool) -> float:
        tp, fp = (np.cumsum(x, dtype=np.float64) for x in self.tp_fp(iou_thr, strict))
        if self.npos == 0:  # mmdet divides by eps, d2 by zero (nan >= t is False): no recall reaches 0
            return 0.0
        recall = tp / self.npos
        precision = tp / np.maximum(tp + fp, np.finfo(np.float64).eps)
        return eleven_point_ap(recall, precision)


def match_class(
    detections: Sequence[tuple[int, np.ndarray, np.ndarray]],
    gt_boxes: Sequence[np.ndarray],
    gt_difficult: Sequence[np.ndarray],
) -> ClassMatches:
    """Match one class. detections: (image index, boxes (K, 4), scores (K,)) in processing order;
    gt_boxes / gt_difficult: that class's GT per image (index = image index)."""
    offsets = np.cumsum([0] + [len(g) for g in gt_boxes])
    ious, gts, scores = [], [], []
    for image, boxes, s in detections:
        if len(s) == 0:
            continue
        gt = gt_boxes[image]
        if len(gt):
            iou = box_iou_plus1(boxes.astype(np.float64), gt.astype(np.float64))
            ious.append(iou.max(1))
            gts.append(iou.argmax(1) + offsets[image])
        else:
            ious.append(np.full(len(s), -np.inf))
            gts.append(np.zeros(len(s), np.int64))
        scores.append(s)
    difficult = np.concatenate([np.zeros(0, bool), *gt_difficult]).astype(bool)
    npos = int((~difficult).sum())
    if not scores:
        return ClassMatches(np.zeros(0), np.zeros(0, np.int64), difficult, npos)
    order = np.argsort(-np.concatenate(scores), kind="stable")
    return ClassMatches(np.concatenate(ious)[order], np.concatenate(gts)[order], difficult, npos)


class VOCDetectionEvaluator(DatasetEvaluator):
    """VOC07-test AP of a detector, `mmdet` or `d2` flavour (module docstring), in percent.

    ground_truth: every test image's record (boxes as the XML states them), including images the
    detector finds nothing in. process(inputs, outputs): `image_ids(inputs)` names the batch's images
    (by default inputs is a sequence of dicts with "image_id"); outputs are torchvision-style dicts with
    "boxes" (xyxy, in the original image's pixels), "scores" and "labels" (1..C, 0 being the
    background). Each rank processes its shard; evaluate() gathers.

    Results: {"AP50": mAP, "per_class": {name: AP50}} (mmdet); {"AP", "AP50", "AP75", "per_class"} (d2).
    """

    def __init__(self, ground_truth: Iterable[DetectionRecord], flavour: str = "mmdet",
                 class_names: Sequence[str] = VOC_CLASSES,
                 image_ids: Callable[[Any], Sequence[str]] | None = None) -> None:
        self.flavour = Flavour.of(flavour)
        self.image_ids = image_ids or (lambda inputs: [t["image_id"] for t in inputs])
        self.class_names = tuple(class_names)
        records = list(ground_truth)
        self.image_index = {r.image_id: i for i, r in enumerate(records)}
        if len(self.image_index) != len(records):
            raise ValueError("ground truth lists an image id twice")
        # per class, per image: GT boxes and difficult flags
        self.gt_boxes = [[r.boxes[r.labels == c] for r in records] for c in range(len(self.class_names))]
        self.gt_difficult = [[r.difficult[r.labels == c] for r in records] for c in range(len(self.class_names))]
        self.reset()

    def reset(self) -> None:
        self._predictions: list[tuple[int, np.ndarray, np.ndarray, np.ndarray]] = []

    def process(self, inputs: Any, outputs: Sequence[Mapping[str, Any]]) -> None:
        for image_id, out in zip(self.image_ids(inputs), outputs, strict=True):
            if image_id not in self.image_index:
                raise KeyError(f"image {image_id!r} is not in the ground truth")
            boxes = np.asarray(_numpy(out["boxes"]), np.float64).reshape(-1, 4).copy()
            scores = np.asarray(_numpy(out["scores"]), np.float64).reshape(-1).copy()
            labels = np.asarray(_numpy(out["labels"]), np.int64).reshape(-1) - 1
            if self.flavour.shift_and_round:
                boxes[:, :2] += 1.0
                boxes = np.array([[float(f"{v:.1f}") for v in row] for row in boxes]).reshape(-1, 4)
                scores = np.array([float(f"{v:.3f}") for v in scores])
            self._predictions.append((self.image_index[image_id], boxes, scores, labels))

    def evaluate(self) -> dict[str, Any]:
        predictions = [p for rank in gather(self._predictions) for p in rank]
        per_threshold = np.zeros((len(self.flavour.iou_thresholds), len(self.class_names)))
        npos = np.zeros(len(self.class_names), np.int64)
        for c in range(len(self.class_names)):
            dets = [(i, b[labels == c], s[labels == c]) for i, b, s, labels in predictions]
            matches = match_class(dets, self.gt_boxes[c], self.gt_difficult[c])
            npos[c] = matches.npos
            for t, thr in enumerate(self.flavour.iou_thresholds):
                per_threshold[t, c] = 100.0 * matches.ap(thr, self.flavour.strict)
        counted = np.ones(len(self.class_names), bool) if self.flavour.mean_over_all_classes else npos > 0
        means = per_threshold[:, counted].mean(1) if counted.any() else np.zeros(len(per_threshold))
        by_thr = dict(zip(self.flavour.iou_thresholds, means.tolist(), strict=True))
        results: dict[str, Any] = {}
        if self.flavour.name == "d2":
            results["AP"] = float(means.mean())
        results["AP50"] = by_thr[0.5]
        if 0.75 in by_thr:
            results["AP75"] = by_thr[0.75]
        results["per_class"] = dict(zip(self.class_names, per_threshold[0].tolist(), strict=True))
        return results


def _numpy(x: Any) -> Any:
    """A tensor (any device) as numpy; anything else as given."""
    return x.detach().cpu().numpy() if hasattr(x, "detach") else x
