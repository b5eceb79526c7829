"""The voc12aug_fcn plugin: every §8 value of its config, a resumed run equal to an uninterrupted one, the ledger metric."""

import math

import pytest
import torch

from densecl_bench import config
from densecl_bench.backbone import Backbone
from densecl_bench.benchmarks.base import RunContext
from densecl_bench.benchmarks.seg_fcn import Voc12AugFcn
from densecl_bench.checkpoint import load_checkpoint
from densecl_bench.errors import UserError
from densecl_bench.engine import per_rank_batch
from densecl_bench.segmentation.data import voc12aug_dataset
from densecl_bench.segmentation.train import train_fcn
from densecl_bench.tables import KNOWN
from test_seg_data import write_voc12

CONFIG = "fcn_r50-d8_512x512_20k_voc12aug"


def test_config_pins_every_section_8_value():
    cfg = config.load(CONFIG, "benchmarks")
    assert cfg["protocol"] == "mmselfsup-0.x"
    assert (cfg["num_classes"], cfg["ignore_index"]) == (21, 255)
    assert (cfg["decode_channels"], cfg["aux_channels"], cfg["dropout"]) == (512, 256, 0.1)
    assert (cfg["decode_loss_weight"], cfg["aux_loss_weight"]) == (1.0, 0.4)
    assert cfg["img_scale"] == [2048, 512] and cfg["ratio_range"] == [0.5, 2.0]
    assert (cfg["crop_size"], cfg["cat_max_ratio"], cfg["flip_prob"], cfg["photometric_distortion"]) == (512, 0.75, 0.5, True)
    assert (cfg["lr"], cfg["momentum"], cfg["weight_decay"]) == (0.01, 0.9, 5e-4)
    assert cfg["lr_schedule"] == {"kind": "poly", "by_epoch": False, "power": 0.9, "min_lr": 1e-4}
    assert (cfg["max_iters"], cfg["total_batch_size"]) == (20000, 16)
    assert per_rank_batch(cfg["total_batch_size"], 4) == 4  # 4 GPUs x 4 images
    assert (cfg["eval_interval"], cfg["checkpoint_interval"], cfg["precision"]) == (2000, 2000, "fp32")
    assert ("voc12aug_fcn", "mIoU") in KNOWN and Voc12AugFcn.config == CONFIG
    demo = config.load(CONFIG, "benchmarks", ["demo"])
    assert {k for k in cfg if demo[k] != cfg[k]} <= {"_profile", "img_scale", "crop_size", "max_iters", "total_batch_size",
                                                     "eval_interval", "checkpoint_interval"}
    with pytest.raises(UserError, match="does not split evenly"):
        per_rank_batch(cfg["total_batch_size"], 3)


TINY = {**config.load(CONFIG, "benchmarks"), "img_scale": [64, 32], "crop_size": 32, "max_iters": 4,
        "total_batch_size": 2, "eval_interval": 2, "checkpoint_interval": 2, "decode_channels": 8, "aux_channels": 8}


@pytest.fixture(scope="module")
def voc(tmp_path_factory):
    root = tmp_path_factory.mktemp("voc")
    return write_voc12(root, {"train": ["2012_000001", "2012_000002"], "aug": ["2012_000003", "2012_000004"],
                              "val": ["2012_000005", "2012_000006"]})


def test_resume_mid_run_reproduces_the_uninterrupted_run(voc, tmp_path):
    ckpt, cpu = load_checkpoint("random"), torch.device("cpu")
    full = train_fcn(ckpt, TINY, voc12aug_dataset(voc), tmp_path / "full", device=cpu, num_workers=0)
    cut = train_fcn(ckpt, TINY, voc12aug_dataset(voc), tmp_path / "cut", device=cpu, num_workers=0, until=2)
    assert [h["iter"] for h in cut.history] == [2]
    resumed = train_fcn(ckpt, TINY, voc12aug_dataset(voc), tmp_path / "cut", device=cpu, num_workers=0)
    assert [h["iter"] for h in full.history] == [h["iter"] for h in resumed.history] == [2, 4]
    assert resumed.final["mIoU"] == full.final["mIoU"] and resumed.final["aAcc"] == full.final["aAcc"]
    a = torch.load(tmp_path / "full" / "latest.pth", weights_only=False)["state_dict"]
    b = torch.load(tmp_path / "cut" / "latest.pth", weights_only=False)["state_dict"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_plugin_records_miou_with_aacc_and_per_class_iou(voc, tmp_path):
    ckpt = load_checkpoint("random")
    cfg = {**TINY, "max_iters": 2, "eval_interval": 0}
    ctx = RunContext(backbone=Backbone(), checkpoint=ckpt, data_root=voc.parents[1], demo=True,
                     device=torch.device("cpu"), run_dir=tmp_path, cache_dir=tmp_path, config=cfg, num_workers=0)
    voc_root = tmp_path / "root" / "VOCdevkit"
    voc_root.mkdir(parents=True)
    (voc_root / "VOC2012").symlink_to(voc)
    ctx.data_root = tmp_path / "root"
    bench = Voc12AugFcn()
    assert all(p.exists() for p in bench.required_data(ctx.data_root))
    [metric] = bench.run(ctx)
    assert (metric.benchmark, metric.name) == ("voc12aug_fcn", "mIoU")
    assert 0 <= metric.value <= 100 and 0 <= metric.extra["aAcc"] <= 100
    iou = metric.extra["IoU"]
    assert len(iou) == 21 and list(iou)[:2] == ["background", "aeroplane"]
    present = [v for v in iou.values() if v is not None]  # absent classes are stored as null, not NaN
    assert metric.value == pytest.approx(sum(present) / len(present))
    assert not any(isinstance(v, float) and math.isnan(v) for v in iou.values())
