"""One self-contained HTML page for one or more runs: the model-zoo tables and the plots a reader wants.

Nothing on the page is fetched: the CSS is inline and every plot is an inline SVG drawn by
matplotlib (text kept as text, so the page stays small and searchable). The tables are
`tables.render`'s, side by side, with a delta row per run against the reference when one is given.
The plots overlay every run (and the reference, dashed or hatched):

- low-shot VOC07 SVM mAP against k on a log axis;
- per-layer bars, feature1..feature5 (and AvgPool), for the VOC07 SVM and both linear tables;
- ImageNet kNN top-1 against k;
- VOC07 per-class AP of the SVM's best layer;
- training curves (loss, LR, evaluation metrics) from every `metrics.jsonl` under a run;
- each metric against the pretraining epoch for a `watch` directory.

Sections without data are left out, so a demo run with two benchmarks gets a short page.
"""

from __future__ import annotations

import datetime as _dt
import html
import io
import json
import math
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from densecl_bench import __version__
from densecl_bench.errors import UserError
from densecl_bench.paths import atomic_write_text
from densecl_bench.results import Ledger, current
from densecl_bench.tables import KNN_K, LOWSHOT_K, load_records, render
from densecl_bench.watch import WATCH_FILE, watched_epochs

LAYERS = tuple(f"feature{i}" for i in range(1, 6))
LAYER_TABLES = (("voc07_svm", "VOC07 SVM mAP"), ("imagenet_linear", "ImageNet linear top-1"),
                ("places205_linear", "Places205 linear top-1"))
REFERENCE_STYLE = {"color": "0.2", "linestyle": "--"}


@dataclass
class Source:
    """One input of the report: a run directory, a watch directory, or a reference JSON."""

    name: str  # as the plots' legends show it
    path: Path
    records: list[dict[str, Any]]  # the records that count (`results.current`)
    reference: bool = False
    epochs: dict[int, list[dict[str, Any]]] = field(default_factory=dict)  # watch dirs: records per epoch

    def values(self, benchmark: str) -> dict[str, tuple[float, float | None]]:
        """Numeric metrics of `benchmark`: (mean over trials, sample std or None)."""
        return _values(self.records, benchmark)


def _values(records: Sequence[dict[str, Any]], benchmark: str) -> dict[str, tuple[float, float | None]]:
    by_metric: dict[str, list[float]] = {}
    for r in records:
        if r["benchmark"] == benchmark and isinstance(r["value"], (int, float)):
            by_metric.setdefault(r["metric"], []).append(float(r["value"]))
    out = {}
    for metric, vals in by_metric.items():
        mean = sum(vals) / len(vals)
        std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else None
        out[metric] = (mean, std)
    return out


def load_source(path: str | os.PathLike[str]) -> Source:
    """A run dir, a watch dir (its epochs' records together) or a reference JSON."""
    path = Path(path)
    if path.is_dir() and (path / WATCH_FILE).exists():
        epochs = {e: current(Ledger(d).records()) for e, d in watched_epochs(path).items()}
        last = epochs[max(epochs)] if epochs else []
        return Source(path.name, path, last, epochs=epochs)
    if path.is_dir() and not (path / "ledger.jsonl").exists():
        raise UserError(f"{path}: no ledger.jsonl or {WATCH_FILE} (expected runs/<run-id>, a watch dir or a "
                        "reference .json)")
    if not path.exists():
        raise UserError(f"{path}: no such run directory or reference file")
    records = current(load_records(path))
    reference = path.suffix == ".json"
    name = f"{records[0]['label']} (reference)" if reference and records else path.name
    return Source(name, path, records, reference=reference)


# ---------------------------------------------------------------- plots
def _matplotlib() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"svg.fonttype": "none", "svg.hashsalt": "densecl-bench", "font.size": 9,
                         "axes.spines.top": False, "axes.spines.right": False, "axes.grid": True,
                         "grid.alpha": 0.3, "legend.fontsize": 8, "legend.frameon": False})
    return plt


