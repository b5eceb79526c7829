"""The `densecl-bench` command. Thin: it parses arguments and calls the library."""

from __future__ import annotations

import logging
import sys
import traceback
from pathlib import Path

import click

from densecl_bench import __version__

PathArg = click.Path(path_type=Path)
PRECISION = click.Choice(["fp32", "bf16"])


class _Commands(click.Group):
    """User errors (bad checkpoint, unknown name, unreadable image...) from any command: one `error:`
    line and exit 2; `-v` prints the traceback first."""

    def invoke(self, ctx: click.Context):
        from densecl_bench.errors import hint, user_errors

        try:
            return super().invoke(ctx)
        except user_errors() as err:
            if ctx.params.get("verbose"):
                traceback.print_exc()
            _fail(f"{err}{hint(err)}")


@click.group(cls=_Commands, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="densecl-bench")
@click.option("-v", "--verbose", is_flag=True, help="Debug logging, and tracebacks with errors.")
def main(verbose: bool) -> None:
    """DenseCL pretraining and the classic self-supervised transfer benchmark suite."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")


def _fail(err: Exception | str) -> None:
    click.echo(f"error: {err}", err=True)
    sys.exit(2)


# ---------------------------------------------------------------- checkpoints
@main.command()
@click.argument("ckpt")
@click.option("--arch", help="resnet18/34/50/101; inferred from the tensor shapes when omitted.")
@click.option("--allow-partial", is_flag=True, help="Load even if backbone tensors are missing (loudly).")
def inspect(ckpt: str, arch: str | None, allow_partial: bool) -> None:
    """Detect a checkpoint's layout and check that every backbone tensor is there and finite."""
    from densecl_bench.checkpoint import describe, load_checkpoint

    click.echo(describe(load_checkpoint(ckpt, arch=arch, allow_partial=allow_partial)))


@main.command()
@click.argument("src")
@click.option("--to", "fmt", type=click.Choice(["detectron2", "torchvision", "mmcv"]), default=None,
              help="Target layout (detectron2 .pkl, plain torchvision state dict, mmcv/mmseg `state_dict`).")
@click.option("-o", "--output", type=PathArg, required=True)
@click.option("--extract-backbone", is_flag=True, help="Write the extracted-backbone file (MMSelfSup layout).")
@click.option("--arch")
@click.option("--allow-partial", is_flag=True)
def convert(src: str, fmt: str | None, output: Path, extract_backbone: bool, arch: str | None,
            allow_partial: bool) -> None:
    """Convert a checkpoint to another layout (detectron2, torchvision, mmcv); never over its input."""
    from densecl_bench.checkpoint import convert as convert_checkpoint

    if fmt is None and not extract_backbone:
        _fail(click.UsageError("give --to FORMAT or --extract-backbone"))
    convert_checkpoint(src, fmt, output, extract_backbone=extract_backbone, arch=arch, allow_partial=allow_partial)
    click.echo(f"wrote {output}")


# ---------------------------------------------------------------- data
@main.group()
def data() -> None:
    """Demo datasets and data-root checks."""


@data.command("demo")
@click.option("--root", type=PathArg, default=None, help="Where to write (default: $DENSECL_BENCH_HOME/demo).")
@click.option("--seed", type=int, default=0, show_default=True)
def data_demo(root: Path | None, seed: int) -> None:
    """Write the embedded demo datasets (deterministic) in the real on-disk layouts."""
    from densecl_bench.data.demo import ensure_demo

    click.echo(f"demo datasets at {ensure_demo(root, seed=seed)}")


@data.command("check")
@click.option("--root", type=PathArg, required=True, help="The data root (VOCdevkit/, coco/, imagenet/, Places205/, iNaturalist2018/, cityscapes/).")
def data_check(root: Path) -> None:
    """Validate the dataset layouts under a data root and name what is missing.

    Exits 1 when a dataset is present but broken, or when none is usable.
    """
    from densecl_bench.data.layout import check_data_root, format_report

    statuses = check_data_root(root)
    click.echo(format_report(statuses))
    broken = [s for s in statuses if not s.ok and s.path.exists()]
    sys.exit(1 if broken or not any(s.ok for s in statuses) else 0)


