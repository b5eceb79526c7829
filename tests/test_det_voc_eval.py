"""VOC07 detection AP in both flavours against hand-computed cases (PROTOCOLS.md §6.3, §12)."""

from pathlib import Path

import numpy as np
import pytest

from densecl_bench.data.voc import DetectionRecord
from densecl_bench.detection.voc_eval import VOCDetectionEvaluator, box_iou_plus1, eleven_point_ap

CLASSES = ("a",)  # one class: d2 averages over every class, a class without GT counts 0


def gt(image_id: str, boxes, labels=None, difficult=None) -> DetectionRecord:
    boxes = np.array(boxes, np.float32).reshape(-1, 4)
    labels = np.zeros(len(boxes), np.int64) if labels is None else np.array(labels, np.int64)
    difficult = np.zeros(len(boxes), bool) if difficult is None else np.array(difficult, bool)
    return DetectionRecord(Path(f"{image_id}.jpg"), image_id, 100, 100, boxes, labels, difficult)


def box(i: int) -> list[float]:
    """The i-th of a row of disjoint 10x10 boxes (inclusive corners)."""
    return [20.0 * i, 0.0, 20.0 * i + 9, 9.0]


def evaluate(flavour: str, records, predictions, classes=CLASSES) -> dict:
    """predictions: image_id -> [(box as the XML would state it, score, class index)], in processing order.

    The d2 model predicts in its loader's coordinates (xmin, ymin one less than the XML), so the
    boxes handed to the d2 evaluator are shifted by -1; the evaluator shifts them back.
    """
    ev = VOCDetectionEvaluator(records, flavour, classes)
    shift = np.array([1.0, 1.0, 0.0, 0.0]) if flavour == "d2" else np.zeros(4)
    for image_id, dets in predictions.items():
        boxes = np.array([d[0] for d in dets], np.float64).reshape(-1, 4) - shift
        out = {"boxes": boxes, "scores": np.array([d[1] for d in dets]), "labels": np.array([d[2] + 1 for d in dets])}
        ev.process([{"image_id": image_id}], [out])
    return ev.evaluate()


BOTH = pytest.mark.parametrize("flavour", ["mmdet", "d2"])


def test_iou_counts_inclusive_pixels():
    # 10x10 and 20x10 boxes sharing 10x10 pixels: 100 / (100 + 200 - 100)
    assert box_iou_plus1(np.array([[0.0, 0, 9, 9]]), np.array([[0.0, 0, 19, 9]]))[0, 0] == 0.5
    assert box_iou_plus1(np.array([[0.0, 0, 9, 9]]), np.array([[10.0, 0, 19, 9]]))[0, 0] == 0.0


@BOTH
def test_eleven_point_ap_on_a_small_curve(flavour):
    # 4 GT; detections TP FP TP TP FP -> recall .25 .25 .5 .75 .75, precision 1 .5 2/3 .75 .6
    # best precision at recall >= t: 1 for t in 0, .1, .2; .75 for t in .3 .. .7; 0 for .8, .9, 1
    records = [gt("x", [box(0), box(1), box(2), box(3)])]
    dets = [(box(0), 0.9, 0), (box(5), 0.8, 0), (box(1), 0.7, 0), (box(2), 0.6, 0), (box(6), 0.5, 0)]
    res = evaluate(flavour, records, {"x": dets})
    assert res["per_class"]["a"] == pytest.approx(100 * (3 + 5 * 0.75) / 11)
    if flavour == "d2":  # exact boxes hit at every threshold up to 0.95
        assert [res["AP"], res["AP50"], res["AP75"]] == pytest.approx([100 * (3 + 5 * 0.75) / 11] * 3)
    else:
        assert set(res) == {"AP50", "per_class"}


def test_recall_thresholds_are_the_sources_floats():
    # 3 / 10 = 0.3 < 0.1 * 3 = 0.30000000000000004: recall 0.3 does not reach the "0.3" point
    recall = np.array([0.1, 0.2, 0.3, 0.3, 0.4])
    precision = np.array([1.0, 1.0, 1.0, 0.75, 0.8])
    assert eleven_point_ap(recall, precision) == pytest.approx((3 + 0.8 + 0.8) / 11)


@BOTH
def test_tied_scores_keep_the_processing_order(flavour):
    records = [gt("x", [box(0)]), gt("y", [box(0)])]
    fp_first = evaluate(flavour, records, {"x": [(box(3), 0.7, 0)], "y": [(box(0), 0.7, 0)]})
    tp_first = evaluate(flavour, records, {"y": [(box(0), 0.7, 0)], "x": [(box(3), 0.7, 0)]})
    # recall 0 then .5 at precision .5 vs recall .5 at precision 1; npos 2, so t > .5 reaches nothing
    assert fp_first["AP50"] == pytest.approx(100 * 6 * 0.5 / 11)
    assert tp_first["AP50"] == pytest.approx(100 * 6 / 11)


