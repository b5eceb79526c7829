"""Unreadable images under `on_bad_image` (issue 8 part 2): `skip` leaves them out of every benchmark and
counts them; `raise` stops with the path.

The backbone has non-zero BN biases, so a blank input still gives a non-zero feature: a placeholder
that leaked into a benchmark would change its numbers. The reference for every `skip` result is the
same benchmark on the dataset with those images removed from its lists.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from densecl_bench import config
from densecl_bench.backbone import Backbone, freeze
from densecl_bench.benchmarks.base import Benchmark, Metric, RunContext
from densecl_bench.benchmarks.knn import ImagenetKnn
from densecl_bench.benchmarks.voc07_svm import Voc07LowshotSvm, Voc07Svm
from densecl_bench.checkpoint import LoadedCheckpoint
from densecl_bench.data.base import BadImageError
from densecl_bench.data.layout import VOC_CLASSES

CPU = torch.device("cpu")
CORRUPT = b"not a jpeg"


pytestmark = pytest.mark.usefixtures("one_thread")


def biased_backbone() -> Backbone:
    """A seeded resnet18 whose BN layers add a bias: zero in, non-zero out."""
    torch.manual_seed(0)
    backbone = Backbone("resnet18")
    for module in backbone.modules():
        if isinstance(module, nn.BatchNorm2d):
            nn.init.uniform_(module.bias, 0.05, 0.3)
    return freeze(backbone)


def test_biased_backbone_maps_a_blank_image_to_a_non_zero_feature():
    with torch.inference_mode():
        assert biased_backbone()(torch.zeros(1, 3, 64, 64), ["feature5"])["feature5"].abs().sum() > 0


def _image(path: Path, cls: int, rng: np.random.Generator) -> None:
    arr = rng.integers(0, 256, (48, 48, 3)).astype(np.float64)
    arr[..., cls % 3] = 0.5 * arr[..., cls % 3] + 20 * (cls % 7)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr.clip(0, 255).astype(np.uint8)).save(path, quality=90)


def write_voc(root: Path, splits: dict[str, int], drop: dict[str, int], corrupt: bool) -> None:
    """A VOC2007 classification layout: image i of a split shows class i % 20 (1), every other class -1.

    The image `drop[split]` is written corrupt (`corrupt`) or left out of the split's lists.
    """
    voc = root / "VOCdevkit" / "VOC2007"
    rng = np.random.default_rng(0)
    main = voc / "ImageSets" / "Main"
    main.mkdir(parents=True)
    for split, n in splits.items():
        ids = [f"{split}{i:03d}" for i in range(n)]
        for i, image_id in enumerate(ids):
            _image(voc / "JPEGImages" / f"{image_id}.jpg", i % 20, rng)
        bad = ids[drop[split]]
        if corrupt:
            (voc / "JPEGImages" / f"{bad}.jpg").write_bytes(CORRUPT)
        listed = [(i, image_id) for i, image_id in enumerate(ids) if corrupt or image_id != bad]
        for c, cls in enumerate(VOC_CLASSES):
            lines = [f"{image_id} {1 if i % 20 == c else -1}" for i, image_id in listed]
            (main / f"{cls}_{split}.txt").write_text("\n".join(lines) + "\n")


def write_imagenet(root: Path, splits: dict[str, int], drop: dict[str, tuple[int, int]], corrupt: bool) -> None:
    """Four class folders per split, `splits[split]` images each; `drop[split]` = (class, image)."""
    rng = np.random.default_rng(1)
    for split, n in splits.items():
        for c in range(4):
            for i in range(n):
                path = root / "imagenet" / split / f"n0{c}" / f"{i:03d}.JPEG"
                _image(path, c, rng)
                if (c, i) == drop[split]:
                    if corrupt:
                        path.write_bytes(CORRUPT)
                    else:
                        path.unlink()


def run(bench: Benchmark, root: Path, tmp_path: Path, on_bad_image: str, **overrides) -> tuple[list[Metric], RunContext]:
    cfg = config.merge(config.load(bench.config, "benchmarks", "demo"),
                       {"image_size": 64, "batch_size": 1, "world_size": 1, **overrides})
    ckpt = LoadedCheckpoint(state_dict={}, arch="resnet18", layout="random", sha256="b" * 64, path="random")
    ctx = RunContext(backbone=biased_backbone(), checkpoint=ckpt, data_root=root, demo=True, device=CPU,
                     run_dir=tmp_path / "run", cache_dir=tmp_path / "cache", config=cfg, num_workers=0,
                     on_bad_image=on_bad_image)
    return bench.run(ctx), ctx


def assert_same_metrics(got: list[Metric], expected: list[Metric]) -> None:
    assert [(m.name, m.value) for m in got] == [(m.name, m.value) for m in expected]
    for a, b in zip(got, expected):
        assert a.extra.get("per_class_ap") == b.extra.get("per_class_ap")
        assert a.extra.get("top5") == b.extra.get("top5")


VOC_SPLITS = {"trainval": 60, "test": 40}
VOC_DROP = {"trainval": 5, "test": 7}
SVM = {"layers": ["feature5"]}
LOWSHOT = {"layers": ["feature5"], "ks": [1, 2], "samples": 2}


@pytest.mark.parametrize(("bench", "overrides"), [(Voc07Svm(), SVM), (Voc07LowshotSvm(), LOWSHOT)],
                         ids=["svm", "lowshot"])
def test_svm_under_skip_equals_svm_without_the_images(bench, overrides, tmp_path):
    write_voc(tmp_path / "bad", VOC_SPLITS, VOC_DROP, corrupt=True)
    write_voc(tmp_path / "removed", VOC_SPLITS, VOC_DROP, corrupt=False)
    skipped, ctx = run(bench, tmp_path / "bad", tmp_path / "a", "skip", **overrides)
    expected, _ = run(bench, tmp_path / "removed", tmp_path / "b", "skip", **overrides)
    assert_same_metrics(skipped, expected)
    assert ctx.skipped_images == {"voc07_trainval": [5], "voc07_test": [7]}
    with pytest.raises(BadImageError, match="trainval005.jpg"):
        run(bench, tmp_path / "bad", tmp_path / "c", "raise", **overrides)


def test_knn_under_skip_equals_knn_without_the_images(tmp_path):
    splits, drop = {"train": 6, "val": 3}, {"train": (1, 2), "val": (2, 0)}
    write_imagenet(tmp_path / "bad", splits, drop, corrupt=True)
    write_imagenet(tmp_path / "removed", splits, drop, corrupt=False)
    ks = {"ks": [1, 3, 5]}
    skipped, ctx = run(ImagenetKnn(), tmp_path / "bad", tmp_path / "a", "skip", **ks)
    expected, _ = run(ImagenetKnn(), tmp_path / "removed", tmp_path / "b", "skip", **ks)
    assert_same_metrics(skipped, expected)
    assert ctx.skipped_images == {"imagenet_train": [8], "imagenet_val": [6]}  # class-major order
    with pytest.raises(BadImageError, match="002.JPEG"):
        run(ImagenetKnn(), tmp_path / "bad", tmp_path / "c", "raise", **ks)


def test_extract_command_skips_on_request_and_the_sidecar_lists_the_rows(tmp_path):
    from click.testing import CliRunner

    from densecl_bench.cli import main

    write_imagenet(tmp_path, {"val": 1}, {"val": (2, 0)}, corrupt=True)
    args = ["extract", "--ckpt", "random", "--dataset", "imagenet", "--split", "val", "--data-root", str(tmp_path),
            "--layers", "feature5", "--pooling", "global", "--size", "64", "--workers", "0"]
    strict = CliRunner().invoke(main, args)
    assert strict.exit_code == 2 and "n02/000.JPEG" in strict.output and "--skip-bad-images" in strict.output
    lenient = CliRunner().invoke(main, [*args, "--skip-bad-images"])
    assert lenient.exit_code == 0, lenient.output
    line = next(line for line in lenient.output.splitlines() if line.startswith("feature5:"))
    assert line.split()[:4] == ["feature5:", "4", "x", "2048"]  # every row kept: row i is image i
    assert json.loads(Path(line.split()[-1]).with_suffix(".json").read_text()) == {"n": 4, "bad_indices": [2]}


class SpyBackbone(Backbone):
    """Counts the images it is given and the blank placeholders among them (all-zero after normalisation)."""

    def __init__(self) -> None:
        super().__init__("resnet18")
        self.seen, self.blank = 0, 0

    def forward(self, x, layers=("feature1", "feature2", "feature3", "feature4", "feature5")):
        self.seen += len(x)
        self.blank += int((x.flatten(1).abs().sum(1) == 0).sum())
        return super().forward(x, layers)


def test_linear_probes_under_skip_never_see_the_images_and_report_them(tmp_path):
    from densecl_bench.benchmarks.linear import ImagenetLinear

    splits, drop = {"train": 4, "val": 2}, {"train": (1, 2), "val": (3, 1)}
    write_imagenet(tmp_path, splits, drop, corrupt=True)
    cfg = config.merge(config.load(ImagenetLinear.config, "benchmarks", "demo"),
                       {"image_size": 16, "epochs": 2, "lr_steps": [], "total_batch_size": 4, "batch_size_per_gpu": 4,
                        "eval_interval": 1, "world_size": 1})
    avg_name = ImagenetLinear.extra_configs[0]
    ckpt = LoadedCheckpoint(state_dict={}, arch="resnet18", layout="random", sha256="b" * 64, path="random")
    backbone = SpyBackbone()
    ctx = RunContext(backbone=freeze(backbone), checkpoint=ckpt, data_root=tmp_path, demo=True, device=CPU,
                     run_dir=tmp_path / "run", cache_dir=tmp_path / "cache", config=cfg, num_workers=0,
                     on_bad_image="skip",
                     configs={avg_name: {**config.load(avg_name, "benchmarks", "demo"), "world_size": 1}})
    bench = ImagenetLinear()
    metrics = bench.run(ctx)
    assert backbone.blank == 0 and backbone.seen > 0  # no placeholder reached the backbone, in training or eval
    assert ctx.skipped_images == {"imagenet_train": [6], "imagenet_val": [7]}
    assert {m.name for m in metrics} == {"feature1", "feature2", "feature3", "feature4", "feature5", "avgpool"}
    ctx.on_bad_image, ctx.run_dir = "raise", tmp_path / "run2"
    with pytest.raises(BadImageError, match="002.JPEG"):
        bench.run(ctx)


def _pretrain_images(root: Path, n: int = 12) -> list[Path]:
    rng = np.random.default_rng(2)
    paths = [root / f"{i:03d}.jpg" for i in range(n)]
    for i, path in enumerate(paths):
        _image(path, i % 3, rng)
    return paths


def test_pretraining_under_skip_samples_the_next_readable_image_instead(tmp_path):
    """A full batch is kept (the queues need it): the slot of the unreadable image 4 trains on image 5."""
    from test_pretrain import tiny_cfg

    from densecl_bench.data.base import ImageList
    from densecl_bench.pretrain.augment import TwoViewDataset, mocov2
    from densecl_bench.pretrain.train import train

    paths = _pretrain_images(tmp_path)
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(CORRUPT)
    labels = np.zeros(len(paths), np.int64)
    bad = ImageList("bad", tmp_path, [*paths[:4], broken, *paths[5:]], labels, ["x"])
    substituted = ImageList("sub", tmp_path, [*paths[:4], paths[5], *paths[5:]], labels, ["x"])

    views = TwoViewDataset(bad, mocov2(32), seed=3, on_bad_image="skip")[(4, 1)]
    expected = TwoViewDataset(substituted, mocov2(32), seed=3)[(4, 1)]
    assert all(torch.equal(a, b) for a, b in zip(views, expected))
    with pytest.raises(BadImageError, match="broken.jpg"):
        TwoViewDataset(bad, mocov2(32), seed=3)[(4, 1)]
    with pytest.raises(BadImageError, match="none of its 1 images"):
        TwoViewDataset(ImageList("b", tmp_path, [broken], labels[:1], ["x"]), mocov2(32), on_bad_image="skip")[(0, 0)]

    skip_cfg = tiny_cfg(epochs=1, data={"on_bad_image": "skip"})
    got = torch.load(train(skip_cfg, bad, tmp_path / "skip"), weights_only=True)["state_dict"]
    want = torch.load(train(tiny_cfg(epochs=1), substituted, tmp_path / "sub"), weights_only=True)["state_dict"]
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)
    with pytest.raises(BadImageError, match="broken.jpg"):
        train(tiny_cfg(epochs=1), bad, tmp_path / "raise")
