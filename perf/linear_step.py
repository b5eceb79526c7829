"""Linear-probe training step vs the frozen backbone's inference-only forward, same batch and size.

One step of the multi-head probe (backbone pass in inference mode, five pooled heads with BN and
Linear(., 1000), summed CE, backward, Nesterov SGD update) should cost little beyond the forward:
target >= 85% of the backbone's inference throughput (issue 4). Both sides go through
`densecl_bench.linear.Probe` (channels_last on CUDA) under the `--precision` the probe would run in
(fp32 by default, as the published numbers). Inputs are random tensors: this times compute, not data loading.

    python perf/linear_step.py [--batch-size 32] [--size 224] [--steps 5] [--classes 1000] [--head multi]
                               [--precision fp32|bf16]
"""

from __future__ import annotations

import argparse
import platform
import time

import torch

from densecl_bench import config
from densecl_bench.engine.precision import PRECISIONS, autocast
from densecl_bench.backbone import Backbone
from densecl_bench.linear import Probe, Recipe, build_heads


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _interleaved_rates(fns, steps: int, batch: int, device: torch.device) -> list[float]:
    """img/s of each fn, timed in alternation so that load from other processes hits both alike."""
    for fn in fns:
        fn()  # warm-up (allocations, cuDNN autotune)
    spent = [0.0] * len(fns)
    for _ in range(steps):
        for i, fn in enumerate(fns):
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            spent[i] += time.perf_counter() - start
    return [steps * batch / t for t in spent]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--head", choices=("multi", "avgpool"), default="multi")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", choices=PRECISIONS, default="fp32")
    args = parser.parse_args()
    device = torch.device(args.device)
    name = "resnet50_mhead_linear-8xb32-steplr-90e_in1k" if args.head == "multi" else "resnet50_linear-8xb32-steplr-100e_in1k"
    recipe = Recipe.from_config(config.load(name, "benchmarks"))
    if args.size != 224 and recipe.pooling == "protocol":
        recipe = Recipe.from_config({**config.load(name, "benchmarks"), "pooling": "adaptive"})
    backbone = Backbone("resnet50")
    probe = Probe(backbone, build_heads(recipe, backbone, args.classes, seed=0), device)
    optimizer = torch.optim.SGD(probe.heads.parameters(), lr=recipe.lr, momentum=recipe.momentum,
                                nesterov=recipe.nesterov, weight_decay=recipe.weight_decay)
    images = torch.randn(args.batch_size, 3, args.size, args.size)
    labels = torch.randint(0, args.classes, (args.batch_size,), device=device)
    x = images.to(device)
    if probe.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)

    def forward_only() -> None:
        with autocast(args.precision, device), torch.inference_mode():
            probe.backbone(x)

    def train_step() -> None:
        with autocast(args.precision, device):
            loss = sum(probe.loss(images, labels).values())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    probe.heads.train()
    fwd, step = _interleaved_rates([forward_only, train_step], args.steps, args.batch_size, device)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else (
        f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads")
    print(f"device: {where}; torch {torch.__version__}; head {args.head}; {args.precision}; batch {args.batch_size}; "
          f"{args.size} px; {args.classes} classes; {args.steps} timed steps")
    print(f"backbone inference forward: {fwd:8.1f} img/s")
    print(f"probe training step:        {step:8.1f} img/s")
    print(f"ratio: {100 * step / fwd:.1f}% (target >= 85%)")


if __name__ == "__main__":
    main()
