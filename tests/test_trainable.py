"""Plugins that fine-tune: a fresh trainable torchvision ResNet from the checkpoint (norm layer, frozen
stages, dilation), SyncBN only where it works, and the runner's check of the protocol's total batch."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn
from torchvision.ops import FrozenBatchNorm2d

from densecl_bench import dist, registry, runner
from densecl_bench.backbone import Backbone, freeze
from densecl_bench.benchmarks.base import Benchmark, Metric, RunContext
from densecl_bench.checkpoint import CheckpointError, LoadedCheckpoint, build_trainable, load_checkpoint
from densecl_bench.engine import ddp
from densecl_bench.results import Ledger, caveats


@pytest.fixture(scope="module")
def r50() -> LoadedCheckpoint:
    return load_checkpoint("random", arch="resnet50", seed=3)


def context(ckpt: LoadedCheckpoint, tmp_path: Path) -> RunContext:
    return RunContext(backbone=freeze(Backbone(ckpt.arch)), checkpoint=ckpt, data_root=tmp_path, demo=True,
                      device=torch.device("cpu"), run_dir=tmp_path, cache_dir=tmp_path, config={})


def assert_holds(net: nn.Module, ckpt: LoadedCheckpoint) -> None:
    state = net.state_dict()
    assert set(state) == set(ckpt.state_dict)
    for key, value in ckpt.state_dict.items():
        assert torch.equal(state[key], value), key


def test_the_d8_net_loads_the_checkpoint_strictly_and_has_output_stride_8(r50, tmp_path):
    net = context(r50, tmp_path).trainable_backbone(replace_stride_with_dilation=(False, True, True))
    assert_holds(net, r50)
    assert net.training and all(p.requires_grad for p in net.parameters())
    # mmseg ResNet-D8, block by block: strides (1, 2, 1, 1), dilations (1, 1, 2, 4), first block contracted
    stages = [net.layer1, net.layer2, net.layer3, net.layer4]
    assert [s[0].conv2.stride for s in stages] == [(1, 1), (2, 2), (1, 1), (1, 1)]
    assert [s[-1].conv2.dilation for s in stages] == [(1, 1), (1, 1), (2, 2), (4, 4)]
    assert [s[0].conv2.dilation for s in stages] == [(1, 1), (1, 1), (1, 1), (2, 2)]
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        res5 = net.layer4(net.layer3(net.layer2(net.layer1(net.maxpool(net.relu(net.bn1(net.conv1(x))))))))
    assert res5.shape == (1, 2048, 8, 8)  # 64 / 8


def test_every_call_is_a_fresh_copy_apart_from_the_frozen_backbone(r50, tmp_path):
    ctx = context(r50, tmp_path)
    one, two = ctx.trainable_backbone(), ctx.trainable_backbone()
    with torch.no_grad():
        one.conv1.weight.add_(1.0)
    assert_holds(two, r50)
    assert torch.equal(ctx.checkpoint.state_dict["conv1.weight"], two.conv1.weight)
    assert isinstance(one.fc, nn.Identity) and one(torch.randn(2, 3, 32, 32)).shape == (2, 2048)


def test_a_state_dict_that_does_not_fit_is_refused(r50):
    extra = LoadedCheckpoint({**r50.state_dict, "layer5.weight": torch.zeros(1)}, "resnet50", "torchvision",
                             "0" * 64, "x.pth")
    with pytest.raises(CheckpointError, match="unexpected layer5.weight"):
        build_trainable(extra)
    with pytest.raises(ValueError, match="frozen_stages"):
        build_trainable(r50, frozen_stages=5)


def test_frozen_stages_get_no_gradients_and_keep_the_checkpoint_statistics_in_train_mode(tmp_path):
    ckpt = load_checkpoint("random", arch="resnet18", seed=1)
    for key in [k for k in ckpt.state_dict if k.endswith("running_var")]:  # statistics a batch would not give
        ckpt.state_dict[key] = torch.full_like(ckpt.state_dict[key], 4.0)
    net = context(ckpt, tmp_path).trainable_backbone(frozen_stages=1)
    frozen = [net.conv1, net.bn1, net.layer1]
    assert not any(p.requires_grad for m in frozen for p in m.parameters())
    assert all(p.requires_grad for m in (net.layer2, net.layer3, net.layer4) for p in m.parameters())
    assert isinstance(net.bn1, FrozenBatchNorm2d) and isinstance(net.layer1[0].bn1, FrozenBatchNorm2d)
    assert isinstance(net.layer2[0].bn1, nn.BatchNorm2d)

    def res2(x):
        return net.layer1(net.maxpool(net.relu(net.bn1(net.conv1(x)))))

    x = torch.randn(4, 3, 32, 32)
    net.train()
    with torch.no_grad():
        trained = res2(x)
    eval_net = freeze(Backbone("resnet18"))
    eval_net.load_state_dict(ckpt.state_dict)
    with torch.no_grad():
        expected = eval_net(x, ["feature2"])["feature2"]
    torch.testing.assert_close(trained, expected)  # eval-mode BN, the checkpoint's statistics
    assert torch.equal(net.layer1[0].bn1.running_var, ckpt.state_dict["layer1.0.bn1.running_var"])


def test_syncbn_only_on_cuda_with_several_processes(r50, tmp_path, monkeypatch):
    net = context(r50, tmp_path).trainable_backbone(norm_layer=nn.SyncBatchNorm, frozen_stages=0)
    assert not any(isinstance(m, nn.SyncBatchNorm) for m in net.modules())  # CPU: plain BN
    monkeypatch.setattr(dist, "world_size", lambda: 2)
    assert ddp.sync_batchnorm(net, torch.device("cpu")) is net
    synced = ddp.sync_batchnorm(net, torch.device("cuda"))
    kinds = {type(m) for m in synced.modules()}
    assert nn.SyncBatchNorm in kinds and nn.BatchNorm2d not in kinds
    assert isinstance(synced.bn1, FrozenBatchNorm2d)  # a frozen stage stays frozen
    monkeypatch.setattr(dist, "world_size", lambda: 1)
    assert ddp.sync_batchnorm(net, torch.device("cuda")) is net


# ---------------------------------------------------------------- the total batch a protocol assumes


def batch_config(tmp_path: Path, name: str, **keys) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text("".join(f"{k}: {v}\n" for k, v in keys.items()))
    return path


def test_batch_mismatch_marks_what_accumulation_cannot_stand_in_for():
    def cfg(**kw):
        return {"total_batch_size": 16, "batch_size_per_gpu": 2, **kw}

    assert runner.batch_mismatch({"a": cfg(), "b": {"lr": 0.1}}, 8) == {}
    assert runner.batch_mismatch({"a": cfg()}, 1) == {"a": {"total_batch_size": 16, "world_size": 1,
                                                            "batch_size_per_gpu": 2}}
    assert runner.batch_mismatch({"a": cfg(batch_policy="accumulate", batch_statistics=False)}, 1) == {}
    for kw in ({"batch_policy": "accumulate"}, {"batch_policy": "accumulate", "batch_statistics": True},
               {"batch_policy": "scale_lr", "batch_statistics": False}):
        assert set(runner.batch_mismatch({"a": cfg(**kw)}, 1)) == {"a"}, kw


def test_shipped_linear_configs_are_marked_only_where_bn_sees_the_batch():
    configs, _ = runner.stage_protocol(registry.available()["imagenet_linear"], [], {})
    assert set(runner.batch_mismatch(configs, 1)) == {"resnet50_mhead_linear-8xb32-steplr-90e_in1k"}
    assert runner.batch_mismatch(configs, 8) == {}
    demo, _ = runner.stage_protocol(registry.available()["imagenet_linear"], ["demo"], {})
    assert runner.batch_mismatch(demo, 1) == {}


def test_the_runner_warns_records_and_marks_a_missed_total_batch(tmp_path, monkeypatch):
    cfg = batch_config(tmp_path, "finetune", total_batch_size=16, batch_size_per_gpu=2, lr=0.02)

    class Finetune(Benchmark):
        name, table, config = "voc12aug_fcn", "Segmentation: Pascal VOC 2012 + Aug", str(cfg)

        def required_data(self, data_root: Path) -> list[Path]:
            return []

        def run(self, ctx: RunContext) -> list[Metric]:
            return [Metric(self.name, "mIoU", 60.0)]

    monkeypatch.setattr(registry, "available", lambda: {Finetune.name: Finetune})
    said: list[str] = []
    runner.run_suite(["voc12aug_fcn"], "random", arch="resnet18", data_root=tmp_path, runs_dir=tmp_path / "runs",
                     run_id="r", echo=said.append)
    assert any("warning: finetune assumes a total batch of 16; 1 process(es) x 2 per GPU give 2 per pass" in s
               for s in said)
    record = Ledger(tmp_path / "runs" / "r").records()[0]
    assert record["provenance"]["batch_mismatch"] == {"finetune": {"total_batch_size": 16, "world_size": 1,
                                                                   "batch_size_per_gpu": 2}}
    assert caveats(record) == ["batch 1 x 2 per pass, not the 16 of finetune"]
    tables = (tmp_path / "runs" / "r" / "tables.md").read_text()
    assert "| random-init-resnet18 † | 60.00 |" in tables
    assert "† random-init-resnet18: batch 1 x 2 per pass, not the 16 of finetune." in tables
