"""Segmentation data (VOC12+aug, Cityscapes) and mmseg 0.x's pipelines (PROTOCOLS.md §8, §13).

Train: VOC2012 `train.txt` (SegmentationClass, palette PNGs read as indices) + `aug.txt`
(SegmentationClassAug, greyscale PNGs); val: `val.txt`. The pairs are sorted, so the run does not
depend on the order of the list files (the published `aug.txt` comes from a Python set).

Cityscapes: gtFine train / val with the trainIds maps (`data/cityscapes.py`).

Train pipeline, in mmseg's order: Resize to `scale` x ratio in [0.5, 2.0] keeping the aspect
(mmcv `imrescale`: the largest factor that fits the long edge into scale[0] and the short edge into
scale[1]), RandomCrop with cat_max_ratio, RandomFlip, PhotoMetricDistortion, Normalize, Pad to the
crop size (image 0, label 255). Each random draw uses torch's RNG, which `engine.SeededDataset`
seeds per sample. OpenCV is not a dependency: resizing is torch's (bilinear, align_corners=False
for images, the floor-index nearest rule of cv2.INTER_NEAREST for labels), HSV is OpenCV's 8-bit
convention (H in [0, 180)) computed in numpy; both differ from OpenCV by at most rounding.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

from densecl_bench.data.base import load_rgb
from densecl_bench.data.cityscapes import CLASSES as CITYSCAPES_CLASSES
from densecl_bench.data.cityscapes import cityscapes_pairs
from densecl_bench.data.layout import VOC_CLASSES, layout_error
from densecl_bench.data.voc import voc_segmentation

CLASSES = ("background", *VOC_CLASSES)
IGNORE_INDEX = 255
MEAN = (123.675, 116.28, 103.53)  # RGB, 0..255
STD = (58.395, 57.12, 57.375)


@dataclass(frozen=True)
class SegDataset:
    """One benchmark's data: sorted (image, label) pairs per split and the class names in label order."""

    name: str
    train: list[tuple[Path, Path]]
    val: list[tuple[Path, Path]]
    classes: tuple[str, ...]


def voc12aug_dataset(voc_dir: str | Path) -> SegDataset:
    """VOC2012 train + aug / val, 21 classes (background first)."""
    return SegDataset("voc12aug", voc12aug_pairs(voc_dir, "train"), voc12aug_pairs(voc_dir, "val"), CLASSES)


def cityscapes_dataset(root: str | Path) -> SegDataset:
    """Cityscapes gtFine train / val (leftImg8bit + *_gtFine_labelTrainIds.png), 19 classes."""
    return SegDataset("cityscapes", cityscapes_pairs(root, "train"), cityscapes_pairs(root, "val"), CITYSCAPES_CLASSES)


def voc12aug_pairs(voc_dir: str | Path, split: str) -> list[tuple[Path, Path]]:
    """(image, mask) pairs: train = train.txt + aug.txt (duplicates kept, as mmseg's concatenation), val = val.txt;
    sorted, so the list files' order does not matter."""
    voc_dir = Path(voc_dir)
    return sorted(voc_segmentation(voc_dir, split, aug_dir=voc_dir if split == "train" else None))


def load_label(path: Path, dataset: str = "voc12aug") -> np.ndarray:
    """A mask PNG as class indices (uint8): palette ('P') and greyscale ('L') images carry them as pixel values.
    `dataset` names the layout the error shows."""
    with Image.open(path) as img:
        if img.mode not in ("P", "L"):
            raise layout_error(dataset, f"{path} is a {img.mode} image; masks are palette or greyscale PNGs")
        return np.array(img)


# ------------------------------------------------------------------------------------------ geometry


def rescale_size(width: int, height: int, scale: tuple[int, int]) -> tuple[int, int]:
    """mmcv `imrescale` with keep_ratio: (w, h) scaled by min(long_max / long, short_max / short), rounded half up."""
    factor = min(max(scale) / max(width, height), min(scale) / min(width, height))
    return int(width * factor + 0.5), int(height * factor + 0.5)


