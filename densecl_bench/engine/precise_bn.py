"""PreciseBN: replace the EMA running statistics of BatchNorm by averages over many batches.

Same math as detectron2's / fvcore's `update_bn_stats` and torch's `momentum=None`: after N
batches the running mean is the average of the N batch means and the running variance the average
of the N (unbiased) batch variances. The EMA kept during training lags behind weights that still
move; evaluating with these averages is what TEST.PRECISE_BN does (PROTOCOLS.md §6.1). Under DDP
each rank averages its own batches, then the ranks' averages are averaged (equal batch counts).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from densecl_bench import dist
from densecl_bench.progress import bar as progress_bar


def bn_layers(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


@torch.no_grad()
def update_bn_stats(model: nn.Module, batches: Iterable[Any], forward: Callable[[Any], Any], num_iters: int = 200) -> int:
    """Run `forward` on up to `num_iters` batches in train mode and set every BN's running statistics
    to their cumulative average; returns the number of batches used. Other state is left as it was."""
    layers = bn_layers(model)
    if not layers:
        return 0
    momenta = [bn.momentum for bn in layers]
    was_training = model.training
    model.train()
    for bn in layers:
        bn.reset_running_stats()
        bn.momentum = None  # torch then keeps the cumulative average
    used = 0
    try:
        for batch in progress_bar(itertools.islice(batches, num_iters), desc="precise BN", total=num_iters,
                                  leave=False):
            forward(batch)
            used += 1
    finally:
        for bn, momentum in zip(layers, momenta, strict=True):
            bn.momentum = momentum
        model.train(was_training)
    if used == 0:
        raise ValueError("PreciseBN got no batch to recompute the BN statistics on")
    if dist.is_dist():
        for bn in layers:
            for stat in (bn.running_mean, bn.running_var):
                stat.div_(dist.world_size())
                dist.all_reduce_sum(stat)
    return used
