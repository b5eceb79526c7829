"""Regression gate: compare a run's records with a published reference JSON under per-metric tolerances.

Tolerances (a dict or a YAML file) map `default`, a benchmark name, or `benchmark.metric` to an
absolute tolerance in points (`0.5`, or `{abs: 0.5}`) and/or `{sigma: k}`: with more than one trial,
|delta| <= k * (sample std of the trials); with one trial, or trials that agree exactly, the
absolute tolerance applies. The most specific key wins for each of `abs` and `sigma`.

Verdicts: `ok` within tolerance, `worse` below it (fails), `better` above it (fails only when
`two_sided`: a large improvement on released weights means the protocol moved). Every metric is
higher-is-better (accuracy, mAP, AP, mIoU). String metrics (the best layer) are `ok` or `differs`
(fails). A reference metric the run lacks fails unless `allow_missing`; so does one whose records
carry a caveat (`results.caveats`: partial checkpoint, skipped images), `excluded` unless
`include_flagged`. Null reference entries (the seed's empty COCO row) are reported as skipped.
PROTOCOLS.md §9, §10.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from densecl_bench.config import ConfigError
from densecl_bench.results import caveats, current

DEFAULT_ABS = 0.5
OK, WORSE, BETTER, DIFFERS = "ok", "worse", "better", "differs"
MISSING, EXCLUDED, SKIPPED = "missing", "excluded", "skipped: no reference"


@dataclass(frozen=True)
class Tolerance:
    """Allowed |measured - reference| in points; `sigma` (k) replaces `abs` by k·std when trials vary."""

    abs: float
    sigma: float | None = None

    def describe(self, std: float | None) -> str:
        if self.sigma is not None and std:
            return f"±{self.sigma:g}σ={self.sigma * std:.2f}"
        return f"±{self.abs:.2f}"


@dataclass(frozen=True)
class RegressRow:
    """One metric's comparison; `failed` is what `RegressReport.ok` counts (an allowed miss is not)."""

    benchmark: str
    metric: str
    reference: float | str | None
    measured: float | str | None
    std: float | None  # sample std over trials, when there are several
    trials: int
    delta: float | None
    tolerance: str
    verdict: str
    failed: bool


@dataclass(frozen=True)
class RegressReport:
    """The gate's answer: `ok` (the CLI exits 0) or not (exit 1), and the rows to print.

    excluded: the caveats of records left out of the comparison (`include_flagged` judges them).
    """

    rows: list[RegressRow]
    label: str | None
    demo: bool
    excluded: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return not any(row.failed for row in self.rows)

    def format(self) -> str:
        """An aligned text table, then a summary line (and a warning for demo-data runs)."""
        def num(v: float | str | None) -> str:
            return "" if v is None else v if isinstance(v, str) else f"{v:.2f}"

        def measured(r: RegressRow) -> str:
            text = num(r.measured)
            return f"{text} ± {r.std:.2f} (n={r.trials})" if r.std is not None else text

        header = ["metric", "reference", "measured", "delta", "tolerance", "verdict"]
        body = [[f"{r.benchmark}.{r.metric}", num(r.reference), measured(r),
                 "" if r.delta is None else f"{r.delta:+.2f}", r.tolerance, r.verdict] for r in self.rows]
        widths = [max(len(row[i]) for row in [header, *body]) for i in range(len(header))]
        right = {1, 2, 3}  # numbers line up on the right, names and verdicts on the left
        lines = ["  ".join(cell.rjust(w) if i in right else cell.ljust(w)
                           for i, (cell, w) in enumerate(zip(row, widths))).rstrip()
                 for row in [header, *body]]
        counts = pd.Series([r.verdict for r in self.rows], dtype=object).value_counts()
        summary = ", ".join(f"{n} {v}" for v, n in counts.items())
        lines.append(f"{'OK' if self.ok else 'FAIL'}: {summary or 'no rows'}"
                     + (f" (run {self.label})" if self.label else ""))
        if self.excluded:
            lines.append(f"Left out: records made with {'; '.join(self.excluded)} (--include-flagged judges them).")
        if self.demo:
            lines.append("Note: measured on the embedded demo data; not comparable to published numbers.")
        return "\n".join(lines) + "\n"


def load_tolerances(spec: dict[str, Any] | str | os.PathLike[str] | None) -> dict[str, Any]:
    """Tolerances from a dict, a YAML file, or None (the default absolute tolerance only)."""
    if spec is None:
        return {}
    if isinstance(spec, dict):
        return spec
    path = Path(spec)
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as err:
        raise ConfigError(f"{path}: cannot read tolerances: {err}") from err
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: tolerances must be a mapping, got {type(data).__name__}")
    return data


def _parse(key: str, spec: Any) -> dict[str, float]:
    """One tolerance entry as {'abs': x} / {'sigma': k} / both."""
    if isinstance(spec, (int, float)) and not isinstance(spec, bool):
        spec = {"abs": spec}
    if not isinstance(spec, dict) or not spec or set(spec) - {"abs", "sigma"}:
        raise ConfigError(f"tolerance {key!r}: expected a number or a mapping with 'abs' and/or 'sigma', "
                          f"got {spec!r}")
    for name, value in spec.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            raise ConfigError(f"tolerance {key}.{name}: expected a number >= 0, got {value!r}")
    return {name: float(value) for name, value in spec.items()}


