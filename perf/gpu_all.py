"""Every GPU measurement the perf docs still lack, in one run of at most 8 minutes (issue 15).

Prepared so that the first session with a GPU records them all at once: one markdown block, naming
the device, printed and written to `--out`, to be appended to perf/RESULTS.md. In order of what the
docs need most:

1. End-to-end DenseCL pretraining images/s (`pretrain.train`, real loop, ResNet-50, 224 px, batch 32)
   on 500x375 JPEGs drawn by the demo generator: `loader: cpu` (PIL workers) vs `loader: gpu`
   (device decode + batched augmentation), fp32 (reference style) and bf16 + channels_last + fused
   SGD (+ torch.compile), against the step alone on a fixed batch; each loader alone too.
   Issue 15's goal: GPU loader + tuned step >= 2.5x the reference-style step.
2. The DenseCL step: fp32 vs tuned, dense-branch cost (`perf/pretrain_step.py`).
3. Feature extraction pipeline vs raw forward (`perf/extract_throughput.py`).
4. Linear-probe step vs forward, fp32 and bf16 (`perf/linear_step.py`).
5. FCN R50-D8 training and inference, fp32 and bf16 (`perf/seg_fcn.py`).
6. kNN on the GPU (`perf/knn_speed.py`) and the whole VOC07 SVM protocol on the GPU (`svm.voc07_svm`).
7. Faster R-CNN C4 and Mask R-CNN FPN training steps with their breakdowns, fp32 (`perf/det_c4.py`,
   `perf/det_fpn.py`), last: the rows above are the ones the docs need most.

Each measurement runs in this process (no
re-import per row), with the torch backend flags restored after it, under a time limit so the whole
run stays within `--budget` seconds; a row that fails or runs out of time is reported as such and
the others still run.

    bash perf/gpu_all.sh                 # on a GPU
    bash perf/gpu_all.sh --dry-run       # every path at tiny sizes on the CPU (tests/test_gpu_all.py)
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import platform
import runpy
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torchvision

from densecl_bench import config
from densecl_bench.data.base import ImageList
from densecl_bench.engine import EpochLoader, HookBase
from densecl_bench.paths import atomic_write_text
from densecl_bench.pretrain.augment import EpochSampler, TwoViewDataset, mocov2
from densecl_bench.pretrain.batch_augment import Recipe
from densecl_bench.pretrain.gpu_loader import GPUTwoViewLoader
from densecl_bench.pretrain.train import train

PERF = Path(__file__).resolve().parent
sys.path.insert(0, str(PERF))  # the sibling perf scripts' helpers (pretrain_step.compare, svm_speed.synthetic_voc)


@dataclass(frozen=True)
class Sizes:
    """Every size a row uses: the real ones on a GPU, tiny ones for `--dry-run`."""

    arch: str = "resnet50"
    image_size: int = 224
    batch: int = 32
    queue: int = 65536
    jpegs: int = 1600  # 50 iterations of batch 32
    jpeg_hw: tuple[int, int] = (375, 500)
    unique_jpegs: int = 64  # drawn scenes; the others are copies (decoding costs the same)
    warmup: int = 10  # iterations not timed (worker start-up, cudnn autotuning)
    workers: int = min(16, os.cpu_count() or 1)
    compile: bool = True
    svm_dims: tuple[int, ...] = (2048, 9216)
    svm_rows: tuple[int, int] = (5011, 4952)


DRY = Sizes(arch="resnet18", image_size=32, batch=2, queue=4, jpegs=6, jpeg_hw=(38, 50), unique_jpegs=2, warmup=1,
            workers=0, compile=False, svm_dims=(16,), svm_rows=(60, 60))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class RowTimeout(Exception):
    pass


@contextlib.contextmanager
def _time_limit(seconds: float) -> Iterator[None]:
    def expire(signum, frame):
        raise RowTimeout(f"stopped after {seconds:.0f} s (the run's time budget)")

    old = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 1.0))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


@contextlib.contextmanager
def _restored_backends() -> Iterator[None]:
    """Rows set cudnn.benchmark, TF32 and thread counts for themselves; the next row starts from the defaults."""
    saved = (torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
             torch.get_float32_matmul_precision(), torch.get_num_threads())
    try:
        yield
    finally:
        (torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
         precision, threads) = saved
        torch.set_float32_matmul_precision(precision)
        torch.set_num_threads(threads)


def run_script(script: str, argv: list[str]) -> str:
    """Run `perf/<script>` as `python perf/<script> argv...` would, in this process; returns what it printed."""
    out, old_argv = io.StringIO(), sys.argv
    sys.argv = [str(PERF / script), *argv]
    try:
        with contextlib.redirect_stdout(out):
            runpy.run_path(str(PERF / script), run_name="__main__")
    finally:
        sys.argv = old_argv
    return "```text\n$ python perf/" + " ".join([script, *argv]) + "\n" + out.getvalue().rstrip() + "\n```"


def demo_jpegs(root: Path, sizes: Sizes) -> ImageList:
    """`sizes.jpegs` JPEGs of VOC size drawn by the demo generator (multi-object scenes, its JPEG quality)."""
    from densecl_bench.data.demo import _multi_object_scene, _save_jpeg

    h, w = sizes.jpeg_hw
    scenes = []
    for i in range(sizes.unique_jpegs):
        path = root / "scenes" / f"{i:03d}.jpg"
        _save_jpeg(_multi_object_scene(np.random.default_rng(i), (w, h), i % 20, 20, 2)[0], path)
        scenes.append(path.read_bytes())
    paths = []
    for i in range(sizes.jpegs):
        path = root / "train" / f"{i:05d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(scenes[i % len(scenes)])
        paths.append(path)
    return ImageList("demo_jpegs", root, paths, np.zeros(len(paths), np.int64), ["scene"])


class StepClock(HookBase):
    """Wall time at the end of every step (after a device sync): the loop's throughput, loader included."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.times = device, []

    def after_step(self) -> None:
        _sync(self.device)
        self.times.append(time.perf_counter())