@data.command("cityscapes-trainids")
@click.option("--root", type=PathArg, required=True, help="The Cityscapes folder (the one holding gtFine/).")
@click.option("--overwrite", is_flag=True, help="Rewrite trainIds maps that already exist.")
def data_cityscapes_trainids(root: Path, overwrite: bool) -> None:
    """Write gtFine/**/*_gtFine_labelTrainIds.png from the *_gtFine_labelIds.png maps.

    Maps each label id to its trainId by the published Cityscapes label table (19 classes, 255 = ignore),
    as mmseg's tools/convert_datasets/cityscapes.py does through cityscapesscripts.
    """
    from densecl_bench.data.cityscapes import convert_label_ids

    written, kept = convert_label_ids(root, overwrite=overwrite)
    click.echo(f"wrote {written} trainIds maps under {root / 'gtFine'}" + (f", kept {kept} existing" if kept else ""))


# ---------------------------------------------------------------- features
@main.command()
@click.option("--ckpt", required=True, help="Checkpoint file, or `random` for a seeded random init.")
@click.option("--dataset", type=click.Choice(["voc07", "imagenet", "places205"]), required=True)
@click.option("--split", required=True)
@click.option("--layers", default="feature1-5", show_default=True)
@click.option("--data-root", type=PathArg, default=None, help="Default: the embedded demo datasets.")
@click.option("--pooling", type=click.Choice(["protocol", "adaptive", "global"]), default=None)
@click.option("--size", type=int, default=None, help="Input size (224 for real data, 96 for the demo).")
@click.option("--batch-size", type=int, default=32, show_default=True)
@click.option("--workers", type=int, default=2, show_default=True)
@click.option("--device", default=None)
@click.option("--skip-bad-images", is_flag=True,
              help="Leave unreadable images out (zero rows, listed in each file's .json sidecar) instead of failing.")
@click.option("--precision", type=PRECISION, default="fp32", show_default=True,
              help="Arithmetic of the forward pass: fp32 as published, or bf16 autocast (cached apart).")
def extract(ckpt: str, dataset: str, split: str, layers: str, data_root: Path | None, pooling: str | None,
            size: int | None, batch_size: int, workers: int, device: str | None, skip_bad_images: bool,
            precision: str) -> None:
    """Extract pooled features into the on-disk cache (a second call is a cache hit)."""
    from densecl_bench.backbone import parse_layers
    from densecl_bench.runner import extract_dataset

    out = extract_dataset(ckpt, dataset, split, parse_layers(layers), data_root=data_root, pooling=pooling, size=size,
                          batch_size=batch_size, num_workers=workers, device=device,
                          on_bad_image="skip" if skip_bad_images else "raise", precision=precision)
    for layer, (path, shape) in out.items():
        click.echo(f"{layer}: {shape[0]} x {shape[1]}  {path}")


# ---------------------------------------------------------------- benchmarks
def _gpus_per_stage(_ctx: click.Context, _param: click.Parameter, value: str) -> int | None:
    """`auto` (None: each benchmark's own GPUs) or a positive count."""
    if value == "auto":
        return None
    if not value.isdigit() or int(value) < 1:
        raise click.BadParameter(f"expected `auto` or a positive integer, got {value!r}")
    return int(value)


@main.command()
@click.argument("benchmarks", nargs=-1, required=True)
@click.option("--ckpt", required=True,
              help="Checkpoint file, a released name (after `fetch`), or `random` for a random init seeded by --seed.")
@click.option("--data-root", type=PathArg, default=None, help="Default: the embedded demo datasets.")
@click.option("--runs-dir", type=PathArg, default=Path("runs"), show_default=True)
@click.option("--run-id", default=None,
              help="Default: <label>-<sha8>-<profiles>; re-running it resumes (same checkpoint and data root only).")
@click.option("--label", default=None, help="Table row label (default: the pretraining config name).")
@click.option("--profile", "profiles", default="",
              help="Config profiles, comma-separated and applied in order (e.g. vissl, or fair,cv); "
                   "demo is applied first on the demo data. Default: the published protocol.")
