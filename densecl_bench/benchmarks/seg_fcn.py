"""FCN R50-D8 on VOC12+aug (PROTOCOLS.md §8): the "Segmentation: Pascal VOC 2012 + Aug" table's mIoU.

The whole backbone is fine-tuned from the checkpoint with mmseg's FCN heads; the stage checkpoints
under its run dir and resumes from it when re-run. The ledger gets mIoU, with aAcc and the per-class
IoU (NaN, stored as null, for a class absent from the val labels and predictions) in its extra.
"""

from __future__ import annotations

import math
from pathlib import Path

from densecl_bench.benchmarks.base import Benchmark, Metric, RunContext
from densecl_bench.data.layout import dataset_dirs
from densecl_bench.segmentation.train import train_fcn


class Voc12AugFcn(Benchmark):
    name = "voc12aug_fcn"
    aliases = ("seg_fcn",)
    table = "Segmentation: Pascal VOC 2012 + Aug"
    config = "fcn_r50-d8_512x512_20k_voc12aug"
    order = 70
    gpus = 4

    def required_data(self, data_root: Path) -> list[Path]:
        voc = dataset_dirs(data_root)["voc12aug"]
        lists = voc / "ImageSets" / "Segmentation"
        return [voc / "JPEGImages", voc / "SegmentationClass", voc / "SegmentationClassAug",
                *(lists / f"{split}.txt" for split in ("train", "aug", "val"))]

    def run(self, ctx: RunContext) -> list[Metric]:
        result = train_fcn(ctx.checkpoint, ctx.config, dataset_dirs(ctx.data_root)["voc12aug"], ctx.run_dir,
                           device=ctx.device, seed=ctx.seed, num_workers=ctx.num_workers)
        final = result.final
        iou = {name: None if math.isnan(v) else v for name, v in final["IoU"].items()}
        return [Metric(self.name, "mIoU", final["mIoU"], {"aAcc": final["aAcc"], "IoU": iou, "iter": final["iter"]})]
