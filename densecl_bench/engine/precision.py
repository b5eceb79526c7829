"""Precision is a protocol setting: `fp32` (what every published number used) or `bf16` autocast.

It is chosen by the config or the CLI and recorded, never implied by the device: the same `bf16`
runs under autocast on CPU and on CUDA, and `fp32` adds no context at all, but is IEEE fp32 on GPUs
too once `ieee_fp32()` has turned off torch's TF32 default for cuDNN convolutions.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

import torch

from densecl_bench.config import ConfigError

PRECISIONS = ("fp32", "bf16")
DEFAULT = "fp32"


def check(precision: str) -> str:
    """Return `precision` if it is known; a ConfigError naming the choices otherwise."""
    if precision not in PRECISIONS:
        raise ConfigError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    return precision


def autocast(precision: str, device: torch.device | str) -> AbstractContextManager:
    """The context a forward pass runs in: bf16 autocast on the device's type, or nothing for fp32."""
    if check(precision) == "fp32":
        return nullcontext()
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)


def ieee_fp32() -> None:
    """No TF32 in cuDNN convolutions (torch's default on Ampere and newer GPUs) nor in CUDA matmuls.

    TF32 keeps 10 mantissa bits of fp32's 23, and the published numbers predate it. bf16 autocast is
    unaffected (its convolutions and matmuls run in bf16); the process-wide flags stay set.
    """
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
