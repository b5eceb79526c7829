"""Mask R-CNN R50-FPN training speed (PROTOCOLS.md §7) with a per-part breakdown, and the loader's speed.

Training: full steps (backbone + FPN, RPN, box and mask heads, L1/CE/BCE losses, backward, SGD) on
random images of the protocol's typical size (shorter side 800, 4:3: 800x1067 padded to 800x1088)
with 7 instances each (COCO train2017 averages 7.3) and box-local mask crops, at the per-GPU batch
(2). The first step is a warm-up and not timed. Each step is split by forward hooks (synchronised
on CUDA) into backbone+FPN, RPN, RoI heads (box + mask, losses included) and the rest (backward and
the optimizer step). Loader: `CocoTrainSet` items per second in one process on a 640x480 JPEG with 7
polygon instances (decode, resize to 640..800, flip, rasterise the masks in their boxes).

Published: detectron2 Mask R-CNN R50-FPN 1x 0.261 s/iter at 16 images on 8 V100 (2 per GPU);
torchvision's reference recipe 0.2728 s/iter (8 V100, 2 per GPU).

    python perf/det_fpn.py [--steps 3] [--batch-size 2] [--size 800] [--precision fp32|bf16] [--device cpu|cuda]
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import torch
from det_timing import breakdown, describe, items_per_second, memory, sgd_step, step_arguments, time_step
from PIL import Image

from densecl_bench.checkpoint import load_checkpoint
from densecl_bench.data.coco import CocoImage
from densecl_bench.detection.coco_data import CocoTrainSet
from densecl_bench.detection.fpn import FPNConfig, mask_rcnn_from_checkpoint


def targets(n: int, h: int, w: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """n random boxes with elliptic box-local masks (a one-pixel margin, as `coco_data` writes them)."""
    xy = torch.rand(n, 2, generator=gen) * torch.tensor([w * 0.7, h * 0.7])
    wh = 16 + torch.rand(n, 2, generator=gen) * torch.tensor([w * 0.3, h * 0.3])
    boxes = torch.cat([xy, xy + wh], 1)
    origins = boxes[:, :2].floor() - 1
    size = (boxes[:, 2:].ceil() + 1 - origins).long()
    hm, wm = int(size[:, 1].max()), int(size[:, 0].max())
    yy, xx = torch.meshgrid(torch.arange(hm), torch.arange(wm), indexing="ij")
    masks = torch.stack([(((xx - s[0] / 2) / (s[0] / 2)) ** 2 + ((yy - s[1] / 2) / (s[1] / 2)) ** 2 <= 0.8)
                         .to(torch.uint8) for s in size.tolist()])
    return {"boxes": boxes, "labels": torch.randint(1, 81, (n,), generator=gen), "masks": masks,
            "mask_origins": origins}


def loader_speed(n: int) -> float:
    """CocoTrainSet items per second in this process (one worker's share)."""
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "img.jpg"
        Image.fromarray(rng.integers(0, 255, (480, 640, 3), dtype=np.uint8)).save(path, quality=90)
        polys, boxes = [], []
        for _ in range(7):
            c = rng.uniform(60, 420, 2)
            angles = np.sort(rng.uniform(0, 2 * np.pi, 16))
            pts = c + np.stack([np.cos(angles), np.sin(angles)], 1) * rng.uniform(20, 60, (16, 1))
            polys.append([pts.ravel().tolist()])
            boxes.append([*pts.min(0), *(pts.max(0) - pts.min(0))])
        image = CocoImage(1, path, 640, 480, np.array(boxes, np.float32), np.zeros(7, np.int64),
                          np.zeros(7, np.int64), polys, np.zeros(7, bool), np.full(7, 1000.0, np.float32))
        return items_per_second(CocoTrainSet([image] * n), n)


def main() -> None:
    parser = step_arguments(__doc__.splitlines()[0], size=800)
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    model, _ = mask_rcnn_from_checkpoint(load_checkpoint("random"), FPNConfig())
    model.to(device).train()
    gen = torch.Generator().manual_seed(0)
    h, w = args.size, args.size * 4 // 3
    images = [torch.rand(3, h, w, generator=gen).mul(255).to(device) for _ in range(args.batch_size)]
    batch_targets = [{k: v.to(device) for k, v in targets(7, h, w, gen).items()} for _ in range(args.batch_size)]

    step = sgd_step(model, images, batch_targets, args.precision, device)
    total, per = time_step(model, ("backbone", "rpn", "roi_heads"), step, args.steps, device)
    print(describe(device, args.precision))
    print(f"train: batch {args.batch_size} x {h}x{w}: {total:.3f} s/step, {args.batch_size / total:.2f} img/s, {memory(device)}")
    print(breakdown(total, per))
    print(f"loader: {loader_speed(args.loader_items):.1f} items/s per worker process (640x480 JPEG, 7 instances)")
    print("published: detectron2 0.261 s/iter, torchvision 0.2728 s/iter (16 images on 8 V100: 2 per GPU)")


if __name__ == "__main__":
    main()
