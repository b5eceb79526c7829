"""The benchmark plugin contract: a name, the table it feeds, its config, and `run(ctx) -> list[Metric]`.

Built-in benchmarks register through the `densecl_bench.benchmarks` entry-point group, the same
group third-party packages use (see `registry.py`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from densecl_bench.backbone import Backbone
from densecl_bench.checkpoint import LoadedCheckpoint
from densecl_bench.data.base import ImageList


@dataclass(frozen=True)
class Metric:
    """One number a benchmark produced. `name` is the table column key (e.g. `k=16`, `feature4`, `AP50`).

    `value` is a float (percent, as the tables print it) or, for labels such as the best layer, a str.
    `extra` carries what the ledger keeps but the tables do not print (min/max/std, chosen costs...).
    """

    benchmark: str
    name: str
    value: float | str
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class RunContext:
    """Everything a benchmark needs; built once per run by the runner.

    config: this benchmark's resolved config (profile applied); `demo` is True when the data are the
    embedded demo datasets. `features()` extracts through the on-disk feature cache.
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


class Benchmark(ABC):
    """A benchmark plugin. Subclasses set the class attributes and implement `required_data` and `run`."""

    name: ClassVar[str]  # the ledger / reference-JSON key, e.g. "voc07_svm"
    aliases: ClassVar[tuple[str, ...]] = ()  # short names accepted on the command line
    table: ClassVar[str]  # the model-zoo table it feeds
    config: ClassVar[str]  # config name in benchmarks/
    order: ClassVar[int] = 100  # position in `run all` and `list` (the model-zoo page's table order)

    @abstractmethod
    def required_data(self, data_root: Path) -> list[Path]:
        """Paths that must exist under `data_root` for this benchmark to run."""

    @abstractmethod
    def run(self, ctx: RunContext) -> list[Metric]:
        """Run the protocol and return its metrics."""
