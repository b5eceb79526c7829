"""Detection pieces the C4 (PROTOCOLS.md §6) and FPN (§7) models share, on torchvision's parts (§12).

- `UnroundedAnchorGenerator`: cell anchors kept at their exact corners (detectron2, mmdet 2.x;
  torchvision rounds them to integers);
- `L1RPN`: torchvision's RPN with the L1 box loss (detectron2 SMOOTH_L1_BETA 0, mmdet `L1Loss`;
  torchvision hard-codes smooth-L1 with beta 1/9) and, when asked for, mmdet's anchor rules:
  `allowed_border` (anchors crossing the image border take no part in the assignment) and
  `MMDetLowQualityMatcher` (`min_pos_iou`);
- `fastrcnn_l1_loss` and `init_box_predictor` (N(0, 0.01) scores, N(0, 0.001) deltas, zero biases);
- `PadBatch`: normalisation (RGB, 0..255 mean/std of the `_moco` configs) and zero padding to a
  multiple of 32; the loaders resize and flip, so detections come back in the coordinates of the
  (resized) input tensors;
- `ModelSettings`, `RCNNSettings`: model configs read from YAML (unknown keys refused), and the
  values both models share; `build_rpn`;
- `check_loaded`: every checkpoint tensor sits, unchanged, where the model's key map says.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any, ClassVar, Self

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection._utils import Matcher
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.rpn import RegionProposalNetwork, RPNHead

from densecl_bench.checkpoint import LoadedCheckpoint

PIXEL_MEAN = (123.675, 116.280, 103.530)  # RGB, 0..255 (PROTOCOLS.md §6.1 `_moco.yaml`, §7.1 mmdet)
PIXEL_STD = (58.395, 57.120, 57.375)


class ModelSettings:
    """Mixin for a frozen dataclass of model settings: `from_dict` refuses unknown keys, lists become tuples."""

    kind: ClassVar[str] = "model"

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> Self:
        known = {f.name for f in fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown {cls.kind} model settings: {', '.join(unknown)}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


@dataclass(frozen=True)
class RCNNSettings(ModelSettings):
    """What the C4 and FPN models share, at the published values (detectron2 defaults, mmdet configs).

    Subclasses add their own settings and the RPN proposal numbers (C4 and FPN differ there).
    """

    num_classes: int = 20
    anchor_sizes: tuple[float, ...] = (32, 64, 128, 256, 512)
    aspect_ratios: tuple[float, ...] = (0.5, 1.0, 2.0)
    rpn_pre_nms_train: int = 2000  # per level
    rpn_post_nms_train: int = 1000  # per image
    rpn_pre_nms_test: int = 1000
    rpn_post_nms_test: int = 1000
    rpn_nms: float = 0.7
    rpn_fg_iou: float = 0.7
    rpn_bg_iou: float = 0.3
    rpn_batch_per_image: int = 256
    rpn_positive_fraction: float = 0.5
    rpn_min_pos_iou: float | None = None  # mmdet: 0.3 (`MMDetLowQualityMatcher`); None: detectron2's matcher
    roi_fg_iou: float = 0.5
    roi_bg_iou: float = 0.5
    rois_per_image: int = 512
    roi_positive_fraction: float = 0.25
    bbox_reg_weights: tuple[float, float, float, float] = (10.0, 10.0, 5.0, 5.0)
    score_thresh: float = 0.05
    nms: float = 0.5
    detections_per_image: int = 100


class UnroundedAnchorGenerator(AnchorGenerator):
    """torchvision's generator with the cell anchors kept at their exact (fractional) corners."""

    def generate_anchors(self, scales: Sequence[float], aspect_ratios: Sequence[float],
                         dtype: torch.dtype = torch.float32, device: torch.device = torch.device("cpu")) -> Tensor:
        scales_t = torch.as_tensor(scales, dtype=dtype, device=device)
        h_ratios = torch.sqrt(torch.as_tensor(aspect_ratios, dtype=dtype, device=device))
        ws = (scales_t[None, :] / h_ratios[:, None]).reshape(-1)  # w = s / sqrt(r), h = s * sqrt(r): area s^2
        hs = (scales_t[None, :] * h_ratios[:, None]).reshape(-1)
        return torch.stack([-ws, -hs, ws, hs], dim=1) / 2


