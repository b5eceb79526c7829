"""The MoCo v2 two-view augmentation (PROTOCOLS.md §1.2) on a whole batch of decoded images, on any device.

`augment.mocov2` runs per image in PIL on the loader's CPU workers; on a modern GPU that pipeline,
not the model, bounds pretraining (issue 15). This module does the same work on batched tensors,
so the GPU that trains also augments, with parameters drawn per sample and per view:

- `Recipe.draw` samples one view's parameters with the very torch RNG calls, in the very order,
  that `augment.mocov2` makes. Inside the per-(seed, epoch, index) seeded RNG of the loader both
  pipelines therefore draw *identical* parameters for a sample; only the pixel arithmetic differs
  (float here, uint8 after every op in PIL).
- `resized_crop`: RandomResizedCrop and the horizontal flip in one resampling per view. Each output
  row/column is a PIL-style antialiased bilinear (triangle filter widened by the downscale factor)
  over the crop box; the flip reverses the column weights. All ops after the crop commute with a
  flip (pointwise colour ops, a symmetric blur with mirror-symmetric edge handling), so folding
  the final flip into the crop gives the same image.
- `color_jitter`: brightness, contrast, saturation, hue with per-sample factors, in a per-sample
  order of the four ops (torchvision's ColorJitter shuffles them per call), for the samples that
  drew the p = 0.8 jitter.
- `grayscale`: PIL's ITU-R 601 luma ("L" mode), replicated to three channels.
- `gaussian_blur`: PIL's `GaussianBlur(radius=σ)` is three extended box blurs per axis (Gwosdek et
  al. 2011) whose radius follows from σ; here each blurred sample gets its own separable box kernel
  of that radius, applied three times per axis with PIL's edge replication (grouped convolutions).
- `normalize`: ImageNet mean / std.

DenseCL needs no geometric metadata from the augmentation: its dense positives are matched by
feature similarity (`model.dense_correspondence`), not by where the two crops overlap.

Measured agreement with the PIL pipeline for the same parameters (tests/test_batch_augment.py): see
`TOLERANCES`. The differences come from PIL's uint8 arithmetic: rounding after every pass, the contrast
mean rounded to an integer, the hue shifted in whole steps of its uint8 HSV.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision import transforms as T

from densecl_bench.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from densecl_bench.pretrain.augment import GaussianBlur, mocov2

# Per op: (mean |Δ|, max |Δ|) in units of 1/255 against the PIL reference on the same uint8 input,
# checked by the tests on random and smooth images at the stated parameters. PIL rounds to uint8
# after every pass: the resize twice (rows, then columns), the blur six times, hue in its uint8 HSV.
TOLERANCES: dict[str, tuple[float, float]] = {
    "resized_crop": (0.5, 1.0),
    "brightness": (0.6, 1.5),
    "contrast": (0.6, 1.5),  # PIL also rounds the image's mean grey level to an integer
    "saturation": (0.6, 1.5),
    "hue": (2.0, 20.0),  # PIL shifts H by whole steps of its uint8 HSV, whose round trip alone moves 6/255
    "grayscale": (0.5, 1.0),
    "gaussian_blur": (1.2, 3.0),
    "pipeline": (2.0, 20.0),  # all of the above chained on the same decoded JPEG, same drawn parameters
}

# PIL's "L" conversion: L = R * 299/1000 + G * 587/1000 + B * 114/1000
LUMA = (0.299, 0.587, 0.114)
BLUR_PASSES = 3  # PIL's GaussianBlur: three box blurs per axis


def _range(r: Sequence[float] | None) -> tuple[float, float] | None:
    return None if r is None else (float(r[0]), float(r[1]))


@dataclass(frozen=True)
class Recipe:
    """The numbers of one view's augmentation, read from the CPU pipeline so there is one definition."""

    size: int
    scale: tuple[float, float]
    ratio: tuple[float, float]
    jitter_p: float
    brightness: tuple[float, float] | None  # None: the op is off (torchvision draws no factor for it)
    contrast: tuple[float, float] | None
    saturation: tuple[float, float] | None
    hue: tuple[float, float] | None
    gray_p: float
    blur_sigma: tuple[float, float]
    blur_p: float
    flip_p: float
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @classmethod
    def mocov2(cls, size: int = 224, augment: Mapping[str, Any] | None = None) -> Recipe:
        """§1.2's recipe (with a config's `data.augmentation` overrides), taken from `augment.mocov2`."""
        rrc, jitter, gray, blur, flip, _, norm = mocov2(size, augment).transforms
        cj = jitter.transforms[0]
        assert isinstance(rrc, T.RandomResizedCrop) and isinstance(cj, T.ColorJitter) and isinstance(blur, GaussianBlur)
        return cls(size=size, scale=tuple(rrc.scale), ratio=tuple(rrc.ratio), jitter_p=jitter.p,
                   brightness=_range(cj.brightness), contrast=_range(cj.contrast),
                   saturation=_range(cj.saturation), hue=_range(cj.hue),
                   gray_p=gray.p, blur_sigma=(blur.sigma_min, blur.sigma_max), blur_p=blur.p, flip_p=flip.p,
                   mean=tuple(norm.mean), std=tuple(norm.std))

    def draw(self, height: int, width: int) -> dict[str, Tensor]:
        """One view's parameters for an image of `height` x `width`, from torch's global RNG.

        The calls (and their order) are those `augment.mocov2` makes, including the ones it skips
        (no jitter factors when the jitter is not applied, no σ without blur): seeded alike, both
        pipelines see the same crop, factors, order, σ and coin flips.
        """
        shape_only = torch.empty((), dtype=torch.uint8).expand(3, height, width)  # what get_params reads
        top, left, h, w = T.RandomResizedCrop.get_params(shape_only, list(self.scale), list(self.ratio))
        order, factors = torch.arange(4), torch.tensor([1.0, 1.0, 1.0, 0.0], dtype=torch.float64)
        jitter = not self.jitter_p < torch.rand(1)  # RandomApply
        if jitter:
            order, *values = T.ColorJitter.get_params(self.brightness, self.contrast, self.saturation, self.hue)
            factors = torch.tensor([v if v is not None else i for v, i in zip(values, (1.0, 1.0, 1.0, 0.0))],
                                   dtype=torch.float64)  # an op that is off: its identity factor
        gray = bool(torch.rand(1) < self.gray_p)
        blur = not torch.rand(()).item() >= self.blur_p
        sigma = torch.empty(()).uniform_(*self.blur_sigma).item() if blur else 0.0
        flip = bool(torch.rand(1) < self.flip_p)
        return {"crop": torch.tensor([top, left, h, w]), "flip": torch.tensor(flip), "jitter": torch.tensor(jitter),
                "order": order, "factors": factors, "gray": torch.tensor(gray), "blur": torch.tensor(blur),
                "sigma": torch.tensor(sigma, dtype=torch.float64)}


