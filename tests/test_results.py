"""The ledger: append-only records, torn-write tolerance, stage resume keys, manifest, provenance."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from densecl_bench.results import PROVENANCE_KEYS, Ledger, LedgerError, Metric, caveats, current, provenance


def _append(ledger: Ledger, metrics, *, label="cfg", trial=0, fingerprint="fp1", demo=False):
    ledger.append(metrics, label=label, trial=trial, config={"k": [10, 20]}, fingerprint=fingerprint,
                  provenance={"demo": demo, "seed": 0})


def test_append_and_read_back(tmp_path):
    ledger = Ledger(tmp_path / "run")
    assert ledger.records() == []
    _append(ledger, [Metric("voc07_svm", "svm", 82.5, {"per_layer": {"feature5": 82.5}}),
                     Metric("voc07_svm", "best_layer", "feature5")])
    _append(ledger, [Metric("imagenet_knn", "k=20", np.float32(48.5), {"top5": np.float64(70.25)})], trial=1)
    recs = ledger.records()
    assert [(r["benchmark"], r["metric"], r["value"], r["trial"]) for r in recs] == [
        ("voc07_svm", "svm", 82.5, 0), ("voc07_svm", "best_layer", "feature5", 0), ("imagenet_knn", "k=20", 48.5, 1)]
    assert recs[0]["extra"] == {"per_layer": {"feature5": 82.5}}
    assert recs[2]["extra"] == {"top5": 70.25}
    assert all(r["label"] == "cfg" and r["fingerprint"] == "fp1" and r["config"] == {"k": [10, 20]} for r in recs)
    assert set(recs[0]) == {"benchmark", "metric", "value", "extra", "trial", "label", "fingerprint", "config",
                            "provenance"}
    # one JSON object per line
    lines = ledger.path.read_text().splitlines()
    assert len(lines) == 3 and json.loads(lines[1])["metric"] == "best_layer"


def test_append_keeps_earlier_bytes(tmp_path):
    ledger = Ledger(tmp_path)
    _append(ledger, [Metric("voc07_svm", "svm", 80.0)])
    before = ledger.path.read_bytes()
    _append(ledger, [Metric("voc07_svm", "svm", 81.0)], fingerprint="fp2")
    assert ledger.path.read_bytes().startswith(before)


def test_empty_append_writes_nothing(tmp_path):
    ledger = Ledger(tmp_path)
    _append(ledger, [])
    assert not ledger.path.exists()


def test_completed_keys_on_benchmark_fingerprint_trial(tmp_path):
    ledger = Ledger(tmp_path)
    _append(ledger, [Metric("voc07_svm", "svm", 82.5)], fingerprint="abc", trial=0)
    assert ledger.completed("voc07_svm", "abc", 0)
    assert not ledger.completed("voc07_svm", "abc", 1)
    assert not ledger.completed("voc07_svm", "other", 0)
    assert not ledger.completed("imagenet_knn", "abc", 0)


def test_torn_last_line_is_ignored_and_repaired_on_append(tmp_path):
    ledger = Ledger(tmp_path)
    _append(ledger, [Metric("voc07_svm", "svm", 82.5), Metric("voc07_svm", "best_layer", "feature5")])
    good = ledger.path.read_bytes()
    # an interrupted write: half of a record, no newline
    ledger.path.write_bytes(good + b'{"benchmark": "imagenet_knn", "metric": "k=1')
    with pytest.warns(UserWarning, match="torn"):
        recs = ledger.records()
    assert [r["metric"] for r in recs] == ["svm", "best_layer"]
    with pytest.warns(UserWarning, match="torn"):
        assert not ledger.completed("imagenet_knn", "fp1", 0)
    with pytest.warns(UserWarning, match="torn"):
        _append(ledger, [Metric("imagenet_knn", "k=10", 48.2)])
    assert ledger.path.read_bytes().startswith(good)
    assert [r["metric"] for r in ledger.records()] == ["svm", "best_layer", "k=10"]


def test_damaged_record_before_the_end_raises(tmp_path):
    ledger = Ledger(tmp_path)
    _append(ledger, [Metric("voc07_svm", "svm", 82.5)])
    ledger.path.write_text("{not json\n" + ledger.path.read_text())
    with pytest.raises(LedgerError, match=":1:"):
        ledger.records()


def test_bad_label_or_trial_rejected(tmp_path):
    ledger = Ledger(tmp_path)
    with pytest.raises(ValueError):
        _append(ledger, [Metric("voc07_svm", "svm", 1.0)], label="")
    with pytest.raises(ValueError):
        _append(ledger, [Metric("voc07_svm", "svm", 1.0)], trial=-1)


def test_manifest_roundtrip(tmp_path):
    ledger = Ledger(tmp_path / "r1")
    assert ledger.manifest() is None
    info = {"run_id": "r1", "ckpt": "random", "label": "random", "created": "2025-01-01T00:00:00+00:00",
            "argv": ["run", "all"]}
    ledger.write_manifest(info)
    assert ledger.manifest() == info
    assert (tmp_path / "r1" / "run.json").exists()


def test_current_keeps_latest_fingerprint_and_last_record():
    def rec(metric, value, fp, trial=0, label="a", bench="b"):
        return {"label": label, "benchmark": bench, "metric": metric, "value": value, "fingerprint": fp,
                "trial": trial}
    records = [rec("m", 1.0, "old"), rec("m", 2.0, "old", trial=1), rec("n", 5.0, "old"),
               rec("m", 3.0, "new"), rec("m", 4.0, "new"), rec("m", 9.0, "x", bench="c")]
    kept = current(records)
    assert [(r["benchmark"], r["metric"], r["value"]) for r in kept] == [("b", "m", 4.0), ("c", "m", 9.0)]


def test_provenance_has_every_key(tmp_path):
    prov = provenance(ckpt_sha256="ab" * 32, ckpt_layout="torchvision", ckpt_path=tmp_path / "r50.pth",
                      arch="resnet50", device="cpu", world_size=1, seed=3, wall_time_s=1.5, demo=True,
                      data_root=tmp_path, run_extra="x")
    assert set(PROVENANCE_KEYS) <= set(prov)
    assert prov["run_extra"] == "x"
    assert prov["ckpt_path"] == str(tmp_path / "r50.pth") and prov["data_root"] == str(tmp_path)
    assert prov["demo"] is True and prov["seed"] == 3
    import densecl_bench
    import torch
    assert prov["package_version"] == densecl_bench.__version__
    assert prov["torch_version"].split("+")[0] == torch.__version__.split("+")[0]
    assert prov["numpy_version"] == np.__version__
    assert prov["git_commit"] is None or len(prov["git_commit"]) == 40
    assert prov["timestamp"].endswith("+00:00")
    json.dumps(prov)  # storable as is


def test_the_ledger_owns_its_record_type():
    """Reading a ledger needs neither the plugin contract nor torch; plugins keep importing Metric from base."""
    code = ("import sys, densecl_bench.results as r; "
            "assert 'densecl_bench.benchmarks.base' not in sys.modules and 'torch' not in sys.modules; "
            "from densecl_bench.benchmarks.base import Metric; assert Metric is r.Metric")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_caveats_name_partial_checkpoints_and_skipped_images():
    def record(**prov):
        return {"provenance": {"demo": False, **prov}}

    assert caveats(record()) == caveats(record(allow_partial=False, on_bad_image="raise", skipped_images={})) == []
    assert caveats(record(allow_partial=True, missing_tensors=2)) == [
        "--allow-partial (2 backbone tensors missing, left at random init)"]
    assert caveats(record(on_bad_image="skip", skipped_images={"voc07/trainval": 2, "voc07/test": 1})) == [
        "--skip-bad-images (3 unreadable images left out)"]
    assert caveats(record(on_bad_image="skip")) == ["--skip-bad-images (0 unreadable images left out)"]
