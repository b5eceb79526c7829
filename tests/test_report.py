"""`report`: one self-contained HTML page; every plot present, drawn from the runs' numbers, and
visible when a browser renders it (headless Chromium where installed)."""

import json
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest
from click.testing import CliRunner

from densecl_bench.cli import main
from densecl_bench.data.layout import VOC_CLASSES
from densecl_bench.report import markdown_tables_html, render_report
from densecl_bench.results import Ledger, Metric
from densecl_bench.tables import KNN_K, LOWSHOT_K
from densecl_bench.watch import WATCH_FILE, epoch_dir

REFERENCE = Path(__file__).parents[1] / "results" / "reference" / "densecl_r50_8xb32-coslr-200e.json"
PLOTS = {"lowshot", "layers", "knn", "per-class-ap"}


def _record(run_dir: Path, metrics: list[Metric], label: str, **provenance) -> None:
    by_bench: dict[str, list[Metric]] = {}
    for m in metrics:
        by_bench.setdefault(m.benchmark, []).append(m)
    for bench, ms in by_bench.items():
        Ledger(run_dir).append(ms, label=label, trial=0, config={}, fingerprint=f"fp-{bench}",
                               provenance={"demo": True, **provenance})


def _suite_metrics(shift: float) -> list[Metric]:
    """Every benchmark the plots read, with values offset by `shift` to tell runs apart."""
    out = [Metric("voc07_lowshot_svm", f"k={k}", 30 + 5 * i + shift) for i, k in enumerate(LOWSHOT_K)]
    ap = [round(40 + i + shift, 2) for i in range(len(VOC_CLASSES))]
    out += [Metric("voc07_svm", f"feature{i}", 20 + 10 * i + shift, {"per_class_ap": ap if i == 5 else []})
            for i in range(1, 6)]
    out += [Metric("voc07_svm", "svm", 70 + shift, {"layer": "feature5"}),
            Metric("voc07_svm", "best_layer", "feature5")]
    out += [Metric(bench, f"feature{i}", 10 * i + shift) for bench in ("imagenet_linear", "places205_linear")
            for i in range(1, 6)]
    out += [Metric("imagenet_linear", "avgpool", 55 + shift)]
    out += [Metric("imagenet_knn", f"k={k}", 45 - i + shift) for i, k in enumerate(KNN_K)]
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    for name, shift in (("a", 0.0), ("b", 2.5)):
        _record(root / name, _suite_metrics(shift), label=f"densecl_demo_{name}")
    probe = root / "a" / "imagenet_linear" / "trial0" / "mhead_last.metrics.jsonl"
    probe.parent.mkdir(parents=True)
    probe.write_text("".join(json.dumps(r) + "\n" for r in [
        {"iter": 10, "max_iters": 20, "epoch": 1, "lr": 0.1, "loss": 2.0},
        {"iter": 10, "epoch": 1, "eval": {"top1_feature5": 12.5}},
        {"iter": 20, "max_iters": 20, "epoch": 2, "lr": 0.01, "loss": 1.5},
        {"iter": 20, "epoch": 2, "eval": {"top1_feature5": 17.5}}]) + '{"iter": 2')  # torn last line
    watched = root / "watch-densecl"
    (watched / WATCH_FILE).parent.mkdir()
    (watched / WATCH_FILE).write_text("{}")
    for epoch in (10, 20):
        _record(watched / epoch_dir(epoch), [Metric("imagenet_knn", f"k={k}", epoch + k / 100) for k in KNN_K],
                label="densecl_demo", epoch=epoch)
    return root


class _Page(HTMLParser):
    """Figures with their inline SVG's size and drawn elements, and every URL-bearing attribute."""

    def __init__(self) -> None:
        super().__init__()
        self.figures: dict[str, dict] = {}
        self.urls: list[str] = []
        self.tags: set[str] = set()
        self._figure: str | None = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.add(tag)
        self.urls += [v for k, v in attrs.items() if k in ("src", "href", "xlink:href", "action", "data") and v]
        if tag == "figure":
            self._figure = attrs["id"]
            self.figures[self._figure] = {"svg": None, "drawn": 0, "text": []}
        elif self._figure and tag == "svg":
            size = (float(attrs["width"].rstrip("pt")), float(attrs["height"].rstrip("pt")))
            self.figures[self._figure]["svg"] = size
        elif self._figure and tag in ("path", "use", "rect", "line", "polyline"):
            self.figures[self._figure]["drawn"] += 1

    def handle_data(self, data):
        if self._figure and data.strip():
            self.figures[self._figure]["text"].append(data.strip())

    def handle_endtag(self, tag):
        if tag == "figure":
            self._figure = None


@pytest.fixture(scope="module")
def page(runs):
    text = render_report([runs / "a", runs / "b", runs / "watch-densecl"], reference=REFERENCE)
    parsed = _Page()
    parsed.feed(text)
    return text, parsed


