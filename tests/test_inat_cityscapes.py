"""iNaturalist 2018 linear and Cityscapes FCN (issue 16): readers, the trainIds converter, sliding-window
inference, `data check`, the Cityscapes config pins and both plugins on the demo data."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from torch import nn
from tqdm import tqdm

from densecl_bench import config
from densecl_bench.backbone import LAYERS
from densecl_bench.benchmarks.base import RunContext
from densecl_bench.benchmarks.linear import Inat18Linear
from densecl_bench.benchmarks.seg_fcn import CityscapesFcn
from densecl_bench.checkpoint import LoadedCheckpoint, load_checkpoint
from densecl_bench.cli import main
from densecl_bench.data import demo
from densecl_bench.data.base import DataLayoutError
from densecl_bench.data.cityscapes import CLASSES, LABELS, cityscapes_pairs, convert_label_ids, to_train_ids
from densecl_bench.data.inat import inat2018
from densecl_bench.data.layout import check_data_root, dataset_dirs
from densecl_bench.engine import per_rank_batch
from densecl_bench.regress import SKIPPED, compare
from densecl_bench.segmentation.data import rescale_size
from densecl_bench.segmentation.model import SlideWindow, predict, window_starts
from densecl_bench.tables import KNOWN
from test_linear import tiny_backbone

CITYSCAPES = "fcn_r50-d8_769x769_40k_cityscapes"
INAT = "resnet50_mhead_8xb32-steplr-84e_inat18"
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """The demo's iNaturalist 2018 and Cityscapes folders (their writers alone: about 2 s)."""
    root = tmp_path_factory.mktemp("data")
    dirs = dataset_dirs(root)
    with tqdm(disable=True) as bar:
        demo._write_inat(dirs["inat18"], 0, bar)
        demo._write_cityscapes(dirs["cityscapes"], 0, bar)
    return root


# --- config pins (the iNat config is pinned with the other linear configs in test_protocol_configs.py) -----


def test_cityscapes_config_pins_every_mmselfsup_value():
    cfg = config.load(CITYSCAPES, "benchmarks")
    assert cfg["protocol"] == "mmselfsup-0.x"
    # _base_/models/fcn_r50-d8.py (num_classes=19 there) + the align_corners=True override
    assert (cfg["num_classes"], cfg["ignore_index"], cfg["align_corners"]) == (19, 255, True)
    assert (cfg["decode_channels"], cfg["aux_channels"], cfg["dropout"]) == (512, 256, 0.1)
    assert (cfg["decode_loss_weight"], cfg["aux_loss_weight"]) == (1.0, 0.4)
    # _base_/datasets/cityscapes_769x769.py
    assert cfg["img_scale"] == [2049, 1025] and cfg["ratio_range"] == [0.5, 2.0]
    assert (cfg["crop_size"], cfg["cat_max_ratio"], cfg["flip_prob"], cfg["photometric_distortion"]) == (769, 0.75, 0.5, True)
    # _base_/schedules/schedule_40k.py
    assert (cfg["lr"], cfg["momentum"], cfg["weight_decay"]) == (0.01, 0.9, 5e-4)
    assert cfg["lr_schedule"] == {"kind": "poly", "by_epoch": False, "power": 0.9, "min_lr": 1e-4}
    assert (cfg["max_iters"], cfg["eval_interval"], cfg["checkpoint_interval"]) == (40000, 4000, 4000)
    assert per_rank_batch(cfg["total_batch_size"], 4) == 2  # samples_per_gpu=2 on 4 GPUs
    # test_cfg=dict(mode='slide', crop_size=(769, 769), stride=(513, 513))
    assert (cfg["test_mode"], cfg["test_crop"], cfg["test_stride"]) == ("slide", [769, 769], [513, 513])
    assert cfg["precision"] == "fp32"
    assert ("cityscapes_fcn", "mIoU") in KNOWN and CityscapesFcn.config == CITYSCAPES
    assert all(("inat18_linear", f) in KNOWN for f in LAYERS) and Inat18Linear.config == INAT
    demo_cfg = config.load(CITYSCAPES, "benchmarks", ["demo"])
    assert {k for k in cfg if demo_cfg[k] != cfg[k]} <= {
        "_profile", "img_scale", "crop_size", "test_crop", "test_stride", "max_iters", "total_batch_size",
        "eval_interval", "checkpoint_interval"}
    assert config.load(INAT, "benchmarks", ["demo"])["num_classes"] == len(demo.INAT_TRAIN_COUNTS)


