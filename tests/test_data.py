"""Dataset readers, the demo generator and `data check` (issue 2 parts 6 and 7).

The demo is generated once per session; readers are checked against it and against small hand-written
files whose expected values are written out here.
"""

from __future__ import annotations

import hashlib
import shutil
import threading
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils

from densecl_bench.data import demo
from densecl_bench.data.base import BadImageError, DataLayoutError, ImageList, ImageListDataset, collate_readable
from densecl_bench.data.coco import coco_instances
from densecl_bench.data.imagenet import imagenet
from densecl_bench.data.layout import check_data_root, dataset_dirs, format_report
from densecl_bench.data.places import places205
from densecl_bench.data.voc import VOC_CLASSES, voc07_classification, voc_detection, voc_segmentation


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return demo.ensure_demo(tmp_path_factory.mktemp("demo") / "data", seed=0)


@pytest.fixture(scope="session")
def dirs(demo_root: Path) -> dict[str, Path]:
    return dataset_dirs(demo_root)


def tree_digest(root: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file() and p.name != demo.MARKER):
        digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


# ------------------------------------------------------------------------------------------- VOC


def test_voc_classes_sorted() -> None:
    assert list(VOC_CLASSES) == sorted(VOC_CLASSES) and len(VOC_CLASSES) == 20


