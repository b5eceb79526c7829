"""VOC07 linear SVM and low-shot SVM plugins (PROTOCOLS.md §2, §3; MMSelfSup 0.x `svm_voc07` tools).

Both read VOC2007 trainval/test image-level labels, extract pooled features of the configured
layers through the feature cache (the low-shot benchmark reuses the full SVM's cached features),
and hand the arrays to `densecl_bench.svm`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from densecl_bench.backbone import parse_layers
from densecl_bench.benchmarks.base import Benchmark, Metric, RunContext
from densecl_bench.data.voc import voc07_classification
from densecl_bench.svm import aggregate_lowshot, cost_grid, draw_lowshot, lowshot_svm, voc07_svm

TABLE = "VOC SVM / Low-shot SVM"


def _voc_features(ctx: RunContext, layers: list[str]) -> tuple[dict[str, np.ndarray], np.ndarray,
                                                                 dict[str, np.ndarray], np.ndarray]:
    """trainval and test features per layer plus their N x 20 labels (1 / 0 / -1).

    Unreadable images skipped under `on_bad_image: skip` are in neither: never trained on, drawn
    as a low-shot sample, or tested.
    """
    cfg = ctx.config
    voc = ctx.data_root / "VOCdevkit" / "VOC2007"
    feats, labels = {}, {}
    for split in ("trainval", "test"):
        feats[split], images = ctx.features(voc07_classification(voc, split), cfg["transform"], layers,
                                            cfg["pooling"], cfg["image_size"], cfg["batch_size"])
        labels[split] = images.labels
    return feats["trainval"], labels["trainval"], feats["test"], labels["test"]


def _solver_args(ctx: RunContext) -> dict[str, Any]:
    cfg = ctx.config
    return {"solver": cfg["solver"], "intercept_scaling": float(cfg["intercept_scaling"]), "device": ctx.device,
            "dtype": getattr(torch, cfg["dtype"])}


class _Voc07Benchmark(Benchmark):
    table = TABLE
    rank0_only = True  # the SVMs train in one process; extraction stays sharded
    gpus = 1

    def required_data(self, data_root: Path) -> list[Path]:
        return [data_root / "VOCdevkit" / "VOC2007"]


class Voc07Svm(_Voc07Benchmark):
    """mAP of one-vs-rest linear SVMs per layer (cost chosen per class by 3-fold CV), and the best layer."""

    name = "voc07_svm"
    aliases = ("svm",)
    config = "svm_voc07"
    order = 10

    def run(self, ctx: RunContext) -> list[Metric]:
        cfg = ctx.config
        layers = parse_layers(cfg["layers"])
        costs = cost_grid(cfg["costs"])
        xtr, ytr, xte, yte = _voc_features(ctx, layers)
        metrics, maps = [], {}
        for layer in layers:
            res = voc07_svm(xtr[layer], ytr, xte[layer], yte, costs, n_splits=int(cfg["cv_folds"]),
                            **_solver_args(ctx))
            maps[layer] = res.map
            metrics.append(Metric(self.name, layer, res.map, {
                "per_class_ap": [round(float(a) * 100, 4) for a in res.ap],
                "chosen_costs": res.chosen,
                "solver": res.solver,
                **({"solver_stats": res.info} if res.info else {}),
            }))
        best = max(maps, key=maps.__getitem__)
        metrics.append(Metric(self.name, "svm", maps[best], {"layer": best}))
        metrics.append(Metric(self.name, "best_layer", best))
        return metrics


class Voc07LowshotSvm(_Voc07Benchmark):
    """Mean test mAP over seeded draws of k positives + 19k negatives per class, per k (no CV)."""

    name = "voc07_lowshot_svm"
    aliases = ("lowshot_svm", "lowshot")
    config = "svm_voc07_lowshot"
    order = 20

    def run(self, ctx: RunContext) -> list[Metric]:
        cfg = ctx.config
        layers = parse_layers(cfg["layers"])
        costs = cost_grid(cfg["costs"])
        seed = ctx.seed if cfg.get("seed") is None else int(cfg["seed"])
        select = cfg["cost_select"]
        xtr, ytr, xte, yte = _voc_features(ctx, layers)
        draws = draw_lowshot(ytr, [int(k) for k in cfg["ks"]], int(cfg["samples"]), seed)
        capped = sorted({d.k for d in draws if d.capped})
        metrics = []
        for layer in layers:
            out = lowshot_svm(xtr[layer], xte[layer], yte, draws, costs,
                              cv_folds=int(cfg["cv_folds"]) if select == "cv" else None, **_solver_args(ctx))
            stats = aggregate_lowshot(draws, out["test_ap"], costs, select=select, cv_ap=out.get("cv_ap"))
            for k, st in stats.items():
                extra = {**st, "seed": seed, "layer": layer, "cost_select": select,
                         **({"solver_stats": out["solver_stats"]} if "solver_stats" in out else {})}
                if k in capped:
                    extra["capped"] = True  # too few images for k positives / 19k negatives somewhere
                # One layer (the default) keeps the model zoo's `k=N` names; more layers are suffixed.
                name = f"k={k}" if len(layers) == 1 else f"k={k}/{layer}"
                metrics.append(Metric(self.name, name, st["mean"], extra))
        return metrics
