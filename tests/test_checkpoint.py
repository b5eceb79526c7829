"""Checkpoint layouts, strict verification, safe unpickling and export round trips.

Each builder writes the exact key layout its source saves (PROTOCOLS.md §1.4, §6.2), with
plain dict / tensor / numpy contents, and every one must load to the source backbone's tensors.
"""

import argparse
import hashlib
import logging
import os
import pickle
import re
import sys
import types
import warnings
from collections import OrderedDict

import numpy as np
import pytest
import torch
import torchvision

from densecl_bench.backbone import Backbone, random_state_dict
from densecl_bench.checkpoint import (
    CheckpointError,
    build_backbone,
    convert,
    describe,
    expected_shapes,
    export_checkpoint,
    extract_backbone,
    infer_arch,
    load_checkpoint,
)

torch.set_num_threads(1)


def source_backbone(arch: str = "resnet18", seed: int = 1) -> OrderedDict:
    """A backbone state dict where every tensor (BN running stats and counters too) is distinct."""
    g = torch.Generator().manual_seed(seed)
    sd = OrderedDict()
    for i, (k, v) in enumerate(Backbone(arch).state_dict().items()):
        if k.endswith("num_batches_tracked"):
            sd[k] = torch.tensor(1000 + i, dtype=torch.int64)
        elif k.endswith("running_var"):
            sd[k] = torch.rand(v.shape, generator=g) + 0.5
        else:
            sd[k] = torch.randn(v.shape, generator=g)
    return sd


@pytest.fixture(scope="module")
def src():
    return source_backbone("resnet18")


def prefixed(sd, prefix):
    return OrderedDict((prefix + k, v) for k, v in sd.items())


def d2_rename(key):
    """MoCo's convert-pretrain-to-detectron2.py renames, written out as that script does them."""
    if "layer" not in key:
        key = "stem." + key
    for t in [1, 2, 3, 4]:
        key = key.replace(f"layer{t}", f"res{t + 1}")
    for t in [1, 2, 3]:
        key = key.replace(f"bn{t}", f"conv{t}.norm")
    return key.replace("downsample.0", "shortcut").replace("downsample.1", "shortcut.norm")


def neck_mmss0(dim=512):
    """DenseCLNeck params (mlp.0/2 global, mlp2.0/2 dense 1x1 convs)."""
    return {
        "mlp.0.weight": torch.randn(dim, dim), "mlp.0.bias": torch.randn(dim),
        "mlp.2.weight": torch.randn(128, dim), "mlp.2.bias": torch.randn(128),
        "mlp2.0.weight": torch.randn(dim, dim, 1, 1), "mlp2.0.bias": torch.randn(dim),
        "mlp2.2.weight": torch.randn(128, dim, 1, 1), "mlp2.2.bias": torch.randn(128),
    }


def fake_optimizer(n=3):
    return {"state": {i: {"momentum_buffer": torch.randn(4)} for i in range(n)},
            "param_groups": [{"lr": 0.03, "momentum": 0.9, "weight_decay": 1e-4, "params": list(range(n))}]}


def mmss0_training(sd, with_backbone=True, meta=None):
    """mmcv runner `epoch_N.pth` of MMSelfSup 0.x / OpenSelfSup DenseCL (buffers first, then children)."""
    other = {k: torch.zeros_like(v) for k, v in sd.items()}  # encoder_k differs from the query encoder
    state = OrderedDict(queue=torch.randn(128, 64), queue_ptr=torch.zeros(1, dtype=torch.long),
                        queue2=torch.randn(128, 64), queue2_ptr=torch.zeros(1, dtype=torch.long))
    state.update(prefixed(sd, "encoder_q.0."))
    state.update(prefixed(neck_mmss0(), "encoder_q.1."))
    state.update(prefixed(other, "encoder_k.0."))
    state.update(prefixed(neck_mmss0(), "encoder_k.1."))
    if with_backbone:
        state.update(prefixed(sd, "backbone."))  # `self.backbone = self.encoder_q[0]`
    meta = meta or {"mmcv_version": "1.3.16", "time": "Mon Oct  4 2021", "epoch": 200, "iter": 1000400,
                    "config": "model = dict(type='DenseCL', ...)", "seed": 0, "exp_name": "densecl.py"}
    return {"meta": meta, "state_dict": state, "optimizer": fake_optimizer()}


