"""FCN R50-D8 training and inference speed at the protocol's sizes (PROTOCOLS.md §8), with peak memory.

Training: full steps (forward of both heads, the mmseg 0.x loss, backward, SGD) on random 512x512 crops,
the per-GPU batch of the protocol (4). Inference: whole-image forward at 512x683 (a 500x375 VOC image at
shorter side 512), batch 1. The first step of each is a warm-up and not timed. mmseg's published figures
for FCN R50-D8 512x512 (V100): 5.7 GB training memory per GPU, 23.3 fps inference.

    python perf/seg_fcn.py [--steps 3] [--batch-size 4] [--size 512] [--precision fp32|bf16] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import resource
import time

import torch

from densecl_bench.checkpoint import load_checkpoint
from densecl_bench.engine import precision as precision_mod
from densecl_bench.segmentation.model import FCN, dilated_backbone_from_checkpoint, predict, seg_loss


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, steps: int, device: torch.device) -> float:
    """Seconds per call of `fn` over `steps` calls after one warm-up call."""
    fn()
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    sync(device)
    return (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--precision", default="fp32", choices=precision_mod.PRECISIONS)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = FCN(dilated_backbone_from_checkpoint(load_checkpoint("random"))).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    images = torch.randn(args.batch_size, 3, args.size, args.size, device=device)
    labels = torch.randint(0, 21, (args.batch_size, args.size, args.size), device=device)
    labels[:, :, -args.size // 8 :] = 255  # some padding, as crops of smaller images carry

    def train_step() -> None:
        with precision_mod.autocast(args.precision, device):
            out = model.train()(images)
            loss = seg_loss(out["seg"], labels) + 0.4 * seg_loss(out["aux"], labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    # a 500x375 VOC image at shorter side `size` (512x683 at the protocol's 512)
    image = torch.randn(1, 3, args.size, round(args.size * 683 / 512), device=device)
    original = (round(args.size * 375 / 512), round(args.size * 500 / 512))

    def infer() -> None:
        with torch.inference_mode(), precision_mod.autocast(args.precision, device):
            predict(model.eval(), image, original)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    train_s = timed(train_step, args.steps, device)
    train_mem = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    infer_s = timed(infer, args.steps, device)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB (Linux)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"device: {where}; torch {torch.__version__}; {args.precision}")
    print(f"train: batch {args.batch_size} x {args.size}px: {train_s:.2f} s/step, {args.batch_size / train_s:.2f} img/s"
          + (f", peak GPU memory {train_mem:.2f} GiB" if train_mem is not None else f", peak RSS {rss:.2f} GiB"))
    print(f"inference: 512x683 whole image: {1 / infer_s:.2f} img/s (mmseg published: 23.3 fps, 5.7 GB train memory, V100)")


if __name__ == "__main__":
    main()