def _rate(times: list[float], batch: int, warmup: int) -> float:
    timed = times[warmup:]
    return batch * (len(timed) - 1) / (timed[-1] - timed[0])


def _loader_rate(batches: Iterator, n: int, batch: int, warmup: int, device: torch.device) -> float:
    times = []
    for _, _ in zip(range(n), batches):
        _sync(device)
        times.append(time.perf_counter())
    return _rate(times, batch, warmup)


def pretrain_end_to_end(sizes: Sizes, device: torch.device, work: Path) -> str:
    """Row 1: the real pretraining loop, each loader and step flavour, vs the step alone (no loader)."""
    import pretrain_step

    images = demo_jpegs(work / "jpegs", sizes)
    iters = len(images) // sizes.batch
    base = config.merge(config.load("densecl_r50_8xb32-coslr-200e", "pretrain"), {
        "_config": "gpu_all", "epochs": 1, "log_interval": 10**6, "checkpoint_interval": 10**6,
        "model": {"arch": sizes.arch, "queue_len": sizes.queue},
        "data": {"image_size": sizes.image_size, "batch_size_per_gpu": sizes.batch, "num_workers": sizes.workers},
    })
    rows = []
    step_args = argparse.Namespace(arch=sizes.arch, queue=sizes.queue, batch=sizes.batch, size=sizes.image_size,
                                   warmup=sizes.warmup, steps=max(iters - sizes.warmup, 1))
    for name, bf16 in (("fp32 (reference style)", False), ("bf16 + channels_last + fused SGD", True)):
        pretrain_step.set_tuned_backends(bf16)
        sec, _ = pretrain_step.compare(step_args, device, {name: {"tuned": bf16, "bf16": bf16, "dense": True}})[name]
        rows.append(("none (one batch, repeated)", name, sizes.batch / sec))
    reference = rows[0][2]

    flavours = [("fp32 (reference style)", {"precision": "fp32", "compile": False}),
                ("bf16 + channels_last + fused SGD", {"precision": "bf16", "compile": False})]
    if sizes.compile:
        flavours.append(("bf16 + channels_last + fused SGD + compile", {"precision": "bf16", "compile": True}))
    for loader in ("cpu", "gpu"):
        for name, over in flavours:
            if loader == "cpu" and over["compile"]:
                continue  # the CPU loader already bounds the uncompiled step
            clock = StepClock(device)
            cfg = config.merge(base, {**over, "data": {"loader": loader}})
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                train(cfg, images, work / f"{loader}-{len(rows)}", resume=False, device=device, hooks=[clock])
            rows.append((loader, name, _rate(clock.times, sizes.batch, sizes.warmup)))

    sampler = EpochSampler(len(images), sizes.batch, seed=0)
    cpu_alone = EpochLoader(TwoViewDataset(images, mocov2(sizes.image_size)), sampler, sizes.batch, drop_last=True,
                            num_workers=sizes.workers)
    gpu_alone = GPUTwoViewLoader(images, Recipe.mocov2(sizes.image_size), sampler, sizes.batch, device,
                                 num_workers=sizes.workers)
    alone = {name: _loader_rate(iter(data.epoch(0)), iters, sizes.batch, sizes.warmup, device)
             for name, data in (("cpu", cpu_alone), ("gpu", gpu_alone))}

    lines = [(f"{len(images)} JPEGs of {sizes.jpeg_hw[1]}x{sizes.jpeg_hw[0]} (demo generator scenes), "
              f"{sizes.arch}, {sizes.image_size} px, batch {sizes.batch}, queue {sizes.queue}, "
              f"{sizes.workers} loader workers; images/s over iterations {sizes.warmup + 1}..{iters} of one epoch."),
             "", "| loader | step | img/s | x reference-style step |", "|---|---|---|---|"]
    lines += [f"| {loader} | {name} | {rate:.1f} | {rate / reference:.2f}x |" for loader, name, rate in rows]
    lines += ["", "Loaders alone (two views per image, no model): "
              + ", ".join(f"`loader: {k}` {v:.1f} img/s" for k, v in alone.items())]
    return "\n".join(lines)