def fake_mmengine_history_buffer(monkeypatch):
    """A class that pickles as mmengine.logging.history_buffer.HistoryBuffer (mmengine is not installed)."""
    names = ["mmengine", "mmengine.logging", "mmengine.logging.history_buffer"]
    for name in names:
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))

    class HistoryBuffer:
        def __init__(self):
            self.max_length = 1000000
            self._log_history = np.array([6.9, 6.8])
            self._count_history = np.array([1, 1])

    HistoryBuffer.__module__ = "mmengine.logging.history_buffer"
    HistoryBuffer.__qualname__ = "HistoryBuffer"
    sys.modules["mmengine.logging.history_buffer"].HistoryBuffer = HistoryBuffer
    return HistoryBuffer()


def mmss1_training(sd, history):
    """mmengine checkpoint of MMSelfSup 1.x DenseCL (EMA key encoder under encoder_k.module)."""
    state = OrderedDict(queue=torch.randn(128, 64), queue_ptr=torch.zeros(1, dtype=torch.long),
                        queue2=torch.randn(128, 64), queue2_ptr=torch.zeros(1, dtype=torch.long))
    state.update(prefixed(sd, "backbone."))
    state.update(prefixed(neck_mmss0(), "neck."))
    state.update(prefixed({k: torch.zeros_like(v) for k, v in sd.items()}, "encoder_k.module.0."))
    state.update(prefixed(neck_mmss0(), "encoder_k.module.1."))
    state["encoder_k.steps"] = torch.tensor([1000], dtype=torch.long)
    return {
        "meta": {"mmengine_version": "0.7.3", "epoch": 200, "iter": 1000800, "seed": 0,
                 "experiment_name": "densecl_resnet50", "cfg": "model = dict(type='DenseCL')",
                 "dataset_meta": {}},
        "state_dict": state,
        "message_hub": {"meta": {}, "log_scalars": {"train/loss": history},
                        "runtime_info": {"epoch": 200, "iter": 1000800, "max_epochs": 200},
                        "resumed_keys": {"train/loss": True}},
        "optimizer": fake_optimizer(),
        "param_schedulers": [{"T_max": 200, "eta_min": 0.0, "base_values": [0.03], "last_step": 200}],
    }


