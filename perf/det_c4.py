"""Faster R-CNN R50-C4 training speed (PROTOCOLS.md §6) with a per-part breakdown, and the loader's speed.

Training: full steps (res4 trunk, RPN, RoIAlign + res5 head + predictor, L1/CE losses, backward, SGD)
on random images of the protocol's typical size (a 500x375 VOC image at shorter side 640, the middle
of 480..800: 640x853) with 3 objects each (VOC07+12 trainval averages 2.4-2.9), at the per-GPU batch
(2), 512 RoIs per image as the protocol samples them. The first step is a warm-up and not timed.
Parts (`det_timing.time_step`): trunk ("backbone"), RPN, RoI heads (res5 on every RoI, losses
included), the rest (backward and SGD). Loader: `DetectionTrainSet` items per second in one process
on a 500x375 JPEG (decode, resize to 480..800, flip); the protocol's loader must deliver at least
twice what the step consumes, which the last line compares for `--workers` processes.

Published: detectron2 R50-C4 VOC 0.551 s/iter at 16 images on 8 V100 (2 per GPU).

    python perf/det_c4.py [--steps 3] [--batch-size 2] [--size 640] [--rois 512] [--precision fp32|bf16] [--device cpu|cuda]
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import torch
from det_timing import breakdown, describe, items_per_second, memory, sgd_step, step_arguments, time_step
from PIL import Image

from densecl_bench.checkpoint import load_checkpoint
from densecl_bench.data.voc import DetectionRecord
from densecl_bench.detection.c4 import C4Config, c4_from_checkpoint
from densecl_bench.detection.data import DetectionTrainSet


def targets(n: int, h: int, w: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """n random boxes of at least 32 px a side, labels 1..20."""
    xy = torch.rand(n, 2, generator=gen) * torch.tensor([w * 0.6, h * 0.6])
    wh = 32 + torch.rand(n, 2, generator=gen) * torch.tensor([w * 0.35, h * 0.35])
    return {"boxes": torch.cat([xy, xy + wh], 1), "labels": torch.randint(1, 21, (n,), generator=gen)}


def loader_speed(n: int) -> float:
    """DetectionTrainSet items per second in this process (one worker's share)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "img.jpg"
        pixels = np.random.default_rng(0).integers(0, 255, (375, 500, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(path, quality=90)
        record = DetectionRecord(path, "img", 500, 375, np.array([[48, 40, 300, 260], [200, 120, 480, 360]], np.float32),
                                 np.array([0, 14]), np.zeros(2, bool))
        return items_per_second(DetectionTrainSet([record] * n), n)


def main() -> None:
    parser = step_arguments(__doc__.splitlines()[0], size=640)
    parser.add_argument("--workers", type=int, default=4, help="loader processes per GPU (the protocol's)")
    parser.add_argument("--rois", type=int, default=512, help="RoIs sampled per image (the protocol's 512)")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    model, _ = c4_from_checkpoint(load_checkpoint("random"), C4Config(rois_per_image=args.rois))
    model.to(device).train()
    gen = torch.Generator().manual_seed(0)
    h, w = args.size, args.size * 4 // 3
    images = [torch.rand(3, h, w, generator=gen).mul(255).to(device) for _ in range(args.batch_size)]
    batch_targets = [{k: v.to(device) for k, v in targets(3, h, w, gen).items()} for _ in range(args.batch_size)]
    step = sgd_step(model, images, batch_targets, args.precision, device)
    total, per = time_step(model, ("backbone", "rpn", "roi_heads"), step, args.steps, device)
    consumed = args.batch_size / total
    delivered = loader_speed(args.loader_items) * args.workers
    print(describe(device, args.precision))
    print(f"train: batch {args.batch_size} x {h}x{w}: {total:.3f} s/step, {consumed:.2f} img/s, {memory(device)}")
    print(breakdown(total, per))
    print(f"loader: {delivered:.1f} img/s from {args.workers} worker processes (500x375 JPEG) = "
          f"{delivered / consumed:.1f}x what the step consumes")
    print("published: detectron2 R50-C4 0.551 s/iter (16 images on 8 V100: 2 per GPU)")


if __name__ == "__main__":
    main()
