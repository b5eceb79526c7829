"""Faster R-CNN R50-C4 on VOC07+12 (PROTOCOLS.md §6): the "Detection: Pascal VOC 2007 + 2012" row.

The whole network is fine-tuned from the checkpoint on the engine: SGD, linear warm-up, steps at
18k / 22k of 24k iterations, resumable checkpoints, evaluation on VOC2007 test at the end. The
`flavour` setting switches data and metric rules between mmdet (the default, MMSelfSup's AP50) and
d2 (profile `d2`: MoCo's AP, AP50, AP75 after PreciseBN); every metric records it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, DistributedSampler, Subset

from densecl_bench import config, dist, engine
from densecl_bench.benchmarks.base import Benchmark, Metric, RunContext
from densecl_bench.detection.c4 import C4Config, c4_from_checkpoint
from densecl_bench.detection.data import (
    DetectionTestSet,
    DetectionTrainSet,
    collate,
    to_original,
    training_boxes,
    voc0712,
)
from densecl_bench.detection.voc_eval import VOCDetectionEvaluator


class Voc0712FasterRcnnC4(Benchmark):
    name = "voc0712_faster_rcnn_c4"
    aliases = ("det_c4",)
    table = "Detection: Pascal VOC 2007 + 2012"
    config = "faster_rcnn_r50_c4_mstrain_24k_voc0712"
    order = 50
    gpus = 8

    def required_data(self, data_root: Path) -> list[Path]:
        devkit = data_root / "VOCdevkit"
        return [devkit / "VOC2007" / "Annotations", devkit / "VOC2012" / "Annotations"]

    def run(self, ctx: RunContext) -> list[Metric]:
        results = self.train(ctx)
        names = ("AP", "AP50", "AP75") if ctx.config["flavour"] == "d2" else ("AP50",)
        return [Metric(self.name, n, results[n], results["extra"]) for n in names]

    def train(self, ctx: RunContext, until: int | None = None) -> dict[str, Any]:
        """Fine-tune (resuming from `run_dir` when the resume rule allows) and evaluate at the end.

        until: stop after that many iterations (the schedule still spans max_iters; the next call resumes
        from the last checkpoint, written every `checkpoint_period` iterations). Returns the last
        evaluation, with the record's extras.
        """
        cfg, world, rank, dev = ctx.config, dist.world_size(), dist.rank(), ctx.device
        train_records, test_records = voc0712(ctx.data_root)
        boxes = training_boxes(train_records, cfg["flavour"])
        torch.manual_seed(ctx.seed)
        module, loaded = c4_from_checkpoint(ctx.checkpoint, C4Config.from_dict(cfg["model"]))
        model = engine.ddp.prepare(module, dev)
        groups = engine.param_groups(model, cfg["weight_decay"], no_decay=cfg["no_decay"], base_lr=cfg["lr"])
        optimizer = torch.optim.SGD(groups, lr=cfg["lr"], momentum=cfg["momentum"])

        train_set = engine.SeededDataset(
            DetectionTrainSet(boxes.records, cfg["train_sizes"], cfg["max_size"], cfg["flip_prob"]), ctx.seed)
        sampler = DistributedSampler(train_set, world, rank, shuffle=True, seed=ctx.seed, drop_last=True)
        data = engine.EpochLoader(train_set, sampler, engine.per_rank_batch(cfg["total_batch_size"], world), drop_last=True,
                                  num_workers=ctx.num_workers, collate_fn=collate)
        test_set = DetectionTestSet(test_records, cfg["test_size"], cfg["max_size"])
        test_loader = DataLoader(Subset(test_set, range(rank, len(test_set), world)), cfg["test_batch_size"],
                                 num_workers=ctx.num_workers, collate_fn=collate)
        evaluator = VOCDetectionEvaluator(test_records, cfg["flavour"],
                                          image_ids=lambda batch: [t["image_id"] for t in batch[1]])

        def losses(m: torch.nn.Module, batch: Any) -> dict[str, torch.Tensor]:
            images, targets = batch
            return m([im.to(dev) for im in images],
                     [{"boxes": t["boxes"].to(dev), "labels": t["labels"].to(dev)} for t in targets])

        def detect(m: torch.nn.Module, batch: Any) -> list[dict[str, torch.Tensor]]:
            images, targets = batch
            return to_original(m([im.to(dev) for im in images]), images, targets)

        def evaluate() -> dict[str, Any]:
            return engine.inference_on_dataset(model, test_loader, evaluator, forward=detect, device=dev,
                                               precision=cfg["precision"], desc=f"{self.name} eval")

        schedule = engine.LRSchedule.from_config(cfg["lr_schedule"], total=cfg["max_iters"])
        hooks: list[engine.HookBase] = [engine.LRSchedulerHook(engine.LRScheduler(optimizer, schedule))]
        if cfg["precise_bn_iters"]:
            hooks.append(engine.PreciseBNHook(0, lambda: data.epoch(0), lambda b: losses(module, b),
                                              cfg["precise_bn_iters"], by_epoch=False))
        evaluation = engine.EvalHook(0, evaluate, by_epoch=False)
        out_dir = ctx.run_dir / self.name
        hooks += [evaluation, engine.MetricLogger(out_dir / "metrics.jsonl", images_per_iter=data.batch_size),
                  engine.PeriodicCheckpointer(cfg["checkpoint_period"], by_epoch=False, keep=1)]
        key = engine.ResumeKey(ctx.checkpoint.sha256, config.fingerprint(cfg), ctx.seed, world)
        trainer = engine.Trainer(model, optimizer, data, lambda t, b: losses(t.model, b), max_iters=cfg["max_iters"],
                                 hooks=hooks, checkpointer=engine.Checkpointer(out_dir, key),
                                 precision=cfg["precision"], device=dev, name=self.name)
        trainer.train(until=until)

        results = evaluation.history[-1] if evaluation.history else {}
        extra = {"flavour": cfg["flavour"], "per_class_AP50": results.get("per_class"), "backbone_tensors": loaded,
                 "training_boxes": boxes.counts(), "test_images": len(test_records)}
        return {**results, "extra": extra}
