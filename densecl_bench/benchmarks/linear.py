"""ImageNet and Places205 linear evaluation plugins (PROTOCOLS.md §4; MMSelfSup 0.x linear configs).

`imagenet_linear` fills the "ImageNet Linear Evaluation" table: Feature1..Feature5 from the multi-head
probe and AvgPool from the separate AvgPool-linear probe (its own config, an `extra_configs` entry: the
runner resolves it with the same profiles and fingerprints the stage over both).
`places205_linear` fills "Places205 Linear Evaluation", `inat18_linear` "iNaturalist2018 Linear Evaluation".
Each probe checkpoints under the stage's run dir and resumes from it when the stage is re-run.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

from densecl_bench import config, dist
from densecl_bench.benchmarks.base import Benchmark, Metric, RunContext
from densecl_bench.data.base import ImageList
from densecl_bench.data.imagenet import imagenet
from densecl_bench.data.inat import inat2018
from densecl_bench.data.layout import INAT_ANNOTATIONS, PLACES_IMAGES, layout_error
from densecl_bench.data.places import places205
from densecl_bench.engine import ResumeKey
from densecl_bench.linear import ProbeResult, Recipe, train_probe


def run_probe(ctx: RunContext, cfg: dict[str, Any], probe: str, train: ImageList, val: ImageList) -> ProbeResult:
    """Train one probe of `cfg` on the context's backbone; its checkpoint is `<run_dir>/<probe>_last.pth`.

    The resume key ties the checkpoint to the backbone's sha256, the config with the bad-image policy,
    the seed and the world size. Images the probe skipped go to `ctx.skipped_images`.
    """
    keyed = {k: v for k, v in cfg.items() if k != "world_size"}
    result = train_probe(
        ctx.backbone,
        Recipe.from_config(cfg),
        train,
        val,
        ctx.run_dir / f"{probe}_last.pth",
        device=ctx.device,
        key=ResumeKey(ctx.checkpoint.sha256, config.fingerprint({**keyed, "on_bad_image": ctx.on_bad_image}),
                      ctx.seed, dist.world_size()),
        seed=ctx.seed,
        num_workers=ctx.num_workers,
        on_bad_image=ctx.on_bad_image,
        precision=cfg["precision"],
        name=f"{probe} ({cfg.get('_config', '?')})",
    )
    ctx.skipped_images.update(result.skipped)
    return result


def head_metrics(benchmark: str, result: ProbeResult, cfg: dict[str, Any], names: dict[str, str]) -> list[Metric]:
    """One Metric per head: top-1 (percent) as the value; top-5, batch plan and the probe's config in extra.

    The AvgPool probe's config is not the stage's config, so each metric carries its own fingerprint.
    """
    probe_cfg = {"config": cfg.get("_config"), "config_fingerprint": config.fingerprint(cfg)}
    return [
        Metric(benchmark, metric, result.top1[layer], {**result.extra(layer), **probe_cfg})
        for layer, metric in names.items()
    ]


class _MultiHeadLinear(Benchmark):
    """A multi-head probe over feature1..feature5 on one single-label dataset."""

    gpus = 8
    folder: ClassVar[str]
    reader: ClassVar[Callable[[Path, str], ImageList]]

    def run(self, ctx: RunContext) -> list[Metric]:
        train, val = self.read(ctx.data_root / self.folder, ctx.config)
        return self.mhead(ctx, train, val) + self.more_probes(ctx, train, val)

    def read(self, root: Path, cfg: dict[str, Any]) -> tuple[ImageList, ImageList]:
        """The train and val lists of the dataset folder."""
        return self.reader(root, "train"), self.reader(root, "val")

    def mhead(self, ctx: RunContext, train: ImageList, val: ImageList) -> list[Metric]:
        result = run_probe(ctx, ctx.config, "mhead", train, val)
        layers = Recipe.from_config(ctx.config).layers
        return head_metrics(self.name, result, ctx.config, {layer: layer for layer in layers})

    def more_probes(self, ctx: RunContext, train: ImageList, val: ImageList) -> list[Metric]:
        """Probes beyond the multi-head that feed the same table (none by default)."""
        return []


class ImagenetLinear(_MultiHeadLinear):
    """ImageNet multi-head (feature1..feature5, 90 epochs) and AvgPool linear (100 epochs)."""

    name = "imagenet_linear"
    aliases = ("in_linear",)
    table = "ImageNet Linear Evaluation"
    config = "resnet50_mhead_linear-8xb32-steplr-90e_in1k"
    extra_configs = ("resnet50_linear-8xb32-steplr-100e_in1k",)  # the AvgPool column
    order = 30
    folder = "imagenet"
    reader = staticmethod(imagenet)

    def required_data(self, data_root: Path) -> list[Path]:
        return [data_root / self.folder / "train", data_root / self.folder / "val"]

    def more_probes(self, ctx: RunContext, train: ImageList, val: ImageList) -> list[Metric]:
        """The AvgPool column: its own config, resolved by the runner like the multi-head one."""
        avg_cfg = ctx.configs[self.extra_configs[0]]
        result = run_probe(ctx, avg_cfg, "avgpool", train, val)
        return head_metrics(self.name, result, avg_cfg, {"feature5": "avgpool"})


class Places205Linear(_MultiHeadLinear):
    """Places205 multi-head (feature1..feature5, 28 epochs, final evaluation at epoch 28)."""

    name = "places205_linear"
    aliases = ("places_linear",)
    table = "Places205 Linear Evaluation"
    config = "resnet50_mhead_8xb32-steplr-28e_places205"
    order = 35
    folder = "Places205"
    reader = staticmethod(places205)

    def required_data(self, data_root: Path) -> list[Path]:
        root = data_root / self.folder
        lists = root / "trainvalsplit_places205"
        return [root / PLACES_IMAGES, lists / "train_places205.csv", lists / "val_places205.csv"]


class Inat18Linear(_MultiHeadLinear):
    """iNaturalist 2018 multi-head (feature1..feature5, 84 epochs, steps at 24/48/72, 8142 classes)."""

    name = "inat18_linear"
    aliases = ("inat_linear",)
    table = "iNaturalist2018 Linear Evaluation"
    config = "resnet50_mhead_8xb32-steplr-84e_inat18"
    order = 33
    folder = "iNaturalist2018"
    reader = staticmethod(inat2018)

    def required_data(self, data_root: Path) -> list[Path]:
        return [data_root / self.folder / name for name in INAT_ANNOTATIONS.values()]

    def read(self, root: Path, cfg: dict[str, Any]) -> tuple[ImageList, ImageList]:
        """The lists, after checking the class count against the config's `num_classes` (8142): another
        iNaturalist release (2017 has 5089 species, 2019 1010) is refused by name."""
        train, val = super().read(root, cfg)
        if len(train.classes) != cfg["num_classes"]:
            raise layout_error("inat18", f"{root}: {len(train.classes)} categories in {INAT_ANNOTATIONS['train']}, "
                                         f"the protocol has {cfg['num_classes']}")
        return train, val
