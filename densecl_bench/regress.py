"""Regression gate: compare a run's records with a reference JSON under per-metric tolerances.

Tolerances (a dict or a YAML file) map `default`, a benchmark name, or `benchmark.metric` to an
absolute tolerance in points (`0.5`, or `{abs: 0.5}`) and/or `{sigma: k}`, with an optional `why`
(what justifies it; printed under the report). The allowed |delta| is max(abs, k * sample std of
the trials): never tighter than `abs`, wider when the run's own trials spread. The most specific key
wins for each field. A reference JSON may carry its own `tolerances`; a released checkpoint's
reference takes those of its manifest entry (`released.yaml`).

Verdicts: `ok` within tolerance, `worse` below it (fails), `better` above it (fails only when
`two_sided`: a large improvement on released weights means the protocol moved). Every metric is
higher-is-better (accuracy, mAP, AP, mIoU). String metrics (the best layer) are `ok` or `differs`
(fails). A reference metric the run did not produce is `not run`: reported, failing only with
`require_all` (a partial run is still gated on what it ran). Records with a caveat
(`results.caveats`: partial checkpoint, skipped images) are `excluded` and fail unless
`allow_missing` (or `include_flagged` judges them). Null reference entries (the seed's empty COCO
row) are reported as skipped. PROTOCOLS.md §9, §10.
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

from densecl_bench import released
from densecl_bench.config import ConfigError
from densecl_bench.errors import UserError
from densecl_bench.paths import atomic_write_json
from densecl_bench.results import caveats, current, git_commit

DEFAULT_ABS = 0.5
OK, WORSE, BETTER, DIFFERS = "ok", "worse", "better", "differs"
NOT_RUN, EXCLUDED, SKIPPED = "not run", "excluded", "skipped: no reference"
# What a new reference gets unless told: the demo suite is deterministic on a CPU, so its tolerance
# only absorbs float summation order (BLAS kernels, thread counts) in features and training.
NEW_REFERENCE_TOLERANCES = {"default": {"abs": 0.01, "why": "deterministic on CPU: float summation order only"}}


@dataclass(frozen=True)
class Tolerance:
    """Allowed |measured - reference| in points: max(abs, sigma·std) when trials vary, else abs.

    why: what justifies it, from the most specific key that says (`key`).
    """

    abs: float
    sigma: float | None = None
    why: str | None = None
    key: str | None = None

    def limit(self, std: float | None) -> float:
        return max(self.abs, self.sigma * std) if self.sigma is not None and std else self.abs

    def describe(self, std: float | None) -> str:
        if self.sigma is not None and std:
            return f"±{self.limit(std):.2f} = max({self.abs:g}, {self.sigma:g}σ)"
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
    why: tuple[str, str] | None = None  # (tolerance key, its justification)


@dataclass(frozen=True)
class RegressReport:
    """The gate's answer: `ok` (the CLI exits 0) or not (exit 1), and the rows to print.

    excluded: the caveats of records left out of the comparison (`include_flagged` judges them).
    reference, source: the reference's model name and where its numbers come from.
    """

    rows: list[RegressRow]
    label: str | None
    demo: bool
    excluded: tuple[str, ...] = ()
    reference: str | None = None
    source: str | None = None

    @property
    def ok(self) -> bool:
        return not any(row.failed for row in self.rows)

    def format(self) -> str:
        """Markdown: a heading, the table (metric, reference, ours, delta, tolerance, verdict), the verdict
        line, then what the reader needs to weigh it (left-out records, demo data, sources, tolerances)."""
        def num(v: float | str | None) -> str:
            return "" if v is None else v if isinstance(v, str) else f"{v:.2f}"

        def ours(r: RegressRow) -> str:
            text = num(r.measured)
            return f"{text} ± {r.std:.2f} (n={r.trials})" if r.std is not None else text

        def verdict(r: RegressRow) -> str:
            return f"**{r.verdict}**" if r.failed else r.verdict

        lines = [f"### Regression: {self.label or 'run'} against {self.reference or 'the reference'}", ""]
        lines += ["| metric | reference | ours | delta | tolerance | verdict |", "|---|---:|---:|---:|---|---|"]
        lines += [f"| {r.benchmark}.{r.metric} | {num(r.reference)} | {ours(r)} | "
                  f"{'' if r.delta is None else f'{r.delta:+.2f}'} | {r.tolerance} | {verdict(r)} |"
                  for r in self.rows]
        counts = pd.Series([r.verdict for r in self.rows], dtype=object).value_counts()
        summary = ", ".join(f"{n} {v}" for v, n in counts.items())
        lines += ["", f"{'OK' if self.ok else 'FAIL'}: {summary or 'no rows'}"
                  + (f" (run {self.label})" if self.label else "")]
        if any(r.verdict == NOT_RUN for r in self.rows):
            lines.append("Not run: reference metrics this run did not produce (--require-all fails on them).")
        if self.excluded:
            lines.append(f"Left out: records made with {'; '.join(self.excluded)} (--include-flagged judges them).")
        if self.demo:
            lines.append("Note: measured on the embedded demo data; not comparable to published numbers.")
        if self.source:
            lines.append(f"Reference source: {self.source}")
        whys = dict(r.why for r in self.rows if r.why)
        if whys:
            lines += ["Tolerances:", *(f"- {key}: {why}" for key, why in whys.items())]
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


def _parse(key: str, spec: Any) -> dict[str, float | str]:
    """One tolerance entry as {'abs': x} / {'sigma': k} / both, with an optional 'why'."""
    if isinstance(spec, (int, float)) and not isinstance(spec, bool):
        spec = {"abs": spec}
    if not isinstance(spec, dict) or not set(spec) - {"why"} or set(spec) - {"abs", "sigma", "why"}:
        raise ConfigError(f"tolerance {key!r}: expected a number or a mapping with 'abs' and/or 'sigma' "
                          f"(and 'why'), got {spec!r}")
    for name, value in spec.items():
        if name != "why" and (isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0):
            raise ConfigError(f"tolerance {key}.{name}: expected a number >= 0, got {value!r}")
    return {name: str(value) if name == "why" else float(value) for name, value in spec.items()}


def resolve(tolerances: dict[str, Any], benchmark: str, metric: str) -> Tolerance:
    """The tolerance for one metric: `benchmark.metric` over `benchmark` over `default`, per field."""
    fields: dict[str, Any] = {}
    for key in (f"{benchmark}.{metric}", benchmark, "default"):
        if key in tolerances:
            parsed = _parse(key, tolerances[key])
            if "why" in parsed and "why" not in fields:
                fields["key"] = key
            for name, value in parsed.items():
                fields.setdefault(name, value)
    return Tolerance(abs=fields.get("abs", DEFAULT_ABS), sigma=fields.get("sigma"), why=fields.get("why"),
                     key=fields.get("key"))


def load_reference(spec: dict[str, Any] | str | os.PathLike[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """A reference (a dict, a JSON file, or a released checkpoint's name) and the tolerances that go with
    it: the JSON's own `tolerances`, else those of the release whose reference it is, else none."""
    path, release = None, None
    if isinstance(spec, dict):
        reference = spec
    else:
        path = Path(spec)
        if not path.is_file() and str(spec) in released.load_manifest():
            release = released.get(str(spec))
            path = release.reference
        try:
            reference = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise UserError(f"{path}: cannot read the reference JSON: {err}") from err
    if not isinstance(reference, dict) or not isinstance(reference.get("results"), dict):
        raise UserError(f"{path or 'reference'}: not a reference (expected an object with `model` and "
                        "`results: {benchmark: {metric: value}}`)")
    if reference.get("tolerances") or path is None:
        return reference, reference.get("tolerances") or {}
    release = release or released.reference_for(path)
    return reference, release.tolerances if release else {}


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
    if math.isfinite(delta) and abs(delta) <= tol.limit(spread) + 1e-9:
        verdict, failed = OK, False
    elif math.isfinite(delta) and delta > 0:
        verdict, failed = BETTER, two_sided
    else:  # below the reference, or not a number at all
        verdict, failed = WORSE, True
    return RegressRow(benchmark, metric, float(ref), measured, std, len(values), delta, tol.describe(spread),
                      verdict, failed, (tol.key, tol.why) if tol.why else None)


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
    require_all: bool = False,
) -> RegressReport:
    """Judge a run's records (mean over trials) against a reference JSON (`{results: {bench: {metric: v}}}`).

    reference: a dict, a JSON file or a released checkpoint's name. tolerances: in place of the
    reference's own (`load_reference`). label picks one row label when the records hold several.
    Measured metrics the reference does not list are reported as skipped, never failed. two_sided:
    `better` beyond tolerance fails too (also when the reference says `two_sided: true`). include_flagged: judge records with caveats (partial
    checkpoint, skipped images) instead of reporting them `excluded`. allow_missing: `excluded` does
    not fail. require_all: every reference metric must be judged (`not run` and `excluded` fail).
    """
    if allow_missing and require_all:
        raise ValueError("allow_missing and require_all contradict each other")
    reference, own = load_reference(reference)
    ref_results = reference["results"]
    two_sided = two_sided or bool(reference.get("two_sided"))
    tols = load_tolerances(tolerances) if tolerances is not None else own
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
                rows.append(RegressRow(bench, metric, ref, None, None, 0, None, "", NOT_RUN, require_all))
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
    return RegressReport(rows, label if label is not None else (labels[0] if labels else None), demo, excluded,
                         reference.get("model"), reference.get("source"))