def svm_on_device(sizes: Sizes, device: torch.device) -> str:
    """The whole VOC07 SVM protocol (gram solver, float64, 20 classes x 19 costs) on the device."""
    from svm_speed import synthetic_voc

    from densecl_bench import svm

    lines = ["| dims | n (trainval + test) | wall s | mAP | solver info |", "|---|---|---|---|---|"]
    for dim in sizes.svm_dims:
        xtr, ytr, xte, yte = synthetic_voc(dim, *sizes.svm_rows)
        _sync(device)
        start = time.perf_counter()
        res = svm.voc07_svm(xtr, ytr, xte, yte, svm.cost_grid("mmselfsup"), device=device, progress=False)
        _sync(device)
        lines.append(f"| {dim} | {sizes.svm_rows[0]} + {sizes.svm_rows[1]} | {time.perf_counter() - start:.1f} | "
                     f"{res.map:.2f} | {res.info} |")
    return "\n".join(lines)


@dataclass(frozen=True)
class Row:
    key: str
    title: str
    budget_s: float  # what the row should take on an H100; it may use up to twice that while time is left
    run: Callable[[Sizes, torch.device, Path], str]


def _script(script: str, full: list[str], dry: list[str]) -> Callable[[Sizes, torch.device, Path], str]:
    return lambda sizes, device, work: run_script(script, (dry if sizes is DRY else full) + ["--device", device.type])


