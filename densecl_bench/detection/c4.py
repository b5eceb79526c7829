"""Faster R-CNN R50-C4 (PROTOCOLS.md §6, §12) on torchvision's detection parts.

torchvision gives `GeneralizedRCNN`, `RegionProposalNetwork`, `RPNHead`, `RoIHeads` and
`FastRCNNPredictor`; what the protocol needs beyond them is written here, small and named:

- `C4Trunk`: stem + layer1..3 of the checkpoint (stride 16, 1024 channels), the "res4" feature that
  the RPN and the box head read (detectron2 `build_resnet_backbone` with OUT_FEATURES [res4]);
- anchors 32..512 x ratios 0.5/1/2 at stride 16, not rounded, and the RPN with the L1 loss and
  mmdet's `allowed_border=0` / `min_pos_iou=0.3` rules (`detection.common`, shared with the FPN model);
- `RoIAlignC4`: `ops.roi_align` 14x14 at 1/16, sampling_ratio 0, aligned=True (detectron2 ROIAlignV2,
  mmcv `RoIAlign(14, sampling_ratio=0)`); `MultiScaleRoIAlign` cannot pass `aligned`;
- `Res5Head`: the checkpoint's layer4 (stride 2 in the first block's 3x3, as torchvision) on the
  pooled RoIs, an extra BN after it (MoCo `Res5ROIHeadsExtraNorm`, MMSelfSup `ResLayerExtraNorm`),
  then the mean over H, W;
- `C4RoIHeads`: boxes only, with the L1 box loss;
- `common.PadBatch`: normalisation and padding to 32; resizing and flipping happen in the loader.

Every backbone tensor of the checkpoint is used: conv1/bn1/layer1..3 in the trunk, layer4 in the
box head (`backbone_keys` maps them, `check_loaded` verifies them). BN is plain `nn.BatchNorm2d`
in training mode and nothing is frozen; `engine.ddp.prepare` turns it into SyncBN on CUDA with
more than one process.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from torch import Tensor, nn
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor
from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN
from torchvision.models.detection.roi_heads import RoIHeads
from torchvision.ops import roi_align

from densecl_bench.backbone import Backbone
from densecl_bench.checkpoint import LoadedCheckpoint, build_backbone
from densecl_bench.detection.common import (
    PadBatch,
    RCNNSettings,
    UnroundedAnchorGenerator,
    build_rpn,
    check_loaded,
    fastrcnn_l1_loss,
    init_box_predictor,
)

STRIDE = 16


@dataclass(frozen=True)
class C4Config(RCNNSettings):
    """The model's protocol values (PROTOCOLS.md §6.1); defaults are the published ones."""

    kind: ClassVar[str] = "C4"
    rpn_pre_nms_train: int = 12000
    rpn_post_nms_train: int = 2000
    rpn_pre_nms_test: int = 6000
    allowed_border: float | None = None  # mmdet C4: 0; detectron2: no such rule
    pooler_resolution: int = 14


class C4Trunk(nn.Module):
    """stem + layer1..3 of a ResNet: the stride-16 "res4" map (1024 channels for ResNet-50)."""

    def __init__(self, backbone: Backbone) -> None:
        super().__init__()
        self.conv1, self.bn1, self.relu, self.maxpool = backbone.conv1, backbone.bn1, backbone.relu, backbone.maxpool
        self.layer1, self.layer2, self.layer3 = backbone.layer1, backbone.layer2, backbone.layer3
        self.out_channels = backbone.channels["feature4"]

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return OrderedDict(res4=self.layer3(self.layer2(self.layer1(x))))


class RoIAlignC4(nn.Module):
    """`roi_align` of each image's boxes on the res4 map: detectron2's ROIAlignV2 at stride 16."""

    def __init__(self, resolution: int = 14) -> None:
        super().__init__()
        self.resolution = resolution

    def forward(self, features: dict[str, Tensor], boxes: list[Tensor], image_shapes: list[tuple[int, int]]) -> Tensor:
        return roi_align(features["res4"], boxes, self.resolution, spatial_scale=1.0 / STRIDE,
                         sampling_ratio=0, aligned=True)


