"""The mIoU evaluator against hand-computed confusion matrices (PROTOCOLS.md §8)."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from densecl_bench.segmentation.evaluator import SemSegEvaluator, confusion_matrix, segmentation_metrics

# 4 classes; class 3 appears neither in the labels nor in the predictions; the last pixel is ignored
LABEL = torch.tensor([[0, 0, 1], [1, 2, 255]])
PRED = torch.tensor([[0, 1, 1], [1, 0, 2]])


def one_hot_logits(pred: torch.Tensor, classes: int) -> torch.Tensor:
    return torch.nn.functional.one_hot(pred, classes).permute(2, 0, 1).float()


def test_confusion_matrix_by_hand():
    expected = torch.zeros(4, 4, dtype=torch.int64)
    expected[0, 0], expected[0, 1], expected[1, 1], expected[2, 0] = 1, 1, 2, 1  # rows: label, cols: prediction
    assert torch.equal(confusion_matrix(PRED, LABEL, 4), expected)


def test_metrics_by_hand_absent_class_is_nan_and_left_out():
    out = segmentation_metrics(confusion_matrix(PRED, LABEL, 4), ["a", "b", "c", "d"])
    # IoU: a 1 / (2 + 2 - 1), b 2 / (3 + 2 - 2), c 0 / 1, d 0 / 0 -> NaN; mIoU over a, b, c
    assert out["IoU"]["a"] == pytest.approx(100 / 3)
    assert out["IoU"]["b"] == pytest.approx(200 / 3)
    assert out["IoU"]["c"] == 0.0
    assert math.isnan(out["IoU"]["d"])
    assert out["mIoU"] == pytest.approx(100 / 3)
    assert out["aAcc"] == pytest.approx(60.0)  # 3 of 5 counted pixels


def test_a_class_only_predicted_counts_as_zero():
    out = segmentation_metrics(confusion_matrix(torch.tensor([0, 1]), torch.tensor([0, 0]), 2))
    assert out["IoU"] == {"0": 50.0, "1": 0.0}
    assert out["mIoU"] == pytest.approx(25.0)


def test_evaluator_accumulates_before_dividing():
    """Two images of different sizes: the matrix is summed, not the per-image IoUs averaged."""
    ev = SemSegEvaluator(4)
    ev.reset()
    ev.process((None, [LABEL[:, :2], LABEL[:, 2:]]), [one_hot_logits(PRED[:, :2], 4), one_hot_logits(PRED[:, 2:], 4)])
    whole = segmentation_metrics(confusion_matrix(PRED, LABEL, 4))
    out = ev.evaluate()
    assert out["mIoU"] == pytest.approx(whole["mIoU"]) and out["aAcc"] == pytest.approx(whole["aAcc"])
    ev.reset()
    with pytest.raises(ValueError, match="no labelled pixel"):
        ev.evaluate()


def test_evaluator_rejects_mismatched_sizes_and_bad_labels():
    ev = SemSegEvaluator(4)
    with pytest.raises(ValueError, match="differ in size"):
        ev.process((None, [LABEL]), [one_hot_logits(PRED[:, :2], 4)])
    with pytest.raises(ValueError, match="label values"):
        confusion_matrix(PRED, torch.full_like(LABEL, 7), 4)


def test_two_ranks_sum_their_confusion_matrices(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(Path(__file__).parent / "seg_dist_script.py"), str(tmp_path)]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    labels = torch.cat([LABEL.ravel(), torch.tensor([3, 3, 0, 255])])
    preds = torch.cat([PRED.ravel(), torch.tensor([3, 0, 0, 1])])
    whole = segmentation_metrics(confusion_matrix(preds, labels, 4))
    for rank in (0, 1):
        got = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert got["mIoU"] == pytest.approx(whole["mIoU"]) and got["aAcc"] == pytest.approx(whole["aAcc"])