def resample_weights(in_sizes: Tensor, out_size: int, length: int, flip: Tensor | None = None) -> Tensor:
    """N x out_size x length row-stochastic matrices: PIL's antialiased bilinear resampling of an
    `in_sizes[n]`-long line to `out_size` (taps beyond `in_sizes[n]` get weight 0).

    Output pixel o is centred at (o + 0.5) * s in input coordinates (s = in / out); its taps are
    weighted by the triangle 1 - |x + 0.5 - centre| / max(s, 1), i.e. widened by the downscale
    factor, which is what antialiases, and normalised over the taps inside the line.
    """
    scale = in_sizes.double() / out_size
    support = scale.clamp(min=1.0)
    centre = (torch.arange(out_size, dtype=torch.float64, device=in_sizes.device) + 0.5) * scale[:, None]
    taps = torch.arange(length, dtype=torch.float64, device=in_sizes.device) + 0.5
    w = (1 - (taps[None, None] - centre[:, :, None]).abs() / support[:, None, None]).clamp(min=0)
    w = w * (taps[None, None] < in_sizes[:, None, None])
    w = w / w.sum(2, keepdim=True)
    if flip is not None:
        w = torch.where(flip[:, None, None], w.flip(1), w)
    return w.float()


def resized_crop(images: Sequence[Tensor], crop: Tensor, flip: Tensor, size: int) -> Tensor:
    """Crop box (top, left, height, width) of each uint8 C x H x W image, resized to `size` x `size`
    (antialiased as PIL), mirrored where `flip`: N x 3 x size x size floats in [0, 1].

    The weights of all samples are built at once; the resampling itself is two matrix products
    per sample, because the decoded images (and their boxes) differ in size.
    """
    device = images[0].device
    boxes = crop.tolist()
    hs, ws = crop[:, 2].to(device), crop[:, 3].to(device)
    wy = resample_weights(hs, size, max(b[2] for b in boxes))
    wx = resample_weights(ws, size, max(b[3] for b in boxes), flip.to(device))
    out = torch.empty(len(images), 3, size, size, device=device)
    for n, (img, (top, left, h, w)) in enumerate(zip(images, boxes, strict=True)):
        patch = img[:, top : top + h, left : left + w].float()
        out[n] = wy[n, :, :h] @ patch @ wx[n, :, :w].T
    return out.div_(255).clamp_(0, 1)


