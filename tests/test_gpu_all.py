"""perf/gpu_all.sh --dry-run (issue 15): the rows that are new code run at tiny sizes on the CPU and land
in one markdown block; the script rows go through the same runner (one of them through the shell wrapper)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

PERF = Path(__file__).resolve().parent.parent / "perf"
sys.path.insert(0, str(PERF))

import gpu_all


def test_dry_run_measures_both_loaders_and_writes_one_block(tmp_path):
    out = tmp_path / "gpu.md"
    assert gpu_all.main(["--dry-run", "--rows", "pretrain_e2e,svm", "--out", str(out)]) == 0
    text = out.read_text()
    assert text.startswith("## GPU rows (`bash perf/gpu_all.sh`, issue 15): CPU") and "dry run" in text
    assert text.count("\n## ") == 0 and text.count("\n### ") == 2 and "failed" not in text
    assert "| none (one batch, repeated) | fp32 (reference style) |" in text and "| 1.00x |" in text
    for loader in ("cpu", "gpu"):
        assert f"| {loader} | fp32 (reference style) |" in text
        assert f"| {loader} | bf16 + channels_last + fused SGD |" in text
        assert f"`loader: {loader}`" in text
    assert "| 16 | 60 + 60 |" in text  # the SVM protocol ran on the (CPU) device


def test_shell_wrapper_runs_a_script_row_and_rejects_unknown_rows(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = tmp_path / "knn.md"
    res = subprocess.run(["bash", str(PERF / "gpu_all.sh"), "--dry-run", "--rows", "knn", "--out", str(out)],
                         env=env, capture_output=True, text=True, timeout=120, check=False)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "$ python perf/knn_speed.py --bank 200" in out.read_text() and out.read_text() in res.stdout
    with pytest.raises(SystemExit) as err:
        gpu_all.main(["--dry-run", "--rows", "knn,detection"])
    assert err.value.code == 2


def test_a_failing_row_is_reported_and_the_others_still_run(tmp_path, monkeypatch):
    def broken(sizes, device, work):
        raise RuntimeError("CUDA error: out of memory")

    rows = (gpu_all.Row("boom", "A row that fails", 1, broken), *[r for r in gpu_all.ROWS if r.key == "svm"])
    monkeypatch.setattr(gpu_all, "ROWS", rows)
    out = tmp_path / "gpu.md"
    assert gpu_all.main(["--dry-run", "--rows", "boom,svm", "--out", str(out)]) == 1
    text = out.read_text()
    assert "failed: RuntimeError: CUDA error: out of memory" in text and "| 16 | 60 + 60 |" in text
