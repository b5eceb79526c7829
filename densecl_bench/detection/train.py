"""Fine-tuning a detector on the engine, the one loop both detection benchmarks (§6 C4, §7 FPN) run.

SGD with momentum and weight decay (off for norms where the config says so), the config's step
schedule with linear warm-up, aspect-ratio grouped batches split over the ranks, PreciseBN when the
config asks, resumable checkpoints every `checkpoint_period` iterations, and one evaluation at the
end, on each rank's shard of the test set. The schedule runs `max_iters` iterations, or
`max_epochs` epochs of the grouped batches when the config gives those (mmdet's epoch-based 1x).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from densecl_bench import config, dist, engine
from densecl_bench.benchmarks.base import RunContext
from densecl_bench.detection.data import AspectRatioGroupedSampler, collate, to_original


def train_detector(ctx: RunContext, name: str, module: nn.Module, train_set: Dataset, wide: Sequence[bool],
                   test_set: Dataset, evaluator: engine.DatasetEvaluator, target_keys: Sequence[str],
                   until: int | None = None) -> dict[str, Any]:
    """Train `module` (fresh, on the checkpoint) and return the final evaluation (empty when stopped early).

    train_set: (image, target) pairs drawn from torch's RNG (wrapped here in `SeededDataset`); wide:
    per training image, whether it is wider than tall; target_keys: what the model's training forward
    reads from a target. until: stop after that many iterations (the schedule still spans the whole
    run; the next call resumes from the last checkpoint, written every `checkpoint_period` iterations).
    """
    cfg, world, rank, dev = ctx.config, dist.world_size(), dist.rank(), ctx.device
    model = engine.ddp.prepare(module, dev)
    groups = engine.param_groups(model, cfg["weight_decay"], no_decay=cfg["no_decay"], base_lr=cfg["lr"])
    optimizer = torch.optim.SGD(groups, lr=cfg["lr"], momentum=cfg["momentum"])

    per_rank = engine.per_rank_batch(cfg["total_batch_size"], world)
    sampler = AspectRatioGroupedSampler(wide, per_rank, world, rank, seed=ctx.seed)
    data = engine.EpochLoader(engine.SeededDataset(train_set, ctx.seed), sampler, per_rank, drop_last=True,
                              num_workers=ctx.num_workers, collate_fn=collate)
    test_loader = DataLoader(Subset(test_set, range(rank, len(test_set), world)), cfg["test_batch_size"],
                             num_workers=ctx.num_workers, collate_fn=collate)
    max_iters = cfg["max_epochs"] * len(data) if cfg.get("max_epochs") else cfg["max_iters"]

    def losses(m: nn.Module, batch: Any) -> dict[str, torch.Tensor]:
        images, targets = batch
        return m([im.to(dev) for im in images], [{k: t[k].to(dev) for k in target_keys} for t in targets])

    def detect(m: nn.Module, batch: Any) -> list[dict[str, torch.Tensor]]:
        images, targets = batch
        return to_original(m([im.to(dev) for im in images]), images, targets)

    def evaluate() -> dict[str, Any]:
        # the unwrapped module: DDP's forward would sync buffers, and the ranks' shards may differ in length
        return engine.inference_on_dataset(module, test_loader, evaluator, forward=detect, device=dev,
                                           precision=cfg["precision"], desc=f"{name} eval")

    span = math.ceil(max_iters / len(data)) if cfg["lr_schedule"].get("by_epoch", True) else max_iters
    schedule = engine.LRSchedule.from_config(cfg["lr_schedule"], total=span)
    hooks: list[engine.HookBase] = [engine.LRSchedulerHook(engine.LRScheduler(optimizer, schedule))]
    if cfg["precise_bn_iters"]:
        hooks.append(engine.PreciseBNHook(0, lambda: data.epoch(0), lambda b: losses(module, b),
                                          cfg["precise_bn_iters"], by_epoch=False))
    evaluation = engine.EvalHook(0, evaluate, by_epoch=False)
    out_dir = ctx.run_dir / name
    hooks += [evaluation, engine.MetricLogger(out_dir / "metrics.jsonl", images_per_iter=data.batch_size),
              engine.PeriodicCheckpointer(cfg["checkpoint_period"], by_epoch=False, keep=1)]
    key = engine.ResumeKey(ctx.checkpoint.sha256, config.fingerprint(cfg), ctx.seed, world)
    trainer = engine.Trainer(model, optimizer, data, lambda t, b: losses(t.model, b), max_iters=max_iters,
                             hooks=hooks, checkpointer=engine.Checkpointer(out_dir, key),
                             precision=cfg["precision"], device=dev, name=name)
    trainer.train(until=until)
    return {**(evaluation.history[-1] if evaluation.history else {}), "max_iters": max_iters}
