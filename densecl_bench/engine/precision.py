"""Precision is a protocol setting: `fp32` (what every published number used) or `bf16` autocast.

It is chosen by the config or the CLI and recorded, never implied by the device: the same `bf16`
runs under autocast on CPU and on CUDA, and `fp32` adds no context at all.
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
