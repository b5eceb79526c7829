"""Regression gate verdicts: ok, worse, better (two-sided), missing (and allowed), excluded caveated records,
sigma tolerances, string equality, skips."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest

from densecl_bench.config import ConfigError
from densecl_bench.regress import compare, resolve
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


def test_missing_metric_fails_unless_allowed():
    records = [r for r in full_run() if r["metric"] != "k=20"]
    report = compare(records, REFERENCE)
    assert verdicts(report)[("imagenet_knn", "k=20")] == "missing" and not report.ok
    allowed = compare(records, REFERENCE, allow_missing=True)
    assert verdicts(allowed)[("imagenet_knn", "k=20")] == "missing" and allowed.ok


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
    assert row(compare(run, REFERENCE, {"imagenet_knn.k=20": {"sigma": 1.5}})).verdict == "worse"  # 0.6 > 0.45
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