def resize_pair(image: np.ndarray, label: np.ndarray | None,
                size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray | None]:
    """Resize an H x W x 3 uint8 image (bilinear) and its H x W label (nearest) to size = (w, h)."""
    w, h = size
    x = torch.from_numpy(image).permute(2, 0, 1)[None].float()
    x = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False)
    image = x[0].permute(1, 2, 0).round_().clamp_(0, 255).to(torch.uint8).numpy()
    if label is not None:
        y = F.interpolate(torch.from_numpy(label)[None, None].float(), size=(h, w), mode="nearest")
        label = y[0, 0].to(torch.uint8).numpy()
    return image, label


def _uniform(low: float, high: float) -> float:
    return low + (high - low) * float(torch.rand(()))


def _randint(low: int, high: int) -> int:
    """An integer in [low, high), as numpy's randint."""
    return int(torch.randint(low, high, ()))


def crop_box(height: int, width: int, size: int) -> tuple[int, int]:
    """A uniformly drawn top-left corner of a size x size crop (the whole extent when smaller)."""
    return _randint(0, max(height - size, 0) + 1), _randint(0, max(width - size, 0) + 1)


def random_crop(image: np.ndarray, label: np.ndarray, size: int, cat_max_ratio: float,
                draw: Callable[[int, int, int], tuple[int, int]] = crop_box) -> tuple[np.ndarray, np.ndarray]:
    """mmseg RandomCrop: up to 10 times, keep the crop when it holds more than one (non-ignored) class and
    no class covers `cat_max_ratio` or more of its labelled pixels, else draw another; the 11th draw is kept
    unchecked."""
    top, left = draw(*label.shape, size)
    if cat_max_ratio < 1.0:
        for _ in range(10):
            crop = label[top : top + size, left : left + size]
            _, counts = np.unique(crop[crop != IGNORE_INDEX], return_counts=True)
            if len(counts) > 1 and counts.max() / counts.sum() < cat_max_ratio:
                break
            top, left = draw(*label.shape, size)
    return image[top : top + size, left : left + size], label[top : top + size, left : left + size]


# ------------------------------------------------------------------------------------------ colour


def rgb_to_hsv8(image: np.ndarray) -> np.ndarray:
    """uint8 RGB -> uint8 HSV in OpenCV's 8-bit convention: H = degrees / 2 in [0, 180), S and V in [0, 255]."""
    rgb = image.astype(np.float64)
    v, lo = rgb.max(-1), rgb.min(-1)
    diff = v - lo
    s = np.where(v > 0, 255.0 * diff / np.where(v > 0, v, 1), 0.0)
    safe = np.where(diff > 0, diff, 1)
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    h = np.where(v == r, 60 * (g - b) / safe, np.where(v == g, 120 + 60 * (b - r) / safe, 240 + 60 * (r - g) / safe))
    h = np.where(diff > 0, h % 360, 0.0)
    return np.stack([np.round(h / 2) % 180, np.round(s), v], -1).astype(np.uint8)


def hsv8_to_rgb(hsv: np.ndarray) -> np.ndarray:
    """The inverse of `rgb_to_hsv8` (rounded to uint8)."""
    h = hsv[..., 0].astype(np.float64) * 2 / 60
    s, v = hsv[..., 1] / 255.0, hsv[..., 2].astype(np.float64)
    sector = np.floor(h).astype(int) % 6
    f = h - np.floor(h)
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    choices = [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)]
    out = np.zeros(hsv.shape, np.float64)
    for k, (r, g, b) in enumerate(choices):
        mask = sector == k
        out[mask] = np.stack([r, g, b], -1)[mask]
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


def _convert(x: np.ndarray, alpha: float = 1.0, beta: float = 0.0) -> np.ndarray:
    """x * alpha + beta in float32, clipped to [0, 255], truncated to uint8 (mmseg's `convert`)."""
    return np.clip(x.astype(np.float32) * alpha + beta, 0, 255).astype(np.uint8)


