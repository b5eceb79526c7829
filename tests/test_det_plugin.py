"""The voc0712_faster_rcnn_c4 plugin: its config pins PROTOCOLS.md §6, and it runs on the engine."""

from pathlib import Path

import pytest
import torch
from test_det_data import write_voc

from densecl_bench import config
from densecl_bench.backbone import random_state_dict
from densecl_bench.benchmarks.base import RunContext
from densecl_bench.benchmarks.det_c4 import Voc0712FasterRcnnC4
from densecl_bench.engine import per_rank_batch
from densecl_bench.errors import UserError
from densecl_bench.checkpoint import LoadedCheckpoint, build_backbone
from densecl_bench.detection.c4 import C4Config

NAME = "faster_rcnn_r50_c4_mstrain_24k_voc0712"

FULL = {  # §6.1 and the mmdet config MMSelfSup 0.x used (§6.3)
    "flavour": "mmdet", "total_batch_size": 16, "lr": 0.02, "momentum": 0.9, "weight_decay": 1e-4, "no_decay": [],
    "lr_schedule": {"kind": "step", "by_epoch": False, "steps": [18000, 22000], "gamma": 0.1, "warmup_iters": 100,
                    "warmup_ratio": 0.001},
    "max_iters": 24000, "precise_bn_iters": 0, "train_sizes": list(range(480, 801, 32)), "max_size": 1333,
    "flip_prob": 0.5, "test_size": 800, "precision": "fp32",
    "model": {"anchor_sizes": [32, 64, 128, 256, 512], "aspect_ratios": [0.5, 1.0, 2.0], "rpn_pre_nms_train": 12000,
              "rpn_post_nms_train": 2000, "rpn_pre_nms_test": 6000, "rpn_post_nms_test": 1000, "rpn_nms": 0.7,
              "rpn_batch_per_image": 256, "rpn_positive_fraction": 0.5, "allowed_border": 0, "rpn_min_pos_iou": 0.3,
              "rois_per_image": 512,
              "roi_positive_fraction": 0.25, "pooler_resolution": 14, "score_thresh": 0.05, "nms": 0.5,
              "detections_per_image": 100},
}
D2 = {"flavour": "d2", "no_decay": ["norm"], "precise_bn_iters": 200}  # §6.1 detectron2 / MoCo


def test_config_pins_the_protocol():
    cfg = config.load(NAME, "benchmarks")
    for key, value in FULL.items():
        assert cfg[key] == value, key
    d2 = config.load(NAME, "benchmarks", "d2")
    for key, value in {**FULL, **D2}.items():
        if key != "model":
            assert d2[key] == value, key
    assert d2["model"] == {**FULL["model"], "allowed_border": None, "rpn_min_pos_iou": None}
    # the model's own defaults are the protocol's too (fields the config does not list: IoUs, box weights)
    model = C4Config.from_dict(cfg["model"])
    assert model == C4Config(allowed_border=0, rpn_min_pos_iou=0.3)
    assert (model.rpn_fg_iou, model.rpn_bg_iou, model.roi_fg_iou, model.bbox_reg_weights) == (0.7, 0.3, 0.5,
                                                                                              (10, 10, 5, 5))
    with pytest.raises(ValueError, match="unknown C4 model settings: rpn_topk"):
        C4Config.from_dict({"rpn_topk": 1})


def test_per_rank_batch():
    assert per_rank_batch(16, 8) == 2
    with pytest.raises(UserError, match="does not split evenly over 3"):
        per_rank_batch(16, 3)


def _context(root: Path, run_dir: Path, cfg: dict) -> RunContext:
    ckpt = LoadedCheckpoint(random_state_dict(), "resnet50", "random", "1" * 64, "random")
    return RunContext(build_backbone(ckpt), ckpt, root, True, torch.device("cpu"), run_dir, run_dir / "cache",
                      cfg, seed=0, num_workers=0)


@pytest.mark.parametrize("profile", ["demo", "demo,d2"])
def test_plugin_runs_on_the_engine(tmp_path: Path, profile: str):
    write_voc(tmp_path, "2007", "trainval", ["000001", "000003"])
    write_voc(tmp_path, "2007", "test", ["000002", "000004"])
    write_voc(tmp_path, "2012", "trainval", ["2012_000001"])
    cfg = config.load(NAME, "benchmarks", profile.split(","))
    cfg.update(max_iters=2, precise_bn_iters=min(cfg["precise_bn_iters"], 1), checkpoint_period=1,
               model={**cfg["model"], "rpn_post_nms_train": 8, "rpn_post_nms_test": 4, "rois_per_image": 4})
    plugin = Voc0712FasterRcnnC4()
    assert plugin.required_data(tmp_path) == [tmp_path / "VOCdevkit/VOC2007/Annotations",
                                              tmp_path / "VOCdevkit/VOC2012/Annotations"]
    metrics = plugin.run(_context(tmp_path, tmp_path / "run", cfg))
    d2 = profile.endswith("d2")
    assert [m.name for m in metrics] == (["AP", "AP50", "AP75"] if d2 else ["AP50"])
    for m in metrics:
        assert 0.0 <= m.value <= 100.0 and m.benchmark == "voc0712_faster_rcnn_c4"
        assert m.extra["flavour"] == ("d2" if d2 else "mmdet")
        assert m.extra["backbone_tensors"]["used"] == m.extra["backbone_tensors"]["of"] == len(random_state_dict())
        assert m.extra["training_boxes"]["difficult_dropped"] == (0 if d2 else 3)
        assert m.extra["test_images"] == 2
    latest = torch.load(tmp_path / "run" / plugin.name / "latest.pth", weights_only=False)
    assert latest["meta"]["iter"] == 2


def test_a_run_stopped_mid_schedule_resumes_to_the_same_weights(tmp_path: Path, caplog):
    write_voc(tmp_path, "2007", "trainval", ["000001", "000003"])
    write_voc(tmp_path, "2007", "test", ["000002"])
    write_voc(tmp_path, "2012", "trainval", ["2012_000001"])
    cfg = config.load(NAME, "benchmarks", "demo")
    cfg.update(max_iters=3, total_batch_size=1, checkpoint_period=1,
               model={**cfg["model"], "rpn_post_nms_train": 8, "rpn_post_nms_test": 4, "rois_per_image": 4})
    plugin = Voc0712FasterRcnnC4()
    full = plugin.train(_context(tmp_path, tmp_path / "full", cfg))
    plugin.train(_context(tmp_path, tmp_path / "cut", cfg), until=1)
    assert torch.load(tmp_path / "cut" / plugin.name / "latest.pth", weights_only=False)["meta"]["iter"] == 1
    with caplog.at_level("INFO", logger="densecl_bench.engine.checkpoint"):
        resumed = plugin.train(_context(tmp_path, tmp_path / "cut", cfg))
    assert "iteration 1" in caplog.text  # it resumed, and did not train again from scratch
    a, b = (torch.load(tmp_path / run / plugin.name / "latest.pth", weights_only=False) for run in ("full", "cut"))
    assert a["meta"]["iter"] == b["meta"]["iter"] == 3
    assert a["state_dict"].keys() == b["state_dict"].keys()
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])
    assert resumed["AP50"] == full["AP50"]
