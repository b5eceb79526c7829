"""Learning-rate schedules by epoch or by iteration, linear warm-up, and parameter groups.

The formulas are mmcv's `LrUpdaterHook` family (mmcv/runner/hooks/lr_updater.py, read, not copied),
the schedules behind every MMSelfSup, mmdet and mmseg config the protocols cite:

- step:   base * gamma ** (number of steps <= t)            (StepLrUpdaterHook, list of steps)
- cosine: min + (base - min) * (cos(pi * t / T) + 1) / 2    (CosineAnnealingLrUpdaterHook)
- poly:   (base - min) * (1 - t / T) ** power + min         (PolyLrUpdaterHook)

where t is the epoch (by_epoch) or the global iteration, and T the total epochs or iterations.
Linear warm-up multiplies the regular LR of iteration i < warmup_iters by
1 - (1 - i / warmup_iters) * (1 - ratio), whatever `by_epoch` is (warm-up is always counted in
iterations, as mmcv's default). For a step schedule whose first step comes after the warm-up this is
detectron2's WarmupMultiStepLR / WarmupParamScheduler with warmup_factor = ratio (the same straight
line from ratio * base to base). Every parameter group is scheduled from its own base LR.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from densecl_bench.config import ConfigError

KINDS = ("constant", "step", "cosine", "poly")
NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm)


@dataclass(frozen=True)
class LRSchedule:
    """One LR schedule. `total` is the epochs (by_epoch) or iterations the schedule spans."""

    kind: str
    total: int
    by_epoch: bool = True
    steps: tuple[int, ...] = ()
    gamma: float = 0.1
    power: float = 1.0
    min_lr: float = 0.0
    warmup_iters: int = 0
    warmup_ratio: float = 0.001

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError(f"lr schedule must be one of {KINDS}, got {self.kind!r}")
        if self.total <= 0:
            raise ConfigError(f"lr schedule: total must be positive, got {self.total}")
        if list(self.steps) != sorted(self.steps):
            raise ConfigError(f"lr schedule: steps must increase, got {list(self.steps)}")
        if self.warmup_iters < 0 or not 0 < self.warmup_ratio <= 1:
            raise ConfigError(
                f"lr schedule: warmup_iters must be >= 0 and warmup_ratio in (0, 1], "
                f"got {self.warmup_iters} and {self.warmup_ratio}"
            )

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any], total: int) -> LRSchedule:
        """Read `{kind, by_epoch, steps, gamma, power, min_lr, warmup_iters, warmup_ratio}`; missing keys keep the defaults."""
        known = {"kind", "by_epoch", "steps", "gamma", "power", "min_lr", "warmup_iters", "warmup_ratio"}
        unknown = set(cfg) - known
        if unknown or "kind" not in cfg:
            raise ConfigError(f"lr schedule needs 'kind' and takes only {sorted(known)}; got {sorted(cfg)}")
        args = dict(cfg)
        if "steps" in args:
            args["steps"] = tuple(int(s) for s in args["steps"])
        return cls(total=total, **args)

    def regular(self, base_lr: float, epoch: int, iteration: int) -> float:
        """The LR without warm-up at (epoch, global iteration); both count from 0."""
        t = epoch if self.by_epoch else iteration
        if self.kind == "constant":
            return base_lr
        if self.kind == "step":
            passed = next((i for i, s in enumerate(self.steps) if t < s), len(self.steps))
            return base_lr * self.gamma**passed
        progress = t / self.total
        if self.kind == "cosine":
            return self.min_lr + 0.5 * (base_lr - self.min_lr) * (math.cos(math.pi * progress) + 1)
        return (base_lr - self.min_lr) * (1 - progress) ** self.power + self.min_lr

    def lr(self, base_lr: float, epoch: int, iteration: int) -> float:
        """The LR of the step at (epoch, global iteration), warm-up included."""
        lr = self.regular(base_lr, epoch, iteration)
        if iteration < self.warmup_iters:
            lr *= 1 - (1 - iteration / self.warmup_iters) * (1 - self.warmup_ratio)
        return lr


def param_groups(
    model: nn.Module,
    weight_decay: float,
    *,
    no_decay: Iterable[str] = (),
    lr_mult: Mapping[str, float] | None = None,
    base_lr: float,
) -> list[dict[str, Any]]:
    """Trainable parameters in groups of equal (lr, weight_decay), in `model.parameters()` order.

    no_decay: parameter kinds without weight decay, `norm` (weights and biases of norm layers, as
    mmcv's norm_decay_mult=0 / detectron2's WEIGHT_DECAY_NORM=0) and/or `bias` (every other bias).
    lr_mult: name prefix -> LR multiplier (the longest matching prefix wins). With nothing excluded
    and no multipliers this is one group holding every trainable parameter.
    """
    no_decay = set(no_decay)
    if no_decay - {"norm", "bias"}:
        raise ConfigError(f"weight-decay exclusions are 'norm' and 'bias', got {sorted(no_decay)}")
    norm_params = {id(p) for m in model.modules() if isinstance(m, NORM_TYPES) for p in m.parameters(recurse=False)}
    prefixes = sorted((lr_mult or {}).items(), key=lambda kv: -len(kv[0]))
    groups: dict[tuple[float, float], dict[str, Any]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        kind = "norm" if id(p) in norm_params else "bias" if name.endswith("bias") else "weight"
        wd = 0.0 if kind in no_decay else weight_decay
        mult = next((m for prefix, m in prefixes if name.startswith(prefix)), 1.0)
        lr = base_lr * mult
        groups.setdefault((lr, wd), {"params": [], "lr": lr, "weight_decay": wd})["params"].append(p)
    return list(groups.values())


class LRScheduler:
    """Sets every group's LR from its own base LR, captured when the scheduler is built.

    The base LRs are taken from the optimizer as constructed, before any checkpoint is loaded into
    it (a loaded optimizer carries the last LR it used, not the base), and the schedule is a pure
    function of the position, so nothing of the scheduler needs saving: the trainer's position is it.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, schedule: LRSchedule) -> None:
        self.optimizer, self.schedule = optimizer, schedule
        self.base_lrs = [group["lr"] for group in optimizer.param_groups]

    def set(self, epoch: int, iteration: int) -> list[float]:
        lrs = [self.schedule.lr(base, epoch, iteration) for base in self.base_lrs]
        for group, lr in zip(self.optimizer.param_groups, lrs, strict=True):
            group["lr"] = lr
        return lrs