def test_reference_has_the_keys_empty_and_regress_skips_them():
    reference = Path(__file__).resolve().parent.parent / "results/reference/densecl_r50_8xb32-coslr-200e.json"
    results = json.loads(reference.read_text())["results"]
    assert results["inat18_linear"] is None and results["cityscapes_fcn"] is None  # no DenseCL numbers published
    records = [{"benchmark": bench, "metric": metric, "value": 10.0, "extra": {}, "trial": 0, "label": "run",
                "fingerprint": "fp", "config": {}, "provenance": {}}
               for bench, metric in (("inat18_linear", "feature5"), ("cityscapes_fcn", "mIoU"))]
    report = compare(records, reference, allow_missing=True)
    rows = {(r.benchmark, r.metric): r for r in report.rows}
    assert rows["inat18_linear", "feature5"].verdict == rows["cityscapes_fcn", "mIoU"].verdict == SKIPPED
    assert report.ok


# --- readers ----------------------------------------------------------------------------------------


def test_inat_reader_takes_the_json_and_its_file_names(root: Path):
    folder = dataset_dirs(root)["inat18"]
    train, val = inat2018(folder, "train"), inat2018(folder, "val")
    assert len(train.classes) == len(val.classes) == 12
    assert np.bincount(train.labels).tolist() == list(demo.INAT_TRAIN_COUNTS)  # long-tailed
    assert np.bincount(val.labels).tolist() == [demo.INAT_VAL_PER_CLASS] * 12
    doc = json.loads((folder / "train2018.json").read_text())
    first = doc["images"][0]
    assert train.paths[0] == folder / first["file_name"] and train.paths[0].is_file()
    assert first["file_name"].startswith(f"train_val2018/{doc['categories'][0]['supercategory']}/0/")


def test_inat_reader_names_what_is_wrong(root: Path, tmp_path: Path):
    folder = tmp_path / "iNaturalist2018"
    folder.mkdir()
    with pytest.raises(DataLayoutError, match=r"missing file .*val2018\.json") as err:
        inat2018(folder, "val")
    assert "expected layout for inat18" in str(err.value)
    doc = json.loads((dataset_dirs(root)["inat18"] / "val2018.json").read_text())
    doc["annotations"] = doc["annotations"][1:]
    (folder / "val2018.json").write_text(json.dumps(doc))
    with pytest.raises(DataLayoutError, match=r"1 images have no annotation \(first id 100000\)"):
        inat2018(folder, "val")


def test_cityscapes_reader_pairs_images_and_trainids(root: Path, tmp_path: Path):
    folder = dataset_dirs(root)["cityscapes"]
    pairs = cityscapes_pairs(folder, "val")
    assert len(pairs) == 6 and [p[0].parent.name for p in pairs] == ["frankfurt"] * 3 + ["lindau"] * 3
    image, label = pairs[0]
    assert label == folder / "gtFine/val/frankfurt" / image.name.replace("_leftImg8bit", "_gtFine_labelTrainIds")
    values = np.unique(np.asarray(Image.open(label)))
    assert set(values.tolist()) <= {*range(19), 255} and 255 in values  # ego vehicle is void
    broken = tmp_path / "cityscapes"
    shutil.copytree(folder, broken)
    label = broken / label.relative_to(folder)
    label.unlink()
    with pytest.raises(DataLayoutError, match=r"missing file .*labelTrainIds\.png; write the trainIds maps with "
                                              r"`densecl-bench data cityscapes-trainids"):
        cityscapes_pairs(broken, "val")
    with pytest.raises(DataLayoutError, match=r"missing folder .*leftImg8bit/test"):
        cityscapes_pairs(broken, "test")


