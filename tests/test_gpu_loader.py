"""`loader: gpu` (issue 15) on CPU tensors: the same views as the PIL loader within the stated tolerance,
every file kind the device decoder is not given, the bad-image policy, and the switch's recording."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from test_pretrain import load_ckpt, tiny_cfg

from densecl_bench.cli import main
from densecl_bench.config import ConfigError
from densecl_bench.data.base import BadImageError, ImageList, load_rgb
from densecl_bench.data.transforms import IMAGENET_STD
from densecl_bench.pretrain import train
from densecl_bench.pretrain.augment import EpochSampler, TwoViewDataset, mocov2
from densecl_bench.pretrain.batch_augment import TOLERANCES, Recipe
from densecl_bench.pretrain.gpu_loader import (
    DECODED,
    ENCODED,
    UNREADABLE,
    GPUTwoViewLoader,
    decode,
    read_payload,
)
from densecl_bench.pretrain.train import protocol_fingerprint

pytestmark = pytest.mark.usefixtures("one_thread")
CPU = torch.device("cpu")


def _photo(rng: np.random.Generator, h: int = 45, w: int = 60) -> Image.Image:
    coarse = Image.fromarray((rng.random((h // 5, w // 5, 3)) * 255).astype(np.uint8))
    return coarse.resize((w, h), Image.BICUBIC)


@pytest.fixture(scope="module")
def jpegs(tmp_path_factory) -> ImageList:
    root = tmp_path_factory.mktemp("jpegs")
    rng = np.random.default_rng(0)
    paths = []
    for i in range(12):
        path = root / "train" / f"n{i % 3}" / f"{i:03d}.JPEG"
        path.parent.mkdir(parents=True, exist_ok=True)
        _photo(rng, 45 + 3 * i, 60).save(path, quality=90)
        paths.append(path)
    return ImageList("jpegs", root, paths, np.arange(12) % 3, ["a", "b", "c"])


def _loader(images: ImageList, size: int = 32, batch: int = 4, **kw) -> GPUTwoViewLoader:
    return GPUTwoViewLoader(images, Recipe.mocov2(size), EpochSampler(len(images), batch, seed=3), batch, CPU,
                            seed=3, **kw)


def test_views_match_the_pil_loader_for_the_same_samples(jpegs):
    """Same (seed, epoch, index) -> same drawn parameters; the pixels differ only by PIL's uint8 rounding."""
    gpu, cpu = _loader(jpegs), TwoViewDataset(jpegs, mocov2(32), seed=3)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    for epoch in (0, 1):
        sampler = EpochSampler(len(jpegs), 4, seed=3)
        sampler.set_epoch(epoch)
        order = [i for i, _ in sampler]
        batches = list(gpu.epoch(epoch))
        assert len(batches) == 3
        for b, views in enumerate(batches):
            want = [cpu[(i, epoch)] for i in order[4 * b : 4 * b + 4]]
            for v in (0, 1):
                d = ((views[v] - torch.stack([w[v] for w in want])) * std).abs() * 255
                assert float(d.mean()) <= TOLERANCES["pipeline"][0] and float(d.max()) <= TOLERANCES["pipeline"][1]
    q, k = batches[0]
    assert q.shape == k.shape == (4, 3, 32, 32) and not torch.equal(q, k)
    again = next(iter(gpu.epoch(1, start=2)))  # resuming mid-epoch lands on the same views
    assert all(torch.equal(a, b) for a, b in zip(again, batches[2], strict=True))


