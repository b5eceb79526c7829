"""VOC12+aug readers and mmseg 0.x's train / eval pipelines (PROTOCOLS.md §8), on tiny self-written folders."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from densecl_bench.engine import SeededDataset
from densecl_bench.segmentation import data as seg
from densecl_bench.segmentation.data import (
    MEAN, STD, PhotoMetricDistortion, SegmentationEvalSet, SegmentationTrainSet, TrainPipeline, hsv8_to_rgb,
    load_label, random_crop, rescale_size, rgb_to_hsv8, voc12aug_pairs,
)


def write_voc12(root: Path, lists: dict[str, list[str]], size=(40, 30)) -> Path:
    """A tiny VOC2012 folder: train/val masks as palette PNGs, aug masks greyscale; class = image number % 21."""
    voc = root / "VOC2012"
    (voc / "ImageSets" / "Segmentation").mkdir(parents=True)
    for folder in ("JPEGImages", "SegmentationClass", "SegmentationClassAug"):
        (voc / folder).mkdir()
    rng = np.random.default_rng(0)
    for split, ids in lists.items():
        (voc / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("".join(f"{i}\n" for i in ids))
        for i in ids:
            Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(voc / "JPEGImages" / f"{i}.jpg")
            mask = np.zeros((size[1], size[0]), np.uint8)
            mask[:, size[0] // 2 :] = int(i[-2:]) % 21
            mask[0, :] = 255
            img = Image.fromarray(mask, "L")
            if split == "aug":
                img.save(voc / "SegmentationClassAug" / f"{i}.png")
            else:
                pal = img.convert("P")
                pal.putpalette([c for k in range(256) for c in (k, 255 - k, (7 * k) % 256)])
                pal.save(voc / "SegmentationClass" / f"{i}.png")
    return voc


def test_pairs_read_palette_and_grey_masks_as_indices_independent_of_list_order(tmp_path):
    a = write_voc12(tmp_path / "a", {"train": ["2012_000003", "2012_000001"], "aug": ["2012_000007", "2012_000005"],
                                     "val": ["2012_000009"]})
    b = write_voc12(tmp_path / "b", {"train": ["2012_000001", "2012_000003"], "aug": ["2012_000005", "2012_000007"],
                                     "val": ["2012_000009"]})
    pa, pb = voc12aug_pairs(a, "train"), voc12aug_pairs(b, "train")
    assert [(p.name, m.parent.name) for p, m in pa] == [(p.name, m.parent.name) for p, m in pb]
    assert len(pa) == 4 and len(voc12aug_pairs(a, "val")) == 1
    by_name = {p.stem: load_label(m) for p, m in pa}
    assert by_name["2012_000003"][5, 30] == 3 and by_name["2012_000007"][5, 30] == 7  # palette and greyscale
    assert by_name["2012_000003"][0, 0] == 255


def test_rescale_size_is_mmcv_imrescale():
    assert rescale_size(500, 375, (2048, 512)) == (683, 512)  # short edge bound: 512 / 375
    assert rescale_size(2000, 300, (2048, 512)) == (2048, 307)  # long edge bound: 2048 / 2000


def test_crop_keeps_a_crop_with_no_dominant_class():
    label = np.zeros((40, 40), np.uint8)
    label[:, 20:] = 1
    for seed in range(20):
        torch.manual_seed(seed)
        _, crop = random_crop(np.zeros((40, 40, 3), np.uint8), label, 20, 0.75)
        counts = np.bincount(crop.ravel())
        assert crop.shape == (20, 20) and counts.max() / counts.sum() < 0.75


def test_crop_retries_ten_times_then_keeps_the_eleventh_draw():
    draws = iter([(i, i) for i in range(11)])
    calls = []

    def draw(h, w, size):
        calls.append(1)
        return next(draws)

    label = np.full((40, 40), 4, np.uint8)  # one class everywhere: every check fails
    image, crop = random_crop(np.arange(40 * 40 * 3, dtype=np.int32).reshape(40, 40, 3), label, 8, 0.75, draw)
    assert len(calls) == 11 and image[0, 0, 0] == (10 * 40 + 10) * 3
    calls.clear()
    draws = iter([(0, 0)])
    random_crop(np.zeros((40, 40, 3)), label, 8, 1.0, draw)  # cat_max_ratio 1: no check
    assert len(calls) == 1


def test_hsv8_matches_opencv_convention_and_round_trips():
    rgb = np.array([[[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 0], [128, 128, 128], [0, 0, 0]]], np.uint8)
    hsv = rgb_to_hsv8(rgb)
    assert hsv[0, :, 0].tolist() == [0, 60, 120, 30, 0, 0]  # degrees / 2
    assert hsv[0, :, 1].tolist() == [255, 255, 255, 255, 0, 0]
    assert hsv[0, :, 2].tolist() == [255, 255, 255, 255, 128, 0]
    assert np.array_equal(hsv8_to_rgb(hsv), rgb)
    shifted = hsv.copy()
    shifted[..., 0] = (shifted[..., 0].astype(int) + 30) % 180
    assert hsv8_to_rgb(shifted)[0, 0].tolist() == [255, 255, 0]  # red + 60 degrees = yellow


def test_photometric_order_and_steps(monkeypatch):
    """All coins 1 with mode 0 -> brightness, saturation, hue, contrast last; the values are the drawn ones."""
    coins = iter([1, 0, 1, 1, 5, 1])  # brightness, mode=0, saturation, hue, hue delta 5, contrast
    uniforms = iter([10.0, 1.0, 1.0])  # brightness +10, saturation x1, contrast x1
    monkeypatch.setattr(seg, "_randint", lambda lo, hi: next(coins))
    monkeypatch.setattr(seg, "_uniform", lambda lo, hi: next(uniforms))
    img = np.full((2, 2, 3), 100, np.uint8)
    img[..., 0] = 200
    out = PhotoMetricDistortion()(img)
    hsv = rgb_to_hsv8(np.clip(img.astype(int) + 10, 0, 255).astype(np.uint8))
    hsv[..., 0] = (hsv[..., 0].astype(int) + 5) % 180
    assert np.array_equal(out, hsv8_to_rgb(hsv))


def test_train_pipeline_pads_normalises_and_is_seeded_per_sample(tmp_path):
    voc = write_voc12(tmp_path, {"train": ["2012_000001"], "aug": ["2012_000002"], "val": []}, size=(24, 16))
    pipeline = TrainPipeline(crop_size=32, scale=(64, 16), ratio_range=(1.0, 1.0), photometric=None)
    data = SeededDataset(SegmentationTrainSet(voc12aug_pairs(voc, "train"), pipeline), seed=1)
    x, y = data[0]
    assert x.shape == (3, 32, 32) and y.shape == (32, 32)
    # scale (64, 16) keeps 24 x 16 as is; the crop covers it; padding below and to the right
    assert torch.all(x[:, 16:] == 0) and torch.all(y[16:] == 255) and torch.all(y[:, 24:] == 255)
    assert torch.all(y[1:16, :24] != 255)
    raw = np.array(Image.open(voc / "JPEGImages" / "2012_000001.jpg").convert("RGB")).astype(np.float32)
    flipped = bool(y[5, 0] != 0)  # the left half is background unless flipped
    raw = raw[:, ::-1] if flipped else raw
    expected = (torch.from_numpy(raw.copy()).permute(2, 0, 1) - torch.tensor(MEAN)[:, None, None]) / torch.tensor(STD)[:, None, None]
    assert torch.allclose(x[:, :16, :24], expected, atol=1e-5)
    x2, y2 = data[0]
    assert torch.equal(x, x2) and torch.equal(y, y2)


def test_eval_set_resizes_the_image_and_keeps_the_label(tmp_path):
    voc = write_voc12(tmp_path, {"train": [], "aug": [], "val": ["2012_000004"]}, size=(40, 30))
    x, y = SegmentationEvalSet(voc12aug_pairs(voc, "val"), scale=(80, 20))[0]
    assert x.shape == (3, 20, 27) and y.shape == (30, 40)  # factor min(80 / 40, 20 / 30)
    Image.new("RGB", (2, 2)).save(tmp_path / "bad.png")
    with pytest.raises(Exception, match="(?s)masks are palette or greyscale.*layout for voc12aug"):
        load_label(tmp_path / "bad.png")
    with pytest.raises(Exception, match="(?s)masks are palette or greyscale.*layout for cityscapes"):
        SegmentationEvalSet([(tmp_path / "bad.png", tmp_path / "bad.png")], scale=(80, 20), dataset="cityscapes")[0]
