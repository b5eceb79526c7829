"""Timing pieces shared by the detector perf scripts (`det_c4.py`, `det_fpn.py`).

A training step is split by forward hooks on the detector's top-level parts (synchronised on CUDA,
so each part's time is its own); what is left of the step is backward and the optimizer step.
"""

from __future__ import annotations

import argparse
import resource
import time
from collections import defaultdict
from collections.abc import Callable, Sequence

import torch
from torch.utils.data import Dataset

from densecl_bench.engine import precision as precision_mod


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def sgd_step(model: torch.nn.Module, images: list[torch.Tensor], targets: list[dict[str, torch.Tensor]],
             precision: str, device: torch.device) -> Callable[[], None]:
    """One protocol training step (losses summed, backward, SGD 0.02 / momentum 0.9 / wd 1e-4) on fixed inputs."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9, weight_decay=1e-4)

    def step() -> None:
        with precision_mod.autocast(precision, device):
            loss = sum(model(images, targets).values())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def time_step(model: torch.nn.Module, parts: Sequence[str], step: Callable[[], None], steps: int,
              device: torch.device) -> tuple[float, dict[str, float]]:
    """Seconds per `step()` over `steps` calls after one warm-up call, and each named part's share."""
    spent: dict[str, float] = defaultdict(float)
    starts: dict[str, float] = {}
    for name in parts:
        def begin(module: torch.nn.Module, args: tuple, name: str = name) -> None:
            sync(device)
            starts[name] = time.perf_counter()

        def end(module: torch.nn.Module, args: tuple, out: object, name: str = name) -> None:
            sync(device)
            spent[name] += time.perf_counter() - starts[name]

        getattr(model, name).register_forward_pre_hook(begin)
        getattr(model, name).register_forward_hook(end)
    step()
    spent.clear()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    total = (time.perf_counter() - start) / steps
    per = {k: v / steps for k, v in spent.items()}
    per["backward + SGD"] = total - sum(per.values())
    return total, per


def step_arguments(description: str, size: int) -> argparse.ArgumentParser:
    """The options both detector scripts take; `size` is the default shorter side."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--size", type=int, default=size, help="shorter side; the longer is 4/3 of it")
    parser.add_argument("--precision", default="fp32", choices=precision_mod.PRECISIONS)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--loader-items", type=int, default=20)
    return parser


def items_per_second(dataset: Dataset, n: int) -> float:
    """`dataset[i]` for i < n in this process: one loader worker's throughput."""
    start = time.perf_counter()
    for i in range(n):
        dataset[i]
    return n / (time.perf_counter() - start)


def describe(device: torch.device, precision: str) -> str:
    """The device line every perf script prints first."""
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    return f"device: {where}; torch {torch.__version__}; {precision}"


def memory(device: torch.device) -> str:
    if device.type == "cuda":
        return f"peak GPU memory {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB"
    return f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB"


def breakdown(total: float, per: dict[str, float]) -> str:
    return "  " + ", ".join(f"{k} {v:.3f} s ({100 * v / total:.0f}%)" for k, v in per.items())