@pytest.fixture(scope="module")
def odd_files(tmp_path_factory) -> dict[str, object]:
    """One file of every kind the device decoder is not given, beside a plain colour JPEG."""
    root = tmp_path_factory.mktemp("odd")
    rgb = _photo(np.random.default_rng(1))
    files = {"rgb": ("rgb.jpg", rgb, {}), "grey": ("grey.jpg", rgb.convert("L"), {}),
             "cmyk": ("cmyk.jpg", rgb.convert("CMYK"), {}), "png": ("rgba.png", rgb.convert("RGBA"), {})}
    paths = {}
    for kind, (name, img, kw) in files.items():
        img.save(root / name, **kw)
        paths[kind] = root / name
    paths["corrupt"] = root / "corrupt.jpg"
    paths["corrupt"].write_bytes(b"not a jpeg")
    paths["truncated"] = root / "truncated.jpg"
    data = paths["rgb"].read_bytes()
    paths["truncated"].write_bytes(data[: len(data) * 2 // 3])  # a valid header, a third of the scan missing
    return paths


def test_file_kinds_take_the_right_decoder(odd_files):
    status = {kind: read_payload(path)[1] for kind, path in odd_files.items()}
    assert status == {"rgb": ENCODED, "grey": DECODED, "cmyk": DECODED, "png": DECODED, "corrupt": UNREADABLE,
                      "truncated": ENCODED}
    kinds = list(odd_files)
    reads = [read_payload(odd_files[k]) for k in kinds]
    images = decode([r[0] for r in reads], [r[1] for r in reads], CPU)
    for kind, img in zip(kinds, images, strict=True):
        if kind in ("corrupt", "truncated"):
            assert img is None, kind  # nothing decodes them: the policy decides
        else:  # every other kind decodes to what the PIL loader sees, bit for bit
            want = torch.from_numpy(np.array(load_rgb(odd_files[kind]))).permute(2, 0, 1)
            assert torch.equal(img, want), kind


def test_bad_images_follow_the_policy(jpegs, odd_files):
    """skip: the slot of an unreadable image trains on the next readable one, with the slot's views, and
    is counted; raise: the error names the file."""
    paths = list(jpegs.paths)
    bad = ImageList("bad", jpegs.root, [*paths[:4], odd_files["corrupt"], odd_files["truncated"], *paths[6:]],
                    jpegs.labels, jpegs.classes)
    substituted = ImageList("sub", jpegs.root, [*paths[:4], paths[6], paths[6], *paths[6:]], jpegs.labels,
                            jpegs.classes)
    lenient, reference = _loader(bad, on_bad_image="skip"), _loader(substituted)
    for got, want in zip(lenient.epoch(0), reference.epoch(0), strict=True):
        assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
    assert sorted(lenient.skipped) == [4, 5]
    with pytest.raises(BadImageError, match="corrupt.jpg|truncated.jpg"):
        list(_loader(bad).epoch(0))


def test_loader_gpu_trains_and_is_recorded_as_part_of_the_protocol(jpegs, tmp_path):
    """`--loader gpu` trains (CPU tensors here); the checkpoint names the loader, the fingerprint tells the
    loaders apart, and a CPU-loader run does not silently resume the GPU-loader one."""
    cfg_path = tmp_path / "tiny.yaml"
    cfg_path.write_text(json.dumps(tiny_cfg(epochs=1)))
    args = ["pretrain", str(cfg_path), "--data-root", str(jpegs.root), "--work-dir", str(tmp_path / "w"),
            "--loader", "gpu"]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    ckpt = load_ckpt(tmp_path / "w" / "latest.pth")
    assert ckpt["meta"]["config"]["data"]["loader"] == "gpu" and ckpt["meta"]["iter"] == 3
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values() if v.is_floating_point())
    cpu_cfg = tiny_cfg(epochs=1, data={"loader": "cpu"})
    assert protocol_fingerprint(cpu_cfg) != protocol_fingerprint(tiny_cfg(epochs=1, data={"loader": "gpu"}))
    with pytest.raises(ConfigError, match="belongs to another run"):
        train(cpu_cfg, jpegs, tmp_path / "w")
    with pytest.raises(ConfigError, match="data.loader must be one of"):
        train(tiny_cfg(data={"loader": "dali"}), jpegs, tmp_path / "x")
