"""Feature extraction: documented dims per layer, cache hits, atomic writes, bad images."""

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
    out = extract(backbone, images, **kwargs)
    assert out["feature2"].shape == (5, 64 * 36) and out["feature5"].shape == (5, 512 * 4)
    tf = transforms.voc_svm(64)
    x = torch.stack([tf(Image.open(p).convert("RGB")) for p in images.paths])
    with torch.inference_mode():
        ref = pool_feature(backbone(x, ["feature5"])["feature5"], "feature5", "adaptive").numpy()
    np.testing.assert_allclose(out["feature5"], ref, rtol=1e-4, atol=1e-5)
    calls = CountingBackbone.calls
    again = extract(backbone, images, **kwargs)
    assert CountingBackbone.calls == calls  # cache hit: no forward pass
    np.testing.assert_array_equal(again["feature5"], out["feature5"])
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


def test_bad_image_skip_is_counted(tmp_path):
    images = _images(tmp_path, 4)
    (tmp_path / "broken.jpg").write_bytes(b"not a jpeg")
    images.paths[1] = tmp_path / "broken.jpg"
    backbone = freeze(Backbone("resnet18"))
    out = extract(backbone, images, transform="voc_svm", layers=["feature5"], pooling="adaptive", size=64,
                  batch_size=2, num_workers=0, cache_dir=tmp_path / "cache", ckpt_key="k", on_bad_image="skip")
    assert not out["feature5"][1].any() and out["feature5"][0].any()
    meta = next((tmp_path / "cache").rglob("*.json")).read_text()
    assert '"bad_indices": [\n    1\n  ]' in meta


def test_two_process_sharded_extraction_equals_one_process(tmp_path):
    """torchrun --nproc_per_node 2 (gloo): each rank extracts a shard, rank 0 merges; same numbers."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from densecl_bench.backbone import random_state_dict

    images = _images(tmp_path, 7)  # odd count: unequal shards
    script = Path(__file__).with_name("dist_extract_script.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
           str(tmp_path), str(tmp_path / "cache2")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    backbone = Backbone("resnet18")
    backbone.load_state_dict(random_state_dict("resnet18"))
    single = extract(freeze(backbone), images, transform="voc_svm", layers=["feature5"], pooling="adaptive",
                     size=64, batch_size=2, num_workers=0, cache_dir=tmp_path / "cache1", ckpt_key="dist")
    merged = [p for p in (tmp_path / "cache2").rglob("*.npy")]
    assert len(merged) == 1 and ".part" not in merged[0].name  # part files were removed
    np.testing.assert_allclose(np.load(merged[0]), single["feature5"], rtol=1e-4, atol=1e-5)  # batching differs
