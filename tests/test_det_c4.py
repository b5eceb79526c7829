"""Faster R-CNN R50-C4 on torchvision parts (PROTOCOLS.md §6, §12): loading, anchors, losses, tiny runs."""

import math

import pytest
import torch
import torchvision
from torch import nn
from torchvision.models.detection._utils import Matcher

from densecl_bench.backbone import random_state_dict
from densecl_bench.checkpoint import LoadedCheckpoint
from densecl_bench.detection.c4 import C4Config, c4_from_checkpoint
from densecl_bench.detection.common import (
    L1RPN,
    MMDetLowQualityMatcher,
    UnroundedAnchorGenerator,
    fastrcnn_l1_loss,
    rpn_l1_loss,
)

# few proposals and RoIs so that a ResNet-50 trains a step at 96 px in a second or two
TINY = C4Config(rpn_pre_nms_train=100, rpn_post_nms_train=8, rpn_pre_nms_test=100, rpn_post_nms_test=4,
                rpn_batch_per_image=32, rois_per_image=4)


def checkpoint(state_dict=None) -> LoadedCheckpoint:
    sd = random_state_dict() if state_dict is None else state_dict
    return LoadedCheckpoint(sd, "resnet50", "torchvision", "0" * 64, "test.pth")


def test_torchvision_r50_loads_with_every_tensor_used():
    sd = {k: v for k, v in torchvision.models.resnet50().state_dict().items() if not k.startswith("fc.")}
    model, record = c4_from_checkpoint(checkpoint(sd), TINY)
    assert record == {"used": len(sd), "of": len(sd), "missing": []}
    state = model.state_dict()
    assert torch.equal(state["backbone.layer3.5.bn3.running_var"], sd["layer3.5.bn3.running_var"])
    assert torch.equal(state["roi_heads.box_head.res5.0.conv2.weight"], sd["layer4.0.conv2.weight"])
    # besides the checkpoint's tensors, only the new parts: RPN, the extra norm, the predictor
    new = {".".join(k.split(".")[:2]) for k in state
           if not k.startswith(("backbone.", "roi_heads.box_head.res5."))}
    assert new == {"rpn.head", "roi_heads.box_head", "roi_heads.box_predictor"}
    norm = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
    assert {k for k in state if k.startswith("roi_heads.box_head.") and ".res5." not in k} == {
        f"roi_heads.box_head.norm.{n}" for n in norm}


def test_res5_strides_in_the_3x3_and_nothing_is_frozen():
    model, _ = c4_from_checkpoint(checkpoint(), TINY)
    res5 = model.roi_heads.box_head.res5
    assert res5[0].conv1.stride == (1, 1) and res5[0].conv2.stride == (2, 2)
    assert all(p.requires_grad for p in model.parameters())
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert all(type(m) is nn.BatchNorm2d and m.training for m in norms)
    pred = model.roi_heads.box_predictor
    assert pred.cls_score.weight.std().item() == pytest.approx(0.01, rel=0.05)
    assert pred.bbox_pred.weight.std().item() == pytest.approx(0.001, rel=0.05)
    assert not pred.cls_score.bias.any() and not pred.bbox_pred.bias.any()


def test_cell_anchors_are_not_rounded():
    gen = UnroundedAnchorGenerator(((32, 64, 128, 256, 512),), ((0.5, 1.0, 2.0),))
    cell = gen.cell_anchors[0]
    assert cell.shape == (15, 4)
    # ratio 0.5 (h / w), size 32: w = 32 / sqrt(0.5), h = 32 * sqrt(0.5), centred on 0
    w, h = 32 / math.sqrt(0.5), 32 * math.sqrt(0.5)
    assert cell[0].tolist() == pytest.approx([-w / 2, -h / 2, w / 2, h / 2])
    assert ((cell[:, 2] - cell[:, 0]) * (cell[:, 3] - cell[:, 1])).tolist() == pytest.approx(
        [s * s for s in (32, 64, 128, 256, 512)] * 3, rel=1e-6)


