"""Markdown model-zoo tables regenerated from ledger records, in the seed's layout.

The layout (titles, the text under each title, column headers, which (benchmark, metric) fills each
column, and the decimals the published tables print) is data: `LAYOUT`. Rows are labelled by the
records' `label` (the pretraining config name). Missing values are blank; repeated trials render as
`mean ± std` (sample std); several runs render side by side with delta rows against the first row.
Metrics the layout does not know (third-party benchmarks, extra metrics) get their own tables. Rows
with a caveat (`results.caveats`: partial checkpoint, skipped images, not fp32, a total batch the
world size missed) carry a `†` and a note.
Layout source: MMSelfSup 0.x `configs/selfsup/densecl/README.md` (PROTOCOLS.md §9, §10); the
iNaturalist2018 and Cityscapes tables from the 0.x algorithm-page template (§13).
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

from densecl_bench.paths import atomic_write_text
from densecl_bench.results import Ledger, caveats, current

LABEL_HEADER = "Self-Supervised Config"
TABLES_FILE = "tables.md"
LOWSHOT_K = (1, 2, 4, 8, 16, 32, 64, 96)
KNN_K = (10, 20, 100, 200)


@dataclass(frozen=True)
class Column:
    header: str
    benchmark: str
    metric: str
    decimals: int = 2


@dataclass(frozen=True)
class Table:
    title: str
    text: str  # printed between the title and the table; "" for none
    columns: tuple[Column, ...]


def _features(benchmark: str) -> tuple[Column, ...]:
    return tuple(Column(f"Feature{i}", benchmark, f"feature{i}") for i in range(1, 6))


LAYOUT: tuple[Table, ...] = (
    Table("VOC SVM / Low-shot SVM", "", (
        Column("Best Layer", "voc07_svm", "best_layer"),
        Column("SVM", "voc07_svm", "svm", 1),
        *(Column(f"k={k}", "voc07_lowshot_svm", f"k={k}") for k in LOWSHOT_K),
    )),
    Table("ImageNet Linear Evaluation",
          "Feature1..Feature5: no global average pooling; each map is pooled to a fixed\n"
          "size and followed by a linear layer (config resnet50_mhead_linear-8xb32-steplr-90e_in1k).\n"
          "AvgPool: linear evaluation with global average pooling (config resnet50_linear-8xb32-steplr-100e_in1k).",
          (*_features("imagenet_linear"), Column("AvgPool", "imagenet_linear", "avgpool"))),
    Table("iNaturalist2018 Linear Evaluation", "Config resnet50_mhead_8xb32-steplr-84e_inat18.",
          _features("inat18_linear")),
    Table("Places205 Linear Evaluation", "Config resnet50_mhead_8xb32-steplr-28e_places205.",
          _features("places205_linear")),
    Table("ImageNet Nearest-Neighbor Classification",
          "Features after global average pooling; k = number of nearest neighbours.",
          tuple(Column(f"k={k}", "imagenet_knn", f"k={k}", 1) for k in KNN_K)),
    Table("Detection: Pascal VOC 2007 + 2012", "Config faster_rcnn_r50_c4_mstrain_24k_voc0712.",
          (Column("AP50", "voc0712_faster_rcnn_c4", "AP50"),)),
    Table("Detection: COCO2017", "Config mask_rcnn_r50_fpn_mstrain_1x_coco.",
          tuple(Column(f"{name}({kind})", "coco_mask_rcnn_fpn_1x", f"{prefix}_{name}", 1)
                for prefix, kind in (("bbox", "Box"), ("segm", "Mask"))
                for name in ("mAP", "AP50", "AP75"))),
    Table("Segmentation: Pascal VOC 2012 + Aug", "Config fcn_r50-d8_512x512_20k_voc12aug.",
          (Column("mIOU", "voc12aug_fcn", "mIoU"),)),
    Table("Segmentation: Cityscapes", "Config fcn_r50-d8_769x769_40k_cityscapes.",
          (Column("mIOU", "cityscapes_fcn", "mIoU"),)),
)
KNOWN = {(c.benchmark, c.metric) for t in LAYOUT for c in t.columns}
DEMO_NOTE = ("Demo data: the numbers of {rows} come from the embedded demo datasets "
             "and are not comparable to the published ones.")
CAVEAT_MARK = "†"


@dataclass(frozen=True)
class Cell:
    """One table cell: a mean over `n` trials (with sample std when n > 1), or a label string."""

    value: float | str
    std: float | None
    n: int
    demo: bool
    caveats: tuple[str, ...] = ()

    def format(self, decimals: int) -> str:
        if isinstance(self.value, str):
            return self.value
        text = f"{self.value:.{decimals}f}"
        return text if self.std is None else f"{text} ± {self.std:.{decimals}f}"


def _cell(group: pd.DataFrame) -> Cell:
    values = list(group["value"])
    demo = bool(group["demo"].any())
    notes = tuple(dict.fromkeys(note for notes in group["caveats"] for note in notes))
    if any(isinstance(v, str) for v in values):
        counts = pd.Series([str(v) for v in values]).value_counts()
        top = str(counts.index[0])
        text = top if len(counts) == 1 else f"{top} ({counts.iloc[0]}/{len(values)})"
        return Cell(text, None, len(values), demo, notes)
    series = pd.Series(values, dtype=float)
    std = float(series.std(ddof=1, skipna=False)) if len(series) > 1 else None
    return Cell(float(series.mean(skipna=False)), std, len(series), demo, notes)


def reference_records(json_path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Records for a published reference JSON (`model`, `results: {benchmark: {metric: value} | null}`).

    Null benchmarks and null values give no record, so they render blank.
    """
    ref = json.loads(Path(json_path).read_text())
    provenance = {"source": ref.get("source"), "demo": False}
    return [
        {"benchmark": bench, "metric": metric, "value": value, "extra": {}, "trial": 0,
         "label": ref["model"], "fingerprint": "reference", "config": {}, "provenance": provenance}
        for bench, metrics in ref["results"].items() if metrics
        for metric, value in metrics.items() if value is not None
    ]


