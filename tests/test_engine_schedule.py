"""LR schedules with warm-up against hand-computed values, parameter groups, per-group base LRs."""

import math

import pytest
import torch
from torch import nn

from densecl_bench.config import ConfigError
from densecl_bench.engine.schedule import LRSchedule, LRScheduler, param_groups


def test_step_by_epoch_with_iteration_warmup():
    """mmdet Mask R-CNN 1x (PROTOCOLS.md §7.1): 12 epochs, x0.1 at 8 and 11, linear warm-up 1000 iters, ratio 0.001."""
    s = LRSchedule("step", total=12, by_epoch=True, steps=(8, 11), warmup_iters=1000, warmup_ratio=0.001)
    ipe = 500  # iterations per epoch
    assert s.lr(0.02, 0, 0) == pytest.approx(0.00002)  # 0.02 * 0.001
    assert s.lr(0.02, 0, 250) == pytest.approx(0.0050150)  # 0.02 * (1 - 0.75 * 0.999)
    assert s.lr(0.02, 1, ipe) == pytest.approx(0.010010)  # 0.02 * (1 - 0.5 * 0.999)
    assert s.lr(0.02, 2, 2 * ipe) == 0.02
    assert s.lr(0.02, 7, 8 * ipe - 1) == 0.02
    assert s.lr(0.02, 8, 8 * ipe) == pytest.approx(0.002)
    assert s.lr(0.02, 11, 11 * ipe) == pytest.approx(0.0002)


def test_multistep_by_iteration_with_warmup_matches_detectron2():
    """detectron2 C4 VOC (§6.1): base 0.02, steps 18000/22000, 24k iters, warm-up 100 iters, factor 0.001."""
    s = LRSchedule("step", total=24000, by_epoch=False, steps=(18000, 22000), warmup_iters=100, warmup_ratio=0.001)
    assert s.lr(0.02, 0, 0) == pytest.approx(0.00002)
    assert s.lr(0.02, 0, 50) == pytest.approx(0.010010)  # 0.02 * (0.001 * 0.5 + 0.5)
    assert s.lr(0.02, 0, 99) == pytest.approx(0.0198002)  # 0.02 * (0.001 * 0.01 + 0.99)
    assert s.lr(0.02, 0, 100) == 0.02
    assert s.lr(0.02, 0, 17999) == 0.02
    assert s.lr(0.02, 0, 18000) == pytest.approx(0.002)  # the step iteration already uses the new LR
    assert s.lr(0.02, 0, 22000) == pytest.approx(0.0002)
    assert s.lr(0.02, 0, 23999) == pytest.approx(0.0002)
    for i in (0, 1, 37, 99):  # detectron2's warm-up factor: f * (1 - a) + a, a = i / warmup_iters
        assert s.lr(0.02, 0, i) == pytest.approx(0.02 * (0.001 * (1 - i / 100) + i / 100), rel=1e-12)


def test_cosine_by_epoch_with_warmup():
    """MMSelfSup DenseCL (§1.3): lr 0.03, CosineAnnealing(min_lr=0) updated per epoch over 200 epochs."""
    s = LRSchedule("cosine", total=200, by_epoch=True, warmup_iters=10, warmup_ratio=0.1)
    assert s.lr(0.03, 0, 0) == pytest.approx(0.003)  # 0.03 * 0.1
    assert s.lr(0.03, 0, 5) == pytest.approx(0.0165)  # 0.03 * (1 - 0.5 * 0.9)
    assert s.lr(0.03, 0, 10) == 0.03
    assert s.lr(0.03, 50, 5000) == pytest.approx(0.025606602)  # 0.03 * (1 + cos(pi / 4)) / 2
    assert s.lr(0.03, 100, 10000) == pytest.approx(0.015)
    assert s.lr(0.03, 150, 15001) == pytest.approx(0.004393398)  # 0.03 * (1 - cos(pi / 4)) / 2
    assert s.lr(0.03, 100, 10000) == s.lr(0.03, 100, 10999)  # constant within the epoch


def test_cosine_by_iteration_with_min_lr():
    s = LRSchedule("cosine", total=1000, by_epoch=False, min_lr=0.001)
    assert s.lr(0.1, 0, 0) == pytest.approx(0.1)
    assert s.lr(0.1, 0, 250) == pytest.approx(0.0855017857)  # 0.001 + 0.099 * (1 + cos(pi / 4)) / 2
    assert s.lr(0.1, 0, 500) == pytest.approx(0.0505)
    assert s.lr(0.1, 0, 1000) == pytest.approx(0.001)