class Res5Head(nn.Module):
    """The checkpoint's layer4 on the pooled RoIs, the extra BN after it, the mean over H, W."""

    def __init__(self, backbone: Backbone) -> None:
        super().__init__()
        self.res5 = backbone.layer4
        self.out_channels = backbone.channels["feature5"]
        self.norm = nn.BatchNorm2d(self.out_channels)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(self.res5(x)).mean((2, 3))


class C4RoIHeads(RoIHeads):
    """torchvision's box RoI heads (sampling, box coding, post-processing) with the L1 box loss."""

    def forward(self, features: dict[str, Tensor], proposals: list[Tensor], image_shapes: list[tuple[int, int]],
                targets: list[dict[str, Tensor]] | None = None) -> tuple[list[dict[str, Tensor]], dict[str, Tensor]]:
        if self.training:
            if targets is None:
                raise ValueError("training needs targets")
            proposals, _, labels, regression_targets = self.select_training_samples(proposals, targets)
        class_logits, box_regression = self.box_predictor(self.box_head(self.box_roi_pool(features, proposals,
                                                                                          image_shapes)))
        if self.training:
            loss_cls, loss_box = fastrcnn_l1_loss(class_logits, box_regression, labels, regression_targets)
            return [], {"loss_classifier": loss_cls, "loss_box_reg": loss_box}
        boxes, scores, classes = self.postprocess_detections(class_logits, box_regression, proposals, image_shapes)
        return [{"boxes": b, "scores": s, "labels": c} for b, s, c in zip(boxes, scores, classes)], {}


def backbone_from_checkpoint(ckpt: LoadedCheckpoint) -> Backbone:
    """A trainable copy of the checkpoint's backbone (train mode, gradients on, nothing frozen).

    The C4 model takes the stem..layer3 trunk and layer4 (the res5 head) by name, which the project's
    `Backbone` exposes; `build_backbone` refuses a state dict that does not fit the architecture.
    """
    return build_backbone(ckpt).train().requires_grad_(True)


def build_c4(backbone: Backbone, cfg: C4Config = C4Config()) -> GeneralizedRCNN:
    """Faster R-CNN R50-C4 around `backbone` (its modules are taken, not copied; pass a fresh one)."""
    trunk = C4Trunk(backbone)
    anchors = UnroundedAnchorGenerator((tuple(cfg.anchor_sizes),), (tuple(cfg.aspect_ratios),))
    rpn = build_rpn(anchors, trunk.out_channels, cfg, cfg.allowed_border)
    head = Res5Head(backbone)
    predictor = init_box_predictor(FastRCNNPredictor(head.out_channels, cfg.num_classes + 1))
    roi_heads = C4RoIHeads(
        RoIAlignC4(cfg.pooler_resolution), head, predictor,
        cfg.roi_fg_iou, cfg.roi_bg_iou, cfg.rois_per_image, cfg.roi_positive_fraction,
        cfg.bbox_reg_weights, cfg.score_thresh, cfg.nms, cfg.detections_per_image,
    )
    return GeneralizedRCNN(trunk, rpn, roi_heads, PadBatch())


def backbone_keys(state_dict: Mapping[str, Tensor]) -> dict[str, str]:
    """Checkpoint key -> C4 model key: layer4.* goes to the res5 head, everything else to the trunk."""
    out = {}
    for key in state_dict:
        if key.startswith("layer4."):
            out[key] = "roi_heads.box_head.res5." + key.removeprefix("layer4.")
        else:
            out[key] = "backbone." + key
    return out


def c4_from_checkpoint(ckpt: LoadedCheckpoint, cfg: C4Config = C4Config()) -> tuple[GeneralizedRCNN, dict[str, Any]]:
    """The C4 model on a fresh trainable copy of the checkpoint's backbone, and `check_loaded`'s record."""
    model = build_c4(backbone_from_checkpoint(ckpt), cfg)
    return model, check_loaded(model, ckpt, backbone_keys(ckpt.state_dict))

