"""What a run did is what its record says: the stage fingerprint covers every config, profiles are never
silently ignored, a run id keeps its checkpoint and data root, caveats reach the ledger and the tables,
exit codes, one-line user errors, and the runner under torchrun (rank-0-only benchmarks, failing together)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from click.testing import CliRunner
from PIL import Image

from densecl_bench import registry, runner
from densecl_bench.benchmarks.base import Benchmark, Metric, RunContext
from densecl_bench.benchmarks.knn import ImagenetKnn
from densecl_bench.benchmarks.linear import ImagenetLinear
from densecl_bench.benchmarks.voc07_svm import Voc07LowshotSvm, Voc07Svm
from densecl_bench.cli import main
from densecl_bench.config import ConfigError
from densecl_bench.data.base import BadImageError, ImageList
from densecl_bench.errors import UserError
from densecl_bench.results import Ledger

SEEN: list[RunContext] = []
IN_AVGPOOL = "resnet50_linear-8xb32-steplr-100e_in1k"


def quiet(*_args) -> None:
    pass


def bench_class(name: str, config: str | Path, extra: tuple[str | Path, ...] = (), order: int = 100,
                run=None) -> type[Benchmark]:
    """A benchmark that needs no data and records the context it ran with."""

    def _run(self, ctx: RunContext) -> list[Metric]:
        SEEN.append(ctx)
        return run(ctx) if run else [Metric(self.name, "m", 1.0)]

    return type(name, (Benchmark,), {
        "name": name, "table": "t", "config": str(config), "extra_configs": tuple(map(str, extra)), "order": order,
        "required_data": lambda self, root: [], "run": _run,
    })


@pytest.fixture
def fake(monkeypatch):
    """Register the given benchmark classes instead of the installed ones."""
    SEEN.clear()

    def install(*classes: type[Benchmark]) -> None:
        monkeypatch.setattr(registry, "available", lambda: {c.name: c for c in classes})

    return install


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


# ------------------------------------------------------------------ part 3: every config is fingerprinted


def test_editing_a_second_config_reruns_the_stage(tmp_path, fake):
    first = write(tmp_path / "first.yaml", "lr: 1\n")
    second = write(tmp_path / "second.yaml", "lr: 2\n")
    fake(bench_class("two", first, (second,)))
    args = dict(data_root=tmp_path, runs_dir=tmp_path / "runs", run_id="r", echo=quiet)
    runner.run_suite(["two"], "random", arch="resnet18", **args)
    runner.run_suite(["two"], "random", arch="resnet18", **args)
    assert len(SEEN) == 1  # unchanged configs: resumed
    assert SEEN[0].configs[str(second)]["lr"] == 2 and SEEN[0].config["lr"] == 1
    write(second, "lr: 3\n")
    runner.run_suite(["two"], "random", arch="resnet18", **args)
    assert len(SEEN) == 2 and SEEN[1].configs[str(second)]["lr"] == 3
    records = Ledger(tmp_path / "runs" / "r").records()
    assert records[0]["fingerprint"] != records[1]["fingerprint"]
    assert records[1]["config"]["_extra_configs"][str(second)]["lr"] == 3


def test_imagenet_linear_resolves_its_avgpool_config_with_the_profiles():
    assert ImagenetLinear.all_configs() == (ImagenetLinear.config, IN_AVGPOOL)
    configs, not_offered = runner.stage_protocol(ImagenetLinear, ["demo"], {"world_size": 1, "arch": "resnet50"})
    assert not_offered == []
    assert configs[IN_AVGPOOL]["epochs"] == 2 and configs[IN_AVGPOOL]["_profile"] == "demo"
    full, _ = runner.stage_protocol(ImagenetLinear, [], {"world_size": 1, "arch": "resnet50"})
    assert full[IN_AVGPOOL]["epochs"] == 100


# ------------------------------------------------------------------ part 4: profiles


def test_unknown_profile_is_an_error_naming_the_offered_ones(tmp_path):
    offered = r"unknown profile 'vissel': the benchmark configs offer cv, (.+, )?demo, (.+, )?fair, vissl"
    with pytest.raises(ConfigError, match=offered):
        runner.run_suite(["knn"], "random", arch="resnet18", profiles=["vissel"], runs_dir=tmp_path, echo=quiet)
    assert list(tmp_path.iterdir()) == []  # nothing written
    out = CliRunner().invoke(main, ["run", "knn", "--ckpt", "random", "--profile", "demo, vissel",
                                    "--runs-dir", str(tmp_path)])
    assert out.exit_code == 2 and "error: unknown profile 'vissel'" in out.output and "Traceback" not in out.output


def test_profiles_compose_and_one_a_benchmark_lacks_is_reported_and_recorded(tmp_path, fake):
    offers = write(tmp_path / "offers.yaml",
                   "k: base\nprofiles:\n  demo: {k: demo, d: 1}\n  p1: {k: p1}\n  p2: {k: p2}\n")
    lacks = write(tmp_path / "lacks.yaml", "k: base\nprofiles:\n  demo: {k: demo}\n")
    fake(bench_class("offers", offers, order=1), bench_class("lacks", lacks, order=2))
    lines: list[str] = []
    result = runner.run_suite(["all"], "random", arch="resnet18", profiles=["p1", "p2"], runs_dir=tmp_path / "runs",
                              echo=lines.append)
    assert result.run_dir.name.endswith("-demo_p1_p2")  # demo first: this is the demo data
    offered, lacking = SEEN
    assert (offered.config["k"], offered.config["d"], offered.config["_profile"]) == ("p2", 1, "demo,p1,p2")
    assert (lacking.config["k"], lacking.config["_profile"]) == ("demo", "demo")
    assert "[lacks] profile p1, p2 not offered by " + str(lacks) + ": runs without it" in lines
    records = {r["benchmark"]: r for r in Ledger(result.run_dir).records()}
    assert records["lacks"]["provenance"]["profiles"] == ["demo", "p1", "p2"]
    assert records["lacks"]["provenance"]["profiles_not_offered"] == ["p1", "p2"]
    assert records["offers"]["provenance"]["profiles_not_offered"] == []
    assert Ledger(result.run_dir).manifest()["profiles"] == ["demo", "p1", "p2"]
    SEEN.clear()
    runner.run_suite(["offers"], "random", arch="resnet18", profiles=["p2", "p1"], runs_dir=tmp_path / "runs",
                     echo=quiet)
    assert SEEN[0].config["k"] == "p1"  # later profiles win


# ------------------------------------------------------------------ part 8: the record


def test_a_run_id_keeps_its_data_root_and_checkpoint(tmp_path, fake):
    fake(bench_class("b", "knn_imagenet"))
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    args = dict(runs_dir=tmp_path / "runs", run_id="r", echo=quiet)
    runner.run_suite(["b"], "random", arch="resnet18", data_root=tmp_path / "one", **args)
    manifest = (tmp_path / "runs" / "r" / "run.json").read_text()
    with pytest.raises(runner.RunMismatch, match=r"data_root \(.*one there, .*two now\)"):
        runner.run_suite(["b"], "random", arch="resnet18", data_root=tmp_path / "two", **args)
    with pytest.raises(runner.RunMismatch, match="ckpt_sha256"):
        runner.run_suite(["b"], "random", arch="resnet18", seed=1, data_root=tmp_path / "one", **args)
    assert (tmp_path / "runs" / "r" / "run.json").read_text() == manifest
    assert len(SEEN) == 1
    out = CliRunner().invoke(main, ["run", "b", "--ckpt", "random", "--arch", "resnet18", "--data-root",
                                    str(tmp_path / "two"), "--runs-dir", str(tmp_path / "runs"), "--run-id", "r"])
    assert out.exit_code == 2 and "another --run-id" in out.output


def test_leniencies_and_skipped_images_are_recorded_and_marked(tmp_path, fake):
    def skips(ctx: RunContext) -> list[Metric]:
        ctx.skipped_images["voc07/test"] = [3, 5]
        return [Metric("svm", "svm", 80.0)]

    fake(bench_class("voc07_svm", "svm_voc07", run=skips))
    runner.run_suite(["voc07_svm"], "random", arch="resnet18", data_root=tmp_path, runs_dir=tmp_path / "runs",
                     run_id="r", allow_partial=True, on_bad_image="skip", echo=quiet)
    prov = Ledger(tmp_path / "runs" / "r").records()[0]["provenance"]
    assert (prov["allow_partial"], prov["missing_tensors"], prov["on_bad_image"]) == (True, 0, "skip")
    assert prov["skipped_images"] == {"voc07/test": 2}
    tables = (tmp_path / "runs" / "r" / "tables.md").read_text()
    assert "| random-init-resnet18 † |" in tables
    assert ("† random-init-resnet18: --allow-partial (0 backbone tensors missing, left at random init); "
            "--skip-bad-images (2 unreadable images left out).") in tables


def test_run_fails_when_nothing_ran_or_a_named_benchmark_was_skipped(tmp_path):
    empty = tmp_path / "typo"
    empty.mkdir()
    cli = CliRunner()
    base = ["--ckpt", "random", "--arch", "resnet18", "--data-root", str(empty), "--runs-dir", str(tmp_path / "runs")]
    named = cli.invoke(main, ["run", "voc07_svm", *base])
    assert named.exit_code == 1 and "error: voc07_svm was asked for but skipped: no data at" in named.output
    everything = cli.invoke(main, ["run", "all", *base])
    assert everything.exit_code == 1 and "error: nothing ran: voc07_svm skipped (no data at" in everything.output


@pytest.mark.parametrize("args", [["--trials", "0"], ["--trials", "-1"], ["--workers", "-1"]])
def test_run_rejects_impossible_counts(args):
    out = CliRunner().invoke(main, ["run", "knn", "--ckpt", "random", *args])
    assert out.exit_code == 2 and "Invalid value" in out.output
    trials = int(args[1]) if args[0] == "--trials" else 1
    workers = int(args[1]) if args[0] == "--workers" else 0
    with pytest.raises(UserError, match="trials must be >= 1 and workers >= 0"):
        runner.run_suite(["knn"], "random", trials=trials, num_workers=workers, echo=quiet)


def _hostile(path: Path) -> None:
    class Payload:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    torch.save({"state_dict": Payload()}, path, _use_new_zipfile_serialization=True)


def _one_error_line(out) -> str:
    errors = [line for line in out.output.splitlines() if line.startswith("error:")]
    assert out.exit_code == 2 and len(errors) == 1 and "Traceback" not in out.output, out.output
    return errors[0]


def test_user_errors_are_one_line_exit_2_and_v_keeps_the_traceback(tmp_path):
    cli = CliRunner()
    sd = torchvision.models.resnet18().state_dict()
    del sd["layer4.1.conv2.weight"]
    torch.save(sd, tmp_path / "partial.pth")
    (tmp_path / "garbage.pth").write_bytes(b"not a checkpoint at all")
    _hostile(tmp_path / "hostile.pth")
    runs = ["--runs-dir", str(tmp_path / "runs"), "--data-root", str(tmp_path)]
    cases = {
        "partial": (["run", "knn", "--ckpt", str(tmp_path / "partial.pth"), *runs], "layer4.1.conv2.weight"),
        "garbage": (["run", "knn", "--ckpt", str(tmp_path / "garbage.pth"), *runs], "garbage.pth"),
        "hostile": (["run", "knn", "--ckpt", str(tmp_path / "hostile.pth"), *runs], "hostile.pth"),
        "unknown": (["run", "nope", "--ckpt", "random", *runs], "unknown benchmark 'nope'; registered:"),
        "arch": (["run", "knn", "--ckpt", "random", "--arch", "resnet152", *runs], "unknown arch 'resnet152'"),
        "device": (["run", "knn", "--ckpt", "random", "--device", "nodevice", *runs], "--device nodevice"),
    }
    if not torch.cuda.is_available():
        cases["cuda"] = (["run", "knn", "--ckpt", "random", "--device", "cuda", *runs], "no CUDA GPU")
    for name, (args, expected) in cases.items():
        assert expected in _one_error_line(cli.invoke(main, args)), name
    verbose = cli.invoke(main, ["-v", *cases["unknown"][0]])
    assert verbose.exit_code == 2 and "Traceback" in verbose.output and "error: unknown benchmark" in verbose.output


def test_a_bad_image_is_one_line_with_the_skip_hint(tmp_path, fake):
    images = tmp_path / "images"
    images.mkdir()
    Image.fromarray(np.full((40, 40, 3), 128, np.uint8)).save(images / "good.jpg")
    (images / "bad.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    paths = [images / "good.jpg", images / "bad.jpg"]

    def extract(ctx: RunContext) -> list[Metric]:
        image_list = ImageList("toy/test", images, paths, np.arange(2), ["a", "b"])
        ctx.features(image_list, "voc_svm", ["feature5"], "adaptive", 32, 2)
        return []

    fake(bench_class("voc07_svm", "svm_voc07", run=extract))
    with pytest.raises(BadImageError):  # a user error stops the suite instead of being one failed stage
        runner.run_suite(["voc07_svm"], "random", arch="resnet18", data_root=tmp_path, runs_dir=tmp_path / "a",
                         num_workers=0, echo=quiet)
    out = CliRunner().invoke(main, ["run", "voc07_svm", "--ckpt", "random", "--arch", "resnet18", "--workers", "0",
                                    "--data-root", str(tmp_path), "--runs-dir", str(tmp_path / "b")])
    line = _one_error_line(out)
    assert "bad.jpg" in line and line.endswith("(--skip-bad-images leaves unreadable images out and records how "
                                               "many in the results)")


def test_list_writes_no_demo_data(tmp_path, monkeypatch):
    monkeypatch.setenv("DENSECL_BENCH_HOME", str(tmp_path / "home"))
    out = CliRunner().invoke(main, ["list"])
    assert out.exit_code == 0 and "imagenet_linear" in out.output and IN_AVGPOOL in out.output
    assert "no data at" in out.output and not (tmp_path / "home").exists()


# ------------------------------------------------------------------ part 5: torchrun


def test_svm_and_knn_run_on_rank_0_only():
    assert Voc07Svm.rank0_only and Voc07LowshotSvm.rank0_only and ImagenetKnn.rank0_only
    assert not ImagenetLinear.rank0_only  # the probes train with DDP on every rank


def _torchrun(mode: str, tmp_path: Path) -> subprocess.CompletedProcess:
    images = tmp_path / "images"
    images.mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(5):  # odd: unequal shards
        Image.fromarray((rng.random((40, 48, 3)) * 255).astype(np.uint8)).save(images / f"{i}.png")
    out = tmp_path / mode
    out.mkdir()
    script = Path(__file__).with_name("dist_runner_script.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DENSECL_BENCH_HOME": str(tmp_path / "home"),
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
           mode, str(images), str(out)]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)


def test_rank0_only_benchmark_runs_once_while_extraction_stays_sharded(tmp_path):
    proc = _torchrun("rank0", tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "rank0"
    assert sorted(p.name for p in out.glob("ran_on_rank*")) == ["ran_on_rank0"]
    from densecl_bench.backbone import Backbone, freeze, random_state_dict
    from densecl_bench.features import extract

    backbone = Backbone("resnet18")
    backbone.load_state_dict(random_state_dict("resnet18"))
    paths = sorted((tmp_path / "images").glob("*.png"))
    images = ImageList("toy/train", tmp_path / "images", paths, np.arange(5), [str(i) for i in range(5)])
    single = extract(freeze(backbone), images, transform="voc_svm", layers=["feature5"], pooling="adaptive",
                     size=64, batch_size=2, num_workers=0, cache_dir=tmp_path / "single", ckpt_key="x")
    merged = list((tmp_path / "home" / "cache").rglob("*.npy"))
    assert len(merged) == 1 and ".part" not in merged[0].name  # both shards merged by rank 0
    np.testing.assert_allclose(np.load(merged[0]), single.arrays["feature5"], rtol=1e-4, atol=1e-5)
    assert [r["value"] for r in Ledger(out / "runs" / "r").records()] == [5.0]


def test_a_failure_on_one_rank_ends_every_rank_with_its_message(tmp_path):
    """Rank 1 raises while rank 0 waits in a barrier: without the watcher rank 0 hangs past the timeout."""
    proc = _torchrun("fail", tmp_path)
    assert proc.returncode != 0
    assert "error: rank 1 failed: RuntimeError: boom on rank 1 (rank 0 stops too)" in proc.stderr, proc.stderr[-3000:]
