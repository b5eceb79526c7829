"""Wrap a model for the run it is in: DDP when torch.distributed is initialised, plain otherwise.

BatchNorm becomes SyncBatchNorm only on CUDA with more than one process: torch's SyncBatchNorm
raises on CPU tensors under a process group, and with one process it is plain BN anyway.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from densecl_bench import dist


def prepare(model: nn.Module, device: torch.device, *, sync_bn: bool = True, broadcast_buffers: bool = True,
            find_unused_parameters: bool = False) -> nn.Module:
    """Move `model` to `device`; convert BN to SyncBN (CUDA, world > 1, `sync_bn`) and wrap in DDP when distributed.

    Build the optimizer on the returned module's parameters (DDP shares them with `model`).
    """
    model = model.to(device)
    if not dist.is_dist():
        return model
    if sync_bn:
        model = sync_batchnorm(model, device)
    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids, broadcast_buffers=broadcast_buffers,
                                   find_unused_parameters=find_unused_parameters)


def sync_batchnorm(model: nn.Module, device: torch.device) -> nn.Module:
    """`model` with its BatchNorm layers as SyncBatchNorm on CUDA with world size > 1; unchanged elsewhere."""
    if device.type == "cuda" and dist.world_size() > 1:
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model