@click.option("--trials", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seed of the first trial (trial t uses seed + t), and of the weights of --ckpt random.")
@click.option("--arch", default=None)
@click.option("--allow-partial", is_flag=True, help="Load a checkpoint with missing tensors (recorded, rows marked).")
@click.option("--device", default=None)
@click.option("--workers", type=click.IntRange(min=0), default=2, show_default=True)
@click.option("--skip-bad-images", is_flag=True,
              help="Leave unreadable images out instead of failing (recorded with counts, rows marked).")
@click.option("--precision", type=PRECISION, default=None,
              help="Arithmetic of every stage in place of the configs' (fp32, as published): bf16 autocast "
                   "is fingerprinted, recorded and its rows marked.")
@click.option("--launcher", type=click.Choice(["local", "slurm", "submitit-local"]), default="local", show_default=True,
              help="local: every stage in this process (torchrun for several GPUs). slurm: one SLURM job per stage "
                   "through submitit. submitit-local: one submitit job per stage on this machine.")
@click.option("--gpus-per-stage", default="auto", show_default=True, callback=_gpus_per_stage,
              help="GPUs of each stage's job: auto (the protocol's: 8 linear and detection, 4 FCN, 1 SVM/kNN) or N.")
@click.option("--partition", default=None, help="SLURM partition of the stage jobs.")
@click.option("--timeout-min", type=click.IntRange(min=1), default=24 * 60, show_default=True,
              help="Time limit of each stage job; a stage that reaches it is requeued and resumes.")
@click.option("--no-wait", is_flag=True, help="Submit the stage jobs and return (follow them with `status`).")
def run(benchmarks: tuple[str, ...], ckpt: str, data_root: Path | None, runs_dir: Path, run_id: str | None,
        label: str | None, profiles: str, trials: int, seed: int, arch: str | None, allow_partial: bool,
        device: str | None, workers: int, skip_bad_images: bool, precision: str | None, launcher: str,
        gpus_per_stage: int | None, partition: str | None, timeout_min: int, no_wait: bool) -> None:
    """Run benchmarks (`all`, or names such as voc07_svm knn) and print the model-zoo tables.

    Exits 1 when a stage failed, a benchmark named here was skipped, or nothing ran.
    """
    from densecl_bench import dist
    from densecl_bench.engine import TrainingInterrupted
    from densecl_bench.runner import run_suite
    from densecl_bench.tables import render_run_dir

    kwargs = dict(data_root=data_root, runs_dir=runs_dir, run_id=run_id, label=label,
                  profiles=[p.strip() for p in profiles.split(",") if p.strip()], trials=trials, seed=seed, arch=arch,
                  allow_partial=allow_partial, device=device, num_workers=workers,
                  on_bad_image="skip" if skip_bad_images else "raise", precision=precision, echo=click.echo)
    try:
        if launcher == "local":
            result = run_suite(list(benchmarks), ckpt, **kwargs)
        else:
            from densecl_bench.launch import JobOptions, submit_suite

            options = JobOptions(cluster=launcher, gpus_per_stage=gpus_per_stage, partition=partition,
                                 timeout_min=timeout_min, wait=not no_wait)
            result = submit_suite(list(benchmarks), ckpt, options, **kwargs)
            if no_wait:
                click.echo(f"\nrun: {result.run_dir}\nfollow it with: densecl-bench status {result.run_dir}")
                return
    except TrainingInterrupted as err:  # the same command resumes the stage and skips the finished ones
        click.echo(str(err), err=True)
        sys.exit(err.exit_code)
    problems = result.problems()
    if dist.is_main():
        click.echo(f"\nrun: {result.run_dir}\n")
        click.echo(render_run_dir(result.run_dir, skip_empty=True))
        for problem in problems:
            click.echo(f"error: {problem}", err=True)
    sys.exit(1 if problems else 0)


@main.command()
@click.argument("run_dir", type=PathArg)
@click.option("--follow", "every", type=click.FloatRange(min=1), default=None, metavar="SECONDS",
              help="Print the view again every SECONDS until every stage has ended.")
def status(run_dir: Path, every: float | None) -> None:
    """Each stage of a run: queued / running (progress, ETA) / done / failed / lost, with its job id."""
    import time

    from densecl_bench.status import format_views, stage_views

    if not (run_dir / "run.json").exists():
        _fail(FileNotFoundError(f"{run_dir}: no run.json (expected a run directory such as runs/<run-id>)"))
    while True:
        views = stage_views(run_dir)
        click.echo("\n".join(format_views(views)) or "no stage has started yet")
        if every is None or not any(v.active for v in views):
            return
        time.sleep(every)
        click.echo()


@main.command()
@click.argument("work_dir", type=PathArg)
@click.option("--bench", "benchmarks", default="knn,voc07_svm", show_default=True,
              help="Benchmarks to run on each checkpoint, comma-separated.")
@click.option("--every", type=click.IntRange(min=1), default=1, show_default=True,
              help="Benchmark epochs divisible by this (and the final one).")
@click.option("--final-epoch", type=click.IntRange(min=1), default=None,
              help="Stop after this epoch (default: the schedule length recorded in our checkpoints).")
@click.option("--runs-dir", type=PathArg, default=Path("runs"), show_default=True)
@click.option("--run-id", default=None, help="The watch dir under --runs-dir (default: watch-<work dir name>).")
@click.option("--poll", type=click.FloatRange(min=0.1), default=60, show_default=True, help="Seconds between looks.")
@click.option("--stop-file", type=PathArg, default=None,
              help="Sentinel that ends the watch (default: WORK_DIR/watch.stop).")
@click.option("--once", is_flag=True, help="Benchmark what is there now, then exit.")
@click.option("--data-root", type=PathArg, default=None, help="Default: the embedded demo datasets.")
@click.option("--profile", "profiles", default="", help="Config profiles, comma-separated (as for `run`).")
@click.option("--arch", default=None)
@click.option("--device", default=None)
@click.option("--workers", type=click.IntRange(min=0), default=2, show_default=True)
def watch(work_dir: Path, benchmarks: str, every: int, final_epoch: int | None, runs_dir: Path, run_id: str | None,
          poll: float, stop_file: Path | None, once: bool, data_root: Path | None, profiles: str, arch: str | None,
          device: str | None, workers: int) -> None:
    """Benchmark each new epoch_N.pth of a pretraining work dir as it appears (restartable)."""
    from densecl_bench.watch import watch as run_watch

    result = run_watch(work_dir, [b.strip() for b in benchmarks.split(",") if b.strip()], every=every,
                       runs_dir=runs_dir, run_id=run_id, final_epoch=final_epoch, stop_file=stop_file, poll_s=poll,
                       once=once, echo=click.echo, data_root=data_root,
                       profiles=[p.strip() for p in profiles.split(",") if p.strip()], arch=arch, device=device,
                       num_workers=workers)
    click.echo(f"watch: {result.watch_dir} ({len(result.benchmarked)} checkpoint(s) benchmarked)")


@main.command("list")
@click.option("--data-root", type=PathArg, default=None, help="Default: the embedded demo datasets.")
def list_benchmarks(data_root: Path | None) -> None:
    """Registered benchmarks, the table each feeds, and whether their data are found (writes nothing)."""
    from densecl_bench import paths, registry

    root = data_root or paths.demo_root()
    note = "" if data_root else " (embedded demo datasets; written by the first `run` or by `data demo`)"
    click.echo(f"data root: {root}{note}\n")
    for name, cls in registry.available().items():
        missing = [p for p in cls().required_data(root) if not p.exists()]
        found = "data found" if not missing else f"no data at {missing[0]}"
        aliases = f" (aliases: {', '.join(cls.aliases)})" if cls.aliases else ""
        configs = ", ".join(cls.all_configs())
        click.echo(f"{name}{aliases}\n    table: {cls.table}\n    config: {configs}\n    {found}")


@main.command()
@click.argument("runs", nargs=-1, type=PathArg, required=True)
@click.option("-o", "--output", type=PathArg, default=None, help="Also write the markdown here.")
@click.option("--skip-empty", is_flag=True, help="Leave out tables with no numbers.")
def table(runs: tuple[Path, ...], output: Path | None, skip_empty: bool) -> None:
    """Regenerate the markdown model-zoo tables from runs (or reference JSONs), side by side with deltas."""
    from densecl_bench.paths import atomic_write_text
    from densecl_bench.tables import render_run_dir

    for path in runs:
        if path.suffix != ".json" and not (path / "ledger.jsonl").exists():
            _fail(FileNotFoundError(f"{path}: no ledger.jsonl (expected a run directory such as runs/<run-id>, "
                                    "or a reference .json)"))
    text = render_run_dir(*runs, skip_empty=skip_empty)
    click.echo(text)
    if output:
        atomic_write_text(output, text)


@main.command()
@click.argument("runs", nargs=-1, type=PathArg, required=True)
@click.option("-o", "--output", type=PathArg, default=Path("report.html"), show_default=True)
@click.option("--reference", type=PathArg, default=None,
              help="Reference numbers (JSON, model-zoo layout): first row, base of the deltas, dashed in the plots.")
def report(runs: tuple[Path, ...], output: Path, reference: Path | None) -> None:
    """One self-contained HTML page: the model-zoo tables and plots of runs (or watch dirs), side by side."""
    from densecl_bench.report import write_report

    click.echo(f"wrote {write_report(runs, output, reference)}")


@main.command()
@click.argument("run_dir", type=PathArg)
@click.option("--reference", default=None,
              help="Reference numbers: a JSON (model-zoo layout) or a released checkpoint's name.")
@click.option("--tolerances", type=PathArg, default=None,
              help="YAML of per-metric tolerances, in place of the reference's own.")
@click.option("--require-all", is_flag=True,
              help="Fail on reference metrics the run did not produce (`not run`) or left out (CI on real data).")
@click.option("--allow-missing", is_flag=True,
              help="Records left out for a caveat are not a failure either (`not run` never fails without "
                   "--require-all).")
@click.option("--label", default=None, help="Which row of the run to check, when it holds several.")
@click.option("--two-sided", is_flag=True,
              help="Also fail on a metric better than the reference beyond tolerance (the protocol moved).")
@click.option("--include-flagged", is_flag=True,
              help="Judge records with a caveat too (--allow-partial, --skip-bad-images, bf16, a missed "
                   "total batch; left out by default).")
@click.option("-o", "--output", type=PathArg, default=None, help="Also write the markdown report here.")
@click.option("--write-reference", type=PathArg, default=None,
              help="Write the run's numbers as a reference JSON instead (keeps an existing file's tolerances).")
def regress(run_dir: Path, reference: str | None, tolerances: Path | None, require_all: bool,
            allow_missing: bool, label: str | None, two_sided: bool, include_flagged: bool,
            output: Path | None, write_reference: Path | None) -> None:
    """Compare a run with reference numbers and print a markdown table; exit 1 on any failure.

    Verdicts: ok, worse, better (fails with --two-sided), differs (labels), not run (fails with
    --require-all), excluded (caveats; fails unless --allow-missing), skipped (no reference).
    """
    from densecl_bench.paths import atomic_write_text
    from densecl_bench.regress import compare, load_tolerances
    from densecl_bench.regress import write_reference as write_ref
    from densecl_bench.results import Ledger

    if not (run_dir / "ledger.jsonl").exists():
        _fail(FileNotFoundError(f"{run_dir}: no ledger.jsonl (expected a run directory such as runs/<run-id>)"))
    if (reference is None) == (write_reference is None):
        _fail(click.UsageError("give --reference (to compare) or --write-reference (to write one)"))
    if allow_missing and require_all:
        _fail(click.UsageError("--allow-missing and --require-all contradict each other"))
    try:
        if write_reference is not None:
            ref = write_ref(Ledger(run_dir).records(), write_reference, label=label,
                            tolerances=load_tolerances(tolerances) if tolerances else None)
            n = sum(len(m) for m in ref["results"].values())
            click.echo(f"wrote {write_reference}: {n} metrics of {ref['model']}")
            return
        report = compare(Ledger(run_dir).records(), reference, load_tolerances(tolerances) if tolerances else None,
                         allow_missing=allow_missing, label=label, two_sided=two_sided,
                         include_flagged=include_flagged, require_all=require_all)
    except ValueError as err:
        _fail(err)
    click.echo(report.format())
    if output:
        atomic_write_text(output, report.format())
    sys.exit(0 if report.ok else 1)


# ---------------------------------------------------------------- released checkpoints
@main.command()
@click.option("--names", is_flag=True, help="Only the names, one a line (for scripts).")
def released(names: bool) -> None:
    """The pinned released checkpoints: name, url, sha256, layout, reference JSON, and whether fetched."""
    from densecl_bench import released as rel

    for release in rel.load_manifest().values():
        if names:
            click.echo(release.name)
            continue
        fetched = f"fetched: {release.path}" if release.path.is_file() else "not fetched"
        click.echo(f"{release.name}  ({release.method})\n    url:       {release.url}\n"
                   f"    sha256:    {release.sha256}{'' if len(release.sha256) == 64 else '… (published prefix)'}\n"
                   f"    layout:    {release.layout}\n    reference: {release.reference}\n    {fetched}")


@main.command()
@click.argument("names", nargs=-1)
@click.option("--all", "fetch_all", is_flag=True, help="Every released checkpoint.")
@click.option("--url", default=None, help="Download from this mirror instead (the hash is still the manifest's).")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
def fetch(names: tuple[str, ...], fetch_all: bool, url: str | None, no_progress: bool) -> None:
    """Download released checkpoints into $DENSECL_BENCH_HOME/weights, verified against their sha256.

    Resumes a partial download; refuses (and deletes) a file whose hash does not match.
    """
    from densecl_bench import released as rel

    if fetch_all == bool(names) or (url and len(names) != 1):
        _fail(click.UsageError("give released names, or --all (--url takes exactly one name)"))
    for name in rel.load_manifest() if fetch_all else names:
        rel.fetch(rel.get(name), url=url, progress=not no_progress, echo=click.echo)


# ---------------------------------------------------------------- pretraining
@main.command()
@click.argument("config_file")
@click.option("--data-root", type=PathArg, default=None, help="ImageNet-style folder (train/<class>/*).")
@click.option("--work-dir", type=PathArg, default=None, help="Default: work_dirs/<config name>.")
@click.option("--epochs", type=click.IntRange(min=1), default=None,
              help="Length of the run: the cosine schedule spans this many epochs (default: the config's).")
@click.option("--stop-after-epochs", type=click.IntRange(min=1), default=None,
              help="Stop after this many epochs of the schedule; running again resumes it.")
@click.option("--no-resume", is_flag=True, help="Start from scratch even if a checkpoint exists.")
@click.option("--device", default=None)
@click.option("--precision", type=PRECISION, default=None,
              help="fp32 or bf16 autocast in place of the config's `precision` (fp32, as the reference).")
@click.option("--loader", type=click.Choice(["cpu", "gpu"]), default=None,
              help="Where images are decoded and augmented, in place of the config's `data.loader`: cpu (PIL in "
                   "the loader workers, the default) or gpu (whole batches on the training device).")
def pretrain(config_file: str, data_root: Path | None, work_dir: Path | None, epochs: int | None,
             stop_after_epochs: int | None, no_resume: bool, device: str | None, precision: str | None,
             loader: str | None) -> None:
    """Pretrain a ResNet-50 with DenseCL (resumable; torchrun for several GPUs)."""
    from densecl_bench import config
    from densecl_bench.config import ConfigError
    from densecl_bench.engine import NonFiniteLoss, TrainingInterrupted
    from densecl_bench.pretrain import QueueSizeError
    from densecl_bench.pretrain import pretrain as run_pretrain

    try:
        cfg = config.load(config_file, "pretrain")
        if precision:
            cfg["precision"] = precision
        if loader:
            cfg["data"] = dict(cfg["data"], loader=loader)
        latest = run_pretrain(cfg, data_root=data_root, work_dir=work_dir, resume=not no_resume,
                              epochs=epochs, max_epochs=stop_after_epochs, device=device)
    except TrainingInterrupted as err:
        click.echo(str(err), err=True)
        sys.exit(err.exit_code)
    except (ConfigError, QueueSizeError, NonFiniteLoss) as err:
        _fail(err)
    click.echo(f"latest checkpoint: {latest}")


if __name__ == "__main__":
    main()
