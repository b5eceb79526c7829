"""Linear probes (PROTOCOLS.md §4): head dims, frozen backbone, schedules, batch plans, Lighting,
resume, the plugins, and 2-process gloo DDP against 1 process. Tiny: resnet18, 16 px images."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DistributedSampler

from densecl_bench import config, linear
from densecl_bench.engine import LRSchedule, NonFiniteLoss, ResumeKey
from densecl_bench.backbone import LAYERS, Backbone, freeze, pool_feature
from densecl_bench.benchmarks.base import RunContext
from densecl_bench.checkpoint import LoadedCheckpoint
from densecl_bench.data.augment import IMAGENET_EIGVAL, IMAGENET_EIGVEC, Lighting, build_train
from densecl_bench.data.base import ImageList
from densecl_bench.linear import ProbeHeads, Recipe, plan_batch, train_probe

CPU = torch.device("cpu")
IN_MHEAD = "resnet50_mhead_linear-8xb32-steplr-90e_in1k"
IN_AVGPOOL = "resnet50_linear-8xb32-steplr-100e_in1k"
PLACES = "resnet50_mhead_8xb32-steplr-28e_places205"


pytestmark = pytest.mark.usefixtures("one_thread")


def write_images(folder: Path, n: int, classes: int, seed: int, size: int = 20) -> ImageList:
    """Noisy colour-coded images: learnable but not trivially, so accuracies stay informative."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths, labels = [], []
    for i in range(n):
        label = i % classes
        arr = rng.integers(0, 256, (size, size, 3)).astype(np.float64)
        arr[..., label % 3] = 0.5 * arr[..., label % 3] + 80
        path = folder / f"{i:03d}.png"
        Image.fromarray(arr.clip(0, 255).astype(np.uint8)).save(path)
        paths.append(path)
        labels.append(label)
    return ImageList(folder.name, folder, paths, np.array(labels, np.int64), [f"c{k}" for k in range(classes)])


def tiny_recipe(**overrides) -> Recipe:
    base = Recipe(
        head="multi", layers=LAYERS, pooling="adaptive", image_size=16, train_aug="imagenet_mhead",
        test_aug="center_crop", lr=0.01, momentum=0.9, nesterov=True, weight_decay=1e-4, lr_steps=(1,),
        lr_gamma=0.1, epochs=2, total_batch_size=8, batch_size_per_gpu=8, batch_policy="accumulate",
        eval_interval=1, final_eval=True,
    )
    return replace(base, **overrides)


def tiny_backbone(seed: int = 0) -> Backbone:
    """resnet18 with non-trivial BN running statistics, so eval vs train mode would show."""
    torch.manual_seed(seed)
    net = Backbone("resnet18")
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 2.0)
    return freeze(net)


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> tuple[ImageList, ImageList]:
    root = tmp_path_factory.mktemp("toy")
    return write_images(root / "train", 24, 3, seed=0), write_images(root / "val", 12, 3, seed=1)


# --- heads --------------------------------------------------------------------------------------


def test_resnet50_head_dims_at_224():
    """PROTOCOLS.md §2.2 / §4.1: 9216 / 9216 / 8192 / 9216 / 8192 inputs, and 2048 for AvgPool."""
    backbone = freeze(Backbone("resnet50"))
    heads = ProbeHeads(backbone.channels, LAYERS, 1000, "protocol", norm=True)
    expected = {"feature1": 9216, "feature2": 9216, "feature3": 8192, "feature4": 9216, "feature5": 8192}
    assert {name: heads.fcs[name].in_features for name in LAYERS} == expected
    with torch.inference_mode():
        feats = backbone(torch.randn(1, 3, 224, 224))
        pooled = heads.pool(feats)
        logits = heads.eval()(pooled)
    for name in LAYERS:
        assert pooled[name].flatten(1).shape == (1, expected[name])
        # the (C, g, g) view flattens back to exactly the protocol pooling's vector
        assert torch.equal(pooled[name].flatten(1), pool_feature(feats[name], name, "protocol"))
        assert logits[name].shape == (1, 1000)
        assert heads.norms[name].num_features == backbone.channels[name] and not heads.norms[name].affine
        assert heads.norms[name].momentum == 0.1
    avg = ProbeHeads(backbone.channels, ["feature5"], 1000, "global", norm=False)
    assert avg.fcs["feature5"].in_features == 2048 and isinstance(avg.norms["feature5"], torch.nn.Identity)


