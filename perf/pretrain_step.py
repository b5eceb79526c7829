"""Throughput of one DenseCL training step, against MoCo v2 and across GPU precision settings.

Times one iteration of the engine's `Trainer` with the pretraining step of
`densecl_bench.pretrain.train.build_step` (both encoders, momentum update, queues, loss, the
loss check, backward, SGD step) on one batch of random images, served without a data loader:

1. DenseCL vs plain MoCo v2 on the same code path (`dense=False`: no dense neck branch, no
   correspondence, no dense loss or queue 2). The two are timed in alternating steps so that
   load from other processes hits both alike; the median step time is reported.
2. CUDA only: the same step in fp32/NCHW (PyTorch defaults, foreach SGD) vs the tuned path
   (`precision: bf16` autocast, channels_last, fused SGD, cudnn.benchmark, TF32 logits),
   optionally with torch.compile of the backbones.

    python perf/pretrain_step.py --threads 1 --batch 2 --size 224 --queue 65536 --steps 3   # CPU, brief
    python perf/pretrain_step.py --batch 32 --size 224 --queue 65536 --steps 20 [--compile]   # GPU
"""

from __future__ import annotations

import argparse
import itertools
import platform
import statistics
import time

import torch

from densecl_bench.engine import Trainer
from densecl_bench.pretrain.model import DenseCL
from densecl_bench.pretrain.train import build_optimizer, build_step

OPT_CFG = {"_config": "perf", "optimizer": {"momentum": 0.9, "weight_decay": 1e-4}}


class OneBatch:
    """Training data that serves the same batch `n` times per epoch (the step's time without loading)."""

    def __init__(self, batch: tuple[torch.Tensor, torch.Tensor], n: int) -> None:
        self.batch, self.n = batch, n

    def __len__(self) -> int:
        return self.n

    def epoch(self, epoch: int, start: int = 0):
        return itertools.repeat(self.batch, self.n - start)


def make(args: argparse.Namespace, device: torch.device, v: dict) -> Trainer:
    """A trainer for variant `v` that runs one iteration per `train(until=iter + 1)` call."""
    torch.manual_seed(0)
    model = DenseCL(args.arch, queue_len=args.queue).to(device)
    if v["tuned"]:
        model.to(memory_format=torch.channels_last)
    if v.get("compile"):
        model.encoder_q[0].compile()
        model.encoder_k[0].compile()
    optimizer = build_optimizer(OPT_CFG, model, 0.03, fused=v["tuned"] and device.type == "cuda")
    steps = args.warmup + args.steps
    step = build_step(model, device, channels_last=v["tuned"], warmup_iters=0, dense=v["dense"])
    return Trainer(model, optimizer, OneBatch(images(args, device, v["tuned"]), steps), step, max_iters=steps,
                   precision="bf16" if v["bf16"] else "fp32", device=device)


def images(args: argparse.Namespace, device: torch.device, channels_last: bool) -> tuple[torch.Tensor, torch.Tensor]:
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    shape = (args.batch, 3, args.size, args.size)
    return (torch.randn(shape, device=device).contiguous(memory_format=fmt),
            torch.randn(shape, device=device).contiguous(memory_format=fmt))


def timed(fn, device: torch.device) -> tuple[float, float]:
    """(seconds the step took by the clock used for this device, wall seconds)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t, c = time.perf_counter(), time.process_time()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    wall = time.perf_counter() - t
    return (wall if device.type == "cuda" else time.process_time() - c), wall


def compare(args: argparse.Namespace, device: torch.device, variants: dict[str, dict]) -> dict[str, tuple[float, float]]:
    """Median (step seconds, wall seconds) of each variant, steps interleaved round-robin after `warmup` each."""
    built = {name: make(args, device, v) for name, v in variants.items()}
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in variants}
    for i in range(args.warmup + args.steps):
        for name, trainer in built.items():
            dt = timed(lambda: trainer.train(until=trainer.iter + 1), device)
            if i >= args.warmup:
                times[name].append(dt)
    return {name: (statistics.median(t for t, _ in ts), statistics.median(w for _, w in ts)) for name, ts in times.items()}


def report(title: str, args: argparse.Namespace, med: dict[str, tuple[float, float]], baseline: str) -> None:
    clock = "CPU time" if title.startswith("CPU") else "wall time"
    print(f"\n{title}: batch {args.batch}, {args.size} px, queue {args.queue}, {args.arch}, "
          f"median of {args.steps} steps after {args.warmup} warm-up ({clock})")
    for name, (sec, wall) in med.items():
        rel = med[baseline][0] / sec
        print(f"  {name:28s} {sec * 1000:9.1f} ms/step  {args.batch / sec:8.2f} img/s  x{rel:.3f} vs {baseline}"
              + (f"  (wall {wall * 1000:.0f} ms)" if clock == "CPU time" else ""))


def set_tuned_backends(on: bool) -> None:
    torch.backends.cudnn.benchmark = on
    torch.backends.cuda.matmul.allow_tf32 = on


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="resnet50")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--queue", type=int, default=65536)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--compile", action="store_true", help="GPU: add a tuned + torch.compile variant")
    ap.add_argument("--skip-cpu", action="store_true")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, {torch.get_num_threads()} CPU threads")

    if not args.skip_cpu:
        cpu = torch.device("cpu")
        med = compare(args, cpu, {"MoCo v2 (dense=False)": dict(tuned=False, bf16=False, dense=False),
                                  "DenseCL": dict(tuned=False, bf16=False, dense=True)})
        report("CPU, fp32", args, med, "MoCo v2 (dense=False)")
        cost = med["DenseCL"][0] / med["MoCo v2 (dense=False)"][0] - 1
        print(f"  dense branch cost: {cost * 100:+.1f}% step time")

    if torch.cuda.is_available():
        gpu = torch.device("cuda")
        print(f"\nGPU: {torch.cuda.get_device_name(gpu)}")
        set_tuned_backends(False)
        fp32 = compare(args, gpu, {"fp32 NCHW": dict(tuned=False, bf16=False, dense=True)})
        set_tuned_backends(True)
        variants = {"MoCo v2 tuned (dense=False)": dict(tuned=True, bf16=True, dense=False),
                    "DenseCL tuned": dict(tuned=True, bf16=True, dense=True)}
        tuned = compare(args, gpu, variants)
        med = {**fp32, **tuned}
        if args.compile:
            med.update(compare(args, gpu, {"DenseCL tuned + compile": dict(tuned=True, bf16=True, dense=True, compile=True)}))
        report("CUDA", args, med, "fp32 NCHW")
        cost = med["DenseCL tuned"][0] / med["MoCo v2 tuned (dense=False)"][0] - 1
        print(f"  dense branch cost (tuned): {cost * 100:+.1f}% step time; "
              f"peak memory {torch.cuda.max_memory_allocated(gpu) / 2**30:.1f} GiB")


if __name__ == "__main__":
    main()
