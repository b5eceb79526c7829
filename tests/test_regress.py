"""Regression gate verdicts: ok, worse, better (two-sided), not run (and required), excluded caveated records,
max(abs, k·σ) tolerances, string equality, skips; the markdown report; references and their tolerances."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest
from click.testing import CliRunner

from densecl_bench.cli import main
from densecl_bench.config import ConfigError
from densecl_bench.regress import NEW_REFERENCE_TOLERANCES, compare, resolve, write_reference
from densecl_bench.tables import reference_records

REF_JSON = Path(__file__).resolve().parent.parent / "results" / "reference" / "densecl_r50_8xb32-coslr-200e.json"
REFERENCE = {"model": "ref", "results": {
    "voc07_svm": {"best_layer": "feature5", "svm": 82.5},
    "imagenet_knn": {"k=10": 48.2, "k=20": 48.5},
    "coco_mask_rcnn_fpn_1x": None,
}}


def rec(bench, metric, value, trial=0, label="run", demo=False, **provenance):
    return {"benchmark": bench, "metric": metric, "value": value, "extra": {}, "trial": trial, "label": label,
            "fingerprint": "fp", "config": {}, "provenance": {"demo": demo, **provenance}}


def full_run(svm=82.5, layer="feature5", k10=48.2, k20=48.5):
    return [rec("voc07_svm", "best_layer", layer), rec("voc07_svm", "svm", svm),
            rec("imagenet_knn", "k=10", k10), rec("imagenet_knn", "k=20", k20)]


def verdicts(report):
    return {(r.benchmark, r.metric): r.verdict for r in report.rows}


def test_within_tolerance_passes_and_null_reference_is_skipped():
    report = compare(full_run(svm=82.1, k10=48.6), REFERENCE)
    assert report.ok
    assert verdicts(report) == {("voc07_svm", "best_layer"): "ok", ("voc07_svm", "svm"): "ok",
                                ("imagenet_knn", "k=10"): "ok", ("imagenet_knn", "k=20"): "ok",
                                ("coco_mask_rcnn_fpn_1x", "*"): "skipped: no reference"}
    svm = next(r for r in report.rows if r.metric == "svm")
    assert svm.delta == pytest.approx(-0.4) and svm.measured == pytest.approx(82.1)


def test_outside_tolerance_fails():
    report = compare(full_run(k20=47.9), REFERENCE)  # delta -0.6 > default 0.5
    assert not report.ok
    assert verdicts(report)[("imagenet_knn", "k=20")] == "worse"
    text = report.format()
    assert "FAIL: " in text and "imagenet_knn.k=20" in text and "-0.60" in text and "1 worse" in text


def test_better_beyond_tolerance_passes_unless_two_sided():
    run = full_run(svm=84.0, k20=47.9)  # +1.5 and -0.6
    report = compare(run, REFERENCE)
    assert verdicts(report)[("voc07_svm", "svm")] == "better"
    assert [r.metric for r in report.rows if r.failed] == ["k=20"]
    report = compare(full_run(svm=84.0), REFERENCE)
    assert report.ok and "OK: " in report.format() and "1 better" in report.format()
    two = compare(full_run(svm=84.0), REFERENCE, two_sided=True)
    assert not two.ok and verdicts(two)[("voc07_svm", "svm")] == "better"
    assert compare(full_run(svm=82.9), REFERENCE, two_sided=True).ok  # +0.4 is within tolerance


def test_nan_is_worse():
    assert verdicts(compare(full_run(k10=float("nan")), REFERENCE))[("imagenet_knn", "k=10")] == "worse"


def test_records_with_caveats_are_excluded_unless_asked():
    partial = [r for r in full_run() if r["benchmark"] == "voc07_svm"] + [
        rec("imagenet_knn", "k=10", 48.2, allow_partial=True, missing_tensors=3),
        rec("imagenet_knn", "k=20", 48.5, on_bad_image="skip", skipped_images={"imagenet/val": 2})]
    report = compare(partial, REFERENCE)
    assert verdicts(report)[("imagenet_knn", "k=10")] == verdicts(report)[("imagenet_knn", "k=20")] == "excluded"
    assert not report.ok
    text = report.format()
    assert "--allow-partial (3 backbone tensors missing" in text and "--skip-bad-images (2 unreadable" in text
    assert "--include-flagged" in text
    assert compare(partial, REFERENCE, allow_missing=True).ok
    judged = compare(partial, REFERENCE, include_flagged=True)
    assert judged.ok and verdicts(judged)[("imagenet_knn", "k=10")] == "ok" and not judged.excluded


def test_a_metric_not_run_is_reported_and_fails_only_when_all_are_required():
    records = [r for r in full_run() if r["metric"] != "k=20"]
    report = compare(records, REFERENCE)
    assert verdicts(report)[("imagenet_knn", "k=20")] == "not run" and report.ok
    assert "| imagenet_knn.k=20 | 48.50 |  |  |  | not run |" in report.format()
    required = compare(records, REFERENCE, require_all=True)
    assert verdicts(required)[("imagenet_knn", "k=20")] == "not run" and not required.ok
    assert "| **not run** |" in required.format() and "FAIL: " in required.format()
    with pytest.raises(ValueError, match="contradict"):
        compare(records, REFERENCE, require_all=True, allow_missing=True)


def test_string_metrics_must_be_equal():
    assert not compare(full_run(layer="feature4"), REFERENCE).ok
    assert verdicts(compare(full_run(layer="feature4"), REFERENCE))[("voc07_svm", "best_layer")] == "differs"


def test_per_benchmark_and_per_metric_tolerances(tmp_path):
    run = full_run(svm=82.2, k10=47.5, k20=48.0)  # deltas -0.3, -0.7, -0.5
    tols = {"default": 0.25, "voc07_svm": 0.3, "imagenet_knn.k=10": {"abs": 0.8}}
    assert verdicts(compare(run, REFERENCE, tols)) == {
        ("voc07_svm", "best_layer"): "ok", ("voc07_svm", "svm"): "ok", ("imagenet_knn", "k=10"): "ok",
        ("imagenet_knn", "k=20"): "worse", ("coco_mask_rcnn_fpn_1x", "*"): "skipped: no reference"}
    path = tmp_path / "tol.yaml"
    path.write_text("default: 0.25\nvoc07_svm: 0.3\nimagenet_knn.k=10: {abs: 0.8}\n")
    assert verdicts(compare(run, REFERENCE, path)) == verdicts(compare(run, REFERENCE, tols))
    bad = tmp_path / "bad.yaml"
    bad.write_text("voc07_svm: {tol: 1}\n")
    with pytest.raises(ConfigError, match="voc07_svm"):
        compare(run, REFERENCE, bad)


def test_sigma_tolerance_uses_the_trials_std():
    values = [47.6, 47.9, 48.2]  # mean 47.9, delta -0.6 against 48.5
    std = statistics.stdev(values)  # 0.3
    run = full_run()[:3] + [rec("imagenet_knn", "k=20", v, trial=t) for t, v in enumerate(values)]
    row = lambda report: next(r for r in report.rows if r.metric == "k=20")  # noqa: E731
    two = row(compare(run, REFERENCE, {"imagenet_knn.k=20": {"sigma": 2}}))  # 0.6 <= 2 * 0.3
    assert two.verdict == "ok" and two.std == pytest.approx(std) and two.trials == 3
    assert two.measured == pytest.approx(statistics.fmean(values))
    # never tighter than abs: max(0.5 default, 1.5 * 0.3 = 0.45) = 0.5 < 0.6; max(0.7, 0.45) = 0.7 >= 0.6
    assert row(compare(run, REFERENCE, {"imagenet_knn.k=20": {"sigma": 1.5}})).verdict == "worse"
    wide = row(compare(run, REFERENCE, {"imagenet_knn.k=20": {"sigma": 1.5, "abs": 0.7}}))
    assert wide.verdict == "ok" and wide.tolerance == "±0.70 = max(0.7, 1.5σ)"
    # one trial: sigma has no std to use, the absolute tolerance applies
    single = full_run(k20=48.0)
    assert row(compare(single, REFERENCE, {"imagenet_knn": {"sigma": 2}, "default": 0.6})).verdict == "ok"
    assert row(compare(single, REFERENCE, {"imagenet_knn": {"sigma": 2}, "default": 0.4})).verdict == "worse"


def test_resolve_prefers_the_most_specific_key_per_field():
    tols = {"default": {"abs": 0.5, "sigma": 3}, "b": 0.2, "b.m": {"sigma": 1}}
    t = resolve(tols, "b", "m")
    assert (t.abs, t.sigma) == (0.2, 1.0)
    t = resolve({}, "x", "y")
    assert (t.abs, t.sigma) == (0.5, None)


def test_reference_json_against_itself_and_extra_metrics():
    records = [r | {"label": "run"} for r in reference_records(REF_JSON)]
    records.append(rec("coco_mask_rcnn_fpn_1x", "bbox_mAP", 38.0))
    records.append(rec("my_plugin", "acc", 1.0))
    report = compare(records, REF_JSON)
    assert report.ok
    v = verdicts(report)
    assert v[("coco_mask_rcnn_fpn_1x", "bbox_mAP")] == "skipped: no reference"
    assert v[("my_plugin", "acc")] == "skipped: no reference"
    assert sum(x == "ok" for x in v.values()) == sum(len(m) for m in json.loads(REF_JSON.read_text())[
        "results"].values() if m)


def test_several_labels_need_a_choice_and_demo_is_flagged():
    records = full_run() + [r | {"label": "other", "provenance": {"demo": True}} for r in full_run(svm=70.0)]
    with pytest.raises(ValueError, match="label"):
        compare(records, REFERENCE)
    assert compare(records, REFERENCE, label="run").ok
    other = compare(records, REFERENCE, label="other")
    assert not other.ok and other.demo and "demo data" in other.format()


def test_report_is_a_markdown_table_with_sources_and_tolerance_reasons():
    reference = REFERENCE | {"source": "the seed's model-zoo page"}
    tols = {"default": {"abs": 0.5, "why": "trial spread"}, "imagenet_knn.k=20": {"abs": 0.1}}
    text = compare(full_run(svm=82.1, k20=48.3), reference, tols).format()
    lines = text.splitlines()
    assert lines[0] == "### Regression: run against ref"
    header = lines.index("| metric | reference | ours | delta | tolerance | verdict |")
    assert lines[header + 1] == "|---|---:|---:|---:|---|---|"
    assert "| voc07_svm.svm | 82.50 | 82.10 | -0.40 | ±0.50 | ok |" in lines
    assert "| imagenet_knn.k=20 | 48.50 | 48.30 | -0.20 | ±0.10 | **worse** |" in lines
    assert "Reference source: the seed's model-zoo page" in lines
    assert "- default: trial spread" in lines  # k=20's own entry has no why: the default's is not claimed for it
    assert text.count("- ") == 1


def test_reference_tolerances_travel_with_the_reference(tmp_path):
    ref = tmp_path / "ref.json"
    ref.write_text(json.dumps(REFERENCE | {"tolerances": {"imagenet_knn": 0.05}}))
    run = full_run(k10=48.1)  # -0.1: inside the default 0.5, outside the reference's own 0.05
    assert verdicts(compare(run, ref))[("imagenet_knn", "k=10")] == "worse"
    assert verdicts(compare(run, ref, {"default": 0.5}))[("imagenet_knn", "k=10")] == "ok"  # --tolerances wins


def test_the_shipped_densecl_reference_gates_a_partial_run():
    """A run of two benchmarks against the seed's full reference: judged on what it ran, `not run` for the
    rest; --require-all (the released-weights workflow) fails it. Its tolerances come from released.yaml."""
    ref = json.loads(REF_JSON.read_text())["results"]
    records = [rec("voc07_svm", m, v) for m, v in ref["voc07_svm"].items()]
    records += [rec("imagenet_knn", m, v - 0.8) for m, v in ref["imagenet_knn"].items()]  # within kNN's 1.0
    report = compare(records, REF_JSON)
    assert report.ok and report.source.startswith("MMSelfSup 0.x model zoo page")
    v = verdicts(report)
    assert v[("imagenet_knn", "k=10")] == "ok" and v[("voc07_svm", "svm")] == "ok"
    assert v[("voc12aug_fcn", "mIoU")] == v[("imagenet_linear", "avgpool")] == "not run"
    knn = next(r for r in report.rows if r.metric == "k=10")
    assert knn.tolerance == "±1.00" and knn.why[0] == "imagenet_knn"
    strict = compare(records, REF_JSON, require_all=True)
    assert not strict.ok and sum(r.failed for r in strict.rows) == sum(
        len(m) for b, m in ref.items() if m and b not in ("voc07_svm", "imagenet_knn"))
    assert not compare([r | {"value": r["value"] - 1.2} if r["benchmark"] == "imagenet_knn" else r
                        for r in records], REF_JSON).ok


def test_write_reference_round_trips_and_keeps_reviewed_tolerances(tmp_path):
    path = tmp_path / "demo.json"
    run = full_run(svm=20.123456) + [rec("imagenet_knn", "k=10", 10.0, trial=1)]  # k=10: trials 48.2 and 10.0
    written = write_reference(run, path)
    assert json.loads(path.read_text()) == written
    assert written["results"] == {"voc07_svm": {"best_layer": "feature5", "svm": 20.1235},
                                  "imagenet_knn": {"k=10": 29.1, "k=20": 48.5}}
    assert written["tolerances"] == NEW_REFERENCE_TOLERANCES and written["model"] == "run"
    assert written["two_sided"] and written["source"].startswith("densecl-bench, git ")
    assert compare(run, path).ok
    moved = compare(full_run(svm=20.2) + run[2:], path)  # +0.08 > 0.01: the reference is two-sided
    assert not moved.ok and verdicts(moved)[("voc07_svm", "svm")] == "better"
    reviewed = written | {"tolerances": {"voc07_svm": 0.1}}
    path.write_text(json.dumps(reviewed))
    assert write_reference(full_run(svm=20.2), path)["tolerances"] == {"voc07_svm": 0.1}
    with pytest.raises(ValueError, match="allow-partial"):
        write_reference([rec("voc07_svm", "svm", 1.0, allow_partial=True, missing_tensors=1)], path)


def test_cli_gate_report_file_and_reference_writing(tmp_path):
    run = tmp_path / "runs" / "r"
    run.mkdir(parents=True)
    (run / "ledger.jsonl").write_text("".join(json.dumps(r) + "\n" for r in full_run(k20=47.0)))
    ref = tmp_path / "ref.json"
    ref.write_text(json.dumps(REFERENCE))
    cli = CliRunner()
    gate = cli.invoke(main, ["regress", str(run), "--reference", str(ref), "-o", str(tmp_path / "report.md")])
    assert gate.exit_code == 1 and "| imagenet_knn.k=20 | 48.50 | 47.00 | -1.50 | ±0.50 | **worse** |" in gate.output
    assert (tmp_path / "report.md").read_text() == gate.output.removesuffix("\n")
    written = cli.invoke(main, ["regress", str(run), "--write-reference", str(tmp_path / "new.json")])
    assert written.exit_code == 0 and "wrote" in written.output
    assert cli.invoke(main, ["regress", str(run), "--reference", str(tmp_path / "new.json")]).exit_code == 0
    for args, message in [([], "--reference (to compare) or --write-reference"),
                          (["--reference", str(ref), "--require-all", "--allow-missing"], "contradict"),
                          (["--reference", str(run / "ledger.jsonl")], "cannot read the reference JSON")]:
        bad = cli.invoke(main, ["regress", str(run), *args])
        assert bad.exit_code == 2 and bad.output.startswith("error: ") and message in bad.output, bad.output
