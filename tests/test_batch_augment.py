"""Batched MoCo v2 augmentation (issue 15): each op against PIL / torchvision at fixed parameters, within
`batch_augment.TOLERANCES`; the drawn parameters against the recipe's distributions at a fixed seed."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter
from scipy import stats
from torchvision.transforms import functional as TF

from densecl_bench.pretrain import batch_augment as B
from densecl_bench.pretrain.augment import mocov2

pytestmark = pytest.mark.usefixtures("one_thread")


def _smooth(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Photo-like content (a bicubic blow-up of coarse noise): colours that PIL's uint8 steps see as in photos."""
    coarse = Image.fromarray((rng.random((h // 8, w // 8, 3)) * 255).astype(np.uint8))
    return np.asarray(coarse.resize((w, h), Image.BICUBIC))


@pytest.fixture(scope="module")
def arrays() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [(rng.random((48, 60, 3)) * 255).astype(np.uint8), _smooth(rng, 48, 60)]


def _tensor(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.array(a)).permute(2, 0, 1)


def _unit(img: Image.Image | np.ndarray) -> torch.Tensor:
    return _tensor(np.asarray(img)).float()[None] / 255


def _assert_within(got: torch.Tensor, want: torch.Tensor, op: str) -> None:
    d = (got.double() - want.double()).abs() * 255
    mean_tol, max_tol = B.TOLERANCES[op]
    assert float(d.mean()) <= mean_tol and float(d.max()) <= max_tol, (op, float(d.mean()), float(d.max()))


def test_resample_weights_by_hand():
    # 4 -> 2 (downscale 2): centres at 1 and 3, triangle of half-width 2 over tap centres 0.5 .. 3.5
    w = B.resample_weights(torch.tensor([4]), 2, 4)[0]
    torch.testing.assert_close(w, torch.tensor([[0.75, 0.75, 0.25, 0.0], [0.0, 0.25, 0.75, 0.75]]) / 1.75)
    # 2 -> 4 (upscale): plain bilinear, half-pixel centres, edge taps clamped; taps beyond the line get 0
    w = B.resample_weights(torch.tensor([2]), 4, 3, flip=torch.tensor([True]))[0]
    torch.testing.assert_close(w, torch.tensor([[0.0, 1, 0], [0.25, 0.75, 0], [0.75, 0.25, 0], [1, 0, 0]]))


def test_resized_crop_and_flip_match_pil(arrays):
    for a in arrays:
        pil = Image.fromarray(a)
        # a downscaling box, an upscaling box, the whole image; each also mirrored
        for top, left, h, w, size in [(5, 7, 40, 50, 32), (10, 3, 20, 30, 64), (0, 0, 48, 60, 40)]:
            ref = pil.crop((left, top, left + w, top + h)).resize((size, size), Image.BILINEAR)
            for flip in (False, True):
                want = ref.transpose(Image.FLIP_LEFT_RIGHT) if flip else ref
                got = B.resized_crop([_tensor(a)], torch.tensor([[top, left, h, w]]), torch.tensor([flip]), size)
                _assert_within(got, _unit(want), "resized_crop")


@pytest.mark.parametrize("op, pil_fn, values", [
    ("brightness", TF.adjust_brightness, (0.6, 1.33)),
    ("contrast", TF.adjust_contrast, (0.6, 1.4)),
    ("saturation", TF.adjust_saturation, (0.61, 1.4)),
    ("hue", TF.adjust_hue, (-0.1, 0.0, 0.07)),
])
def test_jitter_ops_match_pil(arrays, op, pil_fn, values):
    fn = getattr(B, f"adjust_{op}")
    for a in arrays:
        for v in values:
            _assert_within(fn(_unit(a), torch.tensor([v])), _unit(pil_fn(Image.fromarray(a), v)), op)


def test_float_ops_equal_torchvision_tensor_ops(arrays):
    """Where torchvision's float formula is the same, the result is the same to float precision."""
    x = torch.cat([_unit(a) for a in arrays])
    torch.testing.assert_close(B.adjust_hue(x, torch.tensor([0.07, -0.1])),
                               torch.cat([TF.adjust_hue(x[:1], 0.07), TF.adjust_hue(x[1:], -0.1)]), atol=2e-6, rtol=0)
    torch.testing.assert_close(B.adjust_brightness(x, torch.tensor([1.3, 0.7])),
                               torch.cat([TF.adjust_brightness(x[:1], 1.3), TF.adjust_brightness(x[1:], 0.7)]))


def test_color_jitter_applies_each_samples_order():
    """Brightness then contrast differs from contrast then brightness; each sample gets its own order."""
    rng = np.random.default_rng(1)
    x = torch.from_numpy(rng.random((2, 3, 8, 8))).float()
    factors = torch.tensor([[1.3, 0.6, 1.0, 0.0]] * 2, dtype=torch.float64)
    order = torch.tensor([[0, 1, 2, 3], [1, 0, 3, 2]])
    got = B.color_jitter(x, torch.tensor([True, True]), order, factors)
    f = torch.tensor([1.3]), torch.tensor([0.6])
    b_then_c = B.adjust_contrast(B.adjust_brightness(x[:1], f[0]), f[1])
    c_then_b = B.adjust_brightness(B.adjust_contrast(x[1:], f[1]), f[0])
    torch.testing.assert_close(got, torch.cat([b_then_c, c_then_b]))
    assert not torch.allclose(b_then_c, B.adjust_brightness(B.adjust_contrast(x[:1], f[1]), f[0]))
    unchanged = B.color_jitter(x, torch.tensor([False, True]), order, factors)
    assert torch.equal(unchanged[0], x[0]) and torch.equal(unchanged[1], got[1])


def test_grayscale_matches_pil(arrays):
    for a in arrays:
        got = B.grayscale(_unit(a), torch.tensor([True]))
        _assert_within(got, _unit(Image.fromarray(a).convert("L").convert("RGB")), "grayscale")
        assert torch.equal(B.grayscale(_unit(a), torch.tensor([False])), _unit(a))


def test_box_radius_and_kernel_variance():
    """PIL's radius for σ = 2 is 1.375 (hand: l = 1, a = 3 * (2 - 4) / (6 * (4/3 - 4)) = 0.375); three
    passes of the extended box then have variance exactly σ²."""
    assert B.box_radius(torch.tensor([2.0])).item() == pytest.approx(1.375)
    sigma = torch.tensor([0.1, 0.5, 1.0, 1.37, 2.0], dtype=torch.float64)
    k = B.box_kernels(B.box_radius(sigma))
    taps = torch.arange(k.shape[1], dtype=torch.float64) - k.shape[1] // 2
    torch.testing.assert_close(k.sum(1), torch.ones(5, dtype=torch.float64))
    torch.testing.assert_close(3 * (k * taps**2).sum(1), sigma**2)


def test_gaussian_blur_matches_pil(arrays):
    x = torch.cat([_unit(a) for a in arrays])
    for s in (0.1, 0.5, 1.0, 2.0):
        got = B.gaussian_blur(x, torch.tensor([True, True]), torch.tensor([s, s], dtype=torch.float64))
        want = torch.cat([_unit(Image.fromarray(a).filter(ImageFilter.GaussianBlur(s))) for a in arrays])
        _assert_within(got, want, "gaussian_blur")
    mixed = B.gaussian_blur(x, torch.tensor([False, True]), torch.tensor([0.0, 2.0], dtype=torch.float64))
    assert torch.equal(mixed[0], x[0])  # per-sample: the other sample's kernel does not touch it
    _assert_within(mixed[1:], _unit(Image.fromarray(arrays[1]).filter(ImageFilter.GaussianBlur(2.0))), "gaussian_blur")


@pytest.fixture(scope="module")
def draws() -> list[dict[str, torch.Tensor]]:
    """3000 views of a 400 x 300 image, drawn as the loader does (one seeded RNG per sample, two views)."""
    recipe = B.Recipe.mocov2(224)
    out = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        for _ in range(1500):
            out += [recipe.draw(300, 400), recipe.draw(300, 400)]
    return out


def _reference_crops(n: int, height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """RandomResizedCrop(scale 0.2-1, ratio 3/4-4/3) as torchvision documents it, in numpy: (area fraction, w/h)."""
    out = []
    for _ in range(n):
        for _ in range(10):
            area = height * width * rng.uniform(0.2, 1.0)
            ratio = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
            w, h = round(math.sqrt(area * ratio)), round(math.sqrt(area / ratio))
            if 0 < w <= width and 0 < h <= height:
                break
        else:
            w, h = width, height  # 4:3 lies inside the ratio range: the fallback is the whole image
        out.append((h * w / (height * width), w / h))
    return np.array(out)


def test_crop_distribution_matches_the_recipe(draws):
    crops = torch.stack([d["crop"] for d in draws]).double()
    top, left, h, w = crops.unbind(1)
    ref = _reference_crops(20000, 300, 400, np.random.default_rng(0))
    assert stats.ks_2samp((h * w / 120000).numpy(), ref[:, 0]).pvalue > 0.01
    assert stats.ks_2samp((w / h).numpy(), ref[:, 1]).pvalue > 0.01
    assert (h * w / 120000).min() >= 0.2 - 0.01 and ((w / h) >= 0.74).all() and ((w / h) <= 1.35).all()
    assert (top + h <= 300).all() and (left + w <= 400).all()
    # the box position is uniform over the free range: its normalised offset has mean 1/2
    free = (left / (400 - w).clamp(min=1))[w < 400]
    assert abs(float(free.mean()) - 0.5) < 0.03


def test_coin_and_factor_distributions(draws):
    n = len(draws)
    for key, p in (("jitter", 0.8), ("gray", 0.2), ("blur", 0.5), ("flip", 0.5)):
        hits = sum(bool(d[key]) for d in draws)
        assert stats.binomtest(hits, n, p).pvalue > 0.01, key
    jittered = torch.stack([d["factors"] for d in draws if d["jitter"]])
    for col, (lo, hi) in enumerate([(0.6, 1.4), (0.6, 1.4), (0.6, 1.4), (-0.1, 0.1)]):
        assert stats.kstest(jittered[:, col].numpy(), stats.uniform(lo, hi - lo).cdf).pvalue > 0.01
    orders = [tuple(d["order"].tolist()) for d in draws if d["jitter"]]
    counts = np.array([orders.count(o) for o in set(orders)])
    assert len(counts) == 24 and stats.chisquare(counts).pvalue > 0.01  # every order of the 4 ops, equally often
    sigma = np.array([float(d["sigma"]) for d in draws if d["blur"]])
    assert stats.kstest(sigma, stats.uniform(0.1, 1.9).cdf).pvalue > 0.01


@pytest.mark.parametrize("augment", [
    None,
    {"color_jitter_p": 0.0},
    {"color_jitter": [0.0, 0.4, 0.0, 0.0], "grayscale_p": 0.5, "crop_scale": [0.5, 1.0]},
])
def test_recipe_draws_what_the_pil_pipeline_draws_under_overrides(augment):
    # a config's data.augmentation must change both loaders alike: same parameters, same RNG calls in the same
    # order (an op that is off draws nothing in torchvision, so the recipe must not draw for it either)
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (30, 40, 3), dtype=np.uint8))
    recipe = B.Recipe.mocov2(32, augment)
    assert recipe.scale == (tuple(augment["crop_scale"]) if augment and "crop_scale" in augment else (0.2, 1.0))
    for seed in range(20):
        torch.manual_seed(seed)
        mocov2(32, augment)(img)
        cpu_state = torch.get_rng_state()
        torch.manual_seed(seed)
        params = recipe.draw(30, 40)
        assert torch.equal(torch.get_rng_state(), cpu_state), seed
        if augment and augment.get("color_jitter_p") == 0.0:
            assert not params["jitter"]
    with pytest.raises(ValueError, match="unknown keys"):
        mocov2(32, {"colour_jitter": 0.1})