def _luma(x: Tensor) -> Tensor:
    weights = torch.tensor(LUMA, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return (x * weights).sum(1, keepdim=True)


def _blend(x: Tensor, other: Tensor, factor: Tensor) -> Tensor:
    """PIL's ImageEnhance: other + factor * (x - other), clipped to [0, 1]."""
    f = factor.view(-1, 1, 1, 1).to(x.dtype)
    return (f * x + (1 - f) * other).clamp(0, 1)


def adjust_brightness(x: Tensor, factor: Tensor) -> Tensor:
    return _blend(x, torch.zeros_like(x), factor)


def adjust_contrast(x: Tensor, factor: Tensor) -> Tensor:
    """Blend with the image's mean grey level (torchvision's tensor rule; PIL rounds that mean to uint8)."""
    return _blend(x, _luma(x).mean((2, 3), keepdim=True), factor)


def adjust_saturation(x: Tensor, factor: Tensor) -> Tensor:
    return _blend(x, _luma(x), factor)


def adjust_hue(x: Tensor, shift: Tensor) -> Tensor:
    """Rotate the HSV hue of each sample by `shift` turns (in [-0.5, 0.5]); S and V are kept."""
    r, g, b = x.unbind(1)
    v, _ = x.max(1)
    c = v - x.min(1).values
    safe = torch.where(c > 0, c, torch.ones_like(c))
    h = torch.where(v == r, ((g - b) / safe) % 6, torch.where(v == g, (b - r) / safe + 2, (r - g) / safe + 4))
    h = (torch.where(c > 0, h, torch.zeros_like(h)) + 6 * shift.view(-1, 1, 1).to(x.dtype)) % 6
    # HSV -> RGB: channel n = V - C * clamp(min(k, 4 - k), 0, 1) with k = (n + H) mod 6, n = 5, 3, 1
    k = (torch.tensor([5.0, 3.0, 1.0], device=x.device, dtype=x.dtype).view(1, 3, 1, 1) + h[:, None]) % 6
    return v[:, None] - c[:, None] * torch.minimum(k, 4 - k).clamp(0, 1)


JITTER_OPS = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)  # torchvision's fn_idx order


def color_jitter(x: Tensor, apply: Tensor, order: Tensor, factors: Tensor) -> Tensor:
    """ColorJitter on the samples where `apply`: position p applies op `order[n, p]` with `factors[n, op]`.

    apply, order, factors live on the CPU (they come with the batch), so choosing the rows costs no sync.
    """
    x = x.clone()
    for position in range(4):
        for op, fn in enumerate(JITTER_OPS):
            rows = (apply & (order[:, position] == op)).nonzero().squeeze(1)
            if rows.numel():
                on_device = rows.to(x.device)
                x[on_device] = fn(x[on_device], factors[rows, op].to(x.device))
    return x