ROWS = (
    Row("pretrain_e2e", "End-to-end DenseCL pretraining: CPU loader vs GPU loader", 150, pretrain_end_to_end),
    Row("pretrain_step", "DenseCL step: fp32 vs tuned, dense-branch cost (`perf/pretrain_step.py`)", 110,
        lambda sizes, device, work: run_script("pretrain_step.py", [
            "--arch", sizes.arch, "--batch", str(sizes.batch), "--size", str(sizes.image_size), "--queue",
            str(sizes.queue), "--steps", "10" if sizes is not DRY else "1", "--warmup", "1",
            *(["--skip-cpu", "--compile"] if device.type == "cuda" else ["--threads", "1"])])),
    Row("extract", "Feature extraction vs raw forward (`perf/extract_throughput.py`)", 45, _script(
        "extract_throughput.py", ["--images", "512", "--batch-size", "64", "--workers", str(Sizes.workers)],
        ["--images", "2", "--batch-size", "2", "--workers", "0"])),  # protocol pooling needs 224 px
    Row("linear_fp32", "Linear-probe step vs forward, fp32 (`perf/linear_step.py`)", 25, _script(
        "linear_step.py", ["--steps", "10"], ["--batch-size", "2", "--size", "32", "--steps", "1", "--classes", "10"])),
    Row("linear_bf16", "Linear-probe step vs forward, bf16 (`perf/linear_step.py --precision bf16`)", 20, _script(
        "linear_step.py", ["--steps", "10", "--precision", "bf16"],
        ["--batch-size", "2", "--size", "32", "--steps", "1", "--classes", "10", "--precision", "bf16"])),
    Row("seg_fp32", "FCN R50-D8 training and inference, fp32 (`perf/seg_fcn.py`)", 35, _script(
        "seg_fcn.py", ["--steps", "10", "--batch-size", "4"], ["--steps", "1", "--batch-size", "1", "--size", "32"])),
    Row("seg_bf16", "FCN R50-D8 training and inference, bf16 (`perf/seg_fcn.py --precision bf16`)", 30, _script(
        "seg_fcn.py", ["--steps", "10", "--batch-size", "4", "--precision", "bf16"],
        ["--steps", "1", "--batch-size", "1", "--size", "32", "--precision", "bf16"])),
    Row("knn", "kNN, one pass for all k (`perf/knn_speed.py`)", 25, _script(
        "knn_speed.py", ["--bank", "200000", "--queries", "10000"],
        ["--bank", "200", "--queries", "20", "--dim", "16", "--classes", "10"])),
    Row("svm", "VOC07 SVM protocol on the device (`svm.voc07_svm`, gram solver, float64)", 40,
        lambda sizes, device, work: svm_on_device(sizes, device)),
    Row("det_c4", "Faster R-CNN R50-C4 step, breakdown and loader (`perf/det_c4.py`)", 30, _script(
        "det_c4.py", ["--steps", "10"], ["--steps", "1", "--size", "64", "--rois", "4", "--loader-items", "1"])),
    Row("det_fpn", "Mask R-CNN R50-FPN step, breakdown and loader (`perf/det_fpn.py`)", 30, _script(
        "det_fpn.py", ["--steps", "10"], ["--steps", "1", "--size", "64", "--loader-items", "1"])),
)


def header(device: torch.device, dry: bool) -> str:
    if device.type == "cuda":
        where = f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})"
    else:
        where = f"CPU {platform.machine()}, {torch.get_num_threads()} torch threads" + (" — dry run, tiny sizes" if dry else "")
    return (f"## GPU rows (`bash perf/gpu_all.sh`, issue 15): {where}\n\n"
            f"{time.strftime('%Y-%m-%d')}, torch {torch.__version__}, torchvision {torchvision.__version__}, "
            f"{os.cpu_count()} host CPUs.")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dry-run", action="store_true", help="every row at tiny sizes on the CPU")
    ap.add_argument("--out", type=Path, default=PERF / "gpu_all.md", help="where the markdown block is written")
    ap.add_argument("--budget", type=float, default=480.0, help="seconds for the whole run (default 8 min)")
    ap.add_argument("--rows", default=",".join(r.key for r in ROWS), help="comma-separated subset of: %(default)s")
    args = ap.parse_args(argv)
    rows = [r for r in ROWS if r.key in args.rows.split(",")]
    if len(rows) != len(set(args.rows.split(","))):
        ap.error(f"--rows: unknown row in {args.rows!r}; known: {', '.join(r.key for r in ROWS)}")
    if not args.dry_run and not torch.cuda.is_available():
        print("error: no CUDA device; run on a GPU, or with --dry-run to check every row on the CPU", file=sys.stderr)
        return 2
    device = torch.device("cpu" if args.dry_run else "cuda")
    sizes = DRY if args.dry_run else Sizes()
    if args.dry_run:
        torch.set_num_threads(1)  # tiny ops: threads only wait for each other on a shared CPU
    deadline = time.monotonic() + args.budget
    blocks, failed = [header(device, args.dry_run)], 0
    with tempfile.TemporaryDirectory() as tmp:
        for i, row in enumerate(rows):
            left = deadline - time.monotonic()
            start = time.monotonic()
            if left < 5:
                text = "not run: the time budget was spent"
            else:
                try:
                    limit = left if args.dry_run else min(2 * row.budget_s, left)  # dry run: CPU speed is no signal
                    with _restored_backends(), _time_limit(limit):
                        text = row.run(sizes, device, Path(tmp) / f"row{i}")
                except Exception as err:  # noqa: BLE001 -- one failing row must not cost the others their numbers
                    failed += 1
                    text = f"failed: {type(err).__name__}: {err}"
            blocks.append(f"### {row.title}\n\n{text}\n\n({time.monotonic() - start:.0f} s)")
            print(blocks[-1], file=sys.stderr, flush=True)
    markdown = "\n\n".join(blocks) + "\n"
    atomic_write_text(args.out, markdown)
    print(markdown)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