def _svg(fig: Any) -> str:
    """The figure as an inline <svg> element (no XML prolog or DOCTYPE, no metadata block)."""
    plt = _matplotlib()
    buf = io.StringIO()
    fig.savefig(buf, format="svg", bbox_inches="tight", metadata={"Date": None, "Creator": None})
    plt.close(fig)
    text = buf.getvalue()
    text = text[text.index("<svg"):]
    return re.sub(r"<metadata>.*?</metadata>\s*", "", text, flags=re.S)


def _series(sources: Sequence[Source]) -> list[tuple[Source, dict[str, Any]]]:
    """Each source with its line style: runs in matplotlib's colour cycle, the reference dark and dashed."""
    out, colour = [], 0
    for src in sources:
        if src.reference:
            out.append((src, dict(REFERENCE_STYLE)))
        else:
            out.append((src, {"color": f"C{colour % 10}"}))
            colour += 1
    return out


def _curve_plot(sources: Sequence[Source], benchmark: str, ks: Sequence[int], xlabel: str, ylabel: str,
                log: bool) -> str | None:
    """A metric `k=N` against N for every source that has it."""
    plt = _matplotlib()
    fig, ax = plt.subplots(figsize=(6.0, 3.4))
    drawn = []
    for src, style in _series(sources):
        vals = src.values(benchmark)
        points = [(k, *vals[f"k={k}"]) for k in ks if f"k={k}" in vals]
        if not points:
            continue
        x, y = [p[0] for p in points], [p[1] for p in points]
        err = [p[2] or 0.0 for p in points]
        ax.errorbar(x, y, yerr=err if any(err) else None, marker="o", markersize=4, capsize=2, label=src.name,
                    **style)
        drawn.append(src)
    if not any(not src.reference for src in drawn):  # the reference alone is no result
        plt.close(fig)
        return None
    if log:
        ax.set_xscale("log", base=2)
    ax.set_xticks(list(ks), [str(k) for k in ks])
    ax.minorticks_off()
    ax.set(xlabel=xlabel, ylabel=ylabel)
    ax.legend()
    return _svg(fig)


def plot_lowshot(sources: Sequence[Source]) -> str | None:
    return _curve_plot(sources, "voc07_lowshot_svm", LOWSHOT_K, "positives per class k (log scale)",
                       "VOC07 test mAP (%)", log=True)


def plot_knn(sources: Sequence[Source]) -> str | None:
    return _curve_plot(sources, "imagenet_knn", KNN_K, "neighbours k (log scale)", "ImageNet val top-1 (%)",
                       log=True)


def plot_layers(sources: Sequence[Source]) -> str | None:
    """Grouped bars feature1..feature5 (+ AvgPool) per table, one bar per source."""
    plt = _matplotlib()
    panels = []
    for bench, title in LAYER_TABLES:
        cols = [m for m in (*LAYERS, "avgpool") if any(m in s.values(bench) for s in sources if not s.reference)]
        if cols:
            panels.append((bench, title, cols))
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels) + 0.6, 3.4), squeeze=False)
    series = [(s, st) for s, st in _series(sources) if any(s.values(b) for b, _, _ in panels)]
    width = 0.8 / max(len(series), 1)
    for ax, (bench, title, cols) in zip(axes[0], panels):
        for i, (src, style) in enumerate(series):
            vals = src.values(bench)
            xs = [j + (i - (len(series) - 1) / 2) * width for j, c in enumerate(cols) if c in vals]
            ys = [vals[c][0] for c in cols if c in vals]
            errs = [vals[c][1] or 0.0 for c in cols if c in vals]
            if not xs:
                continue
            bar_style = ({"color": "white", "edgecolor": "0.2", "hatch": "//"} if src.reference
                         else {"color": style["color"]})
            ax.bar(xs, ys, width, yerr=errs if any(errs) else None, label=src.name, **bar_style)
        ax.set_xticks(range(len(cols)), [c.replace("feature", "f") if c != "avgpool" else "avg" for c in cols])
        ax.set(title=title, ylabel="%")
    legend = {label: handle for ax in axes[0] for handle, label in zip(*ax.get_legend_handles_labels())}
    fig.legend(legend.values(), legend.keys(), loc="lower center", ncols=min(len(legend), 4),
               bbox_to_anchor=(0.5, 1.0))
    return _svg(fig)


