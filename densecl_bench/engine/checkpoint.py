"""Training checkpoints: atomic, resumable bit for bit, and resumed under one rule only.

Layout (mmcv's runner, so tools that read MMSelfSup's `epoch_N.pth` read ours):
`{'meta': {'epoch', 'iter', 'iter_in_epoch', 'iters_per_epoch', 'resume_key', 'time', ...caller's meta},
'state_dict': model, 'optimizer': ..., 'rng': ..., 'hooks': {hook name: its state}}`. The position
(iter, iters_per_epoch) is also the sampler's: the data order is a function of seed and epoch, so
a run resumed at iteration i of an epoch skips the i batches it has seen. Everything is stored as
tensors and plain containers, so every file loads with `weights_only=True`.

`latest.pth` is always the newest state; numbered snapshots (`epoch_N.pth` / `iter_N.pth`) are hard
links to it (a copy where links are not supported), the last `keep` of them kept.

The resume rule: a checkpoint is resumed when it was written for the same input checkpoint
(sha256), protocol (config fingerprint), seed and world size; otherwise the run starts afresh and
says which of them differs.
"""

from __future__ import annotations

import logging
import os
import random
import re
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from densecl_bench import dist
from densecl_bench.paths import atomic_path, atomic_torch_save

if TYPE_CHECKING:
    from densecl_bench.engine.trainer import Trainer

log = logging.getLogger(__name__)


def rng_state() -> dict[str, Any]:
    """Every RNG a training process may draw from (torch, CUDA, numpy, Python), weights_only-loadable."""
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


@dataclass(frozen=True)
class ResumeKey:
    """What a training state belongs to. checkpoint_sha256 is the input weights' hash ('' for random init)."""

    checkpoint_sha256: str
    fingerprint: str
    seed: int
    world_size: int

    def mismatch(self, saved: dict[str, Any] | None) -> str | None:
        """Why a checkpoint with `saved` (its meta's resume_key) cannot be resumed; None when it can."""
        if saved is None:
            return "it carries no resume key"
        for name, ours in asdict(self).items():
            if saved.get(name) != ours:
                return f"its {name.replace('_', ' ')} is {saved.get(name)!r}, this run's is {ours!r}"
        return None


class Checkpointer:
    """Saves and resumes a trainer's complete state in `directory` (rank 0 writes, every rank reads).

    latest: the file name of the newest state. meta: extra entries for every file's `meta`
    (the config, the package version...).
    """

    def __init__(self, directory: str | os.PathLike[str], key: ResumeKey, *, latest: str = "latest.pth",
                 meta: dict[str, Any] | None = None) -> None:
        self.directory, self.key, self.meta = Path(directory), key, dict(meta or {})
        self.latest = self.directory / latest

    def state(self, trainer: Trainer) -> dict[str, Any]:
        epoch, inner = divmod(trainer.iter, trainer.iters_per_epoch)
        return {
            "meta": {
                **self.meta,
                "epoch": epoch,
                "iter": trainer.iter,
                "iter_in_epoch": inner,
                "iters_per_epoch": trainer.iters_per_epoch,
                "resume_key": asdict(self.key),
                "time": time.strftime("%Y-%m-%d %H:%M:%S"),
            },
            "state_dict": trainer.module.state_dict(),
            "optimizer": trainer.optimizer.state_dict(),
            "rng": rng_state(),
            "hooks": {hook.name: state for hook in trainer.hooks if (state := hook.state_dict())},
        }

    def save(self, trainer: Trainer, snapshot: str | None = None, keep: int = 0) -> Path:
        """Write `latest` atomically (rank 0 only); with `snapshot`, also publish it under that name
        and keep the newest `keep` snapshots of the same pattern (0: all)."""
        if not dist.is_main():
            return self.latest
        atomic_torch_save(self.latest, self.state(trainer))
        if snapshot is not None:
            with atomic_path(self.directory / snapshot) as tmp:
                tmp.unlink()
                try:
                    os.link(self.latest, tmp)
                except OSError:
                    shutil.copyfile(self.latest, tmp)
            self._prune(snapshot, keep)
        return self.latest

    def _prune(self, snapshot: str, keep: int) -> None:
        """Delete all but the newest `keep` files named like `snapshot` (prefix_N.pth, by N)."""
        match = re.fullmatch(r"(.*_)\d+\.pth", snapshot)
        if keep <= 0 or match is None:
            return
        pattern = re.compile(re.escape(match.group(1)) + r"(\d+)\.pth")
        found = sorted((int(m.group(1)), p) for p in self.directory.iterdir() if (m := pattern.fullmatch(p.name)))
        for _, path in found[:-keep]:
            path.unlink(missing_ok=True)

    def load(self, trainer: Trainer) -> bool:
        """Restore `latest` into the trainer if the resume rule allows it; log why not otherwise."""
        if not self.latest.is_file():
            return False
        state = torch.load(self.latest, map_location="cpu", weights_only=True)
        meta = state.get("meta", {})
        why = self.key.mismatch(meta.get("resume_key"))
        if why is None and meta.get("iters_per_epoch") != trainer.iters_per_epoch:
            why = f"it has {meta.get('iters_per_epoch')} iterations per epoch, this run has {trainer.iters_per_epoch}"
        if why is not None:
            if dist.is_main():
                log.warning("not resuming from %s: %s; starting afresh", self.latest, why)
            return False
        trainer.module.load_state_dict(state["state_dict"])
        trainer.optimizer.load_state_dict(state["optimizer"])
        set_rng_state(state["rng"])
        hooks = state.get("hooks", {})
        for hook in trainer.hooks:
            if hook.name in hooks:
                hook.load_state_dict(hooks[hook.name])
        trainer.iter = meta["iter"]
        if dist.is_main():
            log.info("resuming from %s at epoch %d, iteration %d", self.latest, meta["epoch"], meta["iter"])
        return True