def resolve(tolerances: dict[str, Any], benchmark: str, metric: str) -> Tolerance:
    """The tolerance for one metric: `benchmark.metric` over `benchmark` over `default`, per field."""
    fields: dict[str, float] = {}
    for key in (f"{benchmark}.{metric}", benchmark, "default"):
        if key in tolerances:
            for name, value in _parse(key, tolerances[key]).items():
                fields.setdefault(name, value)
    return Tolerance(abs=fields.get("abs", DEFAULT_ABS), sigma=fields.get("sigma"))


def _summarize(values: list[float | str]) -> tuple[float | str, float | None]:
    """Trials as one value: the mean and sample std of numbers, or the label when all trials agree."""
    if any(isinstance(v, str) for v in values):
        distinct = list(dict.fromkeys(map(str, values)))
        return " / ".join(distinct), None
    series = pd.Series(values, dtype=float)
    std = float(series.std(ddof=1, skipna=False)) if len(series) > 1 else None
    return float(series.mean(skipna=False)), std


def _judge(benchmark: str, metric: str, ref: Any, values: list[float | str], tol: Tolerance,
           two_sided: bool) -> RegressRow:
    measured, std = _summarize(values)
    if isinstance(measured, str) or isinstance(ref, str):
        same = all(v == ref for v in values)
        return RegressRow(benchmark, metric, ref, measured, None, len(values), None, "equal",
                          OK if same else DIFFERS, not same)
    delta = measured - float(ref)
    spread = std if std is not None and math.isfinite(std) and std > 0 else None
    limit = tol.sigma * spread if tol.sigma is not None and spread is not None else tol.abs
    if math.isfinite(delta) and abs(delta) <= limit + 1e-9:
        verdict, failed = OK, False
    elif math.isfinite(delta) and delta > 0:
        verdict, failed = BETTER, two_sided
    else:  # below the reference, or not a number at all
        verdict, failed = WORSE, True
    return RegressRow(benchmark, metric, float(ref), measured, std, len(values), delta, tol.describe(spread),
                      verdict, failed)


def _skipped(benchmark: str, metric: str, values: list[float | str] | None) -> RegressRow:
    measured, std = _summarize(values) if values else (None, None)
    return RegressRow(benchmark, metric, None, measured, std, len(values or ()), None, "", SKIPPED, False)


def compare(
    records: Sequence[dict[str, Any]],
    reference: dict[str, Any] | str | os.PathLike[str],
    tolerances: dict[str, Any] | str | os.PathLike[str] | None = None,
    allow_missing: bool = False,
    label: str | None = None,
    two_sided: bool = False,
    include_flagged: bool = False,
) -> RegressReport:
    """Judge a run's records (mean over trials) against a reference JSON (`{results: {bench: {metric: v}}}`).

    label picks one row label when the records hold several. Measured metrics the reference does not
    list are reported as skipped, never failed. two_sided: `better` beyond tolerance fails too.
    include_flagged: judge records with caveats (partial checkpoint, skipped images) instead of
    reporting them `excluded`.
    """
    if not isinstance(reference, dict):
        reference = json.loads(Path(reference).read_text())
    ref_results = reference.get("results", reference)
    tols = load_tolerances(tolerances)
    recs = current(records)
    labels = list(dict.fromkeys(r["label"] for r in recs))
    if label is None and len(labels) > 1:
        raise ValueError(f"records hold several labels ({', '.join(labels)}); pass label=")
    if label is not None:
        if label not in labels:
            raise ValueError(f"no records labelled {label!r} (labels: {', '.join(labels) or 'none'})")
        recs = [r for r in recs if r["label"] == label]
    flagged = {} if include_flagged else {(r["benchmark"], r["metric"]): caveats(r) for r in recs if caveats(r)}
    recs = [r for r in recs if (r["benchmark"], r["metric"]) not in flagged]
    measured: dict[tuple[str, str], list[float | str]] = {}
    for r in sorted(recs, key=lambda r: r["trial"]):
        measured.setdefault((r["benchmark"], r["metric"]), []).append(r["value"])

    rows: list[RegressRow] = []
    for bench, ref_metrics in ref_results.items():
        ref_metrics = ref_metrics or {}
        judged = {m for m, ref in ref_metrics.items() if ref is not None}
        for metric, ref in ref_metrics.items():
            values = measured.get((bench, metric))
            if ref is not None and values is not None:
                rows.append(_judge(bench, metric, ref, values, resolve(tols, bench, metric), two_sided))
            elif ref is not None and (bench, metric) in flagged:
                rows.append(RegressRow(bench, metric, ref, None, None, 0, None, "", EXCLUDED, not allow_missing))
            elif ref is not None:
                rows.append(RegressRow(bench, metric, ref, None, None, 0, None, "", MISSING, not allow_missing))
            elif values is None:
                rows.append(_skipped(bench, metric, None))
        unreferenced = [(m, v) for (b, m), v in measured.items() if b == bench and m not in judged]
        rows += [_skipped(bench, metric, values) for metric, values in unreferenced]
        if not ref_metrics and not unreferenced:
            rows.append(_skipped(bench, "*", None))
    rows += [_skipped(bench, metric, values) for (bench, metric), values in measured.items()
             if bench not in ref_results]
    demo = any(r.get("provenance", {}).get("demo") for r in recs)
    excluded = tuple(dict.fromkeys(note for notes in flagged.values() for note in notes))
    return RegressReport(rows, label if label is not None else (labels[0] if labels else None), demo, excluded)
