"""Mask R-CNN R50-FPN on COCO (PROTOCOLS.md §7, §12): config, model, data, evaluator, plugin and resume."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from test_det_c4 import checkpoint
from test_det_plugin import _context
from torch import nn
from torchvision.ops import roi_align

from densecl_bench import config
from densecl_bench.backbone import random_state_dict
from densecl_bench.benchmarks.det_fpn import CocoMaskRcnnFpn1x
from densecl_bench.checkpoint import load_checkpoint
from densecl_bench.data.coco import coco_instances
from densecl_bench.detection.coco_data import CocoTrainSet, crop_mask, training_images
from densecl_bench.detection.coco_eval import COCOEvaluator, paste_masks
from densecl_bench.detection.data import Geometry
from densecl_bench.detection.fpn import (
    FPNConfig,
    LevelRoIAlign,
    mask_rcnn_from_checkpoint,
    mask_targets,
    roi_levels,
)
from densecl_bench.tables import KNOWN

NAME = "mask_rcnn_r50_fpn_mstrain_1x_coco"
FULL = {  # §7.1: MMSelfSup 0.x mask_rcnn_r50_fpn_mstrain_1x_coco.py and its _base_ files
    "protocol": "mmselfsup-0.x", "drop_crowd_only": False, "total_batch_size": 16, "lr": 0.02, "momentum": 0.9,
    "weight_decay": 1e-4, "no_decay": [],
    "lr_schedule": {"kind": "step", "by_epoch": True, "steps": [8, 11], "gamma": 0.1, "warmup_iters": 1000,
                    "warmup_ratio": 0.001},
    "max_epochs": 12, "max_iters": None, "precise_bn_iters": 0, "train_sizes": [640, 672, 704, 736, 768, 800],
    "max_size": 1333, "flip_prob": 0.5, "test_size": 800, "precision": "fp32",
    "model": {"head": "4conv1fc", "fpn_channels": 256, "anchor_sizes": [32, 64, 128, 256, 512],
              "aspect_ratios": [0.5, 1.0, 2.0], "rpn_pre_nms_train": 2000, "rpn_post_nms_train": 1000,
              "rpn_pre_nms_test": 1000, "rpn_post_nms_test": 1000, "rpn_nms": 0.7, "rpn_fg_iou": 0.7,
              "rpn_bg_iou": 0.3, "rpn_batch_per_image": 256, "rpn_positive_fraction": 0.5, "rpn_min_pos_iou": 0.3,
              "roi_fg_iou": 0.5, "roi_bg_iou": 0.5, "rois_per_image": 512, "roi_positive_fraction": 0.25,
              "bbox_reg_weights": [10.0, 10.0, 5.0, 5.0], "box_resolution": 7, "mask_resolution": 14,
              "score_thresh": 0.05, "nms": 0.5, "detections_per_image": 100},
}
D2 = {  # §7.2: coco_R_50_FPN_1x_moco.yaml on detectron2's defaults
    "drop_crowd_only": True, "no_decay": ["norm"], "max_epochs": None, "max_iters": 90000, "precise_bn_iters": 200,
    "lr_schedule": {"kind": "step", "by_epoch": False, "steps": [60000, 80000], "gamma": 0.1, "warmup_iters": 1000,
                    "warmup_ratio": 0.001},
}
TINY = FPNConfig(num_classes=3, rpn_pre_nms_train=100, rpn_post_nms_train=16, rpn_pre_nms_test=50,
                 rpn_post_nms_test=8, rpn_batch_per_image=32, rois_per_image=8, detections_per_image=4)


def test_config_pins_every_section_7_value():
    cfg = config.load(NAME, "benchmarks")
    assert {k: cfg[k] for k in FULL} == FULL
    assert FPNConfig.from_dict(cfg["model"]) == FPNConfig()  # the model's defaults are the protocol's too
    d2 = config.load(NAME, "benchmarks", "d2-2fc")
    assert {k: d2[k] for k in FULL if k != "model"} == {**{k: v for k, v in FULL.items() if k != "model"}, **D2}
    assert d2["model"] == {**FULL["model"], "head": "2fc", "rpn_min_pos_iou": None}
    demo = config.load(NAME, "benchmarks", "demo")
    assert {k for k in FULL if demo[k] != cfg[k]} == {"total_batch_size", "lr", "lr_schedule", "max_epochs",
                                                      "max_iters", "train_sizes", "test_size", "model"}
    assert CocoMaskRcnnFpn1x.config == NAME
    assert {(CocoMaskRcnnFpn1x.name, f"{t}_{s}") for t in ("bbox", "segm") for s in ("mAP", "AP50", "AP75")} <= KNOWN
    with pytest.raises(ValueError, match="unknown FPN head '3fc'"):
        FPNConfig(head="3fc")


def test_every_backbone_tensor_loads_and_the_heads_are_the_protocols():
    sd = {k: v for k, v in torchvision.models.resnet50().state_dict().items() if not k.startswith("fc.")}
    model, record = mask_rcnn_from_checkpoint(checkpoint(sd), TINY)
    assert record == {"used": len(sd), "of": len(sd), "missing": []}
    state = model.state_dict()
    assert torch.equal(state["backbone.body.layer4.2.bn3.running_var"], sd["layer4.2.bn3.running_var"])
    assert all(p.requires_grad for p in model.parameters())
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert all(type(m) is nn.BatchNorm2d and m.training for m in norms)
    assert len(model.rpn.head.conv) == 1  # one 3x3 conv (torchvision's v2 builder has two)
    heads = model.roi_heads
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.backbone.fpn.modules()) == 8  # lateral + output convs
    assert sum(isinstance(m, nn.BatchNorm2d) for m in heads.box_head.modules()) == 4
    assert [m.out_features for m in heads.box_head.modules() if isinstance(m, nn.Linear)] == [1024]
    assert sum(isinstance(m, nn.BatchNorm2d) for m in heads.mask_head.modules()) == 4
    assert heads.box_roi_pool.resolution == 7 and heads.mask_roi_pool.resolution == 14
    assert heads.box_predictor.bbox_pred.weight.std().item() == pytest.approx(0.001, rel=0.1)
    two, _ = mask_rcnn_from_checkpoint(checkpoint(), FPNConfig(num_classes=3, head="2fc"))
    assert not any(isinstance(m, nn.BatchNorm2d) for m in [*two.roi_heads.box_head.modules(),
                                                            *two.roi_heads.mask_head.modules()])
    assert [m.out_features for m in two.roi_heads.box_head.modules() if isinstance(m, nn.Linear)] == [1024, 1024]
    r18, loaded = mask_rcnn_from_checkpoint(load_checkpoint("random", arch="resnet18"), TINY)  # any ResNet's widths
    assert loaded["used"] == loaded["of"] and r18.backbone.fpn.inner_blocks[0][0].in_channels == 64


def test_roi_levels_and_pooling_follow_mmdet():
    sides = torch.tensor([20.0, 55.9, 56.0, 111.9, 112.0, 224.0, 448.0, 2000.0])
    boxes = torch.stack([torch.zeros(8), torch.zeros(8), sides, sides], 1)
    assert roi_levels(boxes).tolist() == [0, 0, 0, 0, 1, 2, 3, 3]  # floor(log2(sqrt(wh) / 56)), clamped
    feats = {str(i): torch.rand(1, 2, 64 // 2**i, 64 // 2**i) for i in range(4)}
    box = torch.tensor([[3.3, 5.0, 120.0, 100.0]])  # sqrt(wh) ~ 102: level 0 (stride 4)
    expected = roi_align(feats["0"], [box], 7, spatial_scale=0.25, sampling_ratio=0, aligned=True)
    assert torch.equal(LevelRoIAlign(7)(feats, [box], [(256, 256)]), expected)


def _polygon_mask(polygons: list[list[float]], h: int, w: int) -> np.ndarray:
    return mask_utils.decode(mask_utils.frPyObjects(polygons, h, w)).max(axis=2)


@pytest.mark.parametrize("flip", [False, True])
def test_box_crops_equal_the_full_image_mask(flip: bool):
    # a polygon touching the left and top borders, in a 60x40 image resized to 90x60 (and flipped)
    poly = [[0.0, 0.0, 30.5, 2.0, 25.0, 20.7, 3.0, 30.0]]
    g = Geometry(60, 40, 90, 60, flip)
    pts = np.asarray(poly[0]).reshape(-1, 2) * 1.5
    if flip:
        pts[:, 0] = 90 - pts[:, 0]
    full = _polygon_mask([pts.ravel().tolist()], 60, 90)
    box = np.array([pts[:, 0].min(), pts[:, 1].min(), pts[:, 0].max(), pts[:, 1].max()])
    crop, (x0, y0) = crop_mask(poly, g, box)
    assert (x0, y0) == (math.floor(box[0]) - 1, math.floor(box[1]) - 1)
    padded = np.pad(full, 1, mode="edge")  # what roi_align reads within a pixel of the border
    assert np.array_equal(crop, padded[y0 + 1: y0 + 1 + crop.shape[0], x0 + 1: x0 + 1 + crop.shape[1]])
    # the targets of proposals anywhere in the image are those of the full-image mask
    gen = torch.Generator().manual_seed(0)
    xy = torch.rand(40, 2, 2, generator=gen) * torch.tensor([90.0, 60.0])
    proposals = torch.cat([xy.min(1).values, xy.max(1).values + 1], 1).clamp(max=torch.tensor([90.0, 60, 90, 60]))
    masks = torch.zeros(2, crop.shape[0] + 3, crop.shape[1] + 5, dtype=torch.uint8)  # padded as in a batch
    masks[1, : crop.shape[0], : crop.shape[1]] = torch.from_numpy(crop)
    origins = torch.tensor([[0.0, 0.0], [x0, y0]])
    got = mask_targets(proposals, torch.ones(40, dtype=torch.long), masks, origins, 28)
    want = roi_align(torch.from_numpy(full)[None, None].float(), [proposals], 28, 1.0, 0, aligned=True)[:, 0] >= 0.5
    assert torch.equal(got, want.float()) and want.any()


def test_tiny_train_step_and_inference():
    torch.manual_seed(0)
    model, _ = mask_rcnn_from_checkpoint(checkpoint(), TINY)
    images = [torch.rand(3, 64, 96) * 255, torch.rand(3, 80, 64) * 255]
    targets = [{"boxes": torch.tensor([[10.0, 12, 60, 50]]), "labels": torch.tensor([3]),
                "masks": torch.ones(1, 40, 52, dtype=torch.uint8), "mask_origins": torch.tensor([[9.0, 11]])},
               {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long),
                "masks": torch.zeros(0, 1, 1, dtype=torch.uint8), "mask_origins": torch.zeros(0, 2)}]
    losses = model(images, targets)
    assert set(losses) == {"loss_objectness", "loss_rpn_box_reg", "loss_classifier", "loss_box_reg", "loss_mask"}
    sum(losses.values()).backward()
    for name in ("backbone.body.conv1.weight", "backbone.fpn.layer_blocks.0.0.weight", "rpn.head.conv.0.0.weight",
                 "roi_heads.box_head.0.0.weight", "roi_heads.mask_head.0.0.weight",
                 "roi_heads.mask_predictor.mask_fcn_logits.weight"):
        assert model.get_parameter(name).grad.abs().sum() > 0, name
    model.eval()
    with torch.no_grad():
        out = model(images)
    for o in out:
        assert set(o) == {"boxes", "scores", "labels", "masks"} and len(o["boxes"]) <= 4
        assert o["masks"].shape == (len(o["boxes"]), 1, 28, 28) and ((o["masks"] >= 0) & (o["masks"] <= 1)).all()


# ------------------------------------------------------------------------------------------ data, evaluator

SQUARE = [[4.0, 4.0, 28.0, 4.0, 28.0, 26.0, 4.0, 26.0]]
TRIANGLE = [[36.0, 10.0, 60.0, 40.0, 34.0, 44.0]]
OUTSIDE = [[66.0, 10.0, 80.0, 10.0, 80.0, 20.0]]  # right of a 64-wide image


def _ann(image_id: int, ann_id: int, category: int, polygon: list[list[float]], crowd: int = 0) -> dict:
    pts = np.asarray(polygon[0]).reshape(-1, 2)
    (x0, y0), (x1, y1) = pts.min(0), pts.max(0)
    rle = mask_utils.frPyObjects(polygon, 48, 64)
    return {"id": ann_id, "image_id": image_id, "category_id": category, "segmentation": polygon,
            "area": float(mask_utils.area(rle).sum()), "bbox": [x0, y0, x1 - x0, y1 - y0], "iscrowd": crowd}


def write_coco(root: Path) -> Path:
    """coco/{train2017,val2017}: 64x48 JPEGs, categories 1, 3, 7; train holds a crowd-only image, an image
    without annotations, a crowd instance beside two others and an instance outside its image."""
    coco = root / "coco"
    cats = [{"id": c, "name": f"c{c}", "supercategory": "s"} for c in (1, 3, 7)]
    layouts = {
        "train2017": [[(1, SQUARE, 0), (3, TRIANGLE, 0), (7, TRIANGLE, 1)], [(7, SQUARE, 1)], [], [(3, SQUARE, 0), (1, OUTSIDE, 0)],
                      [(7, TRIANGLE, 0), (1, SQUARE, 0)]],
        "val2017": [[(1, SQUARE, 0), (7, TRIANGLE, 0)], [(3, TRIANGLE, 0), (3, SQUARE, 0)], [(7, SQUARE, 0)]],
    }
    ann_id = 1
    for split, images in layouts.items():
        (coco / split).mkdir(parents=True)
        doc = {"images": [], "annotations": [], "categories": cats}
        for i, anns in enumerate(images, start=1):
            pixels = np.full((48, 64, 3), 40, np.uint8)
            for cat, poly, _ in anns:
                pixels[_polygon_mask(poly, 48, 64).astype(bool)] = (60 * (cat % 4), 200, 255 - 30 * cat)
            Image.fromarray(pixels).save(coco / split / f"{i:012d}.jpg", quality=95)
            doc["images"].append({"id": i, "file_name": f"{i:012d}.jpg", "width": 64, "height": 48})
            for cat, poly, crowd in anns:
                doc["annotations"].append(_ann(i, ann_id, cat, poly, crowd))
                ann_id += 1
        (coco / "annotations").mkdir(exist_ok=True)
        (coco / "annotations" / f"instances_{split}.json").write_text(json.dumps(doc))
    return root


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    return write_coco(tmp_path_factory.mktemp("coco_root"))


def test_training_images_leave_crowds_and_empty_images_out(data_root: Path):
    train = coco_instances(data_root / "coco", "train2017")
    mmdet = training_images(train)
    assert [im.id for im in mmdet.images] == [1, 2, 4, 5]  # image 2 (crowd only) trains as background
    assert mmdet.counts() == {"images": 4, "crowd_dropped": 2, "degenerate_dropped": 1,
                              "images_without_annotations": 1, "crowd_only_images": 1}
    assert [im.id for im in training_images(train, drop_crowd_only=True).images] == [1, 4, 5]
    assert mmdet.images[0].iscrowd.tolist() == [False, False] and len(mmdet.images[1].boxes) == 0
    img, target = CocoTrainSet(mmdet.images, sizes=(96,), flip_prob=1.0)[0]
    assert img.shape == (3, 96, 128)
    # the square 4..28 x 4..26 doubled and mirrored in a 128-wide image
    assert target["boxes"][0].tolist() == [128 - 56, 8, 128 - 8, 52] and target["labels"].tolist() == [1, 2]
    assert target["masks"].shape[0] == 2 and target["mask_origins"][0].tolist() == [71, 7]
    crop = target["masks"][0]
    assert crop[1:45, 1:49].all() and crop.sum() == 44 * 48  # pixels 72..119 x 8..51, inside the zero margin


def _gt_outputs(gt: COCO, image_ids: list[int], cat_to_label: dict[int, int]) -> list[dict]:
    """Every non-crowd GT instance as a detection with score 1 and its own mask."""
    outs = []
    for i in image_ids:
        anns = [a for a in gt.imgToAnns[i] if not a["iscrowd"]]
        xywh = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32).reshape(-1, 4)
        outs.append({"boxes": torch.cat([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], 1), "scores": torch.ones(len(anns)),
                     "labels": torch.tensor([cat_to_label[a["category_id"]] + 1 for a in anns]),
                     "masks": torch.from_numpy(np.stack([gt.annToMask(a) for a in anns])).bool()})
    return outs


def _evaluate(val, outputs: list[dict]) -> dict:
    evaluator = COCOEvaluator(val.coco, val.label_to_cat, lambda ids: [(i, (48, 64)) for i in ids])
    evaluator.reset()
    evaluator.process(val.image_ids, outputs)
    return evaluator.evaluate()


def test_ground_truth_scores_100_and_a_perturbation_scores_what_pycocotools_gives(data_root: Path):
    val = coco_instances(data_root / "coco", "val2017")
    outputs = _gt_outputs(val.coco, val.image_ids, val.cat_to_label)
    perfect = _evaluate(val, outputs)
    assert {k: v for k, v in perfect.items() if k != "images"} == {
        f"{t}_{s}": pytest.approx(100.0) for t in ("bbox", "segm") for s in ("mAP", "AP50", "AP75")}
    # perturb: move one box and its mask 5 px, halve a score, drop an instance, add a false positive
    outputs[0]["boxes"][0] += 5
    outputs[0]["masks"][0] = torch.roll(outputs[0]["masks"][0], (5, 5), (0, 1))
    outputs[1]["scores"][1] = 0.5
    for key in ("boxes", "scores", "labels", "masks"):
        outputs[2][key] = outputs[2][key][:0]
    outputs[1] = {k: torch.cat([v, v[:1]]) for k, v in outputs[1].items()}
    outputs[1]["boxes"][-1] = torch.tensor([0.0, 0, 20, 20])
    outputs[1]["scores"][-1] = 0.7
    got = _evaluate(val, outputs)
    results = []  # the same detections written by hand, scored by pycocotools alone
    for image_id, out in zip(val.image_ids, outputs):
        for box, score, label, mask in zip(out["boxes"].tolist(), out["scores"].tolist(), out["labels"].tolist(),
                                           out["masks"].numpy()):
            rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
            results.append({"image_id": image_id, "category_id": val.label_to_cat[label - 1], "score": score,
                            "bbox": [box[0], box[1], box[2] - box[0], box[3] - box[1]], "segmentation": rle})
    for task in ("bbox", "segm"):
        direct = COCOeval(val.coco, val.coco.loadRes([dict(r) for r in results]), task)
        direct.evaluate()
        direct.accumulate()
        direct.summarize()
        assert [got[f"{task}_{s}"] for s in ("mAP", "AP50", "AP75")] == pytest.approx(
            [100 * v for v in direct.stats[:3]])
    assert 0 < got["bbox_mAP"] < 100 and 0 < got["segm_mAP"] < 100


def test_pasting_a_box_sized_mask_reproduces_it_and_batches():
    gen = torch.Generator().manual_seed(1)
    masks = torch.rand(3, 8, 8, generator=gen)
    boxes = torch.tensor([[2.0, 3.0, 10.0, 11.0], [0.0, 0.0, 8.0, 8.0], [12.0, 4.0, 20.0, 12.0]])
    pasted = paste_masks(masks, boxes, 16, 24)
    for p, m, (x0, y0, _, _) in zip(pasted, masks, boxes.int().tolist()):
        expected = torch.zeros(16, 24, dtype=torch.bool)
        expected[y0: y0 + 8, x0: x0 + 8] = m >= 0.5
        assert torch.equal(p, expected)
    assert paste_masks(masks[:0], boxes[:0], 16, 24).shape == (0, 16, 24)


# ------------------------------------------------------------------------------------------ plugin

def _tiny_config(**changes) -> dict:
    cfg = config.load(NAME, "benchmarks", "demo")
    cfg.update({"max_iters": 2, "total_batch_size": 1, "checkpoint_period": 1, "test_batch_size": 3, **changes})
    cfg["model"] = {**cfg["model"], "rpn_post_nms_train": 8, "rpn_post_nms_test": 4, "rois_per_image": 4,
                    "detections_per_image": 3}
    return cfg


def test_plugin_runs_and_fills_the_coco_row(data_root: Path, tmp_path: Path):
    plugin = CocoMaskRcnnFpn1x()
    coco = data_root / "coco"
    assert plugin.required_data(data_root) == [coco / "annotations/instances_train2017.json",
                                               coco / "annotations/instances_val2017.json",
                                               coco / "train2017", coco / "val2017"]
    metrics = plugin.run(_context(data_root, tmp_path, _tiny_config()))
    assert [m.name for m in metrics] == ["bbox_mAP", "bbox_AP50", "bbox_AP75", "segm_mAP", "segm_AP50", "segm_AP75"]
    assert all(0.0 <= m.value <= 100.0 and m.benchmark == "coco_mask_rcnn_fpn_1x" for m in metrics)
    extra = metrics[0].extra
    assert extra["backbone_tensors"]["used"] == extra["backbone_tensors"]["of"] == len(random_state_dict())
    assert (extra["num_classes"], extra["head"], extra["val_images"], extra["iterations"]) == (3, "4conv1fc", 3, 2)
    results = json.loads((tmp_path / plugin.name / "coco_results.json").read_text())
    assert all(set(r) == {"image_id", "category_id", "bbox", "score", "segmentation"} for r in results)


def test_a_run_stopped_mid_schedule_resumes_to_the_same_weights(data_root: Path, tmp_path: Path, one_thread):
    cfg = _tiny_config(max_iters=3)
    plugin = CocoMaskRcnnFpn1x()
    full = plugin.train(_context(data_root, tmp_path / "full", cfg))
    plugin.train(_context(data_root, tmp_path / "cut", cfg), until=1)
    resumed = plugin.train(_context(data_root, tmp_path / "cut", cfg))
    a, b = (torch.load(tmp_path / run / plugin.name / "latest.pth", weights_only=False) for run in ("full", "cut"))
    assert a["meta"]["iter"] == b["meta"]["iter"] == 3
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])
    assert resumed["segm_mAP"] == full["segm_mAP"] and resumed["bbox_mAP"] == full["bbox_mAP"]