def grayscale(x: Tensor, apply: Tensor) -> Tensor:
    rows = apply.nonzero().squeeze(1).to(x.device)
    x = x.clone()
    if rows.numel():
        x[rows] = _luma(x[rows]).expand(-1, 3, -1, -1)
    return x


def box_radius(sigma: Tensor, passes: int = BLUR_PASSES) -> Tensor:
    """The fractional box radius whose `passes` box blurs have variance σ² (PIL's `_gaussian_blur_radius`):
    the integer part l is the widest box that does not overshoot, the fraction a weights the two
    taps just outside it."""
    var = sigma.double() ** 2 / passes
    l = torch.floor((torch.sqrt(12 * var + 1) - 1) / 2)
    a = (2 * l + 1) * (l * (l + 1) - 3 * var) / (6 * (var - (l + 1) ** 2))
    return l + a


def box_kernels(radius: Tensor) -> Tensor:
    """N x (2K + 1) extended box kernels (K = max floor(r) + 1): 1 / (2r + 1) on the |k| <= floor(r)
    taps, (r - floor(r)) / (2r + 1) on the two next ones, 0 beyond; each sums to 1."""
    whole = torch.floor(radius)
    k_max = int(whole.max()) + 1
    dist = torch.arange(-k_max, k_max + 1, dtype=radius.dtype, device=radius.device).abs()[None]
    norm = 2 * radius[:, None] + 1
    inner = (dist <= whole[:, None]) / norm
    edge = (dist == whole[:, None] + 1) * (radius - whole)[:, None] / norm
    return inner + edge


def gaussian_blur(x: Tensor, apply: Tensor, sigma: Tensor) -> Tensor:
    """PIL's GaussianBlur(radius=σ) on the samples where `apply`, σ per sample (CPU tensors for apply, σ)."""
    rows = apply.nonzero().squeeze(1)
    if not rows.numel():
        return x
    kernels = box_kernels(box_radius(sigma[rows])).to(x.device, x.dtype)
    n, c, h, w = len(rows), x.shape[1], x.shape[2], x.shape[3]
    pad = kernels.shape[1] // 2
    weight = kernels.repeat_interleave(c, 0)  # (n * c) x (2K + 1): one kernel per sample, all its channels
    y = x[rows.to(x.device)].reshape(1, n * c, h, w)
    for _ in range(BLUR_PASSES):
        y = F.conv2d(F.pad(y, (pad, pad, 0, 0), mode="replicate"), weight[:, None, None, :], groups=n * c)
    for _ in range(BLUR_PASSES):
        y = F.conv2d(F.pad(y, (0, 0, pad, pad), mode="replicate"), weight[:, None, :, None], groups=n * c)
    x = x.clone()
    x[rows.to(x.device)] = y.view(n, c, h, w)
    return x


def normalize(x: Tensor, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> Tensor:
    m = torch.tensor(mean, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
    s = torch.tensor(std, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
    return (x - m) / s


class BatchMoCoV2:
    """One view of a batch: crop + flip -> jitter -> grey -> blur -> normalise, per-sample parameters
    as `Recipe.draw` returns them, stacked (N x ...) and kept on the CPU."""

    def __init__(self, recipe: Recipe) -> None:
        self.recipe = recipe

    def __call__(self, images: Sequence[Tensor], params: dict[str, Tensor]) -> Tensor:
        x = resized_crop(images, params["crop"], params["flip"], self.recipe.size)
        x = color_jitter(x, params["jitter"], params["order"], params["factors"])
        x = grayscale(x, params["gray"])
        x = gaussian_blur(x, params["blur"], params["sigma"])
        return normalize(x, self.recipe.mean, self.recipe.std)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.recipe})"