def test_poly_by_iteration_with_warmup():
    """mmseg FCN (§8): lr 0.01, poly power 0.9, min_lr 1e-4, per iteration, 20k iterations."""
    s = LRSchedule("poly", total=20000, by_epoch=False, power=0.9, min_lr=1e-4, warmup_iters=100, warmup_ratio=0.1)
    assert s.lr(0.01, 0, 10000) == pytest.approx(0.0054052785)  # 0.0099 * 0.5 ** 0.9 + 1e-4
    assert s.lr(0.01, 0, 19999) == pytest.approx(0.00010133263)  # 0.0099 * (1 / 20000) ** 0.9 + 1e-4
    assert s.lr(0.01, 0, 40) == pytest.approx(0.0045918019)  # (0.0099 * 0.998 ** 0.9 + 1e-4) * (1 - 0.6 * 0.9)
    assert s.lr(0.01, 0, 100) == pytest.approx(0.0099 * 0.995**0.9 + 1e-4)


def test_cosine_and_step_keep_the_replaced_loops_bits():
    """Pretraining's cosine (by epoch and by iteration) and the probes' step LR, bit for bit as the
    loops computed them before the port: base * 0.5 * (1 + cos(pi * t / T)) and base * 0.1 ** steps passed."""
    by_epoch = LRSchedule("cosine", total=200)
    by_iter = LRSchedule("cosine", total=200 * 37, by_epoch=False)
    for e in range(200):
        assert by_epoch.lr(0.03, e, e * 37) == 0.03 * 0.5 * (1.0 + math.cos(math.pi * (e / 200)))
        t = (e * 37 + 5) / (200 * 37)
        assert by_iter.lr(0.03, e, e * 37 + 5) == 0.03 * 0.5 * (1.0 + math.cos(math.pi * t))
    assert by_epoch.lr(0.03, 100, 0) == 0.015 and by_epoch.lr(0.03, 0, 0) == 0.03
    step = LRSchedule("step", total=90, steps=(30, 60, 90))
    for e in range(90):
        assert step.lr(0.01, e, e * 10) == 0.01 * 0.1 ** (0 if e < 30 else 1 if e < 60 else 2)


def test_bad_schedules_are_config_errors():
    with pytest.raises(ConfigError, match="must be one of"):
        LRSchedule("linear", total=10)
    with pytest.raises(ConfigError, match="increase"):
        LRSchedule("step", total=10, steps=(8, 3))
    with pytest.raises(ConfigError, match="warmup"):
        LRSchedule("step", total=10, warmup_iters=5, warmup_ratio=0.0)
    with pytest.raises(ConfigError, match="takes only"):
        LRSchedule.from_config({"kind": "poly", "gama": 0.1}, total=10)
    s = LRSchedule.from_config({"kind": "step", "by_epoch": False, "steps": [3, 6], "gamma": 0.5}, total=10)
    assert s.steps == (3, 6) and s.lr(1.0, 0, 6) == 0.25


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.head = nn.Linear(4, 2)


def test_param_groups_exclude_norm_and_bias_from_weight_decay():
    net = _Net()
    one = param_groups(net, 1e-4, base_lr=0.1)
    assert len(one) == 1 and one[0]["params"] == list(net.parameters()) and one[0]["weight_decay"] == 1e-4

    groups = param_groups(net, 1e-4, no_decay=("norm", "bias"), base_lr=0.1)
    by_wd = {g["weight_decay"]: g["params"] for g in groups}
    assert by_wd[1e-4] == [net.conv.weight, net.head.weight]
    assert by_wd[0.0] == [net.conv.bias, net.bn.weight, net.bn.bias, net.head.bias]

    norm_only = {g["weight_decay"]: g["params"] for g in param_groups(net, 1e-4, no_decay=("norm",), base_lr=0.1)}
    assert norm_only[0.0] == [net.bn.weight, net.bn.bias]

    mult = param_groups(net, 1e-4, lr_mult={"head": 10.0}, base_lr=0.1)
    assert [(g["lr"], len(g["params"])) for g in mult] == [(0.1, 4), (1.0, 2)]
    with pytest.raises(ConfigError, match="exclusions"):
        param_groups(net, 1e-4, no_decay=("bn",), base_lr=0.1)


def test_each_group_keeps_its_base_lr_also_after_loading_an_optimizer():
    net = _Net()
    opt = torch.optim.SGD(param_groups(net, 1e-4, lr_mult={"head": 10.0}, base_lr=0.1), lr=0.1, momentum=0.9)
    sched = LRScheduler(opt, LRSchedule("step", total=10, steps=(2,), warmup_iters=4, warmup_ratio=0.5))
    assert sched.set(0, 2) == pytest.approx([0.075, 0.75])  # base * (1 - 0.5 * 0.5)
    sched.set(3, 40)
    state = opt.state_dict()  # carries the decayed LRs of epoch 3
    fresh = torch.optim.SGD(param_groups(net, 1e-4, lr_mult={"head": 10.0}, base_lr=0.1), lr=0.1, momentum=0.9)
    resumed = LRScheduler(fresh, sched.schedule)
    fresh.load_state_dict(state)
    assert resumed.set(1, 10) == [0.1, 1.0] and [g["lr"] for g in fresh.param_groups] == [0.1, 1.0]
    assert math.isclose(resumed.set(5, 50)[1], 0.1)
