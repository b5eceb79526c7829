"""The results ledger: one JSON record per metric, with the protocol fingerprint and provenance.

A run lives in `runs/<run-id>/`: `ledger.jsonl` (JSON Lines, append-only) and `run.json` (the run's
manifest). Every record carries what is needed to trust or reproduce the number: the resolved
protocol config and its hash (the fingerprint the runner resumes on), the checkpoint's sha256 and
layout, library versions, git commit, device, seed and wall time. PROTOCOLS.md §9 (MMSelfSup 0.x
kept results only in hand-written READMEs; this ledger is what the tables and the gate read).

One process per stage writes a ledger (rank 0): an append rewrites the file through a temporary file
and `os.replace`, so a batch of records lands completely or not at all and earlier records are copied
byte for byte, never re-serialised. Stages that run as concurrent jobs (`launch.py`) append to the
same ledger, so every append holds the run's file lock (`Ledger.lock`) across its read and replace.
"""

from __future__ import annotations

import datetime as _dt
import functools
import importlib.metadata
import json
import os
import subprocess
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from filelock import FileLock

import densecl_bench
from densecl_bench.paths import atomic_path, atomic_write_json

LEDGER_FILE = "ledger.jsonl"
PUBLISHED_PRECISION = "fp32"  # engine.precision.DEFAULT, named here without importing torch
MANIFEST_FILE = "run.json"
LOCK_FILE = "ledger.lock"

PROVENANCE_KEYS = (
    "ckpt_sha256", "ckpt_layout", "ckpt_path", "arch", "package_version", "torch_version",
    "torchvision_version", "numpy_version", "sklearn_version", "git_commit", "device", "world_size",
    "seed", "wall_time_s", "demo", "data_root", "timestamp",
)


@dataclass(frozen=True)
class Metric:
    """One number a benchmark produced. `name` is the table column key (e.g. `k=16`, `feature4`, `AP50`).

    `value` is a float (percent, as the tables print it) or, for labels such as the best layer, a str.
    `extra` carries what the ledger keeps but the tables do not print (min/max/std, chosen costs...).
    """

    benchmark: str
    name: str
    value: float | str
    extra: dict[str, Any] = field(default_factory=dict)


class LedgerError(ValueError):
    """A ledger file holds a damaged record before its last line (a torn last line is tolerated)."""


def _json_default(obj: Any) -> Any:
    """Serialise the numpy / torch scalars and arrays, and paths, that benchmarks put in `extra`."""
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    raise TypeError(f"cannot store {type(obj).__name__} in the ledger: {obj!r}")


