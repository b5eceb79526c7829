"""FCN R50-D8 on VOC12+aug (PROTOCOLS.md §8) and on Cityscapes (§13): each table's mIoU.

The whole backbone is fine-tuned from the checkpoint with mmseg's FCN heads; the stage checkpoints
under its run dir and resumes from it when re-run. The ledger gets mIoU, with aAcc and the per-class
IoU (NaN, stored as null, for a class absent from the val labels and predictions) in its extra.
"""

from __future__ import annotations

import math
from abc import abstractmethod
from pathlib import Path

from densecl_bench.benchmarks.base import Benchmark, Metric, RunContext
from densecl_bench.data.layout import dataset_dirs
from densecl_bench.segmentation.data import SegDataset, cityscapes_dataset, voc12aug_dataset
from densecl_bench.segmentation.train import train_fcn


class _Fcn(Benchmark):
    """FCN R50-D8 fine-tuned on one dataset; the config says everything else (crop, test mode, schedule)."""

    @abstractmethod
    def dataset(self, data_root: Path) -> SegDataset:
        """The train / val pairs and class names under a data root."""

    def run(self, ctx: RunContext) -> list[Metric]:
        result = train_fcn(ctx.checkpoint, ctx.config, self.dataset(ctx.data_root), ctx.run_dir,
                           device=ctx.device, seed=ctx.seed, num_workers=ctx.num_workers)
        final = result.final
        iou = {name: None if math.isnan(v) else v for name, v in final["IoU"].items()}
        return [Metric(self.name, "mIoU", final["mIoU"], {"aAcc": final["aAcc"], "IoU": iou, "iter": final["iter"]})]


class Voc12AugFcn(_Fcn):
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

    def dataset(self, data_root: Path) -> SegDataset:
        return voc12aug_dataset(dataset_dirs(data_root)["voc12aug"])


class CityscapesFcn(_Fcn):
    """769 x 769 crops, 40k iterations, sliding-window inference (769 windows, stride 513), align_corners."""

    name = "cityscapes_fcn"
    table = "Segmentation: Cityscapes"
    config = "fcn_r50-d8_769x769_40k_cityscapes"
    order = 75
    gpus = 4  # 2 crops x 4 GPUs (mmseg cityscapes_769x769, batch 8)

    def required_data(self, data_root: Path) -> list[Path]:
        root = dataset_dirs(data_root)["cityscapes"]
        return [root / kind / split for kind in ("leftImg8bit", "gtFine") for split in ("train", "val")]

    def dataset(self, data_root: Path) -> SegDataset:
        return cityscapes_dataset(dataset_dirs(data_root)["cityscapes"])