def test_head_init_normal_001_zero_bias():
    heads = linear.build_heads(tiny_recipe(), Backbone("resnet18"), 1000, seed=0)  # feature1: 9216 inputs
    w = heads.fcs["feature1"].weight
    assert abs(w.std().item() - 0.01) < 5e-4 and abs(w.mean().item()) < 5e-4
    assert all(torch.count_nonzero(fc.bias) == 0 for fc in heads.fcs.values())


# --- recipes and schedules ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "lrs", "fixed"),
    [
        (IN_MHEAD, {0: 0.01, 29: 0.01, 30: 1e-3, 59: 1e-3, 60: 1e-4, 89: 1e-4},
         dict(epochs=90, nesterov=True, weight_decay=1e-4, momentum=0.9, pooling="protocol", eval_interval=10)),
        (PLACES, {0: 0.01, 6: 0.01, 7: 1e-3, 14: 1e-4, 20: 1e-4, 21: 1e-5, 27: 1e-5},
         dict(epochs=28, nesterov=True, weight_decay=1e-4, momentum=0.9, train_aug="places205", final_eval=True)),
        (IN_AVGPOOL, {0: 30.0, 59: 30.0, 60: 3.0, 79: 3.0, 80: 0.3, 99: 0.3},
         dict(epochs=100, nesterov=False, weight_decay=0.0, momentum=0.9, head="avgpool", pooling="global")),
    ],
)
def test_recipe_lr_at_chosen_epochs(name, lrs, fixed):
    recipe = Recipe.from_config(config.load(name, "benchmarks"))
    assert recipe.total_batch_size == 256 and recipe.batch_size_per_gpu == 32 and recipe.test_aug == "center_crop"
    for key, value in fixed.items():
        assert getattr(recipe, key) == value, key
    schedule = LRSchedule("step", total=recipe.epochs, steps=recipe.lr_steps, gamma=recipe.lr_gamma)
    for epoch, lr in lrs.items():
        assert schedule.lr(recipe.lr, epoch, epoch * 5004) == pytest.approx(lr, rel=1e-9), epoch


@pytest.mark.parametrize("name", [IN_MHEAD, IN_AVGPOOL, PLACES])
def test_demo_profiles_load(name):
    recipe = Recipe.from_config(config.load(name, "benchmarks", "demo"))
    assert recipe.image_size == 96 and recipe.pooling in ("adaptive", "global") and recipe.epochs <= 2


def test_bad_config_value_names_the_key():
    cfg = config.load(IN_MHEAD, "benchmarks")
    with pytest.raises(config.ConfigError, match="batch_policy"):
        Recipe.from_config({**cfg, "batch_policy": "hope"})
    with pytest.raises(config.ConfigError, match="weight_decay"):
        Recipe.from_config({**cfg, "weight_decay": "1e-4"})  # YAML 1.1 reads 1e-4 as a string


def test_batch_plan_accumulate_and_scale(caplog):
    recipe = Recipe.from_config(config.load(IN_MHEAD, "benchmarks"))
    assert plan_batch(recipe, 8) == linear.BatchPlan("accumulate", 8, 32, 1, 256, 0.01, False)
    with caplog.at_level(logging.WARNING, logger="densecl_bench.linear"):
        one = plan_batch(recipe, 1)
    assert (one.accumulate_steps, one.images_per_step, one.lr, one.deviates) == (8, 256, 0.01, True)
    assert "accumulating 8" in caplog.text
    scaled = plan_batch(replace(recipe, batch_policy="scale_lr"), 2)
    assert (scaled.accumulate_steps, scaled.images_per_step, scaled.lr) == (1, 64, pytest.approx(0.0025))
    # 24 per GPU does not divide 256: lowered to 16, accumulated 16 times (still 256 per step).
    odd = plan_batch(replace(recipe, batch_size_per_gpu=24), 1)
    assert (odd.batch_size_per_gpu, odd.accumulate_steps, odd.images_per_step, odd.deviates) == (16, 16, 256, True)
    # 16 GPUs x 32 = 512 > 256: 16 per GPU, one pass per step.
    wide = plan_batch(recipe, 16)
    assert (wide.batch_size_per_gpu, wide.accumulate_steps, wide.images_per_step) == (16, 1, 256)
    with pytest.raises(config.ConfigError, match="scale_lr"):
        plan_batch(recipe, 3)  # 256 images cannot be split over 3 processes