def test_every_plot_is_there_with_an_inline_svg_and_the_runs_in_it(page):
    _, parsed = page
    ids = set(parsed.figures)
    assert PLOTS | {"epochs-watch-densecl", "train-a-imagenet_linear-trial0-mhead_last-metrics-jsonl"} == ids
    for fig_id, fig in parsed.figures.items():
        width, height = fig["svg"]
        assert width > 100 and height > 100 and fig["drawn"] > 10, fig_id
    legend = " ".join(parsed.figures["lowshot"]["text"])
    assert "densecl_demo_a" in legend and "densecl_demo_b" in legend and "(reference)" in legend
    assert "96" in parsed.figures["lowshot"]["text"]  # the k ticks, log axis labelled with k itself
    assert "tvmonitor" in parsed.figures["per-class-ap"]["text"]
    training = parsed.figures["train-a-imagenet_linear-trial0-mhead_last-metrics-jsonl"]["text"]
    assert {"loss", "learning rate", "evaluation", "top1_feature5"} <= set(training)
    assert "pretraining epoch" in parsed.figures["epochs-watch-densecl"]["text"]


def test_the_page_needs_nothing_from_outside(page):
    text, parsed = page
    assert not parsed.tags & {"script", "link", "img", "iframe", "object"}
    # the only references are SVG-internal (markers, clip paths), and each resolves on the page itself
    refs = parsed.urls + re.findall(r"url\(([^)]*)\)", text)
    assert refs and all(ref.startswith("#") for ref in refs)
    assert {ref[1:] for ref in refs} <= set(re.findall(r'\bid="([^"]+)"', text))
    assert "@import" not in text
    assert "<?xml" not in text and "<!DOCTYPE svg" not in text  # inline SVG, not embedded documents


def test_tables_and_deltas_against_the_reference(page):
    text, _ = page
    # the reference row first, the runs after it, a delta row per run; kNN k=20: 48.5 vs 44.0 and 46.5
    assert "<td>resnet50_8xb32-coslr-200e</td>" in text
    knn = text[text.index("ImageNet Nearest-Neighbor"):]
    assert '<td class="down">-4.5</td>' in knn and '<td class="down">-2.0</td>' in knn
    assert "Detection: Pascal VOC" not in text  # tables no run fills are left out


def test_markdown_tables_become_html_tables():
    markdown = "### T\n\nline one\nline two\n\n| A | x |\n|---|---|\n| r | 1.0 |\n| Δ r vs s | +0.5 |\n"
    html = markdown_tables_html(markdown)
    assert html.splitlines() == [
        "<h3>T</h3>", '<p class="note">line one line two</p>',
        "<table><thead><tr><th>A</th><th>x</th></tr></thead><tbody><tr><td>r</td><td>1.0</td></tr>"
        '<tr class="delta"><td>Δ r vs s</td><td class="up">+0.5</td></tr></tbody></table>']


def test_cli_report_writes_the_page_and_refuses_a_non_run(runs, tmp_path):
    cli = CliRunner()
    out = cli.invoke(main, ["report", str(runs / "a"), "-o", str(tmp_path / "r.html")])
    assert out.exit_code == 0 and (tmp_path / "r.html").read_text().startswith("<!DOCTYPE html>")
    bad = cli.invoke(main, ["report", str(tmp_path), "-o", str(tmp_path / "x.html")])
    assert bad.exit_code == 2 and bad.output.startswith("error:") and "no ledger.jsonl" in bad.output


BROWSERS = ("chromium", "chromium-browser", "google-chrome", "chrome-headless-shell")
CHROMIUM = next((p for p in map(shutil.which, BROWSERS) if p), None)
VISIBILITY = """<script>
const out = {};
for (const fig of document.querySelectorAll("figure.plot")) {
  const svg = fig.querySelector("svg"), r = svg.getBoundingClientRect(), s = getComputedStyle(svg);
  const shapes = [...svg.querySelectorAll("path")].map(p => p.getBBox()).filter(b => b.width > 0 || b.height > 0);
  out[fig.id] = {w: r.width, h: r.height, left: r.left, right: r.right, shapes: shapes.length,
                 shown: s.display !== "none" && s.visibility === "visible" && s.opacity !== "0"};
}
document.body.insertAdjacentHTML("beforeend", "<pre id='visibility'>" + JSON.stringify(
  {figures: out, page: document.documentElement.clientWidth}) + "</pre>");
</script>"""


@pytest.mark.skipif(CHROMIUM is None, reason="no Chromium installed (apt-get install chromium)")
def test_every_plot_is_visible_in_a_browser(page, tmp_path):
    text, parsed = page
    probe = tmp_path / "probe.html"
    probe.write_text(text.replace("</body>", VISIBILITY + "</body>"))
    dom = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--window-size=1280,900",
                          "--dump-dom", probe.as_uri()], capture_output=True, text=True, timeout=120, check=True).stdout
    seen = json.loads(re.search(r"<pre id=\"visibility\">(.*?)</pre>", dom, re.S).group(1))
    assert set(seen["figures"]) == set(parsed.figures)
    for fig_id, fig in seen["figures"].items():
        assert fig["shown"] and fig["w"] > 200 and fig["h"] > 100, (fig_id, fig)
        assert 0 <= fig["left"] and fig["right"] <= seen["page"], (fig_id, fig)  # on the page, not cut off
        assert fig["shapes"] > 10, (fig_id, fig)