# --- the labelIds -> trainIds converter ---------------------------------------------------------------------


def test_converter_follows_the_published_label_table(tmp_path: Path):
    # cityscapesscripts/helpers/labels.py: the 19 evaluated classes and their (id, trainId)
    published = {"road": (7, 0), "sidewalk": (8, 1), "building": (11, 2), "wall": (12, 3), "fence": (13, 4),
                 "pole": (17, 5), "traffic light": (19, 6), "traffic sign": (20, 7), "vegetation": (21, 8),
                 "terrain": (22, 9), "sky": (23, 10), "person": (24, 11), "rider": (25, 12), "car": (26, 13),
                 "truck": (27, 14), "bus": (28, 15), "train": (31, 16), "motorcycle": (32, 17), "bicycle": (33, 18)}
    assert CLASSES == tuple(published)  # mmseg's CityscapesDataset.CLASSES order
    ids = np.arange(256, dtype=np.uint8)
    expected = np.full(256, 255, np.uint8)
    for label_id, train_id in published.values():
        expected[label_id] = train_id
    assert np.array_equal(to_train_ids(ids), expected)  # void ids 0-6, 9, 10, 14-16, 18, 29, 30 and unknown: 255
    assert len(LABELS) == 34 and [label_id for _, label_id, _ in LABELS] == list(range(34))

    city = tmp_path / "gtFine" / "val" / "lindau"
    city.mkdir(parents=True)
    Image.fromarray(np.array([[7, 26, 1], [23, 33, 9]], np.uint8), "L").save(city / "a_gtFine_labelIds.png")
    assert convert_label_ids(tmp_path) == (1, 0)
    out = np.asarray(Image.open(city / "a_gtFine_labelTrainIds.png"))
    assert out.tolist() == [[0, 13, 255], [10, 18, 255]]
    assert convert_label_ids(tmp_path) == (0, 1)  # kept
    result = CliRunner().invoke(main, ["data", "cityscapes-trainids", "--root", str(tmp_path), "--overwrite"])
    assert result.exit_code == 0 and "wrote 1 trainIds maps" in result.output
    missing = CliRunner().invoke(main, ["data", "cityscapes-trainids", "--root", str(tmp_path / "none")])
    assert missing.exit_code == 2 and "error: missing folder" in missing.output


# --- sliding-window inference ----------------------------------------------------------------------------


def test_window_starts_as_mmseg_slide_inference():
    # a 1025 x 2049 test image (2048 x 1024 resized to (2049, 1025)), 769 windows, stride 513: 2 x 4 windows
    assert window_starts(1025, 769, 513) == [0, 256]
    assert window_starts(2049, 769, 513) == [0, 513, 1026, 1280]
    assert window_starts(769, 769, 513) == [0] and window_starts(500, 769, 513) == [0]  # smaller: one, unpadded
    assert rescale_size(2048, 1024, (2049, 1025)) == (2049, 1025)  # the test resize of a Cityscapes image
    for size in range(1, 120):
        covered = np.zeros(size, bool)
        for start in window_starts(size, 48, 32):
            assert 0 <= start and (start + 48 <= size or start == 0)
            covered[start : start + 48] = True
        assert covered.all()