def moco_v2(sd, dim):
    """facebookresearch/moco main_moco.py: DDP module.encoder_q/encoder_k, MLP fc.0/fc.2, queue."""
    head = {"fc.0.weight": torch.randn(dim, dim), "fc.0.bias": torch.randn(dim),
            "fc.2.weight": torch.randn(128, dim), "fc.2.bias": torch.randn(128)}
    state = OrderedDict()
    state.update(prefixed({**sd, **head}, "module.encoder_q."))
    state.update(prefixed({k: torch.zeros_like(v) for k, v in {**sd, **head}.items()}, "module.encoder_k."))
    state["module.queue"] = torch.randn(128, 65536 // 512)
    state["module.queue_ptr"] = torch.zeros(1, dtype=torch.long)
    return {"epoch": 200, "arch": "resnet18", "state_dict": state, "optimizer": fake_optimizer()}


def solo_learn(sd):
    """Lightning checkpoint of a solo-learn BYOL model (backbone fc = Identity, so no fc keys)."""
    state = OrderedDict(prefixed(sd, "backbone."))
    state.update({"projector.0.weight": torch.randn(64, 512), "projector.0.bias": torch.randn(64),
                  "predictor.0.weight": torch.randn(64, 64), "classifier.weight": torch.randn(10, 512),
                  "classifier.bias": torch.randn(10)})
    state.update(prefixed({k: torch.zeros_like(v) for k, v in sd.items()}, "momentum_backbone."))
    state["momentum_projector.0.weight"] = torch.randn(64, 512)
    return {"epoch": 399, "global_step": 40000, "pytorch-lightning_version": "1.9.5", "state_dict": state,
            "loops": {"fit_loop": {"state_dict": {}}}, "callbacks": {}, "optimizer_states": [fake_optimizer()],
            "lr_schedulers": [{"last_epoch": 399}], "hparams_name": "kwargs",
            "hyper_parameters": {"cfg": argparse.Namespace(method="byol", backbone={"name": "resnet18"})}}


def lightly(sd):
    return {**prefixed(sd, "backbone."), "projection_head.layers.0.weight": torch.randn(64, 512)}


def timm_train(sd):
    """timm train.py CheckpointSaver: args is an argparse.Namespace."""
    return {"epoch": 99, "arch": "resnet18", "state_dict": {**sd, "fc.weight": torch.randn(1000, 512),
            "fc.bias": torch.randn(1000)}, "optimizer": fake_optimizer(), "version": 2,
            "args": argparse.Namespace(model="resnet18", lr=0.1), "metric": 71.2}


def d2_pkl(sd):
    model = {d2_rename(k): v.numpy() for k, v in sd.items()}
    model.update({"stem.fc.0.weight": np.zeros((512, 512), np.float32)})  # raw-MoCo conversion leftovers
    return {"model": model, "__author__": "MOCO", "matching_heuristics": True}


def d2_model_fpn(sd):
    model = {"backbone.bottom_up." + d2_rename(k): v for k, v in sd.items()}
    model.update({"backbone.fpn_lateral2.weight": torch.randn(256, 64, 1, 1),
                  "roi_heads.box_predictor.cls_score.weight": torch.randn(81, 1024)})
    return {"model": model, "iteration": 89999}


def d2_model_c4(sd):
    model = {}
    for k, v in sd.items():
        key = d2_rename(k)
        model[("roi_heads." if key.startswith("res5.") else "backbone.") + key] = v
    model["proposal_generator.rpn_head.conv.weight"] = torch.randn(256, 256, 3, 3)
    return {"model": model, "iteration": 23999}


LAYOUTS = {
    # name: (builder, expected layout, expected key prefix)
    "torchvision": (lambda sd: {**sd, "fc.weight": torch.randn(1000, 512), "fc.bias": torch.randn(1000)}, "torchvision", ""),
    "torchvision-no-fc": (lambda sd: dict(sd), "torchvision", ""),
    "extracted": (lambda sd: {"state_dict": dict(sd), "author": "MMSelfSup"}, "extracted-backbone", ""),
    "mmss0": (mmss0_training, "mmselfsup-0.x", "backbone."),
    "mmss0-encoder_q-only": (lambda sd: mmss0_training(sd, with_backbone=False), "mmselfsup-0.x", "encoder_q.0."),
    "openselfsup-densecl": (lambda sd: mmss0_training(sd, meta={"epoch": 200, "iter": 1000400}), "mmselfsup-0.x", "backbone."),
    "moco-v2": (lambda sd: moco_v2(sd, 512), "moco", "module.encoder_q."),
    "solo-learn": (solo_learn, "lightning", "backbone."),
    "lightly": (lightly, "backbone-prefixed", "backbone."),
    "timm": (timm_train, "timm", ""),
    "detectron2-model-fpn": (d2_model_fpn, "detectron2-model", "backbone.bottom_up."),
    "detectron2-model-c4": (d2_model_c4, "detectron2-model", "backbone."),
}


def assert_same_backbone(loaded, sd):
    assert list(loaded.state_dict) == list(sd)
    for k, v in sd.items():
        assert loaded.state_dict[k].dtype == v.dtype, k
        assert torch.equal(loaded.state_dict[k], v), k


def sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_each_layout_loads_the_source_tensors(name, src, tmp_path):
    builder, layout, prefix = LAYOUTS[name]
    path = tmp_path / f"{name}.pth"
    torch.save(builder(src), path)
    ckpt = load_checkpoint(path)
    assert (ckpt.layout, ckpt.prefix, ckpt.arch, ckpt.missing_keys) == (layout, prefix, "resnet18", [])
    assert ckpt.sha256 == sha(path)
    assert_same_backbone(ckpt, src)
    model = build_backbone(ckpt)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in src.items())


