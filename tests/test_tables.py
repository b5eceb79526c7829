"""Model-zoo tables: the reference JSON reproduces the seed's tables cell by cell; blanks, trials, deltas."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest

from densecl_bench.results import Ledger, Metric
from densecl_bench.tables import LAYOUT, load_records, reference_records, render, render_run_dir, write_tables

REPO = Path(__file__).resolve().parent.parent
REF_DIR = REPO / "results" / "reference"
REF_JSON = REF_DIR / "densecl_r50_8xb32-coslr-200e.json"
REF_MD = REF_DIR / "model_zoo_densecl.md"
SHARED = REPO.parent / "shared" / "reference"
LABEL = "resnet50_8xb32-coslr-200e"


def parse_tables(markdown: str) -> dict[str, tuple[list[str], list[list[str]]]]:
    """{### title: (header cells, body rows of cells)} for every pipe table in a markdown text."""
    tables: dict[str, tuple[list[str], list[list[str]]]] = {}
    title = None
    for line in markdown.splitlines():
        if line.startswith("### "):
            title = line[4:].strip()
        elif line.startswith("|") and title is not None:
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if all(set(c) <= {"-", ":"} and c for c in cells):
                continue  # the separator line
            if title not in tables:
                tables[title] = (cells, [])
            else:
                tables[title][1].append(cells)
    return tables


def rec(bench, metric, value, *, label="cfg", trial=0, demo=False, fp="fp", **provenance):
    return {"benchmark": bench, "metric": metric, "value": value, "extra": {}, "trial": trial, "label": label,
            "fingerprint": fp, "config": {}, "provenance": {"demo": demo, **provenance}}


def test_reference_json_reproduces_the_seed_tables_cell_by_cell():
    expected = parse_tables(REF_MD.read_text())
    got = parse_tables(render([reference_records(REF_JSON)]))
    assert list(got) == list(expected) == [t.title for t in LAYOUT]
    for title, (header, rows) in expected.items():
        assert got[title][0] == header, title
        assert len(rows) == 1 and rows[0][0] == LABEL
        assert got[title][1] == rows, title
    # spot checks of the formatting rules the seed shows
    assert got["Places205 Linear Evaluation"][1][0][2] == "36.20"
    assert got["VOC SVM / Low-shot SVM"][1][0][1:3] == ["feature5", "82.5"]
    assert got["ImageNet Nearest-Neighbor Classification"][1][0][1:] == ["48.2", "48.5", "46.8", "45.6"]
    assert got["Detection: COCO2017"][1][0][1:] == [""] * 6


def test_reference_json_reproduces_the_seed_text_exactly():
    seed = REF_MD.read_text()
    assert render([reference_records(REF_JSON)]) == seed[seed.index("### "):]


@pytest.mark.skipif(not SHARED.is_dir(), reason="no ../shared/reference beside the clone")
def test_published_copies_match_the_shared_reference():
    """Ours hold the seed's numbers and tables; benchmarks the seed lacks (iNaturalist2018, Cityscapes) are null
    in the JSON and blank tables in the markdown."""
    ours, seed = json.loads(REF_JSON.read_text()), json.loads((SHARED / REF_JSON.name).read_text())
    added = set(ours["results"]) - set(seed["results"])
    assert all(ours["results"][bench] is None for bench in added)
    assert {**ours, "results": {k: v for k, v in ours["results"].items() if k not in added}} == seed
    ours_md, seed_md = parse_tables(REF_MD.read_text()), parse_tables((SHARED / REF_MD.name).read_text())
    assert {title: ours_md[title] for title in seed_md} == seed_md
    assert all(cell == "" for title in set(ours_md) - set(seed_md) for row in ours_md[title][1] for cell in row[1:])


def test_missing_values_are_blank_not_zero():
    out = render([[rec("voc07_svm", "svm", 60.0), rec("imagenet_knn", "k=20", 0.0)]])
    tables = parse_tables(out)
    assert tables["VOC SVM / Low-shot SVM"][1] == [["cfg", "", "60.0"] + [""] * 8]
    assert tables["ImageNet Nearest-Neighbor Classification"][1] == [["cfg", "", "0.0", "", ""]]
    assert tables["Segmentation: Pascal VOC 2012 + Aug"][1] == [["cfg", ""]]
    compact = parse_tables(render([[rec("voc07_svm", "svm", 60.0)]], skip_empty=True))
    assert list(compact) == ["VOC SVM / Low-shot SVM"]


def test_trials_render_mean_and_sample_std():
    values = [72.10, 73.02, 71.55]
    records = [rec("voc07_lowshot_svm", "k=16", v, trial=t) for t, v in enumerate(values)]
    records += [rec("voc07_svm", "best_layer", "feature5", trial=t) for t in range(3)]
    records += [rec("voc07_svm", "svm", 80.04)]  # one trial only: no ± shown
    row = parse_tables(render([records]))["VOC SVM / Low-shot SVM"][1][0]
    mean, std = statistics.fmean(values), statistics.stdev(values)
    assert row[7] == f"{mean:.2f} ± {std:.2f}" == "72.22 ± 0.74"
    assert row[1:3] == ["feature5", "80.0"]


def test_disagreeing_labels_show_the_majority():
    records = [rec("voc07_svm", "best_layer", v, trial=t) for t, v in enumerate(["feature5", "feature4", "feature5"])]
    assert parse_tables(render([records]))["VOC SVM / Low-shot SVM"][1][0][1] == "feature5 (2/3)"


def test_side_by_side_with_deltas():
    a = [rec("imagenet_knn", "k=10", 48.2, label="a"), rec("imagenet_knn", "k=20", 48.5, label="a"),
         rec("voc07_svm", "best_layer", "feature5", label="a")]
    b = [rec("imagenet_knn", "k=10", 47.0, label="b"), rec("imagenet_knn", "k=200", 40.0, label="b"),
         rec("voc07_svm", "best_layer", "feature4", label="b")]
    tables = parse_tables(render([a, b]))
    knn = tables["ImageNet Nearest-Neighbor Classification"][1]
    assert knn == [["a", "48.2", "48.5", "", ""], ["b", "47.0", "", "", "40.0"],
                   ["Δ b vs a", "-1.2", "", "", ""]]
    assert tables["VOC SVM / Low-shot SVM"][1][2][:2] == ["Δ b vs a", "≠"]


def test_same_label_in_two_runs_is_told_apart_by_name():
    a = [rec("imagenet_knn", "k=10", 10.0, label="random")]
    b = [rec("imagenet_knn", "k=10", 12.5, label="random")]
    rows = parse_tables(render([a, b], names=["r1", "r2"]))["ImageNet Nearest-Neighbor Classification"][1]
    assert [r[:2] for r in rows] == [["random (r1)", "10.0"], ["random (r2)", "12.5"],
                                    ["Δ random (r2) vs random (r1)", "+2.5"]]


def test_demo_records_get_a_note_and_unknown_metrics_their_own_table():
    out = render([[rec("imagenet_knn", "k=10", 20.0, label="random", demo=True),
                   rec("imagenet_knn", "top5_k=10", 55.0, label="random", demo=True),
                   rec("my_plugin", "acc", 12.345, label="random")]])
    knn_section = out[out.index("### ImageNet Nearest"):out.index("### Detection: Pascal")]
    assert "Demo data: the numbers of random come from the embedded demo datasets" in knn_section
    assert "Demo data" not in out[:out.index("### ImageNet Nearest")]
    tables = parse_tables(out)
    assert tables["Other metrics: imagenet_knn"] == (["Self-Supervised Config", "top5_k=10"], [["random", "55.00"]])
    assert tables["Other metrics: my_plugin"] == (["Self-Supervised Config", "acc"], [["random", "12.35"]])


def test_rows_with_caveats_are_marked_in_every_table():
    out = render([[rec("voc07_svm", "svm", 80.0, label="partial", allow_partial=True, missing_tensors=4),
                   rec("imagenet_knn", "k=10", 40.0, label="partial", allow_partial=True, missing_tensors=4),
                   rec("imagenet_knn", "k=10", 41.0, label="skipping", on_bad_image="skip",
                       skipped_images={"imagenet/val": 3}),
                   rec("imagenet_knn", "k=10", 42.0, label="clean")]])
    tables = parse_tables(out)
    assert [row[0] for row in tables["VOC SVM / Low-shot SVM"][1]] == ["partial †", "skipping", "clean"]
    assert [row[0] for row in tables["ImageNet Nearest-Neighbor Classification"][1]] == [
        "partial †", "skipping †", "clean"]
    knn = out[out.index("### ImageNet Nearest"):out.index("### Detection: Pascal")]
    assert "† partial: --allow-partial (4 backbone tensors missing, left at random init)." in knn
    assert "† skipping: --skip-bad-images (3 unreadable images left out)." in knn
    voc = out[:out.index("### ImageNet Linear")]
    assert "† partial:" in voc and "skipping:" not in voc


def test_rerun_under_a_new_config_replaces_the_old_numbers():
    records = [rec("voc12aug_fcn", "mIoU", 50.0, fp="old"), rec("voc12aug_fcn", "mIoU", 60.0, fp="new")]
    assert parse_tables(render([records]))["Segmentation: Pascal VOC 2012 + Aug"][1] == [["cfg", "60.00"]]


def test_run_dirs_reference_files_and_tables_md(tmp_path):
    run = tmp_path / "run-1"
    Ledger(run).append([Metric("imagenet_knn", "k=10", 47.34)], label=LABEL, trial=0, config={},
                       fingerprint="f", provenance={"demo": False})
    assert load_records(REF_JSON)[0]["label"] == LABEL
    rows = parse_tables(render_run_dir(REF_JSON, run))["ImageNet Nearest-Neighbor Classification"][1]
    assert rows[0][:2] == [f"{LABEL} ({REF_JSON.name})", "48.2"]
    assert rows[1][:2] == [f"{LABEL} (run-1)", "47.3"]  # the seed's one decimal for kNN
    assert rows[2][1] == "-0.9"  # 47.34 - 48.2 = -0.86
    path = write_tables(run)
    assert path == run / "tables.md"
    assert path.read_text().startswith("# Results: run-1\n\n### VOC SVM")
    with pytest.raises(FileNotFoundError):
        load_records(tmp_path / "nope")