def load_records(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Records of a run directory (its ledger) or of a reference JSON file."""
    path = Path(path)
    if path.is_file() and path.suffix == ".json":
        return reference_records(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: neither a run directory nor a reference .json file")
    return Ledger(path).records()


def _other_tables(benchmarks_metrics: Sequence[tuple[str, str]]) -> list[Table]:
    """One table per benchmark for metrics the layout has no column for, in order of appearance."""
    by_bench: dict[str, list[str]] = {}
    for bench, metric in benchmarks_metrics:
        if (bench, metric) not in KNOWN and metric not in by_bench.setdefault(bench, []):
            by_bench[bench].append(metric)
    return [Table(f"Other metrics: {bench}", "", tuple(Column(m, bench, m) for m in metrics))
            for bench, metrics in by_bench.items() if metrics]


def _pipe_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """GitHub pipe table; a blank cell is `| |`, as in the seed."""
    def line(cells: Sequence[str]) -> str:
        return "|" + "".join(f" {c} |" if c else " |" for c in cells)
    return [line(header), "|" + "---|" * len(header), *(line(r) for r in rows)]


def _delta(cell: Cell | None, base: Cell | None, decimals: int) -> str:
    if cell is None or base is None:
        return ""
    if isinstance(cell.value, str) or isinstance(base.value, str):
        return "" if cell.value == base.value else "≠"
    diff = cell.value - base.value
    return "" if math.isnan(diff) else f"{diff:+.{decimals}f}"


def render(runs: Sequence[Sequence[dict[str, Any]]], names: Sequence[str] | None = None,
           skip_empty: bool = False) -> str:
    """Markdown tables for one run (a list of records) or several side by side.

    names: one per run, used to tell rows apart when two runs share a label (default `run N`).
    With several runs, a `Δ` row per further row gives its difference to the first row.
    skip_empty drops tables with no value at all (the seed prints every table, blank rows included).
    """
    if names is not None and len(names) != len(runs):
        raise ValueError(f"{len(names)} names for {len(runs)} runs")
    rows_data = []
    for i, records in enumerate(runs):
        for r in current(records):
            rows_data.append({"run": i, "label": r["label"], "benchmark": r["benchmark"],
                              "metric": r["metric"], "value": r["value"],
                              "demo": bool(r.get("provenance", {}).get("demo")), "caveats": caveats(r)})
    if not rows_data:
        return "No results recorded.\n"
    frame = pd.DataFrame(rows_data)
    row_keys = list(dict.fromkeys(zip(frame["run"], frame["label"])))
    label_count = pd.Series([label for _, label in row_keys]).value_counts()
    row_names = {
        (run, label): label if label_count[label] == 1 else f"{label} ({names[run] if names else f'run {run + 1}'})"
        for run, label in row_keys
    }
    cells: dict[tuple[int, str, str, str], Cell] = {
        key: _cell(group) for key, group in frame.groupby(["run", "label", "benchmark", "metric"], sort=False)
    }
    tables = list(LAYOUT) + _other_tables(list(zip(frame["benchmark"], frame["metric"])))
    deltas = len(runs) > 1 and len(row_keys) > 1
    blocks = []
    for table in tables:
        grid = [[cells.get((*key, c.benchmark, c.metric)) for c in table.columns] for key in row_keys]
        if skip_empty and not any(cell for row in grid for cell in row):
            continue
        notes = {key: list(dict.fromkeys(n for cell in row if cell for n in cell.caveats))
                 for key, row in zip(row_keys, grid)}
        body = [[row_names[key] + (f" {CAVEAT_MARK}" if notes[key] else ""),
                 *(cell.format(c.decimals) if cell else "" for cell, c in zip(row, table.columns))]
                for key, row in zip(row_keys, grid)]
        if deltas:
            base = row_names[row_keys[0]]
            body += [[f"Δ {row_names[key]} vs {base}",
                      *(_delta(cell, b, c.decimals) for cell, b, c in zip(row, grid[0], table.columns))]
                     for key, row in zip(row_keys[1:], grid[1:])]
        lines = [f"### {table.title}", ""]
        if table.text:
            lines += [table.text, ""]
        lines += _pipe_table([LABEL_HEADER, *(c.header for c in table.columns)], body)
        demo_rows = [row_names[key] for key, row in zip(row_keys, grid) if any(cell and cell.demo for cell in row)]
        footnotes = [DEMO_NOTE.format(rows=", ".join(demo_rows))] if demo_rows else []
        footnotes += [f"{CAVEAT_MARK} {row_names[key]}: {'; '.join(notes[key])}." for key in row_keys if notes[key]]
        for note in footnotes:
            lines += ["", note]
        blocks.append("\n".join(lines) + "\n")
    return "\n".join(blocks)


def render_run_dir(*paths: str | os.PathLike[str], skip_empty: bool = False) -> str:
    """Tables for one or more run directories (or reference JSON files), side by side when several."""
    return render([load_records(p) for p in paths], names=[Path(p).name for p in paths], skip_empty=skip_empty)


def write_tables(run_dir: str | os.PathLike[str]) -> Path:
    """Write `runs/<id>/tables.md` atomically and return its path."""
    run_dir = Path(run_dir)
    path = run_dir / TABLES_FILE
    atomic_write_text(path, f"# Results: {run_dir.name}\n\n" + render_run_dir(run_dir))
    return path
