"""One job per stage through submitit (debug executor in-process, local executor as real processes),
requeue after preemption, the GPUs each protocol asks for, and `status`."""

import json
import os
import time
from pathlib import Path

import pytest
import submitit
from click.testing import CliRunner

from densecl_bench import registry, runner
from densecl_bench.benchmarks.base import Benchmark, Metric, RunContext
from densecl_bench.cli import main
from densecl_bench.launch import JobOptions, StageJob, submit_suite
from densecl_bench.results import Ledger
from densecl_bench.status import StageStates, format_views, stage_views

CALLS: list[tuple[str, bool]] = []  # (benchmark, resumed from its own checkpoint)


class SvmLike(Benchmark):
    name = "voc07_svm"
    table = "VOC SVM / Low-shot SVM"
    config = "knn_imagenet"  # any packaged config: the fingerprint comes from it

    def required_data(self, data_root: Path) -> list[Path]:
        return [data_root / "VOCdevkit" / "VOC2007"]

    def run(self, ctx: RunContext) -> list[Metric]:
        CALLS.append((self.name, False))
        return [Metric(self.name, "feature5", 50.0 + ctx.seed), Metric(self.name, "best_layer", "feature5")]


class TrainLike(SvmLike):
    """Trains in two halves; a preemption after the first leaves its checkpoint in the stage's run dir."""

    name = "imagenet_linear"
    table = "ImageNet Linear Evaluation"
    gpus = 8
    preempt = False  # set per test through monkeypatch

    def run(self, ctx: RunContext) -> list[Metric]:
        state = ctx.run_dir / "latest.txt"
        resumed = state.exists()
        CALLS.append((self.name, resumed))
        if not resumed:
            state.parent.mkdir(parents=True, exist_ok=True)
            state.write_text("half")
            if self.preempt:
                raise KeyboardInterrupt  # the job is killed here; submitit requeues it (checkpoint())
        return [Metric(self.name, "feature5", 60.0)]


@pytest.fixture
def fakes(monkeypatch):
    CALLS.clear()
    benches = {b.name: b for b in (SvmLike, TrainLike)}
    monkeypatch.setattr(registry, "available", lambda: benches)
    return benches


def _values(run_dir: Path) -> list[tuple]:
    return sorted((r["benchmark"], r["metric"], r["trial"], r["value"], r["fingerprint"])
                  for r in Ledger(run_dir).records())


def test_each_stage_is_a_job_and_fills_the_same_ledger_and_tables_as_local(tmp_path, fakes):
    kwargs = dict(runs_dir=tmp_path, arch="resnet18", trials=2)
    runner.run_suite(["all"], "random", run_id="local", echo=lambda *_: None, **kwargs)
    options = JobOptions(cluster="debug", gpus_per_stage=1)
    result = submit_suite(["all"], "random", options, run_id="jobs", echo=lambda *_: None, **kwargs)
    assert not result.problems() and {s.status for s in result.stages} == {"done"}
    assert _values(tmp_path / "jobs") == _values(tmp_path / "local")
    tables = {name: (tmp_path / name / "tables.md").read_text().split("\n", 1)[1] for name in ("local", "jobs")}
    assert tables["jobs"] == tables["local"]
    states = StageStates(tmp_path / "jobs").read()
    assert list(states) == ["voc07_svm", "imagenet_linear"]
    assert all(s["state"] == "done" and s["job_id"].startswith("DEBUG_") and s["gpus"] == 1 for s in states.values())
    # submitted again: every stage is in the ledger, so no job is submitted
    CALLS.clear()
    again = submit_suite(["all"], "random", options, run_id="jobs", echo=lambda *_: None, **kwargs)
    assert CALLS == [] and {s.status for s in again.stages} == {"resumed"}


def test_stage_jobs_ask_for_the_gpus_their_protocol_assumes(tmp_path, fakes, monkeypatch):
    asked = {}
    update = submitit.AutoExecutor.update_parameters

    def record(self, **params):
        if "gpus_per_node" in params:
            asked[params["name"].split(":")[1]] = (params["gpus_per_node"], params["tasks_per_node"])
        return update(self, **params)

    monkeypatch.setattr(submitit.AutoExecutor, "update_parameters", record)
    submit_suite(["all"], "random", JobOptions(cluster="debug", wait=False), runs_dir=tmp_path, run_id="auto",
                 arch="resnet18", echo=lambda *_: None)
    assert asked == {"voc07_svm": (1, 1), "imagenet_linear": (8, 8)}  # one task per GPU (torchrun-style ranks)
    submit_suite(["all"], "random", JobOptions(cluster="debug", gpus_per_stage=2, wait=False), runs_dir=tmp_path,
                 run_id="two", arch="resnet18", echo=lambda *_: None)
    assert asked == {"voc07_svm": (2, 2), "imagenet_linear": (2, 2)}
    queued = stage_views(tmp_path / "two")
    assert [(v.name, v.state) for v in queued] == [("voc07_svm", "queued"), ("imagenet_linear", "queued")]


