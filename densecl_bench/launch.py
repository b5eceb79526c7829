"""Each stage of a suite as its own job through submitit: SLURM on a cluster, submitit's local
executor on one machine (the same path without SLURM), its debug executor in tests.

The submitting process opens the run (checkpoint, manifest, demo data written once) and submits one
job per stage not yet in the ledger, asking for the GPUs the stage's protocol assumes
(`Benchmark.gpus`: 8 for the linear probes and detection, 4 for FCN, 1 for SVM / kNN) or
`gpus_per_stage`. A job runs one task per GPU; each task gets torchrun's environment (RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT, from submitit's `TorchDistributedEnvironment`) and runs
the ordinary one-stage suite, which records into the shared ledger under its file lock.

Preemption and time limits: submitit turns SLURM's warning signal (USR2, sent before the time limit
and on preemption) into a call of the job's `checkpoint()`, which requeues the same stage; where
SLURM itself requeues a preempted job after SIGTERM, the engine has saved the training state on
that signal. Either way the requeued job skips trials already in the ledger and the engine resumes
training from the stage's last checkpoint under its run directory.
"""

from __future__ import annotations

import inspect
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import submitit

from densecl_bench import config, registry
from densecl_bench.benchmarks.base import Benchmark
from densecl_bench.errors import UserError
from densecl_bench.runner import (
    RunSetup,
    StageOutcome,
    SuiteResult,
    open_run,
    run_suite,
    stage_protocol,
    stage_record,
)
from densecl_bench.status import StageStates, format_views, stage_views
from densecl_bench.tables import write_tables

# `--launcher` value -> submitit's executor name
CLUSTERS = {"slurm": "slurm", "submitit-local": "local", "debug": "debug"}


@dataclass(frozen=True)
class JobOptions:
    """What every stage's job asks the scheduler for; gpus_per_stage None: each benchmark's own `gpus`."""

    cluster: str = "slurm"
    gpus_per_stage: int | None = None
    partition: str | None = None
    timeout_min: int = 24 * 60
    cpus_per_task: int = 8
    wait: bool = True


class StageJob(submitit.helpers.Checkpointable):
    """One stage (a benchmark, all its trials) as a job: `run_suite([name], ...)` with the submitter's
    arguments. Checkpointable: on preemption or timeout submitit resubmits it as it is, and the
    resubmitted run resumes (ledger for finished trials, the engine's checkpoint for training)."""

    def __init__(self, name: str, ckpt: str, suite_kwargs: dict[str, Any]) -> None:
        self.name, self.ckpt, self.suite_kwargs = name, ckpt, suite_kwargs

    def __call__(self) -> list[StageOutcome]:
        if submitit.JobEnvironment().num_tasks > 1:  # torch.distributed over the job's tasks, as torchrun
            submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
        return run_suite([self.name], self.ckpt, **self.suite_kwargs).stages


def _recorded(setup: RunSetup, bench: type[Benchmark], trials: int, gpus: int, suite_kwargs: dict[str, Any]) -> bool:
    """Whether every trial of `bench` at this world size is already in the run's ledger."""
    extra = {"world_size": gpus, "arch": setup.loaded.arch}
    if suite_kwargs.get("precision"):
        extra["precision"] = suite_kwargs["precision"]
    configs, _ = stage_protocol(bench, setup.profiles, extra)
    fp = config.fingerprint(stage_record(bench, configs))
    return all(setup.ledger.completed(bench.name, fp, t) for t in range(trials))


def submit_suite(
    names: list[str],
    ckpt: str,
    options: JobOptions,
    *,
    trials: int = 1,
    echo: Callable[[str], None] = print,
    poll_s: float = 10.0,
    **suite_kwargs: Any,
) -> SuiteResult:
    """Submit one job per stage of `names` (as `run_suite` would run them) and, with `options.wait`,
    wait for them and write the tables; the job ids go to the run's `stages.json`.

    suite_kwargs: `run_suite`'s keywords (data_root, runs_dir, run_id, profiles, seed, ...).
    """
    if options.cluster == "slurm" and shutil.which("sbatch") is None:
        raise UserError("--launcher slurm: no `sbatch` here (submit from a SLURM login node; "
                        "--launcher submitit-local runs the same jobs on this machine)")
    benchmarks = registry.resolve(names)
    open_keys = inspect.signature(open_run).parameters.keys()  # the run's identity, as the jobs will open it
    setup = open_run(ckpt, echo=echo, **{k: v for k, v in suite_kwargs.items() if k in open_keys})
    run_dir = setup.run_dir
    # the jobs re-open this very run: same id and label whatever they resolve to on their node
    job_kwargs = {**suite_kwargs, "run_id": run_dir.name, "runs_dir": run_dir.parent, "label": setup.label,
                  "trials": trials}
    states = StageStates(run_dir)
    folder = run_dir / "jobs"
    executor = submitit.AutoExecutor(folder=folder, cluster=CLUSTERS[options.cluster])
    result = SuiteResult(run_dir, named=() if "all" in names else tuple(b.name for b in benchmarks))
    jobs: dict[str, submitit.Job] = {}
    for bench in benchmarks:
        missing = [p for p in bench().required_data(setup.data_root) if not p.exists()]
        if missing:
            echo(f"[{bench.name}] skipped: no data at {missing[0]}")
            result.stages.append(StageOutcome(bench.name, 0, "skipped", f"no data at {missing[0]}"))
            continue
        gpus = options.gpus_per_stage or bench.gpus
        if _recorded(setup, bench, trials, gpus, suite_kwargs):
            echo(f"[{bench.name}] already recorded, not submitted (resume)")
            result.stages += [StageOutcome(bench.name, t, "resumed", "already in the ledger") for t in range(trials)]
            continue
        params: dict[str, Any] = {"name": f"{run_dir.name}:{bench.name}", "timeout_min": options.timeout_min,
                                  "nodes": 1, "tasks_per_node": gpus, "gpus_per_node": gpus,
                                  "cpus_per_task": options.cpus_per_task}
        if options.partition:
            params["slurm_partition"] = options.partition
        executor.update_parameters(**params)
        # queued before the submission: a job that starts at once marks itself running after this
        states.update(bench.name, state="queued", job_id=None, gpus=gpus, cluster=options.cluster,
                      folder=str(folder), submitted=time.time(), started=None, ended=None, detail="")
        job = executor.submit(StageJob(bench.name, ckpt, job_kwargs))
        jobs[bench.name] = job
        states.update(bench.name, job_id=str(job.job_id))
        echo(f"[{bench.name}] submitted job {job.job_id} ({gpus} GPU{'s' * (gpus > 1)})")
    if not options.wait:
        return result
    shown: list[str] = []
    start = time.monotonic()
    while not all(job.done() for job in jobs.values()):
        if (lines := format_views(stage_views(run_dir))) != shown:
            echo("\n".join(lines))
            shown = lines
        time.sleep(min(poll_s, 0.5 + (time.monotonic() - start) / 10))  # short stages end soon after
    for name, job in jobs.items():
        try:
            result.stages += job.result()
        except Exception as err:  # the job died outside the runner (killed, out of memory, no node)
            states.update(name, state="failed", ended=time.time(), detail=f"{type(err).__name__}: {err}")
            result.stages.append(StageOutcome(name, 0, "failed", f"job {job.job_id}: {type(err).__name__}: {err}"))
    with setup.ledger.lock():
        write_tables(run_dir)
    echo("\n".join(format_views(stage_views(run_dir))))
    return result