def _per_class_ap(src: Source) -> tuple[str, list[float]] | None:
    """The VOC07 SVM's per-class AP at its best layer (the `svm` record names the layer)."""
    best = next((r for r in src.records if r["benchmark"] == "voc07_svm" and r["metric"] == "svm"), None)
    layer = (best or {}).get("extra", {}).get("layer")
    rec = next((r for r in src.records if r["benchmark"] == "voc07_svm" and r["metric"] == layer), None)
    ap = (rec or {}).get("extra", {}).get("per_class_ap")
    return (layer, ap) if ap else None


def plot_per_class(sources: Sequence[Source]) -> str | None:
    from densecl_bench.data.layout import VOC_CLASSES

    rows = [(src, style, got) for src, style in _series(sources) if (got := _per_class_ap(src))]
    if not rows:
        return None
    plt = _matplotlib()
    fig, ax = plt.subplots(figsize=(9.0, 3.4))
    width = 0.8 / len(rows)
    for i, (src, style, (layer, ap)) in enumerate(rows):
        xs = [j + (i - (len(rows) - 1) / 2) * width for j in range(len(ap))]
        ax.bar(xs, ap, width, color=style["color"], label=f"{src.name} ({layer})")
    ax.set_xticks(range(len(VOC_CLASSES)), VOC_CLASSES, rotation=60, ha="right")
    ax.set(ylabel="AP (%)")
    ax.legend()
    return _svg(fig)


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a partial line of a crashed or running writer
    return out


def plot_training(metrics_file: Path) -> str | None:
    """Loss terms, LR and the evaluation metrics of one training loop against the iteration."""
    records = [r for r in _read_jsonl(metrics_file) if "iter" in r]
    # one point per iteration: the periodic record, not the epoch summary written at the same iteration
    steps = list({r["iter"]: r for r in reversed(records) if "lr" in r and "loss" in r}.values())[::-1]
    evals = [(r["iter"], {k: v for k, v in (r.get("eval") or {}).items() if isinstance(v, (int, float))})
             for r in records if isinstance(r.get("eval"), dict)]
    evals = [(i, e) for i, e in evals if e]
    if not steps:
        return None
    plt = _matplotlib()
    fig, axes = plt.subplots(1, 3 if evals else 2, figsize=(9.6 if evals else 6.8, 2.8), squeeze=False)
    ax_loss, ax_lr = axes[0][0], axes[0][1]
    marker = "o" if len(steps) <= 30 else None  # a few logged points (short runs): show where they are
    loss_keys = [k for k in steps[-1] if k.startswith("loss") or k.endswith("loss")]
    for key in loss_keys:
        pts = [(r["iter"], r[key]) for r in steps if isinstance(r.get(key), (int, float))]
        ax_loss.plot([p[0] for p in pts], [p[1] for p in pts], label=key, linewidth=1, marker=marker, markersize=3)
    ax_loss.set(title="loss", xlabel="iteration")
    if len(loss_keys) > 1:
        ax_loss.legend()
    ax_lr.plot([r["iter"] for r in steps], [r["lr"] for r in steps], color="C2", linewidth=1, marker=marker,
               markersize=3)
    ax_lr.set(title="learning rate", xlabel="iteration")
    if evals:
        ax_eval = axes[0][2]
        for key in dict.fromkeys(k for _, e in evals for k in e):
            pts = [(i, e[key]) for i, e in evals if key in e]
            ax_eval.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", markersize=3, label=key)
        ax_eval.set(title="evaluation", xlabel="iteration")
        ax_eval.legend()
    return _svg(fig)


