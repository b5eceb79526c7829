"""Precision is a protocol setting: fp32 unless named, and then in the fingerprint, the feature-cache
key, the ledger record and the tables; extraction really runs under it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner
from PIL import Image

from densecl_bench import config, registry, runner
from densecl_bench.backbone import Backbone, freeze, pool_feature
from densecl_bench.benchmarks.base import Benchmark, Metric, RunContext
from densecl_bench.checkpoint import load_checkpoint
from densecl_bench.cli import main
from densecl_bench.config import CONFIG_DIR, ConfigError
from densecl_bench.data import transforms
from densecl_bench.data.base import ImageList
from densecl_bench.features import extract
from densecl_bench.results import Ledger, caveats

SEEN: list[RunContext] = []


class Probe(Benchmark):
    """Needs no data; records the context it ran with."""

    name, table, config = "imagenet_knn", "ImageNet Nearest-Neighbor Classification", "knn_imagenet"

    def required_data(self, data_root: Path) -> list[Path]:
        return []

    def run(self, ctx: RunContext) -> list[Metric]:
        SEEN.append(ctx)
        return [Metric(self.name, "k=20", 42.0)]


@pytest.fixture
def probe(monkeypatch):
    SEEN.clear()
    monkeypatch.setattr(registry, "available", lambda: {Probe.name: Probe})


def images(tmp_path: Path, n: int = 4) -> ImageList:
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        paths.append(tmp_path / f"img{i}.png")
        Image.fromarray(rng.integers(0, 256, (40, 52, 3)).astype(np.uint8)).save(paths[-1])
    return ImageList("toy/train", tmp_path, paths, np.arange(n), [str(i) for i in range(n)])


@pytest.mark.parametrize("path", sorted(CONFIG_DIR.glob("*/*.yaml")), ids=lambda p: p.stem)
def test_every_shipped_config_names_fp32_and_no_profile_changes_it(path):
    raw = yaml.safe_load(path.read_text())
    assert raw["precision"] == "fp32"
    assert all("precision" not in (profile or {}) for profile in (raw.get("profiles") or {}).values())


def run(tmp_path: Path, run_id: str, *args: str) -> dict:
    out = CliRunner().invoke(main, ["run", "imagenet_knn", "--ckpt", "random", "--arch", "resnet18", "--data-root",
                                    str(tmp_path), "--runs-dir", str(tmp_path / "runs"), "--run-id", run_id, *args])
    assert out.exit_code == 0, out.output
    return Ledger(tmp_path / "runs" / run_id).records()[0]


def test_bf16_is_in_the_fingerprint_the_record_and_the_table_and_fp32_is_the_default(tmp_path, probe):
    default, fp32, bf16 = run(tmp_path, "d"), run(tmp_path, "f", "--precision", "fp32"), run(tmp_path, "b",
                                                                                             "--precision", "bf16")
    assert [ctx.precision for ctx in SEEN] == ["fp32", "fp32", "bf16"]
    assert default["config"]["precision"] == default["provenance"]["precision"] == "fp32"
    assert default["fingerprint"] == fp32["fingerprint"] != bf16["fingerprint"]
    assert bf16["config"]["precision"] == bf16["provenance"]["precision"] == "bf16"
    assert caveats(default) == [] and caveats(bf16) == ["precision bf16 (the published numbers are fp32)"]
    tables = (tmp_path / "runs" / "b" / "tables.md").read_text()
    assert "| random-init-resnet18 † | |" in tables
    assert "† random-init-resnet18: precision bf16 (the published numbers are fp32)." in tables
    assert "†" not in (tmp_path / "runs" / "d" / "tables.md").read_text()


def test_a_bf16_run_gets_its_own_default_run_id_and_a_bad_precision_is_refused(tmp_path, probe):
    ckpt = load_checkpoint("random", arch="resnet18")
    assert runner.default_run_id("x", ckpt, [], "bf16") == runner.default_run_id("x", ckpt, []) + "-bf16"
    assert runner.default_run_id("x", ckpt, [], "fp32") == runner.default_run_id("x", ckpt, [])
    with pytest.raises(ConfigError, match="precision must be one of"):
        runner.run_suite(["imagenet_knn"], "random", arch="resnet18", data_root=tmp_path, precision="fp16")


def test_extraction_runs_under_the_named_precision_and_caches_it_apart(tmp_path):
    toy = images(tmp_path)
    torch.manual_seed(0)
    backbone = freeze(Backbone("resnet18"))
    kwargs = dict(transform="voc_svm", layers=["feature5"], pooling="adaptive", size=64, batch_size=4,
                  num_workers=0, cache_dir=tmp_path / "cache", ckpt_key="k")
    torch.backends.cudnn.allow_tf32 = True  # torch's default
    fp32, bf16 = extract(backbone, toy, **kwargs), extract(backbone, toy, precision="bf16", **kwargs)
    assert not torch.backends.cudnn.allow_tf32  # fp32 is IEEE fp32 on GPUs too, not TF32
    assert fp32.files["feature5"] != bf16.files["feature5"]
    tf = transforms.voc_svm(64)
    x = torch.stack([tf(Image.open(p).convert("RGB")) for p in toy.paths])
    with torch.inference_mode():
        plain = pool_feature(backbone(x, ["feature5"])["feature5"], "feature5", "adaptive").numpy()
    np.testing.assert_array_equal(fp32.arrays["feature5"], plain)  # fp32 is the plain forward, bit for bit
    a, b = np.asarray(fp32.arrays["feature5"]), np.asarray(bf16.arrays["feature5"])
    assert not np.array_equal(a, b)  # bf16 really ran...
    assert np.abs(a - b).max() < 0.05 * np.abs(a).max()  # ...and gives nearly the same features
    with pytest.raises(ConfigError, match="precision"):
        extract(backbone, toy, precision="fp16", **kwargs)


def test_the_context_extracts_under_its_config_precision(tmp_path):
    toy = images(tmp_path)
    loaded = load_checkpoint("random", arch="resnet18")
    files = {}
    for precision in ("fp32", "bf16"):
        ctx = RunContext(backbone=freeze(Backbone("resnet18")), checkpoint=loaded, data_root=tmp_path, demo=True,
                         device=torch.device("cpu"), run_dir=tmp_path / "run", cache_dir=tmp_path / "cache",
                         config={"precision": precision}, num_workers=0)
        ctx.features(toy, "voc_svm", ["feature5"], "adaptive", size=64)
        files[precision] = sorted((tmp_path / "cache").rglob("*.npy"))
    assert len(files["fp32"]) == 1 and len(files["bf16"]) == 2


def test_cli_extract_and_pretrain_take_precision(tmp_path, monkeypatch):
    calls = []

    def fake_extract(*args, **kwargs):
        calls.append(kwargs["precision"])
        return {}

    monkeypatch.setattr(runner, "extract_dataset", fake_extract)
    for args in ([], ["--precision", "bf16"]):
        out = CliRunner().invoke(main, ["extract", "--ckpt", "random", "--dataset", "voc07", "--split", "test", *args])
        assert out.exit_code == 0, out.output
    assert calls == ["fp32", "bf16"]

    import densecl_bench.pretrain as pretrain_pkg

    seen = []
    monkeypatch.setattr(pretrain_pkg, "pretrain", lambda cfg, **kw: seen.append(config.load(cfg, "pretrain")) or "x")
    for args in ([], ["--precision", "bf16"]):
        out = CliRunner().invoke(main, ["pretrain", "densecl_demo", *args])
        assert out.exit_code == 0, out.output
    assert [cfg["precision"] for cfg in seen] == ["fp32", "bf16"]
    assert seen[1]["_config"] == "densecl_demo" and seen[1]["optimizer"] == seen[0]["optimizer"]