class Ledger:
    """The append-only metric records of one run directory."""

    def __init__(self, run_dir: str | os.PathLike[str]) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LEDGER_FILE
        self._lock = FileLock(self.run_dir / LOCK_FILE)

    def lock(self) -> FileLock:
        """The run's inter-process lock (re-entrant): held by every append, and by any read-modify-write of
        a file that several jobs of one run update (the tables, the stage states)."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        return self._lock

    def append(
        self,
        metrics: Sequence[Metric],
        *,
        label: str,
        trial: int,
        config: dict[str, Any],
        fingerprint: str,
        provenance: dict[str, Any],
    ) -> None:
        """Add one record per metric, all of them or none (one stage's results are one batch)."""
        if not label or not isinstance(label, str):
            raise ValueError(f"label must be a non-empty string, got {label!r}")
        if not isinstance(trial, int) or trial < 0:
            raise ValueError(f"trial must be an int >= 0, got {trial!r}")
        lines = []
        for m in metrics:
            value = m.value if isinstance(m.value, str) else float(m.value)
            record = {
                "benchmark": m.benchmark, "metric": m.name, "value": value, "extra": dict(m.extra),
                "trial": trial, "label": label, "fingerprint": fingerprint, "config": config,
                "provenance": provenance,
            }
            lines.append(json.dumps(record, default=_json_default) + "\n")
        if not lines:
            return
        with self.lock():
            existing = self.path.read_bytes() if self.path.exists() else b""
            complete = existing.rfind(b"\n") + 1
            if complete < len(existing):
                warnings.warn(f"{self.path}: dropping a torn last line ({len(existing) - complete} bytes) "
                              "left by an interrupted write", stacklevel=2)
            with atomic_path(self.path) as tmp, open(tmp, "wb") as f:
                f.write(existing[:complete])
                f.write("".join(lines).encode())
                f.flush()
                os.fsync(f.fileno())

    def records(self) -> list[dict[str, Any]]:
        """All complete records in order. A last line without its newline is an interrupted write: skipped."""
        if not self.path.exists():
            return []
        text = self.path.read_text()
        lines = text.split("\n")
        torn = lines.pop()  # "" when the file ends with a newline
        if torn:
            warnings.warn(f"{self.path}: ignoring a torn last line ({len(torn)} chars)", stacklevel=2)
        out = []
        for lineno, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise LedgerError(f"{self.path}:{lineno}: damaged record ({err})") from err
        return out

    def completed(self, benchmark: str, fingerprint: str, trial: int) -> bool:
        """Whether this stage (benchmark under this protocol config, this trial) is already recorded."""
        return any(r["benchmark"] == benchmark and r["fingerprint"] == fingerprint and r["trial"] == trial
                   for r in self.records())

    def write_manifest(self, info: dict[str, Any]) -> None:
        """Store run-level facts (run id, checkpoint, label, created, argv) in `run.json`, atomically."""
        atomic_write_json(self.run_dir / MANIFEST_FILE, info)

    def manifest(self) -> dict[str, Any] | None:
        """The run's manifest, or None when the run has none yet."""
        path = self.run_dir / MANIFEST_FILE
        return json.loads(path.read_text()) if path.exists() else None


def current(records: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """The records that count: per (label, benchmark) only the latest protocol fingerprint, and per
    (metric, trial) the last record written.

    A benchmark re-run under a changed config appends new records; older ones stay in the ledger as
    history but must not be averaged with the new ones in tables or the regression gate.
    """
    records = list(records)
    latest = {(r["label"], r["benchmark"]): r["fingerprint"] for r in records}
    kept: dict[tuple[str, str, str, int], dict[str, Any]] = {}
    for r in records:
        if r["fingerprint"] == latest[(r["label"], r["benchmark"])]:
            kept[(r["label"], r["benchmark"], r["metric"], r["trial"])] = r
    return list(kept.values())


def caveats(record: dict[str, Any]) -> list[str]:
    """Why a record may not measure the plain protocol: a partial checkpoint, left-out images, another
    precision than fp32, a total batch the world size did not give.

    Tables mark such rows and the regression gate leaves them out unless asked.
    """
    prov = record.get("provenance") or {}
    out = []
    if prov.get("allow_partial"):
        out.append(f"--allow-partial ({prov.get('missing_tensors', 0)} backbone tensors missing, left at random init)")
    skipped = sum((prov.get("skipped_images") or {}).values())
    if prov.get("on_bad_image") == "skip" or skipped:
        out.append(f"--skip-bad-images ({skipped} unreadable images left out)")
    precision = prov.get("precision")
    if precision and set(precision.split(",")) != {PUBLISHED_PRECISION}:
        out.append(f"precision {precision} (the published numbers are {PUBLISHED_PRECISION})")
    for name, b in (prov.get("batch_mismatch") or {}).items():
        out.append(f"batch {b['world_size']} x {b['batch_size_per_gpu']} per pass, not the "
                   f"{b['total_batch_size']} of {name}")
    return out


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


@functools.cache
def git_commit() -> str | None:
    """HEAD of the git checkout the package runs from, or None (installed wheel, no git, timeout).

    Only a checkout whose top level holds this package counts, so a virtualenv inside some other
    repository does not report that repository's commit.
    """
    root = Path(densecl_bench.__file__).resolve().parent.parent
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "--show-toplevel", "HEAD"],
                             capture_output=True, text=True, timeout=5, check=True).stdout.split()
    except (OSError, subprocess.SubprocessError):
        return None
    if len(out) != 2 or Path(out[0]).resolve() != root:
        return None
    return out[1]


def provenance(
    *,
    ckpt_sha256: str | None = None,
    ckpt_layout: str | None = None,
    ckpt_path: str | os.PathLike[str] | None = None,
    arch: str | None = None,
    device: Any = None,
    world_size: int = 1,
    seed: int | None = None,
    wall_time_s: float | None = None,
    demo: bool = False,
    data_root: str | os.PathLike[str] | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """A record's provenance: the caller's facts plus library versions, git commit and a UTC timestamp.

    Versions come from the installed distributions' metadata, so this imports nothing heavy.
    """
    out = {
        "ckpt_sha256": ckpt_sha256,
        "ckpt_layout": ckpt_layout,
        "ckpt_path": None if ckpt_path is None else os.fspath(ckpt_path),
        "arch": arch,
        "package_version": densecl_bench.__version__,
        "torch_version": _version("torch"),
        "torchvision_version": _version("torchvision"),
        "numpy_version": _version("numpy"),
        "sklearn_version": _version("scikit-learn"),
        "git_commit": git_commit(),
        "device": None if device is None else str(device),
        "world_size": world_size,
        "seed": seed,
        "wall_time_s": wall_time_s,
        "demo": bool(demo),
        "data_root": None if data_root is None else os.fspath(data_root),
        "timestamp": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
    }
    out.update(extra)
    return out