def test_builtin_benchmarks_declare_their_protocols_gpus():
    gpus = {name: cls.gpus for name, cls in registry.available().items()}
    assert gpus == {"voc07_svm": 1, "voc07_lowshot_svm": 1, "imagenet_knn": 1, "imagenet_linear": 8,
                    "places205_linear": 8, "inat18_linear": 8, "voc0712_faster_rcnn_c4": 8,
                    "coco_mask_rcnn_fpn_1x": 8, "voc12aug_fcn": 4, "cityscapes_fcn": 4}


def test_a_requeued_job_resumes_the_stage_from_its_checkpoint(tmp_path, fakes, monkeypatch):
    monkeypatch.setattr(TrainLike, "preempt", True)
    job = StageJob("imagenet_linear", "random", {"runs_dir": tmp_path, "run_id": "r", "arch": "resnet18",
                                                 "echo": lambda *_: None})
    executor = submitit.AutoExecutor(folder=tmp_path / "jobs", cluster="debug")
    with pytest.raises(KeyboardInterrupt):
        executor.submit(job).result()
    assert StageStates(tmp_path / "r").read()["imagenet_linear"]["state"] == "interrupted"
    requeued = job.checkpoint()  # what submitit calls on SLURM's preemption / time-limit signal
    assert isinstance(requeued, submitit.helpers.DelayedSubmission)
    executor.submit(requeued.function, *requeued.args, **requeued.kwargs).result()
    assert CALLS == [("imagenet_linear", False), ("imagenet_linear", True)]
    assert [(r["metric"], r["value"]) for r in Ledger(tmp_path / "r").records()] == [("feature5", 60.0)]
    assert StageStates(tmp_path / "r").read()["imagenet_linear"]["state"] == "done"


def test_status_shows_each_stage_with_progress_eta_and_job(tmp_path):
    run = tmp_path / "run"
    (run / "imagenet_linear" / "trial0").mkdir(parents=True)
    (run / "run.json").write_text("{}")
    records = [{"iter": 20, "max_iters": 100, "loss": 1.0}, {"iter": 25, "max_iters": 100, "loss": 0.9}]
    (run / "imagenet_linear" / "trial0" / "mhead_last.metrics.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in records) + '{"iter": 2')  # a writer's partial last line
    now = 10_000.0
    states = StageStates(run)
    states.update("voc07_svm", state="done", job_id="11", started=now - 70, ended=now - 10, detail="7 metrics in 60s")
    states.update("imagenet_linear", state="running", job_id="12", started=now - 100)
    states.update("voc12aug_fcn", state="queued", job_id="13", submitted=now - 5)
    states.update("imagenet_knn", state="failed", detail="RuntimeError: boom")
    states.update("places205_linear", state="running", host=os.uname().nodename, pid=2**22 + 12345, started=now)
    lines = format_views(stage_views(run, now=now))
    assert lines[0].split() == ["voc07_svm", "done", "job", "11", "7", "metrics", "in", "60s,", "took", "0:01:00"]
    assert "trial0/mhead_last.metrics.jsonl 25% (iter 25/100), ETA 0:05:00, running for 0:01:40" in lines[1]
    assert lines[2].split()[:4] == ["voc12aug_fcn", "queued", "job", "13"] and "0:00:05 ago" in lines[2]
    assert lines[3].split()[:3] == ["imagenet_knn", "failed", "-"] and lines[3].endswith("RuntimeError: boom")
    assert lines[4].split()[1] == "lost" and "is gone" in lines[4]
    out = CliRunner().invoke(main, ["status", str(run)])
    assert out.exit_code == 0 and [line.split()[:2] for line in out.output.splitlines()] == [
        ["voc07_svm", "done"], ["imagenet_linear", "running"], ["voc12aug_fcn", "queued"], ["imagenet_knn", "failed"],
        ["places205_linear", "lost"]]


def test_cli_submitit_local_runs_knn_as_a_process_and_matches_local(tmp_path, monkeypatch):
    """`run knn --launcher submitit-local`: the stage runs in its own process (submitit's local executor)."""
    monkeypatch.chdir(tmp_path)
    cli = CliRunner()
    base = ["run", "knn", "--ckpt", "random", "--arch", "resnet18", "--workers", "0"]
    local = cli.invoke(main, [*base, "--run-id", "local"])
    assert local.exit_code == 0, local.output
    started = time.time()
    jobs = cli.invoke(main, [*base, "--run-id", "jobs", "--launcher", "submitit-local", "--gpus-per-stage", "1"])
    assert jobs.exit_code == 0, jobs.output
    state = StageStates(tmp_path / "runs" / "jobs").read()["imagenet_knn"]
    assert state["state"] == "done" and state["pid"] != os.getpid() and state["started"] > started
    assert (tmp_path / "runs" / "jobs" / "jobs" / f"{state['job_id']}_0_log.out").exists()
    assert _values(tmp_path / "runs" / "jobs") == _values(tmp_path / "runs" / "local")
    assert "| random-init-resnet18 |" in jobs.output


def test_slurm_without_sbatch_is_one_error_line(tmp_path, monkeypatch):
    monkeypatch.setattr("shutil.which", lambda name: None)
    out = CliRunner().invoke(main, ["run", "knn", "--ckpt", "random", "--launcher", "slurm",
                                    "--runs-dir", str(tmp_path)])
    assert out.exit_code == 2 and out.output.startswith("error: --launcher slurm: no `sbatch` here")
    assert list(tmp_path.iterdir()) == []  # no run directory opened
