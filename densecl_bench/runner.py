"""Run benchmarks on one checkpoint: checkpoint -> backbone -> each plugin -> ledger -> tables.

Without a data root the embedded demo datasets are used (written on first use) and every record
says so. Each (benchmark, trial) is one resumable stage: re-running the same run id skips stages
whose protocol fingerprint (over every config the stage runs, resolved with the profiles) is already
in the ledger. A run id belongs to one checkpoint, data root and profile list; reusing it for other
ones is refused rather than mixing their numbers.

Precision (`fp32` as published, or `bf16` autocast) is a protocol setting: every stage config carries
`precision`, resolved from the config or overridden by `run --precision`, so it is in the fingerprint
and the record, and rows not in fp32 are marked. So is a total batch the world size cannot give.

In one process a failed stage is recorded and the suite goes on; user errors (bad checkpoint,
unknown name, unreadable image) stop it. Under torchrun any failure ends every rank with its message
(`dist.fail_together`): the other ranks may be waiting in a collective the failed rank never joins.
"""

from __future__ import annotations

import logging
import re
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from densecl_bench import config, dist, paths, registry
from densecl_bench.backbone import Backbone, freeze
from densecl_bench.benchmarks.base import Benchmark, Metric, RunContext
from densecl_bench.checkpoint import LoadedCheckpoint, build_backbone, load_checkpoint
from densecl_bench.engine import TrainingInterrupted
from densecl_bench.engine import precision as precision_mod
from densecl_bench.errors import UserError, user_errors
from densecl_bench.results import Ledger, provenance
from densecl_bench.status import StageStates
from densecl_bench.tables import write_tables

log = logging.getLogger(__name__)

DEMO_BANNER = (
    "No --data-root given: running on the embedded demo datasets ({root}).\n"
    "Demo numbers exercise the real protocols on tiny synthetic data; they are not comparable to "
    "published results."
)
# manifest facts that identify a run: a run id reused with other values is refused
RUN_IDENTITY = ("ckpt_sha256", "arch", "data_root", "profiles")


class RunMismatch(UserError):
    """An existing run id was given a different checkpoint, data root or profile list."""


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
    named: tuple[str, ...] = ()  # benchmarks named explicitly (not through `all`)

    @property
    def failed(self) -> list[StageOutcome]:
        return [s for s in self.stages if s.status == "failed"]

    def problems(self) -> list[str]:
        """Why the run is not a success: failed stages, named benchmarks skipped, or nothing run at all."""
        out = [f"{s.benchmark} trial {s.trial} failed: {s.detail}" for s in self.failed]
        out += [f"{s.benchmark} was asked for but skipped: {s.detail}" for s in self.stages
                if s.status == "skipped" and s.benchmark in self.named]
        if not any(s.status in ("done", "resumed") for s in self.stages) and not out:
            out.append("nothing ran: " + "; ".join(f"{s.benchmark} {s.status} ({s.detail})" for s in self.stages))
        return out


def _silent(*_args, **_kwargs) -> None:
    pass


def row_label(ckpt: LoadedCheckpoint) -> str:
    """The table's row label: the pretraining config name when the checkpoint records one, else the file stem."""
    cfg = ckpt.meta.get("config")
    if isinstance(cfg, dict) and cfg.get("_config"):
        return str(cfg["_config"])
    if ckpt.layout == "random":
        seed = ckpt.meta.get("seed", 0)
        return f"random-init-{ckpt.arch}" + (f"-seed{seed}" if seed else "")
    return Path(ckpt.path).stem


def load_frozen(ckpt: str, arch: str | None, allow_partial: bool, device: str | None, seed: int = 0
                ) -> tuple[LoadedCheckpoint, Backbone, torch.device]:
    """Checkpoint -> frozen backbone (eval mode, no grads) on `device` (default: this rank's GPU, else CPU).

    seed: the weights of `ckpt="random"`.
    """
    torch_device = dist.resolve_device(device)
    loaded = load_checkpoint(ckpt, arch=arch, allow_partial=allow_partial, seed=seed)
    return loaded, freeze(build_backbone(loaded)).to(torch_device), torch_device


def default_run_id(label: str, ckpt: LoadedCheckpoint, profiles: Sequence[str], precision: str | None = None) -> str:
    """Stable across re-runs of the same command, so re-running resumes; a bf16 run gets its own."""
    parts = [label, ckpt.sha256[:8], "_".join(profiles) or "full"]
    if precision not in (None, precision_mod.DEFAULT):
        parts.append(precision)
    return re.sub(r"[^A-Za-z0-9._-]+", "_", "-".join(parts))