# --- augmentation -------------------------------------------------------------------------------


def test_lighting_matches_hand_computation():
    img = torch.rand(3, 5, 4)
    torch.manual_seed(7)
    out = Lighting(0.1)(img)
    torch.manual_seed(7)
    alpha = torch.normal(0.0, 0.1, size=(3,)).tolist()
    for c in range(3):
        shift = sum(IMAGENET_EIGVEC[c][j] * alpha[j] * IMAGENET_EIGVAL[j] for j in range(3))
        assert torch.allclose(out[c] - img[c], torch.full((5, 4), shift), atol=1e-6)
    assert torch.equal(Lighting(0.0)(img), img)


def test_train_augs_give_protocol_sizes():
    img = Image.new("RGB", (300, 260), (120, 30, 200))
    for name in ("imagenet_mhead", "imagenet_linear", "places205"):
        assert build_train(name, 224)(img).shape == (3, 224, 224)
    with pytest.raises(ValueError, match="train_aug"):
        build_train("nope")


# --- the training loop --------------------------------------------------------------------------


def test_backbone_stays_frozen_heads_train(toy, tmp_path):
    train, val = toy
    backbone = tiny_backbone()
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    result = train_probe(backbone, tiny_recipe(epochs=1), train, val, tmp_path / "ck.pth", device=CPU,
                         num_workers=0, progress=False)
    after = backbone.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # weights and BN running stats
    assert all(p.grad is None and not p.requires_grad for p in backbone.parameters())
    assert not backbone.training
    state = torch.load(tmp_path / "ck.pth", weights_only=True)
    assert state["state_dict"]["norms.feature3.num_batches_tracked"] == 3  # 24 images / 8: the heads' BN did train
    assert set(result.top1) == set(LAYERS) and all(0 <= v <= 100 for v in result.top1.values())
    assert all(result.top5[k] >= result.top1[k] for k in LAYERS)


def test_heads_learn_above_chance(tmp_path):
    """Every head learns: on 3 balanced classes (chance 33.3%) each scores >= 55% top-1 on 60 held-out images
    (>= 33 right: a head at chance gets there with probability 5e-4), and the training loss falls."""
    train, val = write_images(tmp_path / "train", 48, 3, seed=0), write_images(tmp_path / "val", 60, 3, seed=1)
    result = train_probe(tiny_backbone(), tiny_recipe(epochs=5, lr_steps=(3,)), train, val, tmp_path / "ck.pth",
                         device=CPU, num_workers=0, progress=False)
    assert all(result.top1[k] >= 55.0 for k in LAYERS), result.top1
    losses = [r["loss"] for r in result.history]
    assert losses[-1] < 0.75 * losses[0], losses


def test_loop_applies_schedule_and_accumulation(toy, tmp_path):
    train, val = toy
    recipe = tiny_recipe(epochs=3, lr_steps=(1, 2), batch_size_per_gpu=4, eval_interval=2, final_eval=False)
    result = train_probe(tiny_backbone(), recipe, train, val, tmp_path / "ck.pth", device=CPU, num_workers=0,
                         progress=False)
    assert [r["lr"] for r in result.history] == pytest.approx([0.01, 0.001, 0.0001])
    assert result.plan.accumulate_steps == 2 and result.evaluated_epoch == 2  # final_eval off: last eval at 2
    assert [("top1" in r) for r in result.history] == [False, True, False]
    state = torch.load(tmp_path / "ck.pth", weights_only=True)
    # 24 images / 4 per pass = 6 passes per epoch, 3 optimizer steps of 8 images: momentum buffers exist
    assert state["optimizer"]["param_groups"][0]["nesterov"] is True
    assert state["state_dict"]["norms.feature1.num_batches_tracked"] == 18