@pytest.mark.parametrize("module", ["densecl_bench.data.layout", "densecl_bench.data.voc"])
def test_voc_classes_have_one_home_and_no_import_circle(module: str, tmp_path: Path) -> None:
    """Each module imports first in a fresh interpreter, and checking a VOC folder never imports the reader."""
    import subprocess
    import sys

    (tmp_path / "VOCdevkit" / "VOC2007").mkdir(parents=True)
    code = f"""
import sys, {module}
from densecl_bench.data import layout
layout.check_data_root({str(tmp_path)!r})
assert ("densecl_bench.data.voc" in sys.modules) == {module.endswith("voc")}, "layout imported voc"
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    from densecl_bench.data import layout

    assert layout.VOC_CLASSES is VOC_CLASSES

def test_voc07_labels_match_annotations(dirs: dict[str, Path]) -> None:
    """Labels from the per-class files agree with the XML objects: 1 present, 0 absent, -1 difficult-only."""
    for split in ("trainval", "test"):
        images = voc07_classification(dirs["voc07"], split)
        assert images.labels.shape == (240, 20) and images.labels.dtype == np.int32
        ids = [p.stem for p in images.paths]
        assert ids == sorted(ids)
        records = {r.image_id: r for r in voc_detection(dirs["voc07"], split)}
        expected = np.zeros((240, 20), np.int32)
        for row, image_id in enumerate(ids):
            rec = records[image_id]
            for cls in range(20):
                flags = rec.difficult[rec.labels == cls]
                expected[row, cls] = 0 if len(flags) == 0 else -1 if flags.all() else 1
        np.testing.assert_array_equal(images.labels, expected)
        assert (images.labels == -1).any()
    trainval = voc07_classification(dirs["voc07"], "trainval")
    assert (trainval.labels == 1).sum(0).min() >= 8  # low-shot k up to 8 on the demo


def write_voc_main(voc_dir: Path, split: str, rows: dict[str, dict[str, int]]) -> None:
    """Per-class files in the VOC format: rows maps image id -> {class: VOC value}, absent classes -1."""
    main = voc_dir / "ImageSets" / "Main"
    main.mkdir(parents=True, exist_ok=True)
    for cls in VOC_CLASSES:
        (main / f"{cls}_{split}.txt").write_text("".join(f"{i} {rows[i].get(cls, -1):2d}\n" for i in rows))


def test_voc07_label_convention_by_hand(tmp_path: Path) -> None:
    write_voc_main(tmp_path, "test", {"000009": {"dog": 1, "cat": 0}, "000003": {"cat": 1}})
    images = voc07_classification(tmp_path, "test")
    assert [p.name for p in images.paths] == ["000003.jpg", "000009.jpg"]
    assert images.paths[0] == tmp_path / "JPEGImages" / "000003.jpg"
    cat, dog = VOC_CLASSES.index("cat"), VOC_CLASSES.index("dog")
    expected = np.zeros((2, 20), np.int32)
    expected[0, cat] = 1
    expected[1, dog] = 1
    expected[1, cat] = -1
    np.testing.assert_array_equal(images.labels, expected)


def test_voc07_bad_label_line_names_file(tmp_path: Path) -> None:
    write_voc_main(tmp_path, "test", {"000001": {}})
    (tmp_path / "ImageSets/Main/cow_test.txt").write_text("000001 2\n")
    with pytest.raises(DataLayoutError, match=r"cow_test\.txt:1"):
        voc07_classification(tmp_path, "test")


def test_voc_detection_boxes(dirs: dict[str, Path]) -> None:
    records = voc_detection(dirs["voc07"], "trainval")
    assert len(records) == 240
    difficult = 0
    for rec in records:
        b = rec.boxes
        assert b.dtype == np.float32 and rec.labels.dtype == np.int64 and len(b) == len(rec.labels) >= 1
        assert (b[:, 0] >= 1).all() and (b[:, 1] >= 1).all()
        assert (b[:, 2] <= rec.width).all() and (b[:, 3] <= rec.height).all()
        assert (b[:, 0] <= b[:, 2]).all() and (b[:, 1] <= b[:, 3]).all()
        assert Image.open(rec.image).size == (rec.width, rec.height)
        difficult += int(rec.difficult.sum())
    assert difficult > 0
    assert len(voc_detection(dirs["voc12aug"], "trainval")) == 150


def test_voc_detection_reads_xml_as_written(tmp_path: Path) -> None:
    (tmp_path / "ImageSets/Main").mkdir(parents=True)
    (tmp_path / "ImageSets/Main/test.txt").write_text("000042\n")
    (tmp_path / "Annotations").mkdir()
    (tmp_path / "Annotations/000042.xml").write_text(
        "<annotation><size><width>50</width><height>40</height><depth>3</depth></size>"
        "<object><name>horse</name><difficult>1</difficult>"
        "<bndbox><xmin>1</xmin><ymin>2</ymin><xmax>50</xmax><ymax>39.5</ymax></bndbox></object>"
        "<object><name>person</name><bndbox><xmin>3</xmin><ymin>4</ymin><xmax>5</xmax><ymax>6</ymax></bndbox>"
        "</object></annotation>"
    )
    (rec,) = voc_detection(tmp_path, "test")
    assert (rec.width, rec.height, rec.image) == (50, 40, tmp_path / "JPEGImages/000042.jpg")
    np.testing.assert_array_equal(rec.boxes, [[1, 2, 50, 39.5], [3, 4, 5, 6]])
    assert rec.labels.tolist() == [VOC_CLASSES.index("horse"), VOC_CLASSES.index("person")]
    assert rec.difficult.tolist() == [True, False]
    (tmp_path / "Annotations/000042.xml").write_text("<annotation><size>")
    with pytest.raises(DataLayoutError, match=r"malformed annotation .*000042\.xml"):
        voc_detection(tmp_path, "test")


def test_voc_segmentation_masks(dirs: dict[str, Path]) -> None:
    voc12 = dirs["voc12aug"]
    train = voc_segmentation(voc12, "train")
    train_aug = voc_segmentation(voc12, "train", aug_dir=voc12)
    assert len(train) == 60 and len(train_aug) == 120 and train_aug[:60] == train  # train then aug, as mmseg
    assert all(m.parent.name == "SegmentationClassAug" for _, m in train_aug[60:])
    assert len(voc_segmentation(voc12, "val", aug_dir=voc12)) == 30  # aug extends train only
    assert len(voc_segmentation(dirs["voc07"], "trainval")) == 20
    seen = set()
    for image, mask_path in train_aug[::6] + voc_segmentation(voc12, "val")[::6]:
        mask = Image.open(mask_path)
        assert mask.mode == ("L" if mask_path.parent.name == "SegmentationClassAug" else "P")
        assert mask.size == Image.open(image).size
        values = set(np.unique(np.asarray(mask)).tolist())
        assert values <= set(range(21)) | {255}
        seen |= values
        rec = ET.parse(voc12 / "Annotations" / f"{image.stem}.xml").getroot()
        named = {VOC_CLASSES.index(o.findtext("name")) + 1 for o in rec.iter("object")}
        assert values - {0, 255} <= named  # mask classes are the annotated ones
    assert 255 in seen and 0 in seen and len(seen) > 5


# ------------------------------------------------------------------------------------------- COCO


def test_coco_instances(dirs: dict[str, Path]) -> None:
    train, val = coco_instances(dirs["coco2017"], "train2017"), coco_instances(dirs["coco2017"], "val2017")
    assert (len(train), len(val)) == (40, 20)
    assert train.category_ids == list(demo.COCO_CATEGORY_IDS) and len(train.classes) == 8
    assert train.label_to_cat[4] == 8 and train.cat_to_label[34] == 7
    assert not set(train.image_ids) & set(val.image_ids)
    for index in range(len(val)):
        item = val[index]
        assert item.path.is_file() and Image.open(item.path).size == (item.width, item.height)
        assert len(item.boxes) >= 1 and not item.iscrowd.any()
        np.testing.assert_array_equal(item.labels, [val.cat_to_label[int(c)] for c in item.category_ids])
        x, y, w, h = item.boxes.T
        assert (x >= 0).all() and (y >= 0).all() and (x + w <= item.width).all() and (y + h <= item.height).all()
        for box, seg, area in zip(item.boxes, item.segmentations, item.areas):
            rle = mask_utils.merge(mask_utils.frPyObjects(seg, item.height, item.width))
            assert float(mask_utils.area(rle)) == area > 0
            poly = np.array(seg[0]).reshape(-1, 2)
            np.testing.assert_allclose(box, [*poly.min(0), *(poly.max(0) - poly.min(0))], atol=0.011)
            np.testing.assert_allclose(mask_utils.toBbox(rle), box, atol=2.0)  # pixel centres vs polygon extent


# ------------------------------------------------------------------------------------------- ImageNet / Places


def test_imagenet_folders_and_meta_agree(dirs: dict[str, Path], tmp_path: Path) -> None:
    bare = tmp_path / "imagenet"
    bare.mkdir()
    for split in ("train", "val"):
        (bare / split).symlink_to(dirs["imagenet"] / split)
        with_meta, folders = imagenet(dirs["imagenet"], split), imagenet(bare, split)
        assert len(folders) == {"train": 400, "val": 100}[split]
        assert folders.classes == with_meta.classes == [f"n{k:08d}" for k in range(1, 11)]
        assert sorted(zip(map(str, with_meta.paths), with_meta.labels.tolist())) == sorted(
            zip((str(p).replace(str(bare), str(dirs["imagenet"])) for p in folders.paths), folders.labels.tolist())
        )
        assert np.bincount(folders.labels).tolist() == [len(folders) // 10] * 10
        assert all(p.parent.name == folders.classes[label] for p, label in zip(folders.paths, folders.labels))


def test_places205_demo(dirs: dict[str, Path]) -> None:
    train, val = places205(dirs["places205"], "train"), places205(dirs["places205"], "val")
    assert (len(train), len(val)) == (240, 80)
    assert train.classes[:2] == ["b/bamboo_forest", "b/beach"] and len(train.classes) == 8
    assert all(p.is_file() for p in train.paths[::17])
    assert all(p.parent.relative_to(p.parents[2]).as_posix() == train.classes[label]
               for p, label in zip(train.paths, train.labels))


def test_places205_splits_on_last_space(tmp_path: Path) -> None:
    (tmp_path / "data/vision/torralba/deeplearning/images256").mkdir(parents=True)
    (tmp_path / "trainvalsplit_places205").mkdir()
    (tmp_path / "trainvalsplit_places205/val_places205.csv").write_text(
        "a/abbey/my photo 1.jpg 0\n\nb/beach/x.jpg 2\r\n"
    )
    images = places205(tmp_path, "val")
    base = tmp_path / "data/vision/torralba/deeplearning/images256"
    assert images.paths == [base / "a/abbey/my photo 1.jpg", base / "b/beach/x.jpg"]
    assert images.labels.tolist() == [0, 2] and images.labels.dtype == np.int64
    assert images.classes == ["0", "1", "2"]  # no category list: label numbers, indexable by label
    (tmp_path / "trainvalsplit_places205/val_places205.csv").write_text("no-label-here\n")
    with pytest.raises(DataLayoutError, match=r"val_places205\.csv:1"):
        places205(tmp_path, "val")


# ------------------------------------------------------------------------------------------- broken layouts


@pytest.fixture()
def broken_root(demo_root: Path, tmp_path: Path) -> Path:
    """A copy of the demo without its images (index files only), which tests then damage."""
    root = tmp_path / "data"
    shutil.copytree(demo_root, root, ignore=shutil.ignore_patterns("*.jpg", "*.JPEG", "*.png"))
    return root


def test_broken_layouts_name_the_missing_file(broken_root: Path) -> None:
    d = dataset_dirs(broken_root)
    (d["voc07"] / "ImageSets/Main/dog_test.txt").unlink()
    with pytest.raises(DataLayoutError, match=r"missing file .*ImageSets/Main/dog_test\.txt") as err:
        voc07_classification(d["voc07"], "test")
    assert "expected layout for voc07" in str(err.value)
    (d["voc07"] / "Annotations/000004.xml").unlink()
    with pytest.raises(DataLayoutError, match=r"missing file .*Annotations/000004\.xml"):
        voc_detection(d["voc07"], "test")
    shutil.rmtree(d["voc12aug"] / "SegmentationClassAug")
    with pytest.raises(DataLayoutError, match=r"missing folder .*VOC2012/SegmentationClassAug"):
        voc_segmentation(d["voc12aug"], "train", aug_dir=d["voc12aug"])
    (d["coco2017"] / "annotations/instances_val2017.json").unlink()
    with pytest.raises(DataLayoutError, match=r"missing file .*instances_val2017\.json"):
        coco_instances(d["coco2017"], "val2017")
    (d["coco2017"] / "annotations/instances_train2017.json").write_text("{not json")
    with pytest.raises(DataLayoutError, match=r"malformed annotation file .*instances_train2017\.json"):
        coco_instances(d["coco2017"], "train2017")
    with pytest.raises(DataLayoutError, match=r"missing folder .*imagenet/test"):
        imagenet(d["imagenet"], "test")
    (d["places205"] / "trainvalsplit_places205/train_places205.csv").unlink()
    with pytest.raises(DataLayoutError, match=r"missing file .*train_places205\.csv"):
        places205(d["places205"], "train")


def test_check_data_root(demo_root: Path, broken_root: Path, tmp_path: Path) -> None:
    assert all(s.ok for s in check_data_root(demo_root)), format_report(check_data_root(demo_root))
    d = dataset_dirs(broken_root)
    (d["voc07"] / "ImageSets/Main/test.txt").unlink()
    (d["coco2017"] / "annotations/instances_val2017.json").unlink()
    shutil.rmtree(d["places205"])
    statuses = {s.name: s for s in check_data_root(broken_root)}
    assert not statuses["voc07"].ok and any("ImageSets/Main/test.txt" in p for p in statuses["voc07"].problems)
    # images were not copied: every listed id is reported without its JPEG
    assert any("have no" in p and "JPEGImages" in p for p in statuses["voc07"].problems)
    assert any("instances_val2017.json" in p for p in statuses["coco2017"].problems)
    assert statuses["places205"].problems == [f"missing folder {d['places205']}"]
    report = format_report(list(statuses.values()))
    assert "[MISSING] places205" in report and "trainvalsplit_places205" in report
    assert [s.name for s in check_data_root(tmp_path / "nothing")] == list(dataset_dirs(tmp_path))


# ------------------------------------------------------------------------------------------- bad images


def test_bad_image_raise_and_skip(tmp_path: Path) -> None:
    good, corrupt, missing = tmp_path / "good.jpg", tmp_path / "corrupt.jpg", tmp_path / "missing.jpg"
    Image.new("RGB", (8, 8), (255, 0, 0)).save(good)
    corrupt.write_bytes(b"not a jpeg")
    images = ImageList("t", tmp_path, [good, corrupt, missing], np.zeros(3, np.int64), ["x"])
    def to_array(img: Image.Image) -> torch.Tensor:
        return torch.as_tensor(np.asarray(img.resize((4, 4)), np.float32))

    strict = ImageListDataset(images, to_array, on_bad_image="raise")
    assert strict[0][2] is True
    for index, path in ((1, corrupt), (2, missing)):
        with pytest.raises(BadImageError, match=str(path)):
            strict[index]
    lenient = ImageListDataset(images, to_array, on_bad_image="skip")
    results = [lenient[i] for i in range(3)]
    assert [ok for _, _, ok in results] == [True, False, False]
    assert results[1][0].shape == results[0][0].shape
    # collated, the placeholders are gone: only the readable image and the skipped indices remain
    batch, index, skipped = collate_readable(results)
    assert torch.equal(batch, results[0][0][None]) and index.tolist() == [0] and skipped.tolist() == [1, 2]
    empty, index, skipped = collate_readable(results[1:])
    assert empty.shape == (0, *results[0][0].shape) and index.tolist() == [] and skipped.tolist() == [1, 2]
    with pytest.raises(ValueError, match="on_bad_image"):
        ImageListDataset(images, to_array, on_bad_image="ignore")


# ------------------------------------------------------------------------------------------- demo writing


def test_demo_is_deterministic(demo_root: Path, tmp_path: Path) -> None:
    demo.write_demo(tmp_path / "again", seed=0, progress=False)
    assert tree_digest(tmp_path / "again") == tree_digest(demo_root)


def fake_writer(calls: list[int], fail: bool = False, delay: float = 0.0) -> Callable[[Path, int], None]:
    """Stands in for write_demo so that ensure_demo's bookkeeping is tested without drawing anything."""

    def write(root: Path, seed: int) -> None:
        calls.append(seed)
        (Path(root) / "a.txt").write_text(f"seed {seed}")
        threading.Event().wait(delay)
        if fail:
            raise KeyboardInterrupt

    return write


