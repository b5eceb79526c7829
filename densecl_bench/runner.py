"""Run benchmarks on one checkpoint: checkpoint -> backbone -> each plugin -> ledger -> tables.

Without a data root the embedded demo datasets are used (written on first use) and every record
says so. Each (benchmark, trial) is one resumable stage: re-running the same run id skips stages
whose protocol fingerprint is already in the ledger.
"""

from __future__ import annotations

import logging
import re
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import torch

from densecl_bench import config, dist, paths, registry
from densecl_bench.backbone import Backbone, freeze
from densecl_bench.benchmarks.base import RunContext
from densecl_bench.checkpoint import LoadedCheckpoint, build_backbone, load_checkpoint
from densecl_bench.results import Ledger, provenance
from densecl_bench.tables import write_tables

log = logging.getLogger(__name__)

DEMO_BANNER = (
    "No --data-root given: running on the embedded demo datasets ({root}).\n"
    "Demo numbers exercise the real protocols on tiny synthetic data; they are not comparable to "
    "published results."
)


@dataclass
class StageOutcome:
    benchmark: str
    trial: int
    status: str  # done | resumed | skipped | failed
    detail: str = ""


@dataclass
class SuiteResult:
    run_dir: Path
    stages: list[StageOutcome] = field(default_factory=list)

    @property
    def failed(self) -> list[StageOutcome]:
        return [s for s in self.stages if s.status == "failed"]


def _silent(*_args, **_kwargs) -> None:
    pass


def row_label(ckpt: LoadedCheckpoint) -> str:
    """The table's row label: the pretraining config name when the checkpoint records one, else the file stem."""
    cfg = ckpt.meta.get("config")
    if isinstance(cfg, dict) and cfg.get("_config"):
        return str(cfg["_config"])
    if ckpt.layout == "random":
        return f"random-init-{ckpt.arch}"
    return Path(ckpt.path).stem


def load_frozen(ckpt: str, arch: str | None, allow_partial: bool, device: str | None
                ) -> tuple[LoadedCheckpoint, Backbone, torch.device]:
    """Checkpoint -> frozen backbone (eval mode, no grads) on `device` (default: this rank's GPU, else CPU)."""
    loaded = load_checkpoint(ckpt, arch=arch, allow_partial=allow_partial)
    torch_device = torch.device(device) if device else dist.default_device()
    return loaded, freeze(build_backbone(loaded)).to(torch_device), torch_device


def default_run_id(label: str, ckpt: LoadedCheckpoint, profile: str) -> str:
    """Stable across re-runs of the same command, so re-running resumes."""
    parts = [label, profile] if ckpt.layout == "random" else [label, ckpt.sha256[:8], profile]
    return re.sub(r"[^A-Za-z0-9._-]+", "_", "-".join(parts))