def test_resume_after_epoch_1_matches_uninterrupted(toy, tmp_path, monkeypatch):
    from densecl_bench.engine import checkpoint

    train, val = toy
    recipe = tiny_recipe(epochs=2)
    key = ResumeKey("sha", "fingerprint", 0, 1)
    full = train_probe(tiny_backbone(), recipe, train, val, tmp_path / "a.pth", device=CPU, key=key,
                       num_workers=0, progress=False)

    real_save = checkpoint.atomic_torch_save

    def save_then_die(path, obj):
        real_save(path, obj)
        raise KeyboardInterrupt  # killed right after epoch 1's checkpoint

    monkeypatch.setattr(checkpoint, "atomic_torch_save", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        train_probe(tiny_backbone(), recipe, train, val, tmp_path / "b.pth", device=CPU, key=key,
                    num_workers=0, progress=False)
    assert torch.load(tmp_path / "b.pth", weights_only=True)["meta"]["epoch"] == 1
    monkeypatch.setattr(checkpoint, "atomic_torch_save", real_save)
    # a different number of loader workers must not matter either: augmentation is seeded per sample
    resumed = train_probe(tiny_backbone(), recipe, train, val, tmp_path / "b.pth", device=CPU, key=key,
                          num_workers=1, progress=False)
    assert resumed.resumed_from_epoch == 1
    a = torch.load(tmp_path / "a.pth", weights_only=True)
    b = torch.load(tmp_path / "b.pth", weights_only=True)
    assert a["meta"]["epoch"] == b["meta"]["epoch"] == 2
    for k in a["state_dict"]:
        assert torch.equal(a["state_dict"][k], b["state_dict"][k]), k
    assert resumed.top1 == full.top1 and resumed.top5 == full.top5
    assert resumed.history == full.history  # per-epoch losses, LRs and evaluations
    assert (tmp_path / "a.metrics.jsonl").read_text() == (tmp_path / "b.metrics.jsonl").read_text()

    done = train_probe(tiny_backbone(), recipe, train, val, tmp_path / "b.pth", device=CPU, key=key,
                       num_workers=0, progress=False)
    assert done.resumed_from_epoch == 2 and done.top1 == full.top1  # a finished probe just reports
    other = train_probe(tiny_backbone(), replace(recipe, epochs=1), train, val, tmp_path / "b.pth", device=CPU,
                        key=replace(key, fingerprint="other"), num_workers=0, progress=False)
    assert other.resumed_from_epoch == 0  # a checkpoint of another key is not resumed


def test_nan_loss_stops_with_clear_error(toy, tmp_path):
    train, val = toy
    backbone = tiny_backbone()
    backbone.layer4[1].bn2.running_var.fill_(float("nan"))
    # layer4 is broken: only the feature5 head's loss is NaN, and the message says so
    with pytest.raises(NonFiniteLoss, match=r"loss is nan at iteration 1 .*loss\.feature4 [\d.]+, loss\.feature5 nan"):
        train_probe(backbone, tiny_recipe(epochs=1), train, val, tmp_path / "ck.pth", device=CPU,
                    num_workers=0, progress=False)


# --- the plugins --------------------------------------------------------------------------------


def test_imagenet_plugin_fills_feature_and_avgpool_columns(tmp_path):
    from densecl_bench.benchmarks.linear import ImagenetLinear

    root = tmp_path / "data"
    for split, n in (("train", 4), ("val", 2)):
        for k in range(2):
            write_images(root / "imagenet" / split / f"n0{k}", n, 1, seed=10 * k + n)
    cfg = config.merge(config.load(IN_MHEAD, "benchmarks", "demo"),
                       {"image_size": 16, "epochs": 1, "lr_steps": [], "total_batch_size": 8,
                        "batch_size_per_gpu": 8, "eval_interval": 1, "world_size": 1})
    ckpt = LoadedCheckpoint(state_dict={}, arch="resnet18", layout="random", sha256="0" * 64, path="random")
    ctx = RunContext(backbone=tiny_backbone(), checkpoint=ckpt, data_root=root, demo=True, device=CPU,
                     run_dir=tmp_path / "run", cache_dir=tmp_path / "cache", config=cfg, num_workers=0,
                     configs={IN_AVGPOOL: {**config.load(IN_AVGPOOL, "benchmarks", "demo"), "world_size": 1}})
    bench = ImagenetLinear()
    assert all(p.exists() for p in bench.required_data(root))
    metrics = bench.run(ctx)
    assert [m.name for m in metrics] == [*LAYERS, "avgpool"]
    assert all(m.benchmark == "imagenet_linear" and 0 <= m.value <= 100 for m in metrics)
    assert metrics[0].extra["config"] == IN_MHEAD and metrics[-1].extra["config"] == IN_AVGPOOL
    assert metrics[-1].extra["batch_policy"] == "accumulate" and "top5" in metrics[-1].extra
    assert (ctx.run_dir / "mhead_last.pth").is_file() and (ctx.run_dir / "avgpool_last.pth").is_file()


# --- DDP ----------------------------------------------------------------------------------------

WORKER = """
import json, sys, torch
from pathlib import Path
import numpy as np
from densecl_bench import dist
from densecl_bench.data.base import ImageList
from test_linear import tiny_backbone, tiny_recipe
from densecl_bench.linear import train_probe

torch.set_num_threads(1)
dist.init_from_env()
spec = json.loads(Path(sys.argv[1]).read_text())
lists = [ImageList(s["name"], Path(s["root"]), [Path(p) for p in s["paths"]], np.array(s["labels"]), s["classes"])
         for s in spec["lists"]]
res = train_probe(tiny_backbone(), tiny_recipe(**spec["recipe"]), *lists, Path(sys.argv[2]) / "ck.pth",
                  device=torch.device("cpu"), num_workers=0, on_bad_image="skip", progress=False)
if dist.is_main():
    (Path(sys.argv[2]) / "result.json").write_text(json.dumps({"top1": res.top1, "top5": res.top5,
                                                               "skipped": res.skipped}))
dist.close()
"""


@pytest.mark.parametrize("unreadable", [False, True], ids=["readable", "unreadable_skipped"])
def test_ddp_two_gloo_processes_match_one(toy, tmp_path, unreadable):
    """torchrun --nproc_per_node 2 on CPU: same global batches, SyncBN statistics and averaged gradients.

    With unreadable images skipped, rank 0's first pass is empty and rank 1's is full: the step must
    still weigh every readable image as one process does.
    """
    train, val = toy
    overrides = {"epochs": 2, "total_batch_size": 8, "batch_size_per_gpu": 4}  # 2 x 4 = 8 per step
    if unreadable:
        broken = tmp_path / "broken.png"
        broken.write_bytes(b"not a png")
        first_pass = list(DistributedSampler(range(len(train)), num_replicas=2, rank=0, seed=0))[:4]
        train = replace(train, paths=[broken if i in first_pass else p for i, p in enumerate(train.paths)])
        val = replace(val, paths=[broken if i == 3 else p for i, p in enumerate(val.paths)])
    spec = {
        "lists": [{"name": il.name, "root": str(il.root), "paths": [str(p) for p in il.paths],
                   "labels": il.labels.tolist(), "classes": il.classes} for il in (train, val)],
        "recipe": overrides,
    }
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    (tmp_path / "worker.py").write_text(textwrap.dedent(WORKER))
    out = tmp_path / "ddp"
    out.mkdir()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(tmp_path / "worker.py"), str(tmp_path / "spec.json"), str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = json.loads((out / "result.json").read_text())

    single = train_probe(tiny_backbone(), tiny_recipe(**{**overrides, "batch_size_per_gpu": 8}), train, val,
                         tmp_path / "one.pth", device=CPU, num_workers=0, on_bad_image="skip", progress=False)
    assert two["skipped"] == single.skipped == ({"train": sorted(first_pass), "val": [3]} if unreadable else {})
    for name in LAYERS:
        assert two["top1"][name] == pytest.approx(single.top1[name], abs=1e-6)
        assert two["top5"][name] == pytest.approx(single.top5[name], abs=1e-6)
    heads_two = torch.load(out / "ck.pth", weights_only=True)["state_dict"]
    heads_one = torch.load(tmp_path / "one.pth", weights_only=True)["state_dict"]
    for k in heads_one:
        assert torch.allclose(heads_two[k].double(), heads_one[k].double(), rtol=1e-4, atol=1e-5), k