@dataclass(frozen=True)
class PhotoMetricDistortion:
    """mmseg 0.x PhotoMetricDistortion on uint8 images; each step applies with probability 1/2.

    Order: brightness (+U(-delta, delta)); mode = coin; contrast (x U(lo, hi)) here when mode == 1;
    saturation (S x U(lo, hi)); hue (H + randint(-delta, delta), mod 180); contrast here when mode == 0.
    """

    brightness_delta: float = 32
    contrast_range: tuple[float, float] = (0.5, 1.5)
    saturation_range: tuple[float, float] = (0.5, 1.5)
    hue_delta: int = 18

    def contrast(self, img: np.ndarray) -> np.ndarray:
        return _convert(img, alpha=_uniform(*self.contrast_range)) if _randint(0, 2) else img

    def __call__(self, img: np.ndarray) -> np.ndarray:
        if _randint(0, 2):
            img = _convert(img, beta=_uniform(-self.brightness_delta, self.brightness_delta))
        mode = _randint(0, 2)
        if mode == 1:
            img = self.contrast(img)
        if _randint(0, 2):
            hsv = rgb_to_hsv8(img)
            hsv[..., 1] = _convert(hsv[..., 1], alpha=_uniform(*self.saturation_range))
            img = hsv8_to_rgb(hsv)
        if _randint(0, 2):
            hsv = rgb_to_hsv8(img)
            hsv[..., 0] = (hsv[..., 0].astype(int) + _randint(-self.hue_delta, self.hue_delta)) % 180
            img = hsv8_to_rgb(hsv)
        if mode == 0:
            img = self.contrast(img)
        return img


def normalize(image: np.ndarray) -> Tensor:
    """H x W x 3 uint8 RGB -> 3 x H x W float32, (x - mean) / std."""
    x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float()
    return (x - torch.tensor(MEAN)[:, None, None]) / torch.tensor(STD)[:, None, None]


# ------------------------------------------------------------------------------------------ datasets


@dataclass(frozen=True)
class TrainPipeline:
    """The §8 train pipeline with its parameters (crop 512, scale (2048, 512), ratio 0.5-2.0 in the protocol)."""

    crop_size: int = 512
    scale: tuple[int, int] = (2048, 512)
    ratio_range: tuple[float, float] = (0.5, 2.0)
    cat_max_ratio: float = 0.75
    flip_prob: float = 0.5
    photometric: PhotoMetricDistortion | None = PhotoMetricDistortion()  # None: no colour distortion

    def __call__(self, image: np.ndarray, label: np.ndarray) -> tuple[Tensor, Tensor]:
        ratio = _uniform(*self.ratio_range)
        target = (int(self.scale[0] * ratio), int(self.scale[1] * ratio))
        image, label = resize_pair(image, label, rescale_size(image.shape[1], image.shape[0], target))
        image, label = random_crop(image, label, self.crop_size, self.cat_max_ratio)
        if float(torch.rand(())) < self.flip_prob:
            image, label = image[:, ::-1], label[:, ::-1]
        image = np.ascontiguousarray(image)
        x = normalize(self.photometric(image) if self.photometric is not None else image)
        y = torch.from_numpy(np.ascontiguousarray(label)).long()
        pad_h, pad_w = self.crop_size - x.shape[1], self.crop_size - x.shape[2]
        x = F.pad(x, (0, pad_w, 0, pad_h), value=0.0)
        y = F.pad(y, (0, pad_w, 0, pad_h), value=IGNORE_INDEX)
        return x, y


class SegmentationTrainSet(Dataset):
    """(image 3 x crop x crop, label crop x crop int64) per pair; wrap it in `engine.SeededDataset`."""

    def __init__(self, pairs: list[tuple[Path, Path]], pipeline: TrainPipeline, dataset: str = "voc12aug") -> None:
        self.pairs, self.pipeline, self.dataset = pairs, pipeline, dataset

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        image_path, label_path = self.pairs[index]
        return self.pipeline(np.array(load_rgb(image_path)), load_label(label_path, self.dataset))


class SegmentationEvalSet(Dataset):
    """(image resized to `scale` keeping the aspect, 3 x h x w; label at the original size, H x W int64)."""

    def __init__(self, pairs: list[tuple[Path, Path]], scale: tuple[int, int] = (2048, 512),
                 dataset: str = "voc12aug") -> None:
        self.pairs, self.scale, self.dataset = pairs, scale, dataset

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        image_path, label_path = self.pairs[index]
        image = np.array(load_rgb(image_path))
        resized, _ = resize_pair(image, None, rescale_size(image.shape[1], image.shape[0], self.scale))
        return normalize(resized), torch.from_numpy(load_label(label_path, self.dataset)).long()
