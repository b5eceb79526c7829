"""Semantic segmentation metrics as mmseg 0.x computes them (PROTOCOLS.md §8).

Intersection and union are accumulated over the whole validation set (a confusion matrix, summed
over batches and ranks) before any division: mIoU is the NaN-mean of per-class IoU, so a class that
appears neither in the labels nor in the predictions (union 0) is NaN and left out of the mean,
while a class that is only predicted counts with IoU 0. Pixels labelled `ignore_index` are not counted.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from densecl_bench import dist
from densecl_bench.engine.evaluator import DatasetEvaluator


def confusion_matrix(pred: Tensor, label: Tensor, num_classes: int, ignore_index: int = 255) -> Tensor:
    """num_classes x num_classes counts (int64), rows = label, columns = prediction; ignored pixels left out."""
    keep = label != ignore_index
    label, pred = label[keep].long(), pred[keep].long()
    if label.numel() and (int(label.max()) >= num_classes or int(label.min()) < 0):
        raise ValueError(f"label values must lie in [0, {num_classes}) or be {ignore_index}, "
                         f"got {label.unique().tolist()}")
    return torch.bincount(label * num_classes + pred, minlength=num_classes**2).reshape(num_classes, num_classes)


def segmentation_metrics(matrix: Tensor, class_names: Sequence[str] | None = None) -> dict[str, Any]:
    """mIoU, aAcc (percent) and per-class IoU (percent; NaN for a class absent from labels and predictions)."""
    m = matrix.double()
    intersection = m.diag()
    union = m.sum(0) + m.sum(1) - intersection
    iou = intersection / union  # 0/0 -> NaN: the class is absent, not wrong
    names = list(class_names) if class_names is not None else [str(i) for i in range(len(iou))]
    return {
        "mIoU": 100.0 * float(iou.nanmean()),
        "aAcc": 100.0 * float(intersection.sum() / m.sum().clamp_min(1)),
        "IoU": {name: 100.0 * float(v) for name, v in zip(names, iou, strict=True)},
    }


class SemSegEvaluator(DatasetEvaluator):
    """Confusion matrix of argmax predictions against labels, summed over the dataset and every rank.

    process(inputs, outputs): outputs are logits N x C x H x W (or a list of C x H_i x W_i for images
    of different sizes) at each label's resolution; targets(inputs) gives the labels, N x H x W or a
    list of H_i x W_i (default: inputs[1]).
    """

    def __init__(self, num_classes: int, ignore_index: int = 255, class_names: Sequence[str] | None = None,
                 targets: Callable[[Any], Any] | None = None, device: torch.device | str = "cpu") -> None:
        self.num_classes, self.ignore_index, self.class_names = num_classes, ignore_index, class_names
        self.targets = targets or (lambda inputs: inputs[1])
        self.device = torch.device(device)
        self.reset()

    def reset(self) -> None:
        self.matrix = torch.zeros(self.num_classes, self.num_classes, dtype=torch.int64, device=self.device)

    def process(self, inputs: Any, outputs: Tensor | Sequence[Tensor]) -> None:
        for logits, label in zip(outputs, self.targets(inputs), strict=True):
            if logits.shape[-2:] != label.shape[-2:]:
                raise ValueError(f"logits {tuple(logits.shape[-2:])} and label {tuple(label.shape[-2:])} "
                                 "differ in size")
            pred = logits.argmax(0).to(self.device)
            self.matrix += confusion_matrix(pred, label.to(self.device), self.num_classes, self.ignore_index)

    def evaluate(self) -> dict[str, Any]:
        matrix = dist.all_reduce_sum(self.matrix.clone())
        if int(matrix.sum()) == 0:
            raise ValueError("SemSegEvaluator: no labelled pixel was processed")
        return segmentation_metrics(matrix.cpu(), self.class_names)