def test_ensure_demo_writes_once_and_replaces_only_demos(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    monkeypatch.setattr(demo, "write_demo", fake_writer(calls, fail=True))
    with pytest.raises(KeyboardInterrupt):
        demo.ensure_demo(tmp_path / "d", seed=1)
    assert list(tmp_path.iterdir()) == []  # an interrupted write leaves nothing behind
    monkeypatch.setattr(demo, "write_demo", fake_writer(calls))
    root = demo.ensure_demo(tmp_path / "d", seed=1)
    assert demo.ensure_demo(tmp_path / "d", seed=1) == root and calls == [1, 1]  # second call: no write
    assert (root / demo.MARKER).read_text().startswith(demo.DEMO_VERSION)
    demo.ensure_demo(root, seed=2)  # another seed replaces the old demo
    assert (root / "a.txt").read_text() == "seed 2" and calls == [1, 1, 2]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "precious.txt").write_text("keep")
    with pytest.raises(FileExistsError, match="not a densecl-bench demo"):
        demo.ensure_demo(tmp_path / "mine")
    assert (tmp_path / "mine" / "precious.txt").read_text() == "keep" and calls == [1, 1, 2]


def test_ensure_demo_concurrent(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    monkeypatch.setattr(demo, "write_demo", fake_writer(calls, delay=0.2))
    results: list[Path] = []
    threads = [threading.Thread(target=lambda: results.append(demo.ensure_demo(tmp_path / "d"))) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [tmp_path / "d"] * 3
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == [demo.MARKER, "a.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]
