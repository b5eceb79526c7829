"""Checkpoint loading (any known layout -> torchvision ResNet keys), safe unpickling, and export.

(Skeleton: the full loader is being written; this file fixes the public types.)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from torch import Tensor


class CheckpointError(ValueError):
    """A checkpoint cannot be used; the message names the file, the layout detected and what is wrong."""


@dataclass
class LoadedCheckpoint:
    """A backbone state dict in torchvision keys (conv1, bn1, layer1..4; no fc) and its provenance."""

    state_dict: dict[str, Tensor]
    arch: str
    layout: str
    sha256: str
    path: str
    ignored_keys: list[str] = field(default_factory=list)
    missing_keys: list[str] = field(default_factory=list)
    meta: dict = field(default_factory=dict)


def load_checkpoint(path: str | Path, arch: str | None = None, allow_partial: bool = False) -> LoadedCheckpoint:
    raise NotImplementedError
