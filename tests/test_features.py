"""Feature extraction: documented dims per layer, cache hits, atomic writes, bad images."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from densecl_bench.backbone import Backbone, freeze, parse_layers, pool_feature
from densecl_bench.data import transforms
from densecl_bench.data.base import BadImageError, ImageList
from densecl_bench.features import extract

LAYERS = ["feature1", "feature2", "feature3", "feature4", "feature5"]


def _images(tmp_path, n, size=(60, 44)):
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        p = tmp_path / f"img{i}.jpg"
        Image.fromarray((rng.random((size[1], size[0], 3)) * 255).astype(np.uint8)).save(p)
        paths.append(p)
    return ImageList("toy/train", tmp_path, paths, np.arange(n), [str(i) for i in range(n)])


def test_protocol_dims_resnet50_at_224():
    backbone = freeze(Backbone("resnet50"))
    with torch.inference_mode():
        feats = backbone(torch.zeros(1, 3, 224, 224))
    dims = {layer: pool_feature(feats[layer], layer, "protocol").shape[1] for layer in LAYERS}
    assert dims == {"feature1": 9216, "feature2": 9216, "feature3": 8192, "feature4": 9216, "feature5": 8192}
    assert feats["feature1"].shape[-2:] == (112, 112)  # stem output, before max-pool
    assert pool_feature(feats["feature5"], "feature5", "global").shape == (1, 2048)


def test_feature1_is_stem_before_maxpool():
    backbone = freeze(Backbone("resnet18"))
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        expected = backbone.relu(backbone.bn1(backbone.conv1(x)))
        assert torch.equal(backbone(x, ["feature1"])["feature1"], expected)


def test_protocol_pooling_rejects_wrong_size():
    with pytest.raises(ValueError, match="224 px"):
        pool_feature(torch.zeros(1, 2048, 3, 3), "feature5", "protocol")


def test_parse_layers():
    assert parse_layers("feature1-5") == LAYERS
    assert parse_layers("feature4,feature5") == ["feature4", "feature5"]
    with pytest.raises(ValueError):
        parse_layers("feature6")


class CountingBackbone(Backbone):
    calls = 0

    def forward(self, x, layers=tuple(LAYERS)):
        CountingBackbone.calls += 1
        return super().forward(x, layers)


def test_extract_matches_direct_forward_and_hits_cache(tmp_path):
    images = _images(tmp_path, 5)
    backbone = freeze(CountingBackbone("resnet18"))
    kwargs = dict(transform="voc_svm", layers=["feature2", "feature5"], pooling="adaptive", size=64, batch_size=2,
                  num_workers=0, cache_dir=tmp_path / "cache", ckpt_key="k1")
    out = extract(backbone, images, **kwargs).arrays
    assert out["feature2"].shape == (5, 64 * 36) and out["feature5"].shape == (5, 512 * 4)
    tf = transforms.voc_svm(64)
    x = torch.stack([tf(Image.open(p).convert("RGB")) for p in images.paths])
    with torch.inference_mode():
        ref = pool_feature(backbone(x, ["feature5"])["feature5"], "feature5", "adaptive").numpy()
    np.testing.assert_allclose(out["feature5"], ref, rtol=1e-4, atol=1e-5)
    calls = CountingBackbone.calls
    again = extract(backbone, images, **kwargs)
    assert CountingBackbone.calls == calls  # cache hit: no forward pass
    np.testing.assert_array_equal(again.arrays["feature5"], out["feature5"])
    assert again.skipped == [] and again.readable(images) == (again.arrays, images)
    # Another checkpoint key is another cache entry.
    extract(backbone, images, **{**kwargs, "ckpt_key": "k2"})
    assert CountingBackbone.calls > calls


def test_interrupted_extraction_leaves_no_complete_looking_file(tmp_path):
    images = _images(tmp_path, 6)
    images.paths[4] = tmp_path / "missing.jpg"  # fails mid-way
    backbone = freeze(Backbone("resnet18"))
    cache = tmp_path / "cache"
    with pytest.raises(BadImageError, match="missing.jpg"):
        extract(backbone, images, transform="voc_svm", layers=["feature5"], pooling="adaptive", size=64,
                batch_size=2, num_workers=0, cache_dir=cache, ckpt_key="k")
    assert not list(cache.rglob("*.npy"))


def _broken(images: ImageList, index: int, tmp_path) -> ImageList:
    (tmp_path / "broken.jpg").write_bytes(b"not a jpeg")
    images.paths[index] = tmp_path / "broken.jpg"
    return images


def test_bad_image_skip_never_reaches_the_backbone_and_is_counted(tmp_path):
    images = _broken(_images(tmp_path, 5), 1, tmp_path)
    backbone = freeze(Backbone("resnet18"))
    for module in backbone.modules():  # a blank image would now give a non-zero feature
        if isinstance(module, torch.nn.BatchNorm2d):
            torch.nn.init.constant_(module.bias, 0.1)
    # batch size 1: the unreadable image alone is an empty batch
    kwargs = dict(transform="voc_svm", layers=["feature5"], pooling="adaptive", size=64, num_workers=0,
                  cache_dir=tmp_path / "cache", ckpt_key="k", on_bad_image="skip")
    for batch_size in (2, 1):
        out = extract(backbone, images, batch_size=batch_size, **{**kwargs, "ckpt_key": f"k{batch_size}"})
        rows = out.arrays["feature5"]
        assert out.skipped == [1] and not rows[1].any() and rows[[0, 2, 3, 4]].any(axis=1).all()
        meta = json.loads(out.files["feature5"].with_suffix(".json").read_text())
        assert meta == {"n": 5, "bad_indices": [1]}
    readable, kept = out.readable(images)
    assert kept.paths == images.paths[:1] + images.paths[2:] and kept.labels.tolist() == [0, 2, 3, 4]
    np.testing.assert_array_equal(readable["feature5"], rows[[0, 2, 3, 4]])
    again = extract(backbone, images, batch_size=2, **{**kwargs, "ckpt_key": "k2"})  # cache hit: sidecar read back
    assert again.skipped == [1]


def test_bad_image_policy_is_part_of_the_cache_key(tmp_path):
    images = _images(tmp_path, 3)
    backbone = freeze(Backbone("resnet18"))
    kwargs = dict(transform="voc_svm", layers=["feature5"], pooling="adaptive", size=64, batch_size=2,
                  num_workers=0, cache_dir=tmp_path / "cache", ckpt_key="k")
    strict = extract(backbone, images, **kwargs)
    lenient = extract(backbone, images, on_bad_image="skip", **kwargs)
    assert strict.files["feature5"] != lenient.files["feature5"]
    np.testing.assert_array_equal(strict.arrays["feature5"], lenient.arrays["feature5"])
    # a `skip` cache with a left-out row is never read under `raise`: that run fails on the image
    (tmp_path / "b").mkdir()
    broken = _broken(_images(tmp_path / "b", 3), 2, tmp_path)
    assert extract(backbone, broken, on_bad_image="skip", **kwargs).skipped == [2]
    with pytest.raises(BadImageError, match="broken.jpg"):
        extract(backbone, broken, **kwargs)
    with pytest.raises(ValueError, match="on_bad_image"):
        extract(backbone, images, on_bad_image="zero", **kwargs)


def test_two_process_sharded_extraction_equals_one_process(tmp_path):
    """torchrun --nproc_per_node 2 (gloo): each rank extracts a shard, rank 0 merges; same numbers and skipped rows."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from densecl_bench.backbone import random_state_dict

    images = _images(tmp_path, 7)  # with the unreadable image below, 8: one in each shard's half
    (tmp_path / "img5_broken.jpg").write_bytes(b"not a jpeg")
    images.paths.insert(6, tmp_path / "img5_broken.jpg")  # the order of the script's sorted glob
    images.labels = np.arange(8)
    script = Path(__file__).with_name("dist_extract_script.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
           str(tmp_path), str(tmp_path / "cache2")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    backbone = Backbone("resnet18")
    backbone.load_state_dict(random_state_dict("resnet18"))
    single = extract(freeze(backbone), images, transform="voc_svm", layers=["feature5"], pooling="adaptive",
                     size=64, batch_size=2, num_workers=0, cache_dir=tmp_path / "cache1", ckpt_key="dist",
                     on_bad_image="skip")
    assert single.skipped == [6]
    merged = [p for p in (tmp_path / "cache2").rglob("*.npy")]
    assert len(merged) == 1 and ".part" not in merged[0].name  # part files were removed
    assert json.loads(merged[0].with_suffix(".json").read_text()) == {"n": 8, "bad_indices": [6]}
    np.testing.assert_allclose(np.load(merged[0]), single.arrays["feature5"], rtol=1e-4, atol=1e-5)  # batching differs
