"""Watch both halves of DenseCL learn (or not): every iteration's unweighted terms and what drives them.

Runs the real `DenseCL` module, optimiser and MoCo v2 views of a pretrain config on the demo ImageNet
(per-epoch cosine LR, as `lr_schedule: cosine`) and prints one JSON line per iteration:
  g, d          the global and dense InfoNCE, unweighted (chance: ln(K + 1));
  gpos, gmaxneg mean cosine of a global query with its key, and with its nearest key in `queue`;
  dpos, dmaxneg the same for the dense queries against their matched key and `queue2`;
  mode, distinct the correspondence's spread: share of query positions on the most frequent key cell,
                 and distinct key cells per image (of S^2).
Not a test and not the training loop (no checkpoints, no resume): a probe for choosing a schedule.

    python perf/pretrain_probe.py --iters 60 --set model.arch=resnet18 --set data.image_size=64
    python perf/pretrain_probe.py --resume work_dirs/densecl_demo/latest.pth --iters 5 --set optimizer.lr=0
                                  # the same statistics for a trained checkpoint, weights left unchanged
"""

from __future__ import annotations

import argparse
import json
import math
import time
from typing import Any

import torch
from torch import Tensor

import densecl_bench.pretrain.model as densecl
from densecl_bench import config
from densecl_bench.data.demo import ensure_demo
from densecl_bench.data.imagenet import imagenet
from densecl_bench.pretrain.augment import EpochSampler, TwoViewDataset, mocov2
from densecl_bench.pretrain.train import build_model, build_optimizer


def _override(cfg: dict[str, Any], dotted: str, value: str) -> None:
    *path, last = dotted.split(".")
    node = cfg
    for part in path:
        node = node[part]
    node[last] = json.loads(value)


def _instrument(stats: dict[str, Any]) -> None:
    """Wrap the module's loss and correspondence so each call leaves its cosines in `stats`."""
    info_nce, correspondence = densecl.info_nce, densecl.dense_correspondence

    def probed_nce(q: Tensor, k: Tensor, bank: Tensor, temperature: float) -> Tensor:
        with torch.no_grad():
            stats.setdefault("pos", []).append((q * k).sum(1).mean().item())
            stats.setdefault("maxneg", []).append((q @ bank).max(1).values.mean().item())
        return info_nce(q, k, bank, temperature)

    def probed_correspondence(q_b: Tensor, k_b: Tensor) -> Tensor:
        idx = correspondence(q_b, k_b)
        cells = idx.shape[1]
        stats["mode"] = sum(torch.bincount(row, minlength=cells).max().item() for row in idx) / idx.numel()
        stats["distinct"] = sum(row.unique().numel() for row in idx) / len(idx)
        return idx

    densecl.info_nce, densecl.dense_correspondence = probed_nce, probed_correspondence


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="densecl_demo")
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--resume", help="start from this pretraining checkpoint's model state (queues included)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=JSON", help="override, e.g. model.momentum=0.9")
    args = ap.parse_args()
    cfg = config.load(args.config, "pretrain")
    for item in args.set:
        _override(cfg, *item.split("=", 1))
    stats: dict[str, Any] = {}
    _instrument(stats)
    model = build_model(cfg).train()
    if args.resume:
        model.load_state_dict(torch.load(args.resume, map_location="cpu", weights_only=True)["state_dict"])
    batch = cfg["data"]["batch_size_per_gpu"]
    lr = cfg["optimizer"]["lr"] * batch / cfg["optimizer"]["lr_reference_batch"]
    optimizer = build_optimizer(cfg, model, lr, fused=False)
    images = imagenet(ensure_demo() / "imagenet", "train")
    views = TwoViewDataset(images, mocov2(cfg["data"]["image_size"], cfg["data"].get("augmentation")), seed=cfg["seed"])
    sampler = EpochSampler(len(images), batch, cfg["seed"])
    per_epoch, lam = len(sampler) // batch, model.loss_lambda
    chance, start = math.log(model.queue_len + 1), time.perf_counter()
    for it in range(args.iters):
        epoch, inner = divmod(it, per_epoch)
        sampler.set_epoch(epoch)
        items = [views[i] for i in list(sampler)[inner * batch:(inner + 1) * batch]]
        for group in optimizer.param_groups:
            group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * epoch / cfg["epochs"]))
        stats.clear()
        out = model(torch.stack([q for q, _ in items]), torch.stack([k for _, k in items]))
        optimizer.zero_grad()
        out["loss"].backward()
        optimizer.step()
        record = {"iter": it + 1, "epoch": epoch + 1, "chance": chance,
                  "g": out["loss_single"].item() / (1 - lam) if lam < 1 else None,
                  "d": out["loss_dense"].item() / lam if lam > 0 else None,
                  "gpos": stats["pos"][0], "gmaxneg": stats["maxneg"][0], "dpos": stats["pos"][1],
                  "dmaxneg": stats["maxneg"][1], "mode": stats["mode"], "distinct": stats["distinct"],
                  "wall_s": time.perf_counter() - start}
        print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in record.items()}), flush=True)


if __name__ == "__main__":
    main()
