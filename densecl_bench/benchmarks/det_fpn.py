"""Mask R-CNN R50-FPN 1x on COCO 2017 (PROTOCOLS.md §7): the "Detection: COCO2017" row.

The whole network is fine-tuned from the checkpoint on the engine (`detection.train`, the loop the
C4 benchmark runs): SGD 0.02 at batch 16, warm-up 1000 iterations, 12 epochs with steps at 8 and 11
(mmdet, the default), or 90k iterations with steps at 60k / 80k, 2fc heads and PreciseBN (profile
`d2-2fc`); evaluation on val2017 at the end. The ledger gets box and mask mAP / AP50 / AP75.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

from densecl_bench.benchmarks.base import Benchmark, Metric, RunContext
from densecl_bench.data.coco import coco_instances
from densecl_bench.data.layout import dataset_dirs
from densecl_bench.detection.coco_data import CocoTrainSet, training_images
from densecl_bench.detection.coco_eval import STATS, TASKS, COCOEvaluator
from densecl_bench.detection.data import DetectionTestSet
from densecl_bench.detection.fpn import FPNConfig, mask_rcnn_from_checkpoint
from densecl_bench.detection.train import train_detector

TARGET_KEYS = ("boxes", "labels", "masks", "mask_origins")


class CocoMaskRcnnFpn1x(Benchmark):
    name = "coco_mask_rcnn_fpn_1x"
    aliases = ("det_fpn",)
    table = "Detection: COCO2017"
    config = "mask_rcnn_r50_fpn_mstrain_1x_coco"
    order = 60
    gpus = 8  # 2 images x 8 GPUs (mmdet 1x, detectron2 IMS_PER_BATCH 16)

    def required_data(self, data_root: Path) -> list[Path]:
        coco = dataset_dirs(data_root)["coco2017"]
        return [coco / "annotations" / f"instances_{split}.json" for split in ("train2017", "val2017")] + [
            coco / "train2017", coco / "val2017"]

    def run(self, ctx: RunContext) -> list[Metric]:
        results = self.train(ctx)
        return [Metric(self.name, f"{task}_{stat}", results[f"{task}_{stat}"], results["extra"])
                for task in TASKS for stat in STATS]

    def train(self, ctx: RunContext, until: int | None = None) -> dict[str, Any]:
        """Fine-tune (resuming from `run_dir` when the resume rule allows) and evaluate at the end.

        until: stop after that many iterations (`detection.train.train_detector`). Returns the last
        evaluation, with the record's extras.
        """
        cfg, root = ctx.config, dataset_dirs(ctx.data_root)["coco2017"]
        train, val = coco_instances(root, "train2017"), coco_instances(root, "val2017")
        if train.category_ids != val.category_ids:
            raise ValueError(f"{root}: train2017 and val2017 name different categories")
        kept = training_images(train, cfg["drop_crowd_only"])
        model_cfg = dataclasses.replace(FPNConfig.from_dict(cfg["model"]), num_classes=len(train.category_ids))
        torch.manual_seed(ctx.seed)
        module, loaded = mask_rcnn_from_checkpoint(ctx.checkpoint, model_cfg)
        train_set = CocoTrainSet(kept.images, cfg["train_sizes"], cfg["max_size"], cfg["flip_prob"])
        test_set = DetectionTestSet([(val.path(i), i) for i in val.image_ids], cfg["test_size"], cfg["max_size"])
        evaluator = COCOEvaluator(val.coco, val.label_to_cat,
                                  lambda batch: [(t["image_id"], t["orig_size"]) for t in batch[1]],
                                  output_file=ctx.run_dir / self.name / "coco_results.json")
        results = train_detector(ctx, self.name, module, train_set, [im.width > im.height for im in kept.images],
                                 test_set, evaluator, TARGET_KEYS, until=until)
        extra = {"head": model_cfg.head, "num_classes": model_cfg.num_classes, "backbone_tensors": loaded,
                 "training_images": kept.counts(), "val_images": len(val), "iterations": results["max_iters"]}
        return {**results, "extra": extra}
