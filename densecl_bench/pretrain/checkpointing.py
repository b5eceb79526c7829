"""Training checkpoints in MMSelfSup 0.x's layout, plus what an exact resume needs.

PROTOCOLS.md §1.4: `{'meta': {'epoch', 'iter', 'config', ...}, 'state_dict': {queue, queue_ptr, queue2,
queue2_ptr, encoder_q.*, encoder_k.*, backbone.*}, 'optimizer': ...}` as the mmcv runner writes it,
so tools that read the reference's `epoch_N.pth` read ours. We add `rng` (torch, CUDA, numpy and
Python states) stored as tensors and plain containers: every file loads with `weights_only=True`.
`latest.pth` is always the newest state; `epoch_N.pth` are hard links to it at checkpoint epochs
(a copy where links are not supported), the last `keep` of them kept, as mmcv's `max_keep_ckpts`.
"""

from __future__ import annotations

import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from densecl_bench.paths import atomic_path, atomic_torch_save


def rng_state() -> dict[str, Any]:
    """Every RNG the training process may draw from, as weights_only-loadable values."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, py_state, gauss_next = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": {"version": version, "state": torch.tensor(py_state, dtype=torch.int64), "gauss_next": gauss_next},
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(int(v) for v in p["state"].tolist()), p["gauss_next"]))


def save(work_dir: Path, ckpt: dict[str, Any], epoch_file: bool, keep: int) -> Path:
    """Write `latest.pth` atomically; at a checkpoint epoch also publish it as `epoch_N.pth`."""
    latest = work_dir / "latest.pth"
    atomic_torch_save(latest, ckpt)
    if epoch_file:
        target = work_dir / f"epoch_{ckpt['meta']['epoch']}.pth"
        with atomic_path(target) as tmp:
            tmp.unlink()
            try:
                os.link(latest, tmp)
            except OSError:
                shutil.copyfile(latest, tmp)
        _prune(work_dir, keep)
    return latest


def _prune(work_dir: Path, keep: int) -> None:
    if keep <= 0:
        return
    epochs = sorted(int(m.group(1)) for p in work_dir.glob("epoch_*.pth") if (m := re.fullmatch(r"epoch_(\d+)\.pth", p.name)))
    for e in epochs[:-keep]:
        (work_dir / f"epoch_{e}.pth").unlink(missing_ok=True)


def load(path: Path) -> dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=True)