class _Local(nn.Module):
    """Per-pixel logits (1x1 conv), so that any window sees the same logits at a pixel as the whole image."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 5, 1)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"seg": self.conv(x)}


class _Constant(nn.Module):
    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"seg": torch.ones(x.shape[0], 2, x.shape[2] // 8, x.shape[3] // 8)}


@pytest.mark.parametrize("align_corners", [False, True])
def test_slide_equals_whole_for_a_local_model_and_averages_overlaps(align_corners):
    image = torch.randn(1, 3, 64, 128)
    window = SlideWindow((48, 48), (32, 32))
    whole = predict(_Local(), image, (64, 128), align_corners)
    slide = predict(_Local(), image, (64, 128), align_corners, window)
    torch.testing.assert_close(slide, whole, rtol=1e-5, atol=1e-5)
    # every pixel is covered, and overlapping windows are averaged, not summed
    ones = predict(_Constant(), image, (32, 64), align_corners, window)
    assert ones.shape == (2, 32, 64) and torch.allclose(ones, torch.ones_like(ones))


# --- data check and the plugins on the demo data ----------------------------------------------------------------


def test_data_check_names_what_is_missing(root: Path, tmp_path: Path):
    statuses = {s.name: s for s in check_data_root(root)}
    assert statuses["inat18"].ok and statuses["cityscapes"].ok, statuses
    broken = tmp_path / "data"
    shutil.copytree(root, broken, ignore=shutil.ignore_patterns("*_labelTrainIds.png", "*.jpg"))
    (broken / "iNaturalist2018" / "val2018.json").unlink()
    statuses = {s.name: s for s in check_data_root(broken)}
    inat, city = statuses["inat18"], statuses["cityscapes"]
    assert f"missing file {broken / 'iNaturalist2018' / 'val2018.json'}" in inat.problems
    assert any("train images listed in train2018.json missing" in p for p in inat.problems)
    assert any(p.startswith("24 of 24 train images have no *_gtFine_labelTrainIds.png") and
               "densecl-bench data cityscapes-trainids" in p for p in city.problems)


def _context(root: Path, tmp_path: Path, cfg: dict, ckpt: LoadedCheckpoint) -> RunContext:
    return RunContext(backbone=tiny_backbone(), checkpoint=ckpt, data_root=root, demo=True, device=CPU,
                      run_dir=tmp_path / "run", cache_dir=tmp_path / "cache", config={**cfg, "world_size": 1},
                      num_workers=0)


TINY_CKPT = LoadedCheckpoint(state_dict={}, arch="resnet18", layout="random", sha256="0" * 64, path="random")


def test_inat_plugin_fills_feature1_to_5_and_checks_the_class_count(root: Path, tmp_path: Path):
    bench = Inat18Linear()
    assert all(p.exists() for p in bench.required_data(root))
    cfg = config.merge(config.load(INAT, "benchmarks", "demo"),
                       {"image_size": 16, "epochs": 1, "lr_steps": [], "eval_interval": 1})
    metrics = bench.run(_context(root, tmp_path, cfg, TINY_CKPT))
    assert [m.name for m in metrics] == list(LAYERS)
    assert all(m.benchmark == "inat18_linear" and 0 <= m.value <= 100 for m in metrics)
    with pytest.raises(DataLayoutError, match="12 categories in train2018.json, the protocol has 8142"):
        bench.run(_context(root, tmp_path, {**cfg, "num_classes": 8142}, TINY_CKPT))


def test_cityscapes_plugin_records_miou_over_19_classes(root: Path, tmp_path: Path):
    bench = CityscapesFcn()
    assert all(p.exists() for p in bench.required_data(root))
    small = tmp_path / "data"  # two train streets and one val street: a ResNet-50 D8 forward per window is slow
    for split, keep in (("train", 2), ("val", 1)):
        for image, label in cityscapes_pairs(dataset_dirs(root)["cityscapes"], split)[:keep]:
            for path in (image, label):
                target = small / path.relative_to(root)
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(path, target)
    cfg = {**config.load(CITYSCAPES, "benchmarks", "demo"), "max_iters": 1, "checkpoint_interval": 1, "crop_size": 32,
           "test_crop": [64, 64], "test_stride": [64, 64], "decode_channels": 8, "aux_channels": 8}  # 2 windows
    [metric] = bench.run(_context(small, tmp_path, cfg, load_checkpoint("random")))
    assert (metric.benchmark, metric.name, metric.extra["iter"]) == ("cityscapes_fcn", "mIoU", 1)
    iou = metric.extra["IoU"]
    assert list(iou) == list(CLASSES) and iou["road"] is not None  # road is in every demo street
    present = [v for v in iou.values() if v is not None]
    assert metric.value == pytest.approx(sum(present) / len(present))