def run_suite(
    names: list[str],
    ckpt: str,
    *,
    data_root: Path | None = None,
    runs_dir: Path = Path("runs"),
    run_id: str | None = None,
    label: str | None = None,
    profile: str | None = None,
    trials: int = 1,
    seed: int = 0,
    arch: str | None = None,
    allow_partial: bool = False,
    device: str | None = None,
    num_workers: int = 2,
    on_bad_image: str = "raise",
    echo=print,
) -> SuiteResult:
    """Run the named benchmarks (`all` for every registered one) and write ledger and tables."""
    dist.init_from_env()
    if not dist.is_main():
        echo = _silent  # one voice under torchrun
    benchmarks = registry.resolve(names)
    demo = data_root is None
    if demo:
        from densecl_bench.data.demo import ensure_demo

        data_root = ensure_demo()
        if dist.is_main():
            echo(DEMO_BANNER.format(root=data_root))
    profile = profile or ("demo" if demo else "full")
    loaded, backbone, torch_device = load_frozen(ckpt, arch, allow_partial, device)
    label = label or row_label(loaded)
    run_dir = Path(runs_dir) / (run_id or default_run_id(label, loaded, profile))
    ledger = Ledger(run_dir)
    if dist.is_main():
        ledger.write_manifest({
            "run_id": run_dir.name, "label": label, "ckpt": str(ckpt), "ckpt_sha256": loaded.sha256,
            "ckpt_layout": loaded.layout, "arch": loaded.arch, "profile": profile, "demo": demo,
            "data_root": str(data_root), "argv": sys.argv,
        })
    result = SuiteResult(run_dir)
    for bench_cls in benchmarks:
        bench = bench_cls()
        missing = [p for p in bench.required_data(data_root) if not p.exists()]
        if missing:
            result.stages.append(StageOutcome(bench.name, 0, "skipped", f"no data at {missing[0]}"))
            echo(f"[{bench.name}] skipped: no data at {missing[0]}")
            continue
        cfg = config.load(bench.config, "benchmarks", profile, if_offered=True)
        resolved = {**cfg, "world_size": dist.world_size(), "arch": loaded.arch}
        fp = config.fingerprint(resolved)
        for trial in range(trials):
            if ledger.completed(bench.name, fp, trial):
                result.stages.append(StageOutcome(bench.name, trial, "resumed", "already in the ledger"))
                echo(f"[{bench.name}] trial {trial}: already recorded, skipped (resume)")
                continue
            echo(f"[{bench.name}] trial {trial}: running ({cfg['_config']}, profile {cfg['_profile']})")
            ctx = RunContext(
                backbone=backbone, checkpoint=loaded, data_root=Path(data_root), demo=demo, device=torch_device,
                run_dir=run_dir / bench.name / f"trial{trial}", cache_dir=paths.cache_root() / "features",
                config=resolved, seed=seed + trial, num_workers=num_workers, on_bad_image=on_bad_image,
            )
            start = time.perf_counter()
            try:
                metrics = bench.run(ctx)
            except Exception as err:  # one broken benchmark must not lose the others
                log.debug("benchmark %s failed", bench.name, exc_info=True)
                result.stages.append(StageOutcome(bench.name, trial, "failed", f"{type(err).__name__}: {err}"))
                echo(f"[{bench.name}] FAILED: {type(err).__name__}: {err}\n{traceback.format_exc(limit=3)}")
                break
            wall = time.perf_counter() - start
            if dist.is_main():
                prov = provenance(
                    ckpt_sha256=loaded.sha256, ckpt_layout=loaded.layout, ckpt_path=str(ckpt), arch=loaded.arch,
                    device=str(torch_device), world_size=dist.world_size(), seed=seed + trial, wall_time_s=wall,
                    demo=demo, data_root=str(data_root),
                )
                ledger.append(metrics, label=label, trial=trial, config=resolved, fingerprint=fp, provenance=prov)
            result.stages.append(StageOutcome(bench.name, trial, "done", f"{len(metrics)} metrics in {wall:.0f}s"))
            echo(f"[{bench.name}] trial {trial}: {len(metrics)} metrics in {wall:.1f}s")
    if dist.is_main():
        write_tables(run_dir)
    dist.barrier()
    return result



# dataset name -> (folder under the data root, reader, protocol transform, pooling)
EXTRACT_DATASETS = {
    "voc07": ("VOCdevkit/VOC2007", "voc_svm", "protocol"),
    "imagenet": ("imagenet", "center_crop", "global"),
    "places205": ("Places205", "center_crop", "protocol"),
}


def extract_dataset(
    ckpt: str,
    dataset: str,
    split: str,
    layers: list[str],
    *,
    data_root: Path | None = None,
    pooling: str | None = None,
    size: int | None = None,
    batch_size: int = 32,
    num_workers: int = 2,
    device: str | None = None,
    arch: str | None = None,
    allow_partial: bool = False,
    on_bad_image: str = "raise",
) -> dict[str, tuple[Path, tuple[int, ...]]]:
    """Extract (or read from the cache) one split's pooled features; returns {layer: (cache file, shape)}.

    Without a data root, the demo datasets are used at the demo size (96 px, adaptive pooling). Under
    `on_bad_image: skip` the rows of unreadable images are zero and listed in each file's `.json` sidecar.
    """
    from densecl_bench.data import imagenet as imagenet_reader
    from densecl_bench.data import places as places_reader
    from densecl_bench.data import voc as voc_reader
    from densecl_bench.features import extract

    if dataset not in EXTRACT_DATASETS:
        raise KeyError(f"unknown dataset {dataset!r}: expected one of {', '.join(EXTRACT_DATASETS)}")
    folder, transform, default_pooling = EXTRACT_DATASETS[dataset]
    if data_root is None:
        from densecl_bench.data.demo import ensure_demo

        data_root = ensure_demo()
        size = size or 96
        default_pooling = "adaptive" if default_pooling == "protocol" else default_pooling
    size = size or 224
    pooling = pooling or default_pooling
    readers = {
        "voc07": voc_reader.voc07_classification,
        "imagenet": imagenet_reader.imagenet,
        "places205": places_reader.places205,
    }
    image_list = readers[dataset](Path(data_root) / folder, split)
    loaded, backbone, torch_device = load_frozen(ckpt, arch, allow_partial, device)
    cache_dir = paths.cache_root() / "features"
    feats = extract(backbone, image_list, transform=transform, layers=layers, pooling=pooling, size=size,
                    batch_size=batch_size, num_workers=num_workers, device=torch_device, cache_dir=cache_dir,
                    ckpt_key=loaded.sha256, on_bad_image=on_bad_image)
    return {layer: (feats.files[layer], arr.shape) for layer, arr in feats.arrays.items()}