def test_d2_compares_scores_at_three_decimals():
    # mmdet sorts 0.9004 (FP) before 0.9001 (TP); d2 writes both as 0.900 and keeps the processing order
    records = [gt("x", [box(0)])]
    dets = {"x": [(box(0), 0.9001, 0), (box(3), 0.9004, 0)]}
    assert evaluate("mmdet", records, dets)["AP50"] == pytest.approx(50.0)
    assert evaluate("d2", records, dets)["AP50"] == pytest.approx(100.0)


@BOTH
def test_a_hit_on_a_difficult_box_is_neither_tp_nor_fp(flavour):
    # the difficult hit comes first (tp + fp = 0 there), then a TP: precision 1 at recall 1
    records = [gt("x", [box(0), box(1)], difficult=[False, True])]
    res = evaluate(flavour, records, {"x": [(box(1), 0.9, 0), (box(1), 0.85, 0), (box(0), 0.8, 0)]})
    assert res["AP50"] == pytest.approx(100.0)


@BOTH
def test_a_duplicate_detection_is_fp(flavour):
    # TP, duplicate of it, TP on the second box: recall .5 .5 1, precision 1 .5 2/3
    records = [gt("x", [box(0), box(1)])]
    dup = [box(0)[0] + 1, 0.0, box(0)[2] + 1, 9.0]
    res = evaluate(flavour, records, {"x": [(box(0), 0.9, 0), (dup, 0.8, 0), (box(1), 0.7, 0)]})
    assert res["AP50"] == pytest.approx(100 * (6 + 5 * 2 / 3) / 11)


def test_iou_exactly_half_is_a_hit_for_mmdet_only():
    records = [gt("x", [[0, 0, 9, 9]])]
    dets = {"x": [([0.0, 0.0, 19.0, 9.0], 0.9, 0)]}  # IoU 100 / 200
    assert evaluate("mmdet", records, dets)["AP50"] == pytest.approx(100.0)
    assert evaluate("d2", records, dets)["AP50"] == 0.0


def test_a_class_without_gt_counts_only_for_d2():
    records = [gt("x", [box(0)], labels=[0])]
    dets = {"x": [(box(0), 0.9, 0), (box(2), 0.8, 1)]}
    mmdet, d2 = (evaluate(f, records, dets, classes=("a", "b")) for f in ("mmdet", "d2"))
    assert mmdet["per_class"] == d2["per_class"] == {"a": 100.0, "b": 0.0}
    assert mmdet["AP50"] == pytest.approx(100.0)
    assert d2["AP50"] == pytest.approx(50.0)


@BOTH
def test_an_image_with_only_difficult_boxes(flavour):
    # x: the hit on its difficult box is ignored, its other detection is FP; y: one TP. npos = 1
    records = [gt("x", [box(0)], difficult=[True]), gt("y", [box(0)])]
    res = evaluate(flavour, records, {"x": [(box(0), 0.9, 0), (box(4), 0.85, 0)], "y": [(box(0), 0.8, 0)]})
    assert res["AP50"] == pytest.approx(50.0)


@BOTH
def test_images_without_detections_and_reset(flavour):
    records = [gt("x", [box(0)]), gt("y", [box(0)])]
    ev = VOCDetectionEvaluator(records, flavour, CLASSES)
    ev.process([{"image_id": "x"}], [{"boxes": np.zeros((0, 4)), "scores": np.zeros(0), "labels": np.zeros(0)}])
    assert ev.evaluate()["AP50"] == 0.0
    ev.reset()
    with pytest.raises(KeyError, match="'z'"):
        ev.process([{"image_id": "z"}], [{"boxes": np.zeros((0, 4)), "scores": np.zeros(0), "labels": np.zeros(0)}])


def test_d2_averages_ten_thresholds():
    # IoU of the detection with its box: 10*9 / (10*10) = 0.9 -> a hit at 0.50 .. 0.85, not at 0.90, 0.95
    records = [gt("x", [box(0)])]
    res = evaluate("d2", records, {"x": [([0.0, 0.0, 9.0, 8.0], 0.9, 0)]})
    assert res["AP50"] == res["AP75"] == 100.0
    assert res["AP"] == pytest.approx(80.0)


def test_unknown_flavour():
    with pytest.raises(ValueError, match="flavour 'coco'"):
        VOCDetectionEvaluator([], "coco")
