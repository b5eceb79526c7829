"""Mask R-CNN R50-FPN (PROTOCOLS.md §7, §12) assembled from torchvision's detection parts.

torchvision gives the ResNet body, `FeaturePyramidNetwork` (with `LastLevelMaxPool`: P6 = max-pool
of P5, mmdet `num_outs=5`), `RPNHead`, `FastRCNNConvFCHead`, `MaskRCNNHeads`, the predictors and
`RoIHeads`' sampling, box coding and post-processing. What the protocol needs beyond them is here:

- `LevelRoIAlign`: each RoI pooled from one of P2..P5 by mmdet's rule (level = floor(log2(sqrt(wh)
  / 56)), clamped; detectron2's `assign_boxes_to_levels` is the same rule) with `ops.roi_align`,
  `sampling_ratio=0`, `aligned=True` (detectron2 ROIAlignV2, mmcv `RoIAlign`): 7x7 for boxes, 14x14
  for masks. `MultiScaleRoIAlign` cannot pass `aligned` and uses torchvision's own level rule;
- `MaskRoIHeads`: the L1 box loss of `common`, and mask targets RoI-aligned from each instance's
  mask then binarised at 0.5 (mmdet `BitmapMasks.crop_and_resize(binarize=True)`, detectron2
  bitmasks; torchvision trains on the soft, unaligned average). The loader rasterises each mask
  only inside its box (`coco_data`), so a target holds box-sized crops and their origins;
- heads: mmdet's `Shared4Conv1FCBBoxHead` and `FCNMaskHead` with norm (the MMSelfSup 0.x config,
  the default) or detectron2's 2fc box head and plain 4-conv mask head (`head: 2fc`, profile d2-2fc).

Every backbone tensor of the checkpoint goes into the body (`backbone_keys`, `common.check_loaded`).
BN is plain `nn.BatchNorm2d` in the body, FPN and heads, in training mode, nothing frozen;
`engine.ddp.prepare` makes it SyncBN on CUDA with more than one process.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models import ResNet
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.faster_rcnn import (
    FastRCNNConvFCHead,
    FastRCNNPredictor,
)
from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.roi_heads import RoIHeads
from torchvision.ops import roi_align
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from densecl_bench.checkpoint import LoadedCheckpoint, build_trainable
from densecl_bench.detection.common import (
    PadBatch,
    RCNNSettings,
    UnroundedAnchorGenerator,
    build_rpn,
    check_loaded,
    fastrcnn_l1_loss,
    init_box_predictor,
)

STRIDES = (4, 8, 16, 32)  # P2..P5, the levels RoIs are pooled from
HEADS = ("4conv1fc", "2fc")


@dataclass(frozen=True)
class FPNConfig(RCNNSettings):
    """The model's protocol values (PROTOCOLS.md §7.1, mmdet `mask_rcnn_r50_fpn.py`); defaults are mmdet's.

    Anchors 32..512 are scale 8 x strides 4..64, one size per level; the RPN proposal numbers
    (2000 per level -> 1000 per image in training, 1000 -> 1000 at test) are `RCNNSettings`' defaults.
    """

    kind: ClassVar[str] = "FPN"
    num_classes: int = 80
    head: str = "4conv1fc"  # mmdet Shared4Conv1FCBBoxHead + FCNMaskHead with norm; "2fc": detectron2, no norm
    fpn_channels: int = 256
    rpn_min_pos_iou: float | None = 0.3  # mmdet `MaxIoUAssigner(min_pos_iou=0.3)`; None: detectron2's matcher
    box_resolution: int = 7
    mask_resolution: int = 14  # the 28x28 mask comes from the head's 2x deconvolution

    def __post_init__(self) -> None:
        if self.head not in HEADS:
            raise ValueError(f"unknown FPN head {self.head!r}; choose from {', '.join(HEADS)}")


def roi_levels(boxes: Tensor, num_levels: int = len(STRIDES), finest_scale: float = 56.0) -> Tensor:
    """mmdet `SingleRoIExtractor.map_roi_levels`: floor(log2(sqrt(area) / 56)) clamped to 0..num_levels-1."""
    scale = ((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])).sqrt()
    return torch.floor(torch.log2(scale / finest_scale + 1e-6)).clamp(0, num_levels - 1).long()


class LevelRoIAlign(nn.Module):
    """Aligned `roi_align` of each RoI on its FPN level (P2..P5, features "0".."3")."""

    def __init__(self, resolution: int, strides: tuple[int, ...] = STRIDES) -> None:
        super().__init__()
        self.resolution, self.strides = resolution, strides

    def forward(self, features: Mapping[str, Tensor], boxes: list[Tensor], image_shapes: list[tuple[int, int]]
                ) -> Tensor:
        maps = [features[str(i)] for i in range(len(self.strides))]
        rois = torch.cat([torch.cat([torch.full_like(b[:, :1], i), b], 1) for i, b in enumerate(boxes)])
        levels = roi_levels(rois[:, 1:], len(self.strides))
        out = maps[0].new_zeros(len(rois), maps[0].shape[1], self.resolution, self.resolution)
        for level, (feature, stride) in enumerate(zip(maps, self.strides, strict=True)):
            idx = torch.where(levels == level)[0]
            if len(idx):
                out[idx] = roi_align(feature, rois[idx], self.resolution, spatial_scale=1.0 / stride,
                                     sampling_ratio=0, aligned=True).to(out.dtype)
        return out


def mask_targets(proposals: Tensor, matched: Tensor, masks: Tensor, origins: Tensor, size: int) -> Tensor:
    """Binary (P, size, size) targets: each proposal RoI-aligned on its GT's box-local mask, then >= 0.5.

    masks: (K, Hm, Wm) crops, origins: (K, 2) the crops' top-left (x, y) in the image; a crop holds a
    one-pixel margin (edge-replicated where it leaves the image), so that aligned sampling near its
    border reads what it would read from the full-image mask.
    """
    if len(proposals) == 0:
        return proposals.new_zeros(0, size, size)
    local = proposals - origins[matched].repeat(1, 2)
    rois = torch.cat([matched[:, None].to(local.dtype), local], 1)
    out = roi_align(masks[:, None].to(proposals.dtype), rois, size, spatial_scale=1.0, sampling_ratio=0,
                    aligned=True)
    return (out[:, 0] >= 0.5).to(proposals.dtype)


class MaskRoIHeads(RoIHeads):
    """torchvision's RoI heads with the L1 box loss and aligned, binarised mask targets from box crops."""

    def forward(self, features: dict[str, Tensor], proposals: list[Tensor], image_shapes: list[tuple[int, int]],
                targets: list[dict[str, Tensor]] | None = None) -> tuple[list[dict[str, Tensor]], dict[str, Tensor]]:
        if not self.training:
            return self._detect(features, proposals, image_shapes), {}
        if targets is None:
            raise ValueError("training needs targets")
        proposals, matched, labels, regression_targets = self.select_training_samples(proposals, targets)
        class_logits, box_regression = self.box_predictor(self.box_head(self.box_roi_pool(features, proposals,
                                                                                          image_shapes)))
        loss_cls, loss_box = fastrcnn_l1_loss(class_logits, box_regression, labels, regression_targets)
        pos = [torch.where(lab > 0)[0] for lab in labels]
        mask_logits = self._mask_logits(features, [p[i] for p, i in zip(proposals, pos, strict=True)], image_shapes)
        size = mask_logits.shape[-1]
        gt = torch.cat([mask_targets(p[i], m[i], t["masks"], t["mask_origins"], size)
                        for p, m, i, t in zip(proposals, matched, pos, targets, strict=True)])
        pos_labels = torch.cat([lab[i] for lab, i in zip(labels, pos, strict=True)])
        if len(gt):
            picked = mask_logits[torch.arange(len(gt), device=gt.device), pos_labels]
            loss_mask = F.binary_cross_entropy_with_logits(picked, gt)
        else:  # no positive RoI: a zero that still reaches every mask parameter
            loss_mask = mask_logits.sum() * 0
        return [], {"loss_classifier": loss_cls, "loss_box_reg": loss_box, "loss_mask": loss_mask}

    def _mask_logits(self, features: dict[str, Tensor], boxes: list[Tensor], image_shapes: list[tuple[int, int]]
                     ) -> Tensor:
        return self.mask_predictor(self.mask_head(self.mask_roi_pool(features, boxes, image_shapes)))

    def _detect(self, features: dict[str, Tensor], proposals: list[Tensor], image_shapes: list[tuple[int, int]]
                ) -> list[dict[str, Tensor]]:
        class_logits, box_regression = self.box_predictor(self.box_head(self.box_roi_pool(features, proposals,
                                                                                          image_shapes)))
        boxes, scores, labels = self.postprocess_detections(class_logits, box_regression, proposals, image_shapes)
        result = [{"boxes": b, "scores": s, "labels": c} for b, s, c in zip(boxes, scores, labels, strict=True)]
        if sum(len(b) for b in boxes) == 0:
            size = 2 * self.mask_roi_pool.resolution
            return [{**r, "masks": r["boxes"].new_zeros(0, 1, size, size)} for r in result]
        logits = self._mask_logits(features, boxes, image_shapes)
        probs = logits[torch.arange(len(logits), device=logits.device), torch.cat(labels)].sigmoid()[:, None]
        for r, p in zip(result, probs.split([len(b) for b in boxes]), strict=True):
            r["masks"] = p  # (N, 1, 28, 28) box-relative probabilities; `coco_eval` pastes them
        return result


