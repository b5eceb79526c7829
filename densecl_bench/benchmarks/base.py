"""The benchmark plugin contract: a name, the table it feeds, its configs, and `run(ctx) -> list[Metric]`.

Built-in benchmarks register through the `densecl_bench.benchmarks` entry-point group, the same
group third-party packages use (see `registry.py`). `Metric` is the ledger's record type
(`densecl_bench.results`), re-exported here for plugins.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torchvision
from torch import nn

from densecl_bench import dist
from densecl_bench.backbone import Backbone
from densecl_bench.checkpoint import LoadedCheckpoint, build_trainable
from densecl_bench.data.base import ImageList
from densecl_bench.engine import ddp
from densecl_bench.engine import precision as precision_mod
from densecl_bench.results import Metric

__all__ = ["Benchmark", "Metric", "RunContext"]


@dataclass
class RunContext:
    """Everything a benchmark needs; built once per run by the runner.

    config: this benchmark's resolved config (profiles applied); configs: every config the stage runs
    (`Benchmark.config` and `Benchmark.extra_configs`) by name, resolved alike. `demo` is True when the
    data are the embedded demo datasets. `features()` extracts through the on-disk feature cache
    from the frozen `backbone`; `trainable_backbone()` gives benchmarks that fine-tune a fresh network.
    """

    backbone: Backbone
    checkpoint: LoadedCheckpoint
    data_root: Path
    demo: bool
    device: torch.device
    run_dir: Path
    cache_dir: Path
    config: dict[str, Any]
    seed: int = 0
    num_workers: int = 2
    on_bad_image: str = "raise"
    # image-list name -> indices of unreadable images left out (`on_bad_image: skip`); the runner
    # records the counts in the ledger and the tables mark such rows
    skipped_images: dict[str, list[int]] = field(default_factory=dict)
    configs: dict[str, dict[str, Any]] = field(default_factory=dict)
    # rank 0 of a `rank0_only` stage under torchrun: announce each extraction to the other ranks,
    # which wait in `serve_features` and extract their shards
    lead_extraction: bool = False

    @property
    def precision(self) -> str:
        """The stage's arithmetic, `fp32` or `bf16` (the runner resolves `precision` into every config)."""
        return self.config.get("precision", precision_mod.DEFAULT)

    def features(
        self,
        image_list: ImageList,
        transform: str,
        layers: Sequence[str],
        pooling: str,
        size: int = 224,
        batch_size: int = 32,
    ) -> tuple[dict[str, np.ndarray], ImageList]:
        """Pooled features per layer (float32), cached by checkpoint sha256, and the images they belong to.

        Under `on_bad_image: skip` the unreadable images are left out of both, row for row, so that
        no benchmark can train or test on them, and recorded in `skipped_images`.
        """
        from densecl_bench.features import extract

        if self.lead_extraction:
            dist.broadcast_object((image_list, transform, list(layers), pooling, size, batch_size))

        out = extract(
            self.backbone,
            image_list,
            transform=transform,
            layers=layers,
            pooling=pooling,
            size=size,
            batch_size=batch_size,
            num_workers=self.num_workers,
            device=self.device,
            cache_dir=self.cache_dir,
            ckpt_key=self.checkpoint.sha256,
            on_bad_image=self.on_bad_image,
            precision=self.precision,
        )
        if out.skipped:
            self.skipped_images[image_list.name] = out.skipped
        return out.readable(image_list)

    def serve_features(self) -> None:
        """The other ranks of a `rank0_only` stage: join each extraction rank 0 announces, until it is done."""
        while (request := dist.broadcast_object(None)) is not None:
            self.features(*request)

    def trainable_backbone(
        self,
        *,
        norm_layer: Callable[[int], nn.Module] | None = None,
        frozen_stages: int = -1,
        replace_stride_with_dilation: Sequence[bool] = (False, False, False),
    ) -> torchvision.models.ResNet:
        """A fresh torchvision ResNet holding the checkpoint's weights (loaded strictly), on `device`, in train mode.

        Every call builds a new network: fine-tuning one never touches `backbone` or another copy. `fc`
        is an `nn.Identity` (the forward ends in the globally pooled res5). Options as torchvision's and
        mmcv's: `norm_layer` (BatchNorm2d by default; `nn.SyncBatchNorm` becomes SyncBN only on CUDA with
        world size > 1, plain BN elsewhere, as `engine.ddp.prepare` does), `frozen_stages` (-1 none, 0
        the stem, i the stem and layer1..layer_i: no gradients, BN frozen at the checkpoint's
        statistics whatever `train()` says) and `replace_stride_with_dilation` ((False, True, True):
        the FCN-D8 net, output stride 8).
        """
        sync = norm_layer is nn.SyncBatchNorm
        net = build_trainable(self.checkpoint, norm_layer=None if sync else norm_layer, frozen_stages=frozen_stages,
                              replace_stride_with_dilation=replace_stride_with_dilation)
        if sync:
            net = ddp.sync_batchnorm(net, self.device)
        return net.to(self.device).train()


class Benchmark(ABC):
    """A benchmark plugin. Subclasses set the class attributes and implement `required_data` and `run`.

    A config that trains declares the batch its protocol assumes: `total_batch_size` and
    `batch_size_per_gpu`. Where world size x per-GPU batch differs, the runner warns and marks the
    records, unless the config accumulates (`batch_policy: accumulate`) and says no statistic is taken
    over the batch (`batch_statistics: false`): accumulated passes give the same steps, but BN over 32
    images is not BN over 256.
    """

    name: ClassVar[str]  # the ledger / reference-JSON key, e.g. "voc07_svm"
    aliases: ClassVar[tuple[str, ...]] = ()  # short names accepted on the command line
    table: ClassVar[str]  # the model-zoo table it feeds
    config: ClassVar[str]  # config name in benchmarks/: `ctx.config`
    # further configs the stage runs (`ctx.configs[name]`): loaded with the same profiles and part of
    # the stage's fingerprint, so editing any of them re-runs the stage
    extra_configs: ClassVar[tuple[str, ...]] = ()
    order: ClassVar[int] = 100  # position in `run all` and `list` (the model-zoo page's table order)
    # Under torchrun, run() executes on rank 0 only; its `ctx.features()` calls stay sharded over all
    # ranks. For benchmarks whose compute after extraction is one process's work (SVM, kNN).
    rank0_only: ClassVar[bool] = False
    # GPUs the protocol assumes (its total batch over this many processes): a SLURM job of the stage
    # asks for this many unless `--gpus-per-stage` says otherwise
    gpus: ClassVar[int] = 1

    @classmethod
    def all_configs(cls) -> tuple[str, ...]:
        return (cls.config, *cls.extra_configs)

    @abstractmethod
    def required_data(self, data_root: Path) -> list[Path]:
        """Paths that must exist under `data_root` for this benchmark to run."""

    @abstractmethod
    def run(self, ctx: RunContext) -> list[Metric]:
        """Run the protocol and return its metrics."""
