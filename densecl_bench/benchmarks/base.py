"""The benchmark plugin contract: a name, the table it feeds, its configs, and `run(ctx) -> list[Metric]`.

Built-in benchmarks register through the `densecl_bench.benchmarks` entry-point group, the same
group third-party packages use (see `registry.py`). `Metric` is the ledger's record type
(`densecl_bench.results`), re-exported here for plugins.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from densecl_bench import dist
from densecl_bench.backbone import Backbone
from densecl_bench.checkpoint import LoadedCheckpoint
from densecl_bench.data.base import ImageList
from densecl_bench.results import Metric

__all__ = ["Benchmark", "Metric", "RunContext"]


@dataclass
class RunContext:
    """Everything a benchmark needs; built once per run by the runner.

    config: this benchmark's resolved config (profiles applied); configs: every config the stage runs
    (`Benchmark.config` and `Benchmark.extra_configs`) by name, resolved alike. `demo` is True when the
    data are the embedded demo datasets. `features()` extracts through the on-disk feature cache.
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
        )
        if out.skipped:
            self.skipped_images[image_list.name] = out.skipped
        return out.readable(image_list)

    def serve_features(self) -> None:
        """The other ranks of a `rank0_only` stage: join each extraction rank 0 announces, until it is done."""
        while (request := dist.broadcast_object(None)) is not None:
            self.features(*request)


class Benchmark(ABC):
    """A benchmark plugin. Subclasses set the class attributes and implement `required_data` and `run`."""

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

    @classmethod
    def all_configs(cls) -> tuple[str, ...]:
        return (cls.config, *cls.extra_configs)

    @abstractmethod
    def required_data(self, data_root: Path) -> list[Path]:
        """Paths that must exist under `data_root` for this benchmark to run."""

    @abstractmethod
    def run(self, ctx: RunContext) -> list[Metric]:
        """Run the protocol and return its metrics."""