def write_reference(
    records: Sequence[dict[str, Any]],
    path: str | os.PathLike[str],
    label: str | None = None,
    tolerances: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write a run's current numbers as a reference JSON (atomically), e.g. the demo regression reference.

    The reference is two-sided (`two_sided: true`): a number that moves either way is a change to
    review. A reference already at `path` keeps its tolerances (they are reviewed by hand; the numbers are
    regenerated), else `tolerances` (default: NEW_REFERENCE_TOLERANCES) are written. Records with a caveat are refused: a reference must
    measure the plain protocol.
    """
    recs = current(records)
    labels = list(dict.fromkeys(r["label"] for r in recs))
    if label is None and len(labels) > 1:
        raise ValueError(f"records hold several labels ({', '.join(labels)}); pass label=")
    label = label if label is not None else (labels[0] if labels else None)
    recs = [r for r in recs if r["label"] == label]
    if not recs:
        raise ValueError(f"no records labelled {label!r} to write a reference from")
    flagged = sorted({note for r in recs for note in caveats(r)})
    if flagged:
        raise ValueError(f"the run has records made with {'; '.join(flagged)}; a reference needs the plain protocol")
    results: dict[str, dict[str, float | str]] = {}
    by_metric: dict[tuple[str, str], list[float | str]] = {}
    for r in sorted(recs, key=lambda r: r["trial"]):
        by_metric.setdefault((r["benchmark"], r["metric"]), []).append(r["value"])
    for (bench, metric), values in by_metric.items():
        value, _ = _summarize(values)
        results.setdefault(bench, {})[metric] = value if isinstance(value, str) else round(value, 4)
    path = Path(path)
    old = json.loads(path.read_text()) if path.is_file() else {}
    prov = recs[0].get("provenance", {})
    made_by = [f"densecl-bench {prov.get('package_version') or ''}".strip(),
               f"git {prov.get('git_commit') or git_commit()}", f"torch {prov.get('torch_version')}",
               f"device {prov.get('device')}", f"seed {prov.get('seed')}"]
    reference = {
        "model": label,
        "demo": any(r.get("provenance", {}).get("demo") for r in recs),
        "source": ", ".join(p for p in made_by if not p.endswith(" None")),
        "two_sided": True,
        "tolerances": old.get("tolerances") or tolerances or NEW_REFERENCE_TOLERANCES,
        "results": results,
    }
    atomic_write_json(path, reference)
    return reference