def backbone_keys(state_dict: Mapping[str, Tensor]) -> dict[str, str]:
    """Checkpoint key -> model key: the whole ResNet goes into the FPN body (no fc: the checkpoint has none)."""
    return {k: "backbone.body." + k for k in state_dict}


def build_mask_rcnn(resnet: ResNet, cfg: FPNConfig = FPNConfig()) -> GeneralizedRCNN:
    """Mask R-CNN R50-FPN around a torchvision ResNet (its modules are taken, not copied; pass a fresh one)."""
    norm = nn.BatchNorm2d if cfg.head == "4conv1fc" else None
    c = cfg.fpn_channels
    # the FPN is normed in both configs (PROTOCOLS.md §7: mmdet SyncBN neck; detectron2 FPN.NORM SyncBN)
    stages = [getattr(resnet, f"layer{i}") for i in range(1, 5)]
    widths = [(s[-1].bn3 if hasattr(s[-1], "bn3") else s[-1].bn2).num_features for s in stages]  # 256..2048 for R50
    backbone = BackboneWithFPN(resnet, {f"layer{i}": str(i - 1) for i in range(1, 5)}, widths, c,
                               extra_blocks=LastLevelMaxPool(), norm_layer=nn.BatchNorm2d)
    anchors = UnroundedAnchorGenerator(tuple((s,) for s in cfg.anchor_sizes),
                                       (tuple(cfg.aspect_ratios),) * len(cfg.anchor_sizes))
    rpn = build_rpn(anchors, c, cfg)
    r = cfg.box_resolution
    if cfg.head == "4conv1fc":
        box_head = FastRCNNConvFCHead((c, r, r), [c] * 4, [1024], norm_layer=norm)
    else:
        box_head = FastRCNNConvFCHead((c, r, r), [], [1024, 1024])
    mask_head = MaskRCNNHeads(c, [c] * 4, 1, norm_layer=norm)
    roi_heads = MaskRoIHeads(
        LevelRoIAlign(r), box_head, init_box_predictor(FastRCNNPredictor(1024, cfg.num_classes + 1)),
        cfg.roi_fg_iou, cfg.roi_bg_iou, cfg.rois_per_image, cfg.roi_positive_fraction,
        cfg.bbox_reg_weights, cfg.score_thresh, cfg.nms, cfg.detections_per_image,
        mask_roi_pool=LevelRoIAlign(cfg.mask_resolution), mask_head=mask_head,
        mask_predictor=MaskRCNNPredictor(c, c, cfg.num_classes + 1),
    )
    return GeneralizedRCNN(backbone, rpn, roi_heads, PadBatch())


def mask_rcnn_from_checkpoint(ckpt: LoadedCheckpoint, cfg: FPNConfig = FPNConfig()
                              ) -> tuple[GeneralizedRCNN, dict[str, Any]]:
    """The model on a fresh trainable copy of the checkpoint's ResNet (train mode, nothing frozen), and
    `check_loaded`'s record."""
    model = build_mask_rcnn(build_trainable(ckpt).train().requires_grad_(True), cfg)
    return model, check_loaded(model, ckpt, backbone_keys(ckpt.state_dict))
