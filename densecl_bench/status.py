"""Where each stage of a run stands: the states file the runner and the launcher keep, and `status`.

`runs/<id>/stages.json` holds one entry per stage (a benchmark with all its trials): its state
(queued, running, done, failed, skipped, interrupted), the job id when a launcher submitted it, the
GPUs it asked for, the process that runs it and the times. Several jobs of one run update it, so
every update is a read-modify-write under the run's ledger lock. `status` joins it with the ledger
(stages recorded before this file existed) and with the newest `metrics.jsonl` under a running
stage's directory, whose records carry `iter` / `max_iters`, for its progress and ETA. A stage
whose process or job is gone without a final state is shown as lost, not as running forever.
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from densecl_bench.paths import atomic_write_text
from densecl_bench.results import Ledger

STAGES_FILE = "stages.json"
FINAL = ("done", "failed", "skipped", "interrupted")


class Outcome(Protocol):
    """A trial's outcome as the runner reports it (`runner.StageOutcome`)."""

    status: str
    detail: str


class StageStates:
    """The stage states of one run directory."""

    def __init__(self, run_dir: str | os.PathLike[str]) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / STAGES_FILE

    def read(self) -> dict[str, dict[str, Any]]:
        return json.loads(self.path.read_text()) if self.path.exists() else {}

    def update(self, name: str, **fields: Any) -> None:
        """Merge `fields` into stage `name`'s entry (created when new), atomically and under the run's lock."""
        with Ledger(self.run_dir).lock():
            states = self.read()
            states.setdefault(name, {}).update(fields)
            atomic_write_text(self.path, json.dumps(states, indent=2) + "\n")  # in run order, not sorted

    def track(self, name: str, run: Callable[[], Sequence[Outcome]]) -> Sequence[Outcome]:
        """`run()` with stage `name` marked running, then done / failed / skipped by its outcomes, or
        interrupted (a signal, Ctrl-C) / failed when it raises."""
        self.update(name, state="running", started=time.time(), ended=None, host=socket.gethostname(),
                    pid=os.getpid(), detail="")
        try:
            outcomes = run()
        except BaseException as err:
            stopped = isinstance(err, KeyboardInterrupt) or hasattr(err, "exit_code")  # TrainingInterrupted
            self.update(name, state="interrupted" if stopped else "failed", ended=time.time(),
                        detail=f"{type(err).__name__}: {err}")
            raise
        statuses = {o.status for o in outcomes}
        state = "failed" if "failed" in statuses else "skipped" if statuses == {"skipped"} else "done"
        self.update(name, state=state, ended=time.time(), detail="; ".join(o.detail for o in outcomes if o.detail))
        return outcomes


@dataclass(frozen=True)
class Progress:
    """A training stage's position, from the newest record of its newest `metrics.jsonl`."""

    source: str  # the metrics file's name relative to the stage directory
    iter: int
    max_iters: int

    @property
    def fraction(self) -> float:
        return self.iter / self.max_iters if self.max_iters else 0.0


def training_progress(stage_dir: Path) -> Progress | None:
    """The progress of the training loop last written under `stage_dir` (None for stages that do not train)."""
    files = sorted(stage_dir.rglob("*metrics.jsonl"), key=lambda p: p.stat().st_mtime) if stage_dir.is_dir() else []
    if not files:
        return None
    for line in reversed(files[-1].read_text().splitlines()):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a partial last line of a running writer
        if "max_iters" in record and "iter" in record:
            return Progress(str(files[-1].relative_to(stage_dir)), int(record["iter"]), int(record["max_iters"]))
    return None


def format_duration(seconds: float) -> str:
    seconds = max(int(seconds), 0)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def _gone(entry: dict[str, Any]) -> str | None:
    """Why a stage recorded as queued/running cannot be: its process on this host or its SLURM job ended."""
    if entry.get("cluster") == "slurm" and entry.get("job_id"):
        try:
            import submitit

            job_state = submitit.SlurmJob(entry["folder"], entry["job_id"]).state
        except Exception:  # no sacct here (status read on a login node without SLURM tools): trust the file
            return None
        ended = job_state.split()[0] in {"FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "COMPLETED"}
        return f"SLURM job {job_state}" if ended else None
    if entry.get("state") == "running" and entry.get("host") == socket.gethostname() and entry.get("pid"):
        try:
            os.kill(int(entry["pid"]), 0)
        except ProcessLookupError:
            return f"process {entry['pid']} is gone"
        except PermissionError:
            return None
    return None


@dataclass(frozen=True)
class StageView:
    """One stage as `status` shows it."""

    name: str
    state: str  # queued, running, done, failed, skipped, interrupted, or lost (its job/process ended unrecorded)
    job_id: str | None
    detail: str

    @property
    def active(self) -> bool:
        return self.state in ("queued", "running")


def stage_views(run_dir: str | os.PathLike[str], now: float | None = None) -> list[StageView]:
    """Every stage of a run: its state, job id, and progress with ETA (running) or the outcome's detail."""
    run_dir = Path(run_dir)
    now = time.time() if now is None else now
    states = StageStates(run_dir).read()
    for name in dict.fromkeys(r["benchmark"] for r in Ledger(run_dir).records()):
        states.setdefault(name, {"state": "done", "detail": "in the ledger"})  # recorded before stages.json
    views = []
    for name, entry in states.items():
        state = entry.get("state", "?")
        detail = entry.get("detail") or ""
        if state in ("queued", "running") and (why := _gone(entry)):
            state, detail = "lost", f"{why} without a final state; re-run the same command to resume"
        elif state == "queued":
            detail = f"submitted {format_duration(now - entry.get('submitted', now))} ago"
        elif state == "running":
            elapsed = now - entry.get("started", now)
            detail = f"for {format_duration(elapsed)}"
            progress = training_progress(run_dir / name)
            if progress is not None and progress.iter > 0:
                eta = elapsed * (1 - progress.fraction) / progress.fraction
                detail = (f"{progress.source} {progress.fraction:.0%} (iter {progress.iter}/{progress.max_iters}), "
                          f"ETA {format_duration(eta)}, running {detail}")
        elif state in FINAL and entry.get("started") and entry.get("ended"):
            detail = ", ".join(filter(None, [detail, f"took {format_duration(entry['ended'] - entry['started'])}"]))
        views.append(StageView(name, state, entry.get("job_id"), detail))
    return views


def format_views(views: Sequence[StageView]) -> list[str]:
    """One aligned line per stage: name, state, job id, detail."""
    width = max((len(v.name) for v in views), default=0)
    return [f"{v.name:<{width}}  {v.state:<11}  {'job ' + v.job_id if v.job_id else '-':<14}  {v.detail}".rstrip()
            for v in views]