def resolve_profiles(requested: Sequence[str], demo: bool) -> list[str]:
    """The profiles a run applies: `demo` first on demo data, then the requested ones in order.

    A name no registered benchmark's configs offer is an error naming the offered ones (a typo must
    not run the default protocol under the typo's name).
    """
    offered = sorted({p for cls in registry.available().values() for name in cls.all_configs()
                      for p in config.offered(name, "benchmarks")})
    unknown = [p for p in requested if p not in offered]
    if unknown:
        raise config.ConfigError(f"unknown profile {', '.join(map(repr, unknown))}: the benchmark configs offer "
                                 f"{', '.join(offered)}")
    return list(dict.fromkeys(["demo", *requested] if demo else requested))


def stage_protocol(bench: type[Benchmark], profiles: Sequence[str], extra: dict[str, Any]
                   ) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """Every config the stage runs, resolved with `profiles` and `extra` (world size, arch, a precision
    override), by name; and the profiles none of them offers. Each has a `precision` (default fp32)."""
    configs = {}
    for name in bench.all_configs():
        cfg = {**config.load(name, "benchmarks", profiles, if_offered=True), **extra}
        cfg["precision"] = precision_mod.check(cfg.get("precision", precision_mod.DEFAULT))
        configs[name] = cfg
    offered = {p for name in configs for p in config.offered(name, "benchmarks")}
    return configs, [p for p in profiles if p not in offered]


