"""Benchmark a pretraining run while it trains: each new `epoch_N.pth` of its work dir, once.

The work dir is the layout our pretraining and MMSelfSup's (mmcv runner) write: numbered snapshots
`epoch_N.pth` beside `latest.pth`. Every `every`-th epoch and the final one are benchmarked as an
ordinary run, `<watch dir>/epoch_NNNN/` (manifest, ledger, tables: `table`, `regress`, `status` and
`report` read it), whose records carry the epoch in their provenance. The watch dir's `watch.json`
says what is watched; `report` on the watch dir plots each metric against the epoch.

Restarts are free: an epoch whose run already holds every requested benchmark is never loaded
again, and a half-benchmarked one resumes through the runner's ledger. A file is taken once its size
and modification time held still over one poll (mmcv writes snapshots in place, not atomically).
The watch stops when the sentinel file appears (after benchmarking what is there) or once the final
epoch is benchmarked: `final_epoch`,
else the schedule length our pretraining records in each checkpoint (`meta.config.epochs`).
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from densecl_bench import registry
from densecl_bench.paths import atomic_write_json
from densecl_bench.results import Ledger

SNAPSHOT = re.compile(r"^epoch_(\d+)\.pth$")
WATCH_FILE = "watch.json"
STOP_FILE = "watch.stop"


def epoch_dir(epoch: int) -> str:
    return f"epoch_{epoch:04d}"


def snapshots(work_dir: Path) -> dict[int, Path]:
    """The work dir's numbered epoch snapshots, by epoch."""
    found = {}
    for path in work_dir.glob("epoch_*.pth") if work_dir.is_dir() else ():
        if m := SNAPSHOT.match(path.name):
            found[int(m.group(1))] = path
    return dict(sorted(found.items()))


def schedule_epochs(path: Path) -> int | None:
    """The schedule length our pretraining records in a checkpoint's meta (None when absent or unreadable)."""
    import torch

    try:
        meta = torch.load(path, map_location="cpu", weights_only=True, mmap=True).get("meta", {})
    except Exception:  # another layout (e.g. mmcv's pickled config): the user gives --final-epoch
        return None
    epochs = (meta.get("config") or {}).get("epochs")
    return int(epochs) if isinstance(epochs, int) else None


def watched_epochs(watch_dir: Path) -> dict[int, Path]:
    """The per-epoch run directories of a watch dir, by epoch."""
    out = {}
    for path in watch_dir.glob("epoch_*") if watch_dir.is_dir() else ():
        if path.is_dir() and (m := re.fullmatch(r"epoch_(\d+)", path.name)):
            out[int(m.group(1))] = path
    return dict(sorted(out.items()))


@dataclass
class WatchResult:
    watch_dir: Path
    benchmarked: list[int] = field(default_factory=list)  # epochs run by this call
    stopped_by: str = ""  # "final epoch N", "sentinel PATH", or "one pass"


def watch(
    work_dir: str | Path,
    benchmarks: Sequence[str],
    *,
    every: int = 1,
    runs_dir: Path = Path("runs"),
    run_id: str | None = None,
    final_epoch: int | None = None,
    stop_file: Path | None = None,
    poll_s: float = 60.0,
    once: bool = False,
    echo: Callable[[str], None] = print,
    **suite_kwargs: Any,
) -> WatchResult:
    """Poll `work_dir` and benchmark each settled `epoch_N.pth` with N % every == 0 or N final.

    runs_dir / run_id: the watch dir (default `runs/watch-<work dir name>`). stop_file: the sentinel
    (default `<work_dir>/watch.stop`). once: one pass over what is there, then return.
    suite_kwargs: `run_suite`'s keywords for every epoch (data_root, profiles, arch, device, ...).
    """
    from densecl_bench.runner import run_suite

    if every < 1:
        raise ValueError(f"every must be >= 1, got {every}")
    work_dir = Path(work_dir)
    names = [b.name for b in registry.resolve(list(benchmarks))]
    watch_dir = Path(runs_dir) / (run_id or f"watch-{work_dir.resolve().name}")
    stop_file = stop_file or work_dir / STOP_FILE
    atomic_write_json(watch_dir / WATCH_FILE, {"work_dir": str(work_dir.resolve()), "benchmarks": names,
                                               "every": every, "final_epoch": final_epoch})
    result = WatchResult(watch_dir)
    seen: dict[Path, tuple[int, float]] = {}
    handled: set[int] = set()  # epochs decided in this process (a failed stage is retried on restart only)
    final = final_epoch
    while True:
        stopping = stop_file.exists()  # the trainer is done writing: every file there is complete
        for epoch, path in snapshots(work_dir).items():
            if epoch in handled:
                continue
            stat = path.stat()
            settled = once or stopping or seen.get(path) == (stat.st_size, stat.st_mtime)
            seen[path] = (stat.st_size, stat.st_mtime)
            if not settled:
                continue
            handled.add(epoch)
            final = final or schedule_epochs(path)
            if epoch % every and epoch != final:
                continue
            run_dir = watch_dir / epoch_dir(epoch)
            if set(names) <= {r["benchmark"] for r in Ledger(run_dir).records()}:
                continue  # benchmarked before (this watch or an earlier one): never loaded again
            echo(f"[watch] epoch {epoch}: {path}")
            suite = run_suite(names, str(path), runs_dir=watch_dir, run_id=epoch_dir(epoch),
                              extra_provenance={"epoch": epoch, "work_dir": str(work_dir.resolve())}, echo=echo,
                              **suite_kwargs)
            for problem in suite.problems():
                echo(f"[watch] epoch {epoch}: {problem}")
            result.benchmarked.append(epoch)
        if final is not None and final in handled:
            result.stopped_by = f"final epoch {final}"
        elif stopping:
            result.stopped_by = f"sentinel {stop_file}"
        elif once:
            result.stopped_by = "one pass"
        if result.stopped_by:
            echo(f"[watch] stopped: {result.stopped_by}")
            return result
        time.sleep(poll_s)
