"""VOC07+12 detection data for the C4 benchmark: flavour boxes, multi-scale resize, flip, seeding, grouping."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DistributedSampler

from densecl_bench.data.voc import DetectionRecord
from densecl_bench.detection.data import (
    TRAIN_SIZES,
    AspectRatioGroupedSampler,
    DetectionTestSet,
    DetectionTrainSet,
    collate,
    resized_shape,
    to_original,
    training_boxes,
    voc0712,
)
from densecl_bench.engine import EpochLoader, SeededDataset


def record(image: Path, boxes, labels, difficult, image_id="a", size=(40, 60)) -> DetectionRecord:
    return DetectionRecord(image, image_id, size[1], size[0], np.array(boxes, np.float32).reshape(-1, 4),
                           np.array(labels, np.int64), np.array(difficult, bool))


def test_flavour_boxes_and_counts():
    r = record(Path("a.jpg"), [[10, 10, 20, 30], [1, 1, 9, 9], [5, 5, 5, 12]], [3, 4, 5], [False, True, False])
    only_difficult = record(Path("b.jpg"), [[2, 2, 8, 8]], [0], [True], image_id="b")
    no_objects = record(Path("c.jpg"), [], [], [], image_id="c")
    mmdet = training_boxes([r, only_difficult, no_objects], "mmdet")
    # mmdet: XML coordinates, difficult out, the zero-width box (x2 == x1) out
    assert [x.image_id for x in mmdet.records] == ["a", "b"]
    assert mmdet.records[0].boxes.tolist() == [[10, 10, 20, 30]] and mmdet.records[0].labels.tolist() == [3]
    assert mmdet.counts() == {"difficult_dropped": 2, "degenerate_dropped": 1, "images_without_objects": 1,
                              "background_images": 1}
    d2 = training_boxes([r, only_difficult, no_objects], "d2")
    # d2: difficult kept, xmin / ymin - 1, so the one-pixel-wide box has width 1
    assert d2.records[0].boxes.tolist() == [[9, 9, 20, 30], [0, 0, 9, 9], [4, 4, 5, 12]]
    assert d2.records[1].boxes.tolist() == [[1, 1, 8, 8]]
    assert d2.counts() == {"difficult_dropped": 0, "degenerate_dropped": 0, "images_without_objects": 1,
                           "background_images": 0}
    with pytest.raises(ValueError, match="flavour 'coco'"):
        training_boxes([r], "coco")


def test_resized_shape():
    assert TRAIN_SIZES == (480, 512, 544, 576, 608, 640, 672, 704, 736, 768, 800)
    assert resized_shape(375, 500, 480, 1333) == (480, 640)
    assert resized_shape(500, 375, 800, 1333) == (1067, 800)  # 1066.67 rounds up
    assert resized_shape(100, 1000, 800, 1333) == (133, 1333)  # the long side caps the scale


@pytest.fixture()
def image(tmp_path: Path) -> Path:
    path = tmp_path / "a.jpg"
    pixels = np.zeros((40, 60, 3), np.uint8)
    pixels[:, :30] = 200  # left half bright
    Image.fromarray(pixels).save(path, quality=95)
    return path


def test_train_sample_resize_and_flip(image: Path):
    r = record(image, [[6, 4, 30, 20]], [7], [False])
    flipped = DetectionTrainSet([r], sizes=(80,), max_size=1333, flip_prob=1.0)
    img, target = flipped[0]
    assert img.shape == (3, 80, 120) and img.dtype == torch.float32
    # x2 boxes: [12, 8, 60, 40], flipped in a 120-wide image: x' = 120 - x
    assert target["boxes"].tolist() == [[60, 8, 108, 40]]
    assert target["labels"].tolist() == [8] and target["image_id"] == "a"
    assert img[0, :, :50].mean() < 20 and img[0, :, 70:].mean() > 180  # the bright half moved right
    plain = DetectionTrainSet([r], sizes=None, flip_prob=0.0)
    img, target = plain[0]
    assert img.shape == (3, 40, 60) and target["boxes"].tolist() == [[6, 4, 30, 20]]


def test_train_draws_are_seeded_per_sample(image: Path):
    r = record(image, [[6, 4, 30, 20]], [7], [False])
    data = SeededDataset(DetectionTrainSet([r] * 4, sizes=(40, 48, 56, 64)), seed=3)
    first = [tuple(data[i][0].shape) + (data[i][1]["boxes"][0, 0].item(),) for i in range(4)]
    again = [tuple(data[i][0].shape) + (data[i][1]["boxes"][0, 0].item(),) for i in range(4)]
    assert first == again
    data.set_epoch(1)
    assert [tuple(data[i][0].shape) + (data[i][1]["boxes"][0, 0].item(),) for i in range(4)] != first


def test_test_sample_and_scaling_back(image: Path):
    r = record(image, [[6, 4, 30, 20]], [7], [False])
    img, target = DetectionTestSet([(r.image, r.image_id)], size=80)[0]
    assert img.shape == (3, 80, 120) and target == {"image_id": "a", "orig_size": (40, 60)}
    out = to_original([{"boxes": torch.tensor([[12.0, 8, 60, 40]]), "scores": torch.tensor([0.9])}], [img], [target])
    assert out[0]["boxes"].tolist() == [[6, 4, 30, 20]] and out[0]["scores"].tolist() == [pytest.approx(0.9)]


def write_voc(root: Path, year: str, split: str, ids: list[str]) -> None:
    """A VOCdevkit/VOC<year> with `ids` in ImageSets/Main/<split>.txt: 80x64 images, one dog box each
    (a bright rectangle at the XML's corners 5..30 x 6..20) and one difficult cat box."""
    voc = root / "VOCdevkit" / f"VOC{year}"
    for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (voc / sub).mkdir(parents=True, exist_ok=True)
    with open(voc / "ImageSets" / "Main" / f"{split}.txt", "a") as f:
        f.writelines(f"{i}\n" for i in ids)
    pixels = np.full((64, 80, 3), 30, np.uint8)
    pixels[6:21, 5:31] = (230, 180, 40)
    for i in ids:
        Image.fromarray(pixels).save(voc / "JPEGImages" / f"{i}.jpg", quality=95)
        objects = "".join(
            f"<object><name>{name}</name><difficult>{difficult}</difficult><bndbox><xmin>{x1}</xmin>"
            f"<ymin>{y1}</ymin><xmax>{x2}</xmax><ymax>{y2}</ymax></bndbox></object>"
            for name, difficult, (x1, y1, x2, y2) in (("dog", 0, (5, 6, 30, 20)), ("cat", 1, (50, 40, 70, 60))))
        (voc / "Annotations" / f"{i}.xml").write_text(
            f"<annotation><size><width>80</width><height>64</height></size>{objects}</annotation>")


def test_voc0712_reads_both_trainvals_and_the_07_test(tmp_path: Path):
    write_voc(tmp_path, "2007", "trainval", ["000001"])
    write_voc(tmp_path, "2007", "test", ["000002", "000003"])
    write_voc(tmp_path, "2012", "trainval", ["2012_000001"])
    train, test = voc0712(tmp_path)
    assert [r.image_id for r in train] == ["000001", "2012_000001"]
    assert [r.image_id for r in test] == ["000002", "000003"]
    assert train[1].boxes.tolist() == [[5, 6, 30, 20], [50, 40, 70, 60]] and train[1].labels.tolist() == [11, 7]
    assert train[1].difficult.tolist() == [False, True]


def test_training_batches_resume_mid_epoch(image: Path):
    # the trainer resumes at batch i of epoch e: the same images with the same draws as the uninterrupted run
    records = [record(image, [[6, 4, 30, 20]], [7], [False], image_id=str(i)) for i in range(6)]
    data = SeededDataset(DetectionTrainSet(records, sizes=(40, 48, 56, 64)), seed=5)
    loader = EpochLoader(data, DistributedSampler(data, 1, 0, shuffle=True, seed=5), 2, drop_last=True,
                         collate_fn=collate)

    def summary(batches):
        return [[(t["image_id"], tuple(im.shape), t["boxes"].tolist()) for im, t in zip(*b)] for b in batches]

    full = summary(loader.epoch(1))
    assert len(full) == 3
    assert summary(loader.epoch(1, start=1)) == full[1:]
    assert summary(loader.epoch(0)) != full


def test_aspect_ratio_groups_make_whole_batches_per_rank():
    wide = [i % 3 != 0 for i in range(23)]  # 15 wide, 8 tall
    ranks = [AspectRatioGroupedSampler(wide, 2, world=2, rank=r, seed=4) for r in range(2)]
    # floor(15 / 2) + floor(8 / 2) = 11 batches, 5 per rank
    assert [len(s) for s in ranks] == [10, 10]
    orders = [list(s) for s in ranks]
    assert not set(orders[0]) & set(orders[1])
    for order in orders:
        assert all(wide[a] == wide[b] for a, b in zip(order[::2], order[1::2]))
    assert list(ranks[0]) == orders[0]  # a function of (seed, epoch)
    ranks[0].set_epoch(1)
    assert list(ranks[0]) != orders[0]
    # the loader resumes at batch i of the grouped order
    image_free = [record(Path("x.jpg"), [], [], [], image_id=str(i)) for i in range(23)]
    loader = EpochLoader(image_free, AspectRatioGroupedSampler(wide, 2, seed=4), 2, drop_last=True,
                         collate_fn=lambda b: [r.image_id for r in b])
    full = list(loader.epoch(0))
    assert len(full) == len(loader) == 11 and list(loader.epoch(0, start=3)) == full[3:]