def rpn_l1_loss(objectness: Tensor, deltas: Tensor, labels: Tensor, targets: Tensor,
                pos: Tensor, neg: Tensor) -> tuple[Tensor, Tensor]:
    """BCE over the sampled anchors and L1 over the positive ones' deltas, both per sampled anchor.

    The normaliser is the number of sampled anchors (mmdet `avg_factor = num_pos + num_neg`;
    detectron2 divides by 256 x images, the same whenever an image has 256 labelled anchors).
    """
    sampled = torch.cat([pos, neg])
    box = F.l1_loss(deltas[pos], targets[pos], reduction="sum") / max(sampled.numel(), 1)
    return F.binary_cross_entropy_with_logits(objectness[sampled], labels[sampled]), box


class MMDetLowQualityMatcher(Matcher):
    """mmdet 2.x `MaxIoUAssigner(match_low_quality=True, min_pos_iou, gt_max_assign_all=True)`.

    The low-quality step differs from detectron2's (torchvision's) `Matcher`: only a GT whose best
    IoU reaches `min_pos_iou` gets its best anchors (all ties), and such an anchor is assigned to
    that GT (the last one, in GT order, when several claim it), not to its own best GT.
    """

    def __init__(self, high: float, low: float, min_pos_iou: float) -> None:
        super().__init__(high, low, allow_low_quality_matches=True)
        self.min_pos_iou = min_pos_iou

    def set_low_quality_matches_(self, matches: Tensor, all_matches: Tensor, match_quality_matrix: Tensor) -> None:
        best = match_quality_matrix.max(dim=1).values
        claims = (match_quality_matrix == best[:, None]) & (best >= self.min_pos_iou)[:, None]
        order = torch.arange(1, len(best) + 1, device=matches.device)[:, None]
        last = (claims * order).max(dim=0).values  # 1 + the last claiming GT, 0 for none
        matches[last > 0] = last[last > 0] - 1