def test_mmengine_checkpoint_with_message_hub_loads_without_mmengine(src, tmp_path, monkeypatch):
    path = tmp_path / "epoch_200.pth"
    with monkeypatch.context() as m:
        torch.save(mmss1_training(src, fake_mmengine_history_buffer(m)), path)
    assert "mmengine" not in sys.modules
    ckpt = load_checkpoint(path)
    assert (ckpt.layout, ckpt.prefix) == ("mmselfsup-1.x", "backbone.")
    assert ckpt.meta["epoch"] == 200 and ckpt.meta["mmengine_version"] == "0.7.3"
    assert_same_backbone(ckpt, src)
    assert "mmengine" not in sys.modules  # stood in for, never imported


def test_detectron2_pkl_of_numpy_arrays(src, tmp_path):
    path = tmp_path / "moco_r18.pkl"
    with open(path, "wb") as f:
        pickle.dump(d2_pkl(src), f)
    ckpt = load_checkpoint(path)
    assert (ckpt.layout, ckpt.container, ckpt.meta["__author__"]) == ("detectron2", ["model"], "MOCO")
    assert ckpt.ignored_keys == ["stem.fc.0.weight"]
    assert_same_backbone(ckpt, src)


def test_detectron2_pkl_written_by_numpy_1(src, tmp_path):
    """Released .pkl files name numpy.core.multiarray (numpy < 2); they load, without warnings.

    Protocol 2 (module names as plain text lines; bytes via _codecs.encode) as older tools wrote.
    """
    raw = pickle.dumps(d2_pkl(src), protocol=2)
    assert b"numpy._core.multiarray" in raw
    path = tmp_path / "old.pkl"
    path.write_bytes(raw.replace(b"numpy._core.multiarray", b"numpy.core.multiarray"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ckpt = load_checkpoint(path)
    assert_same_backbone(ckpt, src)


def test_mmss0_details_and_describe(src, tmp_path):
    path = tmp_path / "epoch_200.pth"
    torch.save(mmss0_training(src), path)
    ckpt = load_checkpoint(path)
    # queues (4) + encoder_q.0 (120) + encoder_q.1 (8) + encoder_k.0 (120) + encoder_k.1 (8)
    assert len(ckpt.ignored_keys) == 4 + 120 + 8 + 120 + 8
    assert ckpt.meta["epoch"] == 200 and ckpt.container == ["state_dict"]
    text = describe(ckpt)
    assert "layout:   mmselfsup-0.x" in text
    assert "100/100 backbone tensors" in text and "20/20 num_batches_tracked" in text
    assert f"sha256:   {sha(path)}" in text
    assert "encoder_k.0.* (120)" in text and "encoder_q.1.* (8)" in text and "queue (1)" in text
    assert "status:   complete" in text


def test_resnet50_mmss0_checkpoint_and_extract_backbone(tmp_path):
    sd = source_backbone("resnet50", seed=2)
    ckpt_path = tmp_path / "densecl_r50_epoch_200.pth"
    ckpt = mmss0_training(sd)
    ckpt["state_dict"].update(prefixed(neck_mmss0(2048), "encoder_q.1."))
    torch.save(ckpt, ckpt_path)
    out = tmp_path / "backbone.pth"
    loaded = convert(ckpt_path, None, out, extract_backbone=True)
    assert loaded.arch == "resnet50" and "265/265 backbone tensors" in describe(loaded)
    extracted = torch.load(out, weights_only=True)
    assert set(extracted) == {"state_dict", "author"}
    assert list(extracted["state_dict"]) == list(sd)  # no prefix: the extracted-backbone layout
    again = load_checkpoint(out)
    assert again.layout == "extracted-backbone"
    assert_same_backbone(again, sd)


def test_extract_backbone_function(src, tmp_path):
    path = tmp_path / "epoch_1.pth"
    torch.save(mmss0_training(src, with_backbone=False), path)
    extract_backbone(path, tmp_path / "bb.pth")
    assert_same_backbone(load_checkpoint(tmp_path / "bb.pth"), src)


@pytest.mark.parametrize("arch", ["resnet18", "resnet34", "resnet50", "resnet101"])
def test_infer_arch_from_keys(arch):
    assert infer_arch(list(expected_shapes(arch))) == arch


def test_given_arch_that_does_not_match_fails(src, tmp_path):
    path = tmp_path / "r18.pth"
    torch.save(src, path)
    assert load_checkpoint(path, arch="resnet18").arch == "resnet18"
    with pytest.raises(CheckpointError, match=r"arch 'resnet34' was given but the checkpoint holds a resnet18 \(BasicBlocks, 2 blocks"):
        load_checkpoint(path, arch="resnet34")
    with pytest.raises(CheckpointError, match="holds a resnet18"):
        load_checkpoint(path, arch="resnet50")


def test_partial_checkpoint_fails_naming_missing_keys(src, tmp_path):
    partial = {k: v for k, v in src.items() if not k.startswith("layer4.1.")}
    path = tmp_path / "partial.pth"
    torch.save({"state_dict": prefixed(partial, "backbone."), "meta": {"mmcv_version": "1.3.0"}}, path)
    missing = [k for k in src if k.startswith("layer4.1.") and not k.endswith("num_batches_tracked")]
    assert len(missing) == 10
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path)
    msg = str(err.value)
    assert "10 of 100 backbone tensors are missing" in msg
    assert all(k in msg for k in missing)
    assert str(path) in msg and "layout: mmselfsup-0.x" in msg


def test_allow_partial_loads_loudly(src, tmp_path, caplog):
    partial = {k: v for k, v in src.items() if not k.startswith("layer4.1.")}
    path = tmp_path / "partial.pth"
    torch.save(partial, path)
    with caplog.at_level(logging.WARNING, logger="densecl_bench.checkpoint"):
        ckpt = load_checkpoint(path, allow_partial=True)
    assert "PARTIAL CHECKPOINT" in caplog.text and "layer4.1.conv1.weight" in caplog.text
    assert ckpt.missing_keys == [k for k in src if k.startswith("layer4.1.") and not k.endswith("num_batches_tracked")]
    assert "INCOMPLETE" in describe(ckpt) and "missing:  10" in describe(ckpt)
    model = build_backbone(ckpt)
    init = random_state_dict("resnet18", seed=0)
    for k in src:
        if k.startswith("layer4.1."):
            assert model.state_dict()[k].shape == init[k].shape
        else:
            assert torch.equal(model.state_dict()[k], src[k]), k


def test_long_missing_list_is_summarised(src, tmp_path):
    path = tmp_path / "stem_only.pth"
    torch.save({k: v for k, v in src.items() if k.startswith(("conv1", "bn1", "layer3"))}, path)
    with pytest.raises(CheckpointError, match=r"are missing: .*, \.\.\. and \d+ more"):
        load_checkpoint(path)


def test_shape_mismatch_fails(src, tmp_path):
    bad = dict(src)
    bad["layer2.0.conv1.weight"] = torch.randn(128, 64, 1, 1)
    path = tmp_path / "bad.pth"
    torch.save(bad, path)
    with pytest.raises(CheckpointError, match=re.escape("layer2.0.conv1.weight: checkpoint (128, 64, 1, 1) vs resnet18 (128, 64, 3, 3)")):
        load_checkpoint(path, allow_partial=True)


def test_no_backbone_found(tmp_path):
    path = tmp_path / "vit.pth"
    torch.save({"state_dict": {"blocks.0.attn.qkv.weight": torch.zeros(3)}}, path)
    with pytest.raises(CheckpointError, match=r"no ResNet backbone found.*blocks\.0\.attn\.qkv\.weight"):
        load_checkpoint(path)


def test_random_checkpoint_weights_and_hash_follow_the_seed():
    ckpt = load_checkpoint("random", "resnet18")
    description = b"densecl-bench random init: arch=resnet18 seed=0 init=torchvision"
    assert (ckpt.layout, ckpt.sha256, ckpt.arch) == ("random", hashlib.sha256(description).hexdigest(), "resnet18")
    ref = random_state_dict("resnet18", seed=0)
    assert all(torch.equal(ckpt.state_dict[k], v) for k, v in ref.items())
    seeded = load_checkpoint("random", "resnet18", seed=3)
    assert seeded.sha256 == hashlib.sha256(description.replace(b"seed=0", b"seed=3")).hexdigest()
    assert not torch.equal(seeded.state_dict["conv1.weight"], ckpt.state_dict["conv1.weight"])
    assert torch.equal(seeded.state_dict["conv1.weight"], random_state_dict("resnet18", seed=3)["conv1.weight"])
    assert load_checkpoint("random").sha256 not in (ckpt.sha256, seeded.sha256)  # resnet50


def test_non_finite_tensors_are_refused_by_name(tmp_path):
    sd = torchvision.models.resnet18().state_dict()
    sd["layer2.0.bn1.running_var"][3] = float("nan")
    sd["fc.weight"][0, 0] = float("inf")  # not part of the backbone: ignored
    sd["conv1.weight"][0, 0, 0, :2] = float("inf")
    torch.save(sd, tmp_path / "diverged.pth")
    with pytest.raises(CheckpointError, match=r"2 backbone tensor\(s\) hold NaN or inf") as err:
        load_checkpoint(tmp_path / "diverged.pth")
    assert "conv1.weight (2 of 9408)" in str(err.value) and "layer2.0.bn1.running_var (1 of 128)" in str(err.value)
    with pytest.raises(CheckpointError, match="NaN or inf"):
        load_checkpoint(tmp_path / "diverged.pth", allow_partial=True)


def test_truncated_checkpoint_says_so(tmp_path):
    torch.save(torchvision.models.resnet18().state_dict(), tmp_path / "full.pth")
    data = (tmp_path / "full.pth").read_bytes()
    for name, cut in (("half.pth", len(data) // 2), ("tail.pth", len(data) - 100)):
        (tmp_path / name).write_bytes(data[:cut])
        with pytest.raises(CheckpointError, match="truncated or corrupt"):
            load_checkpoint(tmp_path / name)
    pickled = pickle.dumps({"conv1.weight": np.zeros(3)})
    (tmp_path / "cut.pkl").write_bytes(pickled[: len(pickled) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_checkpoint(tmp_path / "cut.pkl")


def test_convert_refuses_to_overwrite_its_input(tmp_path):
    src = tmp_path / "r18.pth"
    torch.save(torchvision.models.resnet18().state_dict(), src)
    before = src.read_bytes()
    (tmp_path / "link.pth").symlink_to(src)
    for out in (src, tmp_path / "." / "r18.pth", tmp_path / "link.pth"):
        with pytest.raises(CheckpointError, match="the output is the input file"):
            convert(src, "torchvision", out)
    assert src.read_bytes() == before


# ------------------------------------------------------------------------------------ safety


class WritesMarker:
    """Unpickling this calls open(marker, 'w'), creating the file: code execution, if allowed."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


class RunsShell:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_hostile_payload_is_live_under_plain_pickle(tmp_path):
    """Control: the payload used below really runs code when unpickled without restrictions."""
    marker = tmp_path / "control"
    pickle.loads(pickle.dumps(WritesMarker(marker))).close()
    assert marker.exists()


@pytest.mark.parametrize("payload,name", [(WritesMarker, "io.open"), (RunsShell, "system")])
def test_hostile_pkl_is_refused_without_running(payload, name, src, tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pkl"
    ckpt = d2_pkl(src)
    ckpt["model"]["stem.conv1.weight"] = payload(marker)
    with open(path, "wb") as f:
        pickle.dump(ckpt, f)
    with pytest.raises(CheckpointError, match=f"forbidden global.*{re.escape(name)}"):
        load_checkpoint(path)
    assert not marker.exists()


@pytest.mark.parametrize("payload,name", [(WritesMarker, "io.open"), (RunsShell, "system")])
def test_hostile_torch_file_is_refused_without_running(payload, name, src, tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": dict(src), "meta": {"hook": payload(marker)}}, path)
    with pytest.raises(CheckpointError, match=f"forbidden global.*{re.escape(name)}"):
        load_checkpoint(path)
    assert not marker.exists()


def test_hostile_legacy_torch_file_is_refused(src, tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil_legacy.pth"
    torch.save({"conv1.weight": src["conv1.weight"], "x": WritesMarker(marker)}, path, _use_new_zipfile_serialization=False)
    with pytest.raises(CheckpointError, match="forbidden global"):
        load_checkpoint(path)
    assert not marker.exists()


# ------------------------------------------------------------------------------------ export


def test_detectron2_export_follows_the_converter(src, tmp_path):
    out = export_checkpoint(src, "detectron2", tmp_path / "r18.pkl", author="MMSelfSup")
    with open(out, "rb") as f:
        obj = pickle.load(f)
    assert obj["__author__"] == "MMSelfSup" and obj["matching_heuristics"] is True
    model = obj["model"]
    assert set(model) == {d2_rename(k) for k in src}
    for key in ["stem.conv1.weight", "stem.conv1.norm.running_var", "res2.0.conv2.norm.weight",
                "res3.0.shortcut.weight", "res3.0.shortcut.norm.running_mean", "res5.1.conv1.weight"]:
        assert key in model
    assert all(isinstance(v, np.ndarray) for v in model.values())
    np.testing.assert_array_equal(model["res3.0.shortcut.norm.running_mean"], src["layer2.0.downsample.1.running_mean"].numpy())
    with pytest.raises(CheckpointError, match=r"must end in \.pkl"):
        export_checkpoint(src, "detectron2", tmp_path / "r18.pth")
    with pytest.raises(CheckpointError, match="unknown export format"):
        export_checkpoint(src, "caffe2", tmp_path / "x")


def test_round_trip_torchvision_detectron2_torchvision_is_bit_identical(tmp_path):
    sd = source_backbone("resnet50", seed=4)
    tv = tmp_path / "r50.pth"
    torch.save(sd, tv)
    convert(tv, "detectron2", tmp_path / "r50.pkl")
    convert(tmp_path / "r50.pkl", "torchvision", tmp_path / "r50_tv.pth")
    back = torch.load(tmp_path / "r50_tv.pth", weights_only=True)
    assert list(back) == list(sd)
    for k, v in sd.items():
        assert back[k].dtype == v.dtype and torch.equal(back[k], v), k
    assert back["bn1.num_batches_tracked"].dtype == torch.int64


def test_mmcv_export_and_convert_errors(src, tmp_path):
    export_checkpoint(src, "mmcv", tmp_path / "mmcv.pth", author="me")
    obj = torch.load(tmp_path / "mmcv.pth", weights_only=True)
    assert obj["author"] == "me" and list(obj["state_dict"]) == list(src)
    with pytest.raises(CheckpointError, match="cannot be combined"):
        convert(tmp_path / "mmcv.pth", "detectron2", tmp_path / "x.pkl", extract_backbone=True)
    with pytest.raises(CheckpointError, match="unknown target format"):
        convert(tmp_path / "mmcv.pth", None, tmp_path / "x.pth")
    with pytest.raises(CheckpointError, match="no such checkpoint file"):
        load_checkpoint(tmp_path / "absent.pth")