def stage_record(bench: type[Benchmark], configs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """What the ledger stores as a stage's config, and fingerprints: the primary config with the others."""
    primary = configs[bench.config]
    extras = {name: cfg for name, cfg in configs.items() if name != bench.config}
    return {**primary, "_extra_configs": extras} if extras else primary


def stage_precision(configs: dict[str, dict[str, Any]]) -> str:
    """The stage's precision for its record: `fp32`, `bf16`, or both comma-joined when its configs differ."""
    return ",".join(dict.fromkeys(cfg["precision"] for cfg in configs.values()))


def batch_mismatch(configs: dict[str, dict[str, Any]], world_size: int) -> dict[str, dict[str, int]]:
    """The configs (by `_config` name) whose protocol batch (`total_batch_size`) this world size misses
    with `batch_size_per_gpu`.

    Gradient accumulation stands in only where no statistic is taken over the batch (`batch_policy:
    accumulate` with `batch_statistics: false`); BN over one process's pass is not BN over the
    protocol's batch, so everywhere else the numbers may differ from the protocol's.
    """
    out = {}
    for name, cfg in configs.items():
        total, per_gpu = cfg.get("total_batch_size"), cfg.get("batch_size_per_gpu")
        if total is None or per_gpu is None or world_size * per_gpu == total:
            continue
        if cfg.get("batch_policy") == "accumulate" and cfg.get("batch_statistics") is False:
            continue
        out[cfg.get("_config", name)] = {"total_batch_size": total, "world_size": world_size,
                                         "batch_size_per_gpu": per_gpu}
    return out


def _open_run(run_dir: Path, manifest: dict[str, Any]) -> Ledger:
    """The run's ledger; a new run gets its manifest, an existing one must be the same run."""
    ledger = Ledger(run_dir)
    old = ledger.manifest()
    if old is None:
        if dist.is_main():
            ledger.write_manifest(manifest)
        return ledger
    differ = [key for key in RUN_IDENTITY if key in old and old[key] != manifest[key]]
    if differ:
        raise RunMismatch(f"run {run_dir} was recorded with other "
                          + "; ".join(f"{key} ({old[key]} there, {manifest[key]} now)" for key in differ)
                          + ": its numbers would not be this command's; pass another --run-id (or --runs-dir)")
    return ledger


@dataclass
class _Suite:
    """What every stage of one run shares."""

    ckpt: str
    loaded: LoadedCheckpoint
    backbone: Backbone
    device: torch.device
    data_root: Path
    demo: bool
    ledger: Ledger
    label: str
    profiles: list[str]
    seed: int
    allow_partial: bool
    num_workers: int
    on_bad_image: str
    precision: str | None
    echo: Callable[[str], None]
    extra_provenance: dict[str, Any] = field(default_factory=dict)

    def context(self, bench: Benchmark, configs: dict[str, dict[str, Any]], trial: int) -> RunContext:
        return RunContext(
            backbone=self.backbone, checkpoint=self.loaded, data_root=self.data_root, demo=self.demo,
            device=self.device, run_dir=self.ledger.run_dir / bench.name / f"trial{trial}",
            cache_dir=paths.cache_root() / "features", config=configs[bench.config], configs=configs,
            seed=self.seed + trial, num_workers=self.num_workers, on_bad_image=self.on_bad_image,
        )

    def provenance(self, ctx: RunContext, wall: float, not_offered: list[str], precision: str,
                   batch: dict[str, dict[str, int]]) -> dict[str, Any]:
        """The record's provenance, with everything that makes a number deviate from the plain protocol."""
        loaded = self.loaded
        return provenance(
            ckpt_sha256=loaded.sha256, ckpt_layout=loaded.layout, ckpt_path=self.ckpt, arch=loaded.arch,
            device=self.device, world_size=dist.world_size(), seed=ctx.seed, wall_time_s=wall, demo=self.demo,
            data_root=self.data_root, profiles=self.profiles, profiles_not_offered=not_offered,
            allow_partial=self.allow_partial, missing_tensors=len(loaded.missing_keys),
            on_bad_image=self.on_bad_image,
            skipped_images={name: len(rows) for name, rows in ctx.skipped_images.items()},
            precision=precision, batch_mismatch=batch, **self.extra_provenance,
        )


def _run_stage(bench: Benchmark, ctx: RunContext) -> list[Metric]:
    """`bench.run(ctx)`; a `rank0_only` benchmark under torchrun runs on rank 0 while the other ranks
    extract their shards of each feature request it makes, and returns [] there."""
    if not (bench.rank0_only and dist.is_dist()):
        return bench.run(ctx)
    if not dist.is_main():
        ctx.serve_features()
        return []
    ctx.lead_extraction = True
    metrics = bench.run(ctx)
    dist.broadcast_object(None)  # releases the serving ranks
    return metrics


def _run_benchmark(suite: _Suite, bench: Benchmark, trials: int) -> list[StageOutcome]:
    """Every trial of one benchmark not yet in the ledger; stops at the first failed trial."""
    echo = suite.echo
    missing = [p for p in bench.required_data(suite.data_root) if not p.exists()]
    if missing:
        echo(f"[{bench.name}] skipped: no data at {missing[0]}")
        return [StageOutcome(bench.name, 0, "skipped", f"no data at {missing[0]}")]
    extra = {"world_size": dist.world_size(), "arch": suite.loaded.arch}
    if suite.precision:
        extra["precision"] = suite.precision
    configs, not_offered = stage_protocol(type(bench), suite.profiles, extra)
    if not_offered:
        echo(f"[{bench.name}] profile {', '.join(not_offered)} not offered by {', '.join(configs)}: runs without it")
    precision = stage_precision(configs)
    batch = batch_mismatch(configs, dist.world_size())
    for name, b in batch.items():
        echo(f"[{bench.name}] warning: {name} assumes a total batch of {b['total_batch_size']}; "
             f"{b['world_size']} process(es) x {b['batch_size_per_gpu']} per GPU give "
             f"{b['world_size'] * b['batch_size_per_gpu']} per pass (accumulation cannot stand in for its "
             "batch statistics): the records are marked")
    record_cfg = stage_record(type(bench), configs)
    fp = config.fingerprint(record_cfg)
    outcomes = []
    for trial in range(trials):
        if suite.ledger.completed(bench.name, fp, trial):
            outcomes.append(StageOutcome(bench.name, trial, "resumed", "already in the ledger"))
            echo(f"[{bench.name}] trial {trial}: already recorded, skipped (resume)")
            continue
        echo(f"[{bench.name}] trial {trial}: running ({bench.config}, profile {configs[bench.config]['_profile']})")
        ctx = suite.context(bench, configs, trial)
        start = time.perf_counter()
        try:
            metrics = _run_stage(bench, ctx)
        except (*user_errors(), TrainingInterrupted):  # Ctrl-C / SIGTERM stops the suite, state saved
            raise
        except Exception as err:  # one broken benchmark must not lose the others
            if dist.is_dist():
                raise  # the other ranks may be inside a collective: end them all (fail_together)
            log.debug("benchmark %s failed", bench.name, exc_info=True)
            echo(f"[{bench.name}] FAILED: {type(err).__name__}: {err}\n{traceback.format_exc(limit=3)}")
            outcomes.append(StageOutcome(bench.name, trial, "failed", f"{type(err).__name__}: {err}"))
            break
        wall = time.perf_counter() - start
        if dist.is_main():
            suite.ledger.append(metrics, label=suite.label, trial=trial, config=record_cfg, fingerprint=fp,
                                provenance=suite.provenance(ctx, wall, not_offered, precision, batch))
        outcomes.append(StageOutcome(bench.name, trial, "done", f"{len(metrics)} metrics in {wall:.0f}s"))
        echo(f"[{bench.name}] trial {trial}: {len(metrics)} metrics in {wall:.1f}s")
    return outcomes


@dataclass
class RunSetup:
    """A run directory opened for one checkpoint: what the stages of the run share, before any model is built."""

    loaded: LoadedCheckpoint
    label: str
    ledger: Ledger
    data_root: Path
    demo: bool
    profiles: list[str]

    @property
    def run_dir(self) -> Path:
        return self.ledger.run_dir


def open_run(
    ckpt: str,
    *,
    data_root: Path | None = None,
    runs_dir: Path = Path("runs"),
    run_id: str | None = None,
    label: str | None = None,
    profiles: Sequence[str] = (),
    seed: int = 0,
    arch: str | None = None,
    allow_partial: bool = False,
    precision: str | None = None,
    echo: Callable[[str], None] = print,
) -> RunSetup:
    """Load the checkpoint, resolve profiles and data (writing the demo datasets on first use) and open
    the run directory: a new one gets its manifest, an existing one must belong to the same run."""
    if precision is not None:
        precision_mod.check(precision)
    demo = data_root is None
    profiles = resolve_profiles(profiles, demo)
    loaded = load_checkpoint(ckpt, arch=arch, allow_partial=allow_partial, seed=seed)
    if demo:
        from densecl_bench.data.demo import ensure_demo

        data_root = ensure_demo()
        echo(DEMO_BANNER.format(root=data_root))
    data_root = Path(data_root).resolve()
    label = label or row_label(loaded)
    run_dir = Path(runs_dir) / (run_id or default_run_id(label, loaded, profiles, precision))
    ledger = _open_run(run_dir, {
        "run_id": run_dir.name, "label": label, "ckpt": str(ckpt), "ckpt_sha256": loaded.sha256,
        "ckpt_layout": loaded.layout, "arch": loaded.arch, "profiles": profiles, "demo": demo,
        "data_root": str(data_root), "precision": precision, "argv": sys.argv,
    })
    return RunSetup(loaded, label, ledger, data_root, demo, profiles)


def run_suite(
    names: list[str],
    ckpt: str,
    *,
    data_root: Path | None = None,
    runs_dir: Path = Path("runs"),
    run_id: str | None = None,
    label: str | None = None,
    profiles: Sequence[str] = (),
    trials: int = 1,
    seed: int = 0,
    arch: str | None = None,
    allow_partial: bool = False,
    device: str | None = None,
    num_workers: int = 2,
    on_bad_image: str = "raise",
    precision: str | None = None,
    extra_provenance: dict[str, Any] | None = None,
    echo: Callable[[str], None] = print,
) -> SuiteResult:
    """Run the named benchmarks (`all` for every registered one) and write ledger and tables.

    profiles: applied in order to every config that offers them (`demo` comes first on demo data).
    seed: the first trial's seed (trial t uses seed + t) and the weights of `ckpt="random"`.
    precision: `fp32` or `bf16` for every stage in place of each config's `precision` (None: the configs').
    extra_provenance: facts every record carries besides the run's (`watch` adds the pretraining epoch).
    Each stage's state (running, done, failed...) goes to the run's `stages.json` for `status`.
    """
    if trials < 1 or num_workers < 0:
        raise UserError(f"trials must be >= 1 and workers >= 0 (got {trials} and {num_workers})")
    precision_mod.ieee_fp32()  # fp32 is IEEE fp32 on every GPU (bf16 autocast is unaffected)
    dist.init_from_env()
    if not dist.is_main():
        echo = _silent  # one voice under torchrun
    with dist.fail_together():
        benchmarks = registry.resolve(names)
        device_ = dist.resolve_device(device)
        setup = open_run(ckpt, data_root=data_root, runs_dir=runs_dir, run_id=run_id, label=label,
                         profiles=profiles, seed=seed, arch=arch, allow_partial=allow_partial, precision=precision,
                         echo=echo)
        backbone = freeze(build_backbone(setup.loaded)).to(device_)
        suite = _Suite(str(ckpt), setup.loaded, backbone, device_, setup.data_root, setup.demo, setup.ledger,
                       setup.label, setup.profiles, seed, allow_partial, num_workers, on_bad_image, precision, echo,
                       dict(extra_provenance or {}))
        run_dir = setup.run_dir
        result = SuiteResult(run_dir, named=() if "all" in names else tuple(b.name for b in benchmarks))
        track = StageStates(run_dir).track if dist.is_main() else (lambda _name, run: run())
        for bench_cls in benchmarks:
            result.stages += track(bench_cls.name, lambda: _run_benchmark(suite, bench_cls(), trials))
        if dist.is_main():
            with setup.ledger.lock():  # a stage of another job may be appending: render what is complete
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
    precision: str = precision_mod.DEFAULT,
) -> dict[str, tuple[Path, tuple[int, ...]]]:
    """Extract (or read from the cache) one split's pooled features; returns {layer: (cache file, shape)}.

    Without a data root, the demo datasets are used at the demo size (96 px, adaptive pooling). Under
    `on_bad_image: skip` the rows of unreadable images are zero and listed in each file's `.json` sidecar.
    precision: `fp32` or `bf16` autocast, cached apart.
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
                    ckpt_key=loaded.sha256, on_bad_image=on_bad_image, precision=precision)
    return {layer: (feats.files[layer], arr.shape) for layer, arr in feats.arrays.items()}
