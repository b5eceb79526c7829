"""ImageNet weighted kNN (PROTOCOLS.md §5; MMSelfSup 0.x `tools/benchmarks/classification/knn_imagenet`).

The bank is the ImageNet train split and the queries its val split; features are res5 (feature5)
globally average-pooled after Resize 256 / CenterCrop 224, L2-normalised, T = 0.07.
"""

from __future__ import annotations

from pathlib import Path

import torch

from densecl_bench.benchmarks.base import Benchmark, Metric, RunContext
from densecl_bench.data.imagenet import imagenet
from densecl_bench.knn import knn_classify


class ImagenetKnn(Benchmark):
    name = "imagenet_knn"
    aliases = ("knn",)
    table = "ImageNet Nearest-Neighbor Classification"
    config = "knn_imagenet"
    order = 40
    gpus = 1
    rank0_only = True  # one process builds the bank; extraction stays sharded

    def required_data(self, data_root: Path) -> list[Path]:
        return [data_root / "imagenet" / "train", data_root / "imagenet" / "val"]

    def run(self, ctx: RunContext) -> list[Metric]:
        cfg = ctx.config
        root = ctx.data_root / "imagenet"
        feats, splits = {}, {}
        for split in ("train", "val"):  # unreadable images skipped under `skip` are neither bank nor query
            by_layer, splits[split] = ctx.features(imagenet(root, split), cfg["transform"], [cfg["layer"]], "global",
                                                   cfg["image_size"], cfg["batch_size"])
            feats[split] = by_layer[cfg["layer"]]
        results = knn_classify(
            feats["train"],
            splits["train"].labels,
            feats["val"],
            splits["val"].labels,
            ks=cfg["ks"],
            temperature=cfg["temperature"],
            num_classes=len(splits["train"].classes),
            l2_normalize=cfg["l2_normalize"],
            query_chunk=cfg["query_chunk"],
            bank_dtype=getattr(torch, cfg["bank_dtype"]),
            device=ctx.device,
            backend=cfg["backend"],
        )
        return [
            Metric(self.name, f"k={k}", top1, {"top5": top5, "temperature": cfg["temperature"]})
            for k, (top1, top5) in results.items()
        ]
