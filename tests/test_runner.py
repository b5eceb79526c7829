"""The runner: plugins through the registry, ledger records, resume after a kill, skipped data, CLI."""

from pathlib import Path

import pytest
from click.testing import CliRunner

from densecl_bench import registry, runner
from densecl_bench.benchmarks.base import Benchmark, Metric, RunContext
from densecl_bench.checkpoint import random_sha256
from densecl_bench.cli import main
from densecl_bench.results import Ledger

CALLS: list[str] = []


class FirstBench(Benchmark):
    name = "voc07_svm"
    table = "VOC SVM / Low-shot SVM"
    config = "knn_imagenet"  # any packaged config: the fingerprint comes from it

    def required_data(self, data_root: Path) -> list[Path]:
        return [data_root / "VOCdevkit" / "VOC2007"]

    def run(self, ctx: RunContext) -> list[Metric]:
        CALLS.append(self.name)
        assert ctx.demo and ctx.config["_profile"] == "demo"
        return [Metric(self.name, "feature5", 50.0 + ctx.seed), Metric(self.name, "best_layer", "feature5")]


class KilledBench(FirstBench):
    name = "imagenet_knn"
    table = "ImageNet Nearest-Neighbor Classification"

    kill = True  # set per test through `monkeypatch` only, so no test sees another's setting

    def run(self, ctx: RunContext) -> list[Metric]:
        CALLS.append(self.name)
        if self.kill:
            raise KeyboardInterrupt  # the user pressed Ctrl-C mid-suite
        return [Metric(self.name, "k=20", 42.0)]


class NoDataBench(FirstBench):
    name = "places205_linear"

    def required_data(self, data_root: Path) -> list[Path]:
        return [data_root / "nowhere"]


@pytest.fixture
def fake_registry(monkeypatch):
    CALLS.clear()
    monkeypatch.setattr(KilledBench, "kill", True)
    benches = {b.name: b for b in (FirstBench, KilledBench, NoDataBench)}
    monkeypatch.setattr(registry, "available", lambda: benches)
    return benches


def test_resume_after_kill_does_not_redo_finished_stages(tmp_path, fake_registry, monkeypatch):
    runs = tmp_path / "runs"
    with pytest.raises(KeyboardInterrupt):
        runner.run_suite(["all"], "random", arch="resnet18", runs_dir=runs, run_id="r", echo=lambda *_: None)
    assert CALLS == ["voc07_svm", "imagenet_knn"]
    records = Ledger(runs / "r").records()
    assert {r["benchmark"] for r in records} == {"voc07_svm"}

    monkeypatch.setattr(KilledBench, "kill", False)
    CALLS.clear()
    result = runner.run_suite(["all"], "random", arch="resnet18", runs_dir=runs, run_id="r", echo=lambda *_: None)
    assert CALLS == ["imagenet_knn"]  # the finished stage was not run again
    status = {(s.benchmark, s.status) for s in result.stages}
    assert status == {("voc07_svm", "resumed"), ("imagenet_knn", "done"), ("places205_linear", "skipped")}
    skipped = next(s for s in result.stages if s.status == "skipped")
    assert "no data at" in skipped.detail and "nowhere" in skipped.detail
    records = Ledger(runs / "r").records()
    assert sorted((r["benchmark"], r["metric"]) for r in records) == [
        ("imagenet_knn", "k=20"), ("voc07_svm", "best_layer"), ("voc07_svm", "feature5")]
    rec = records[0]
    assert rec["provenance"]["demo"] is True and rec["provenance"]["ckpt_sha256"] == random_sha256("resnet18", 0)
    assert rec["config"]["_config"] == "knn_imagenet" and rec["fingerprint"]
    assert (runs / "r" / "tables.md").read_text().count("random-init-resnet18") >= 2


def test_trials_use_successive_seeds(tmp_path, fake_registry, monkeypatch):
    monkeypatch.setattr(KilledBench, "kill", False)
    runner.run_suite(["voc07_svm"], "random", arch="resnet18", runs_dir=tmp_path, run_id="t", trials=3,
                     seed=5, echo=lambda *_: None)
    values = sorted(r["value"] for r in Ledger(tmp_path / "t").records() if r["metric"] == "feature5")
    assert values == [55.0, 56.0, 57.0]
    assert "56.00 ± 1.00" in (tmp_path / "t" / "tables.md").read_text()


def test_unknown_benchmark_names_the_registered_ones(fake_registry):
    with pytest.raises(KeyError, match="voc07_svm"):
        registry.resolve(["nope"])


def test_builtin_benchmarks_are_registered():
    names = set(registry.available())
    assert {"voc07_svm", "voc07_lowshot_svm", "imagenet_knn", "imagenet_linear", "places205_linear"} <= names


def test_cli_run_knn_end_to_end_on_demo_data(tmp_path, monkeypatch):
    """`densecl-bench run knn --ckpt random` on the demo data: real plugin, ledger, tables, regress."""
    monkeypatch.chdir(tmp_path)
    cli = CliRunner()
    result = cli.invoke(main, ["run", "knn", "--ckpt", "random", "--arch", "resnet18", "--run-id", "demo",
                               "--workers", "0"])
    assert result.exit_code == 0, result.output
    assert "embedded demo datasets" in result.output
    records = Ledger(tmp_path / "runs" / "demo").records()
    assert sorted(r["metric"] for r in records) == ["k=10", "k=100", "k=20", "k=200"]
    assert all(0.0 <= r["value"] <= 100.0 for r in records)
    assert "| random-init-resnet18 |" in result.output
    again = cli.invoke(main, ["run", "knn", "--ckpt", "random", "--arch", "resnet18", "--run-id", "demo",
                              "--workers", "0"])
    assert "already recorded" in again.output
    ref = Path(__file__).parents[1] / "results" / "reference" / "densecl_r50_8xb32-coslr-200e.json"
    gate = cli.invoke(main, ["regress", "runs/demo", "--reference", str(ref), "--allow-missing", "--two-sided"])
    assert gate.exit_code == 1 and "FAIL" in gate.output  # a random init on demo data is far from DenseCL


def test_a_stage_stopped_by_a_signal_stops_the_suite_with_its_exit_code(tmp_path, fake_registry, monkeypatch):
    """SIGTERM/Ctrl-C inside a training stage is not one failed benchmark: the suite stops, state saved."""
    import signal

    from densecl_bench.engine import TrainingInterrupted

    def interrupted(self, ctx):
        CALLS.append(self.name)
        raise TrainingInterrupted(tmp_path / "latest.pth", signal.SIGTERM)

    monkeypatch.setattr(FirstBench, "run", interrupted)
    with pytest.raises(TrainingInterrupted):
        runner.run_suite(["all"], "random", arch="resnet18", runs_dir=tmp_path, run_id="s", echo=lambda *_: None)
    assert CALLS == ["voc07_svm"]  # the next benchmark did not start
    out = CliRunner().invoke(main, ["run", "all", "--ckpt", "random", "--arch", "resnet18", "--runs-dir",
                                    str(tmp_path), "--run-id", "s"])
    assert out.exit_code == 128 + signal.SIGTERM and "interrupted by SIGTERM" in out.output