class L1RPN(RegionProposalNetwork):
    """torchvision's RPN with the L1 box loss and, when set, mmdet's border rule and low-quality matching."""

    def __init__(self, *args: Any, allowed_border: float | None = None, min_pos_iou: float | None = None,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.allowed_border = allowed_border
        if min_pos_iou is not None:
            self.proposal_matcher = MMDetLowQualityMatcher(self.proposal_matcher.high_threshold,
                                                           self.proposal_matcher.low_threshold, min_pos_iou)
        self._image_sizes: list[tuple[int, int]] = []

    def forward(self, images: ImageList, features: dict[str, Tensor],
                targets: list[dict[str, Tensor]] | None = None) -> tuple[list[Tensor], dict[str, Tensor]]:
        self._image_sizes = list(images.image_sizes)  # the unpadded sizes, for the border rule
        return super().forward(images, features, targets)

    def assign_targets_to_anchors(self, anchors: list[Tensor], targets: list[dict[str, Tensor]]
                                  ) -> tuple[list[Tensor], list[Tensor]]:
        if self.allowed_border is None:
            return super().assign_targets_to_anchors(anchors, targets)
        labels, matched = [], []
        for anchors_i, target, (h, w) in zip(anchors, targets, self._image_sizes, strict=True):
            b = self.allowed_border
            inside = ((anchors_i[:, 0] >= -b) & (anchors_i[:, 1] >= -b)
                      & (anchors_i[:, 2] < w + b) & (anchors_i[:, 3] < h + b))
            # mmdet assigns among the inside anchors only (the low-quality matches included)
            label_in, matched_in = super().assign_targets_to_anchors([anchors_i[inside]], [target])
            label = torch.full((len(anchors_i),), -1.0, device=anchors_i.device)
            label[inside] = label_in[0]
            boxes = torch.zeros_like(anchors_i)
            boxes[inside] = matched_in[0]
            labels.append(label)
            matched.append(boxes)
        return labels, matched

    def compute_loss(self, objectness: Tensor, pred_bbox_deltas: Tensor, labels: list[Tensor],
                     regression_targets: list[Tensor]) -> tuple[Tensor, Tensor]:
        pos, neg = (torch.where(torch.cat(m))[0] for m in self.fg_bg_sampler(labels))
        return rpn_l1_loss(objectness.flatten(), pred_bbox_deltas, torch.cat(labels),
                           torch.cat(regression_targets), pos, neg)



def build_rpn(anchors: AnchorGenerator, channels: int, cfg: RCNNSettings, allowed_border: float | None = None
              ) -> L1RPN:
    """The RPN of `cfg` on `channels`-deep features, with torchvision's one-conv `RPNHead`."""
    return L1RPN(
        anchors, RPNHead(channels, anchors.num_anchors_per_location()[0], conv_depth=1),
        cfg.rpn_fg_iou, cfg.rpn_bg_iou, cfg.rpn_batch_per_image, cfg.rpn_positive_fraction,
        {"training": cfg.rpn_pre_nms_train, "testing": cfg.rpn_pre_nms_test},
        {"training": cfg.rpn_post_nms_train, "testing": cfg.rpn_post_nms_test},
        cfg.rpn_nms, allowed_border=allowed_border, min_pos_iou=cfg.rpn_min_pos_iou,
    )


def fastrcnn_l1_loss(class_logits: Tensor, box_regression: Tensor, labels: list[Tensor],
                     regression_targets: list[Tensor]) -> tuple[Tensor, Tensor]:
    """CE over the sampled RoIs; L1 of the positives' deltas of their class, summed / number of RoIs.

    detectron2 `FastRCNNOutputLayers.box_reg_loss` (beta 0) and mmdet `BBoxHead.loss` (`L1Loss`,
    avg_factor = the sampled RoIs); torchvision's `fastrcnn_loss` is the same with smooth-L1 beta 1/9.
    """
    labels_t, targets = torch.cat(labels), torch.cat(regression_targets)
    pos = torch.where(labels_t > 0)[0]
    deltas = box_regression.reshape(len(labels_t), -1, 4)[pos, labels_t[pos]]
    box = F.l1_loss(deltas, targets[pos], reduction="sum") / max(labels_t.numel(), 1)
    return F.cross_entropy(class_logits, labels_t), box



class PadBatch(nn.Module):
    """Normalise each RGB 0..255 image and zero-pad the batch to a multiple of 32 (after normalising,
    as detectron2 and mmdet pad). No resizing: the loader has already resized."""

    def __init__(self, divisor: int = 32) -> None:
        super().__init__()
        self.divisor = divisor
        self.register_buffer("mean", torch.tensor(PIXEL_MEAN).view(3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(PIXEL_STD).view(3, 1, 1), persistent=False)

    def forward(self, images: list[Tensor], targets: list[dict[str, Tensor]] | None = None
                ) -> tuple[ImageList, list[dict[str, Tensor]] | None]:
        sizes = [(int(im.shape[-2]), int(im.shape[-1])) for im in images]
        h = -(-max(s[0] for s in sizes) // self.divisor) * self.divisor
        w = -(-max(s[1] for s in sizes) // self.divisor) * self.divisor
        batch = images[0].new_zeros(len(images), 3, h, w, dtype=self.mean.dtype)
        for out, im, (ih, iw) in zip(batch, images, sizes):
            out[:, :ih, :iw] = (im.to(self.mean.dtype) - self.mean) / self.std
        return ImageList(batch, sizes), targets

    def postprocess(self, result: list[dict[str, Tensor]], image_shapes: list[tuple[int, int]],
                    original_image_sizes: list[tuple[int, int]]) -> list[dict[str, Tensor]]:
        return result


def init_box_predictor(predictor: FastRCNNPredictor) -> FastRCNNPredictor:
    """detectron2 `FastRCNNOutputLayers` and mmdet `BBoxHead` init: N(0, 0.01) scores, N(0, 0.001) deltas, zero bias."""
    nn.init.normal_(predictor.cls_score.weight, std=0.01)
    nn.init.normal_(predictor.bbox_pred.weight, std=0.001)
    nn.init.zeros_(predictor.cls_score.bias)
    nn.init.zeros_(predictor.bbox_pred.bias)
    return predictor


def check_loaded(model: nn.Module, ckpt: LoadedCheckpoint, mapping: Mapping[str, str]) -> dict[str, Any]:
    """Verify that every tensor of the checkpoint sits, unchanged, in `model` (before training).

    mapping: checkpoint key -> model key. Returns the record the ledger keeps: how many checkpoint
    tensors were used, of how many, and which backbone tensors the checkpoint lacked (random init;
    only with `allow_partial`).
    """
    state = model.state_dict()
    absent = sorted(m for m in mapping.values() if m not in state)
    if absent:
        raise ValueError(f"the model has no place for checkpoint tensors: {', '.join(absent[:5])}")
    differ = sorted(k for k, m in mapping.items() if not torch.equal(state[m].cpu(), ckpt.state_dict[k].cpu()))
    if differ:
        raise ValueError(f"checkpoint tensors not loaded into the model: {', '.join(differ[:5])}")
    return {"used": len(mapping), "of": len(ckpt.state_dict), "missing": list(ckpt.missing_keys)}