def plot_epochs(src: Source) -> str | None:
    """Each numeric metric of a watched pretraining run against the epoch, one panel per benchmark."""
    if not src.epochs:
        return None
    benches = list(dict.fromkeys(r["benchmark"] for recs in src.epochs.values() for r in recs
                                 if isinstance(r["value"], (int, float))))
    if not benches:
        return None
    plt = _matplotlib()
    fig, axes = plt.subplots(1, len(benches), figsize=(4.2 * len(benches) + 0.4, 3.2), squeeze=False)
    for ax, bench in zip(axes[0], benches):
        per_epoch = {e: _values(recs, bench) for e, recs in src.epochs.items()}
        for metric in dict.fromkeys(m for vals in per_epoch.values() for m in vals):
            pts = [(e, vals[metric][0]) for e, vals in per_epoch.items() if metric in vals]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", markersize=3, label=metric)
        ax.set(title=bench, xlabel="pretraining epoch", ylabel="%")
        ax.legend()
    return _svg(fig)


# ---------------------------------------------------------------- page
CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Helvetica,Arial,sans-serif;color:#1d1d1f;
margin:0 auto;max-width:1180px;padding:24px}
h1{font-size:24px;margin:0 0 4px}h2{font-size:19px;margin:32px 0 8px;border-bottom:1px solid #ddd;
padding-bottom:4px}h3{font-size:15px;margin:20px 0 6px}
.meta{color:#555;margin:0 0 16px}.note{color:#555;font-size:13px}
table{border-collapse:collapse;margin:6px 0 10px;font-variant-numeric:tabular-nums}
th,td{border:1px solid #d6d6d6;padding:4px 9px;text-align:right}th{background:#f3f4f6}
td:first-child,th:first-child{text-align:left}
tr.delta td{background:#fafafa;font-style:italic}td.up{color:#137333}td.down{color:#b3261e}
.plots{display:grid;grid-template-columns:repeat(auto-fit,minmax(520px,1fr));gap:18px}
figure.plot{margin:0;border:1px solid #e3e3e3;border-radius:6px;padding:10px;background:#fff}
figure.plot.wide{grid-column:1/-1}figure.plot svg{max-width:100%;height:auto;display:block;margin:auto}
figcaption{font-weight:600;margin-bottom:6px}
"""


@dataclass(frozen=True)
class Figure:
    id: str
    title: str
    svg: str
    caption: str = ""

    @property
    def wide(self) -> bool:
        """Spans the page: several panels, or twenty classes (matplotlib gives the width in pt)."""
        width = re.search(r'<svg[^>]*\bwidth="([\d.]+)pt"', self.svg)
        return width is not None and float(width.group(1)) > 480


def _esc(text: str) -> str:
    return html.escape(text, quote=True)


def markdown_tables_html(markdown: str) -> str:
    """`tables.render`'s markdown (### titles, paragraphs, pipe tables) as HTML; Δ rows are styled."""
    out, rows = [], []
    prev_blank = True

    def flush_table() -> None:
        if not rows:
            return
        head, body = rows[0], rows[2:]
        parts = ["<table><thead><tr>", *(f"<th>{_esc(c)}</th>" for c in head), "</tr></thead><tbody>"]
        for row in body:
            delta = row[0].startswith("Δ ")
            parts.append('<tr class="delta">' if delta else "<tr>")
            for i, cell in enumerate(row):
                sign = cell[:1] if delta and i else ""
                cls = {"+": ' class="up"', "-": ' class="down"'}.get(sign, "")
                parts.append(f"<td{cls}>{_esc(cell)}</td>")
            parts.append("</tr>")
        out.append("".join(parts) + "</tbody></table>")
        rows.clear()

    for line in markdown.splitlines():
        if line.startswith("|"):
            rows.append([c.strip() for c in line.strip().strip("|").split("|")])
            continue
        flush_table()
        if line.startswith("### "):
            out.append(f"<h3>{_esc(line[4:])}</h3>")
        elif line.strip() and out and out[-1].startswith('<p class="note">') and not prev_blank:
            out[-1] = out[-1][:-len("</p>")] + f" {_esc(line)}</p>"  # a paragraph's next line
        elif line.strip():
            out.append(f'<p class="note">{_esc(line)}</p>')
        prev_blank = not line.strip()
    flush_table()
    return "\n".join(out)


def _figures(sources: Sequence[Source]) -> dict[str, list[Figure]]:
    """The plots by section, each only where its data exist."""
    sections: dict[str, list[Figure]] = {}

    def add(section: str, fig_id: str, title: str, make: Callable[[], str | None], caption: str = "") -> None:
        if (svg := make()) is not None:
            slug = re.sub(r"[^A-Za-z0-9_-]+", "-", fig_id)
            sections.setdefault(section, []).append(Figure(slug, title, svg, caption))

    add("Transfer results", "lowshot", "Low-shot VOC07 SVM: mAP vs k", lambda: plot_lowshot(sources),
        "k positives (and 19k negatives) per class; mean over the sampled subsets.")
    add("Transfer results", "layers", "Per-layer results", lambda: plot_layers(sources),
        "feature1 = stem, feature2..feature5 = res2..res5; hatched bars: the reference.")
    add("Transfer results", "knn", "ImageNet kNN: top-1 vs k", lambda: plot_knn(sources))
    add("Transfer results", "per-class-ap", "VOC07 SVM: AP per class (best layer)", lambda: plot_per_class(sources))
    for src in sources:
        if src.epochs:
            add("Metrics vs pretraining epoch", f"epochs-{src.path.name}", f"{src.name}: metric vs epoch",
                lambda src=src: plot_epochs(src))
    for src in sources:
        if src.reference or src.epochs:
            continue
        for path in sorted(src.path.rglob("*metrics.jsonl")):
            stage = path.relative_to(src.path)
            add("Training curves", f"train-{src.path.name}-{stage}", f"{src.name}: {stage}",
                lambda path=path: plot_training(path))
    return sections


def render_report(paths: Sequence[str | os.PathLike[str]], reference: str | os.PathLike[str] | None = None,
                  title: str = "densecl-bench report") -> str:
    """The report page for the runs (or watch dirs) at `paths`, with `reference` (a reference JSON) as
    the first table row, the base of the delta rows and the dashed curve / hatched bars of the plots."""
    sources = [load_source(p) for p in paths]
    labels = [" / ".join(dict.fromkeys(r["label"] for r in s.records)) or s.name for s in sources]
    for src, label in zip(sources, labels):  # plots name runs by their row label, the run dir where ambiguous
        src.name = label if labels.count(label) == 1 else f"{label} ({src.path.name})"
    if reference is not None:
        ref = load_source(reference)
        present = {r["benchmark"] for s in sources for r in s.records}
        ref.records = [r for r in ref.records if r["benchmark"] in present]  # only the tables the runs fill
        sources.insert(0, ref)
    tables = render([s.records for s in sources], names=[s.path.name for s in sources], skip_empty=True)
    figures = _figures(sources)
    stamp = _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    listing = "".join(f"<li><b>{_esc(s.name)}</b> <span class='note'>{_esc(str(s.path))}"
                      f"{' (watch: epochs ' + ', '.join(map(str, s.epochs)) + ')' if s.epochs else ''}</span></li>"
                      for s in sources)
    body = [f"<h1>{_esc(title)}</h1>",
            f'<p class="meta">densecl-bench {_esc(__version__)} · generated {stamp}</p>',
            f"<ul>{listing}</ul>", "<h2>Model-zoo tables</h2>", markdown_tables_html(tables)]
    for section, figs in figures.items():
        body.append(f"<h2>{_esc(section)}</h2>")
        body.append('<div class="plots">')
        for fig in figs:
            caption = f'<p class="note">{_esc(fig.caption)}</p>' if fig.caption else ""
            kind = "plot wide" if fig.wide else "plot"
            body.append(f'<figure class="{kind}" id="{_esc(fig.id)}"><figcaption>{_esc(fig.title)}</figcaption>'
                        f"{fig.svg}{caption}</figure>")
        body.append("</div>")
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<meta name=\"viewport\" content=\"width=device-width\"><title>{_esc(title)}</title>"
            f"<style>{CSS}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")


def write_report(paths: Sequence[str | os.PathLike[str]], output: str | os.PathLike[str],
                 reference: str | os.PathLike[str] | None = None) -> Path:
    """Write the report page atomically and return its path."""
    atomic_write_text(output, render_report(paths, reference))
    return Path(output)