def test_l1_losses_by_hand():
    # 3 RoIs: background, class 2, class 1; 3 classes + background -> 16 deltas each
    logits = torch.zeros(3, 4)
    reg = torch.zeros(3, 16)
    reg[1, 8:12] = torch.tensor([1.0, -1.0, 0.5, 0.0])  # class 2 of RoI 1
    reg[2, 4:8] = torch.tensor([0.0, 0.0, 0.0, 2.0])  # class 1 of RoI 2
    reg[0, 0:4] = 9.0  # background: no box loss
    targets = torch.zeros(3, 4)
    targets[2, 3] = 0.5
    cls, box = fastrcnn_l1_loss(logits, reg, [torch.tensor([0, 2, 1])], [targets])
    assert cls.item() == pytest.approx(math.log(4))
    assert box.item() == pytest.approx((2.5 + 1.5) / 3)
    # RPN: 2 positives, 1 negative sampled out of 4 anchors
    obj, box = rpn_l1_loss(torch.zeros(4), torch.tensor([[1.0, 0, 0, 0], [0, 0, -3, 0], [5, 5, 5, 5], [7, 7, 7, 7]]),
                           torch.tensor([1.0, 1, 0, -1]), torch.zeros(4, 4), torch.tensor([0, 1]), torch.tensor([2]))
    assert obj.item() == pytest.approx(math.log(2))
    assert box.item() == pytest.approx(4 / 3)


def test_allowed_border_ignores_anchors_across_the_image_edge():
    gen = UnroundedAnchorGenerator(((32,),), ((1.0,),))
    rpn = L1RPN(gen, nn.Identity(), 0.7, 0.3, 256, 0.5, {"training": 10, "testing": 10},
                {"training": 10, "testing": 10}, 0.7, allowed_border=0)
    rpn._image_sizes = [(40, 40)]
    anchors = torch.tensor([[0.0, 0, 32, 32], [-1, 0, 31, 32], [20, 20, 40, 40], [20, 20, 39.5, 39.5]])
    target = {"boxes": torch.tensor([[0.0, 0, 32, 32]])}
    labels, _ = rpn.assign_targets_to_anchors([anchors], [target])
    # inside: x1, y1 >= 0 and x2, y2 < the image size; the best inside anchor is positive
    assert labels[0].tolist() == [1.0, -1.0, -1.0, 0.0]
    rpn.allowed_border = None
    labels, _ = rpn.assign_targets_to_anchors([anchors], [target])
    assert labels[0].tolist() == [1.0, 1.0, 0.0, 0.0]


def test_tiny_train_step_and_inference():
    torch.manual_seed(0)
    model, _ = c4_from_checkpoint(checkpoint(), TINY)
    images = [torch.rand(3, 96, 128) * 255, torch.rand(3, 80, 96) * 255]
    targets = [{"boxes": torch.tensor([[10.0, 12, 60, 70], [50, 20, 120, 90]]), "labels": torch.tensor([3, 15])},
               {"boxes": torch.tensor([[5.0, 5, 40, 50]]), "labels": torch.tensor([20])}]
    losses = model(images, targets)
    assert set(losses) == {"loss_objectness", "loss_rpn_box_reg", "loss_classifier", "loss_box_reg"}
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    for name in ("backbone.conv1.weight", "roi_heads.box_head.res5.2.conv3.weight", "roi_heads.box_head.norm.weight",
                 "rpn.head.conv.0.0.weight", "roi_heads.box_predictor.bbox_pred.weight"):
        assert model.get_parameter(name).grad.abs().sum() > 0, name
    model.eval()
    with torch.no_grad():
        out = model(images)
    assert len(out) == 2 and all(set(o) == {"boxes", "scores", "labels"} for o in out)
    for o, (h, w) in zip(out, [(96, 128), (80, 96)]):
        assert len(o["boxes"]) <= TINY.detections_per_image
        assert ((o["labels"] >= 1) & (o["labels"] <= 20)).all() and (o["scores"] > 0.05).all()
        assert (o["boxes"][:, 2] <= w).all() and (o["boxes"][:, 3] <= h).all()


def test_mmdet_low_quality_matching():
    iou = torch.tensor([[0.45, 0.10, 0.00, 0.00, 0.20],   # GT 0: best anchor 0, whose own best GT is 1
                        [0.50, 0.60, 0.00, 0.00, 0.10],   # GT 1: best anchor 1
                        [0.00, 0.00, 0.25, 0.10, 0.28]])  # GT 2: best IoU 0.28 < min_pos_iou 0.3
    # mmdet: GT 0 claims anchor 0, GT 2 claims nothing; detectron2 / torchvision: each best anchor keeps its
    # own best GT, and GT 2's best anchor is matched at any IoU
    assert MMDetLowQualityMatcher(0.7, 0.3, 0.3)(iou).tolist() == [0, 1, -1, -1, -1]
    assert Matcher(0.7, 0.3, allow_low_quality_matches=True)(iou).tolist() == [1, 1, -1, -1, 2]
    model = L1RPN(UnroundedAnchorGenerator(), nn.Identity(), 0.7, 0.3, 256, 0.5, {"training": 1, "testing": 1},
                  {"training": 1, "testing": 1}, 0.7, min_pos_iou=0.3)
    assert isinstance(model.proposal_matcher, MMDetLowQualityMatcher)
