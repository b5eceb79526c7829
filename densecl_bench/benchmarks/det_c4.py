"""Faster R-CNN R50-C4 on VOC07+12 (PROTOCOLS.md §6): the "Detection: Pascal VOC 2007 + 2012" row.

The whole network is fine-tuned from the checkpoint on the engine (`detection.train`): SGD, linear
warm-up, steps at 18k / 22k of 24k iterations, aspect-ratio grouped batches, resumable checkpoints,
evaluation on VOC2007 test at the end. The `flavour` setting switches data and metric rules between
mmdet (the default, MMSelfSup's AP50) and d2 (profile `d2`: MoCo's AP, AP50, AP75 after PreciseBN);
every metric records it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from densecl_bench.benchmarks.base import Benchmark, Metric, RunContext
from densecl_bench.detection.c4 import C4Config, c4_from_checkpoint
from densecl_bench.detection.data import (
    DetectionTestSet,
    DetectionTrainSet,
    training_boxes,
    voc0712,
)
from densecl_bench.detection.train import train_detector
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

        until: stop after that many iterations (`detection.train.train_detector`). Returns the last
        evaluation, with the record's extras.
        """
        cfg = ctx.config
        train_records, test_records = voc0712(ctx.data_root)
        boxes = training_boxes(train_records, cfg["flavour"])
        torch.manual_seed(ctx.seed)
        module, loaded = c4_from_checkpoint(ctx.checkpoint, C4Config.from_dict(cfg["model"]))
        train_set = DetectionTrainSet(boxes.records, cfg["train_sizes"], cfg["max_size"], cfg["flip_prob"])
        test_set = DetectionTestSet([(r.image, r.image_id) for r in test_records], cfg["test_size"], cfg["max_size"])
        evaluator = VOCDetectionEvaluator(test_records, cfg["flavour"],
                                          image_ids=lambda batch: [t["image_id"] for t in batch[1]])
        results = train_detector(ctx, self.name, module, train_set, [r.width > r.height for r in boxes.records],
                                 test_set, evaluator, ("boxes", "labels"), until=until)
        extra = {"flavour": cfg["flavour"], "per_class_AP50": results.get("per_class"), "backbone_tensors": loaded,
                 "training_boxes": boxes.counts(), "test_images": len(test_records)}
        return {**results, "extra": extra}
