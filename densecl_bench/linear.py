"""Linear probes on a frozen backbone: the multi-head (feature1..feature5) and the AvgPool linear.

PROTOCOLS.md §4; MMSelfSup 0.x `_base_/models/resnet50_multihead.py`, `models/heads/multi_cls_head.py`,
`models/heads/cls_head.py` and the configs `resnet50_mhead_linear-8xb32-steplr-90e_in1k`,
`resnet50_mhead_8xb32-steplr-28e_places205`, `resnet50_linear-8xb32-steplr-100e_in1k`.

Every probe trains on the engine (`densecl_bench.engine`): the step runs the backbone once per batch
in eval mode under `torch.inference_mode` (its BN statistics never move) and every head reads the
same forward. The engine makes the run resumable (a checkpoint of heads + optimizer + position + RNG
every epoch, written atomically), DDP-ready (torchrun), and reproducible across world sizes and
worker counts: the sampler forms the same global batches for any world size and each sample's
augmentation is seeded by (seed, epoch, index).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, DistributedSampler, Subset

from densecl_bench import dist, engine
from densecl_bench.backbone import POOL_GRID, Backbone, freeze, parse_layers, pool_feature
from densecl_bench.config import ConfigError, require
from densecl_bench.data.augment import build_train
from densecl_bench.data.base import ImageList, ImageListDataset, collate_readable
from densecl_bench.data.transforms import build as build_eval

log = logging.getLogger(__name__)

HEAD_KINDS = ("multi", "avgpool")
BATCH_POLICIES = ("accumulate", "scale_lr")
BN_MOMENTUM = 0.1  # SyncBN(momentum=0.1, affine=False) in resnet50_multihead.py
INIT_STD = 0.01  # Normal(0, 0.01) weights, zero bias, for both head kinds


# ---------------------------------------------------------------------------------------------
# Recipes and schedules


@dataclass(frozen=True)
class Recipe:
    """One probe's protocol, read from a config (PROTOCOLS.md §4.2).

    head: `multi` (per-layer pool -> BN(affine=False) -> Linear) or `avgpool` (global pool of
    feature5 -> Linear, no BN). lr is the published LR for `total_batch_size` images per step.
    Weight decay applies to every parameter: the reference's `norm_decay_mult=0` exempts BN
    parameters, and the heads' BN has none (affine=False), so it changes nothing here.
    """

    head: str
    layers: tuple[str, ...]
    pooling: str
    image_size: int
    train_aug: str
    test_aug: str
    lr: float
    momentum: float
    nesterov: bool
    weight_decay: float
    lr_steps: tuple[int, ...]
    lr_gamma: float
    epochs: int
    total_batch_size: int
    batch_size_per_gpu: int
    batch_policy: str
    eval_interval: int
    final_eval: bool

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> Recipe:
        """Validate and read a resolved linear-probe config; errors name the config and the key."""
        num = (int, float)
        head = require(cfg, "head", str)
        if head not in HEAD_KINDS:
            raise ConfigError(f"config {cfg.get('_config', '?')}: head must be one of {HEAD_KINDS}, got {head!r}")
        policy = require(cfg, "batch_policy", str)
        if policy not in BATCH_POLICIES:
            raise ConfigError(
                f"config {cfg.get('_config', '?')}: batch_policy must be one of {BATCH_POLICIES}, got {policy!r}"
            )
        layers = tuple(parse_layers(require(cfg, "layers", (str, list))))
        if head == "avgpool" and layers != ("feature5",):
            raise ConfigError(f"config {cfg.get('_config', '?')}: the avgpool head reads feature5 only")
        recipe = cls(
            head=head,
            layers=layers,
            pooling=require(cfg, "pooling", str),
            image_size=require(cfg, "image_size", int),
            train_aug=require(cfg, "train_aug", str),
            test_aug=require(cfg, "test_aug", str),
            lr=float(require(cfg, "lr", num)),
            momentum=float(require(cfg, "momentum", num)),
            nesterov=require(cfg, "nesterov", bool),
            weight_decay=float(require(cfg, "weight_decay", num)),
            lr_steps=tuple(int(s) for s in require(cfg, "lr_steps", list)),
            lr_gamma=float(require(cfg, "lr_gamma", num)),
            epochs=require(cfg, "epochs", int),
            total_batch_size=require(cfg, "total_batch_size", int),
            batch_size_per_gpu=require(cfg, "batch_size_per_gpu", int),
            batch_policy=policy,
            eval_interval=require(cfg, "eval_interval", int),
            final_eval=require(cfg, "final_eval", bool),
        )
        if recipe.head == "avgpool" and recipe.pooling != "global":
            raise ConfigError(f"config {cfg.get('_config', '?')}: the avgpool head needs pooling 'global'")
        return recipe


@dataclass(frozen=True)
class BatchPlan:
    """How the published total batch is reached at this world size (recorded with every metric)."""

    batch_policy: str
    world_size: int
    batch_size_per_gpu: int
    accumulate_steps: int
    images_per_step: int  # images behind one optimizer step
    lr: float  # base LR actually used (scaled under `scale_lr`)
    deviates: bool  # images_per_step differs from the recipe's total_batch_size


def plan_batch(recipe: Recipe, world_size: int) -> BatchPlan:
    """Keep the recipe's total batch by gradient accumulation, or scale the LR linearly.

    `accumulate`: each optimizer step sees total_batch_size images. When world_size *
    batch_size_per_gpu does not divide it (e.g. 16 GPUs x 32 > 256), the per-GPU batch is lowered to
    the largest size that does (16 x 16), so the recipe's step is kept exactly. BN statistics are
    still per forward pass, as SyncBN over one step's ranks. `scale_lr`: one forward per step, LR *
    images_per_step / total_batch_size.
    """
    per_gpu = recipe.batch_size_per_gpu
    if recipe.batch_policy == "accumulate":
        fits = [b for b in range(per_gpu, 0, -1) if recipe.total_batch_size % (world_size * b) == 0]
        if not fits:
            raise ConfigError(
                f"batch_policy accumulate: {world_size} processes cannot share a total batch of "
                f"{recipe.total_batch_size}; use fewer processes or batch_policy scale_lr"
            )
        per_gpu = fits[0]
    per_pass = world_size * per_gpu
    if recipe.batch_policy == "accumulate":
        accumulate, lr = recipe.total_batch_size // per_pass, recipe.lr
    else:
        accumulate, lr = 1, recipe.lr * per_pass / recipe.total_batch_size
    images = per_pass * accumulate
    plan = BatchPlan(
        batch_policy=recipe.batch_policy,
        world_size=world_size,
        batch_size_per_gpu=per_gpu,
        accumulate_steps=accumulate,
        images_per_step=images,
        lr=lr,
        deviates=per_pass != recipe.total_batch_size or per_gpu != recipe.batch_size_per_gpu,
    )
    if plan.deviates and dist.is_main():
        if recipe.batch_policy == "scale_lr":
            how = f"scaling the LR {recipe.lr:g} -> {lr:g}"
        else:
            how = f"accumulating {accumulate} pass(es) per step at {per_gpu} per GPU"
        log.warning(
            "the published recipe uses %d images per step; %d process(es) x %d per GPU = %d, so %s",
            recipe.total_batch_size, world_size, per_gpu, per_pass, how,
        )
    return plan


# ---------------------------------------------------------------------------------------------
# Heads


class StatsSyncBatchNorm(nn.BatchNorm2d):
    """BatchNorm whose training statistics are reduced over all ranks: SyncBN for inputs without grad.

    The reference uses SyncBN(affine=False). torch's SyncBatchNorm runs on GPU only; the probe's BN
    input comes from the frozen backbone and needs no backward through the statistics, so one
    all-reduce of (sum, sum of squares, count) gives SyncBN's exact result on any backend (gloo too).
    Single-process, it is plain BatchNorm2d.
    """

    def forward(self, x: Tensor) -> Tensor:
        if not (self.training and dist.is_dist()):
            return super().forward(x)
        if x.requires_grad:
            raise RuntimeError("StatsSyncBatchNorm does not backpropagate through its statistics")
        c = x.shape[1]
        x64 = x.double()
        stats = torch.cat([x64.sum((0, 2, 3)), (x64 * x64).sum((0, 2, 3)), x64.new_tensor([x.numel() // c])])
        dist.all_reduce_sum(stats)
        count = stats[-1]
        mean = stats[:c] / count
        var = (stats[c : 2 * c] / count - mean * mean).clamp_min(0)
        with torch.no_grad():
            m = self.momentum
            self.running_mean.mul_(1 - m).add_(mean.to(self.running_mean.dtype), alpha=m)
            unbiased = var * count / (count - 1).clamp_min(1)
            self.running_var.mul_(1 - m).add_(unbiased.to(self.running_var.dtype), alpha=m)
            self.num_batches_tracked.add_(1)
        shape = (1, c, 1, 1)
        return (x - mean.to(x.dtype).view(shape)) * torch.rsqrt(var + self.eps).to(x.dtype).view(shape)


class ProbeHeads(nn.Module):
    """One linear classifier per probed layer, all fed by one backbone forward.

    multi (norm=True): pooled map (C x g x g) -> BN over C (affine=False, momentum 0.1) -> flatten
    -> Linear(C*g*g, classes), as MultiClsHead. avgpool (pooling 'global', norm=False): Linear(C, classes).
    """

    def __init__(
        self,
        channels: Mapping[str, int],
        layers: Sequence[str],
        num_classes: int,
        pooling: str,
        norm: bool,
    ) -> None:
        super().__init__()
        self.layers = tuple(layers)
        self.pooling = pooling
        self.channels = {name: channels[name] for name in self.layers}
        self.grid = {name: 1 if pooling == "global" else POOL_GRID[name] for name in self.layers}
        self.norms = nn.ModuleDict({
            name: StatsSyncBatchNorm(self.channels[name], momentum=BN_MOMENTUM, affine=False) if norm else nn.Identity()
            for name in self.layers
        })
        self.fcs = nn.ModuleDict({name: nn.Linear(self.dim(name), num_classes) for name in self.layers})
        for fc in self.fcs.values():
            nn.init.normal_(fc.weight, std=INIT_STD)
            nn.init.zeros_(fc.bias)

    def dim(self, layer: str) -> int:
        """Input dim of a head's Linear (9216/9216/8192/9216/8192 for ResNet-50's multi-head)."""
        return self.channels[layer] * self.grid[layer] ** 2

    def pool(self, feats: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Pool each feature map to its (N, C, g, g) grid (PROTOCOLS.md §2.2 kernels, or adaptive/global)."""
        out = {}
        for name in self.layers:
            flat = pool_feature(feats[name], name, self.pooling)
            out[name] = flat.view(flat.shape[0], self.channels[name], self.grid[name], self.grid[name])
        return out

    def forward(self, pooled: Mapping[str, Tensor]) -> dict[str, Tensor]:
        return {name: self.fcs[name](self.norms[name](pooled[name]).flatten(1)) for name in self.layers}


def build_heads(recipe: Recipe, backbone: Backbone, num_classes: int, seed: int) -> ProbeHeads:
    """Heads initialised from `seed` alone (the global RNG is left as it was)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return ProbeHeads(backbone.channels, recipe.layers, num_classes, recipe.pooling, norm=recipe.head == "multi")


# ---------------------------------------------------------------------------------------------
# The shared forward, loss and evaluation


class Probe:
    """A frozen backbone and the heads trained on it; `model` is the heads, DDP-wrapped when distributed.

    The precision (autocast) is the caller's context: the trainer's step and `inference_on_dataset`.
    """

    def __init__(self, backbone: Backbone, heads: ProbeHeads, device: torch.device) -> None:
        self.backbone = freeze(backbone).to(device)
        self.device = device
        self.channels_last = device.type == "cuda"  # the same arithmetic, a faster layout for cuDNN
        if self.channels_last:
            self.backbone.to(memory_format=torch.channels_last)
        # BN statistics are synchronised by StatsSyncBatchNorm itself, not by SyncBN or broadcast buffers
        self.model = engine.ddp.prepare(heads, device, sync_bn=False, broadcast_buffers=False)
        self.heads = heads

    def pooled(self, images: Tensor) -> dict[str, Tensor]:
        """One backbone pass in inference mode (no graph, BN in eval), pooled for every head."""
        images = images.to(self.device, non_blocking=True)
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            return self.heads.pool(self.backbone(images, self.heads.layers))

    def loss(self, images: Tensor, labels: Tensor) -> dict[str, Tensor]:
        """Per head (`loss.<layer>`), the sum of its cross-entropy over this pass's images, divided by
        the mean per-rank image count (the terms add up to the heads' summed mean loss).

        DDP averages the ranks' gradients, so each rank divides its sum by the mean per-rank count:
        ranks left with fewer images by skipped unreadable ones (or none: the loss is then zero, with
        a graph) weigh each image as one process over the whole global batch would.
        """
        # inference tensors cannot enter autograd; the pooled maps are small, so copy them out
        pooled = {name: t.float().clone() for name, t in self.pooled(images).items()}
        logits = self.model(pooled)
        world = dist.world_size()
        per_rank = dist.all_reduce_sum(torch.tensor(float(len(labels)), device=self.device)) / world
        per_rank = per_rank.clamp_min(1 / world)  # any non-zero count is at least 1 / world
        return {f"loss.{name}": F.cross_entropy(out.float(), labels, reduction="sum") / per_rank
                for name, out in logits.items()}


class UnreadableImages(engine.DatasetEvaluator):
    """The indices of the images left out of the batches (`on_bad_image: skip`), over every rank."""

    def __init__(self, n: int, device: torch.device) -> None:
        self.n, self.device = n, device
        self.reset()

    def reset(self) -> None:
        self.indices: list[int] = []

    def process(self, inputs: tuple[Tensor, Tensor, Tensor], outputs: Any) -> None:
        self.indices += inputs[2].tolist()

    def evaluate(self) -> dict[str, Any]:
        return {"skipped": _union_over_ranks(self.indices, self.n, self.device)}


def _union_over_ranks(indices: list[int], n: int, device: torch.device) -> list[int]:
    """The sorted union over ranks of each rank's `indices` (< n): one all-reduce of an n-long mask."""
    mask = torch.zeros(n, dtype=torch.int32, device=device)
    mask[indices] = 1
    return dist.all_reduce_sum(mask).nonzero().flatten().tolist()


# ---------------------------------------------------------------------------------------------
# Training


@dataclass
class ProbeResult:
    """Final accuracies per head (percent) and the record of how they were obtained."""

    top1: dict[str, float]
    top5: dict[str, float]
    evaluated_epoch: int
    plan: BatchPlan
    history: list[dict[str, Any]] = field(default_factory=list)
    resumed_from_epoch: int = 0
    skipped: dict[str, list[int]] = field(default_factory=dict)  # list name -> unreadable images left out

    def extra(self, layer: str) -> dict[str, Any]:
        """What the ledger keeps beside a head's top-1: its top-5 and the batch plan (policy, LR, steps)."""
        return {
            "top5": self.top5[layer],
            "evaluated_epoch": self.evaluated_epoch,
            **{k: v for k, v in asdict(self.plan).items() if k != "deviates"},
        }


def train_probe(
    backbone: Backbone,
    recipe: Recipe,
    train_list: ImageList,
    val_list: ImageList,
    ckpt_path: Path,
    *,
    device: torch.device,
    key: engine.ResumeKey | None = None,
    seed: int = 0,
    num_workers: int = 2,
    on_bad_image: str = "raise",
    precision: str = engine.precision.DEFAULT,
    progress: bool | None = None,
    name: str = "probe",
) -> ProbeResult:
    """Train `recipe`'s heads on `train_list`, evaluate on `val_list`, resuming from `ckpt_path`.

    key: what the checkpoint belongs to (backbone sha256, config fingerprint, seed, world size); a
    checkpoint with another key is ignored and overwritten. Default: a random-init key of this seed
    and world size. Evaluations run every `eval_interval` epochs and, with `final_eval`, at the last
    epoch; the result is the last evaluation. on_bad_image: `raise` stops at an unreadable image with
    its path; `skip` drops it from its batch (the loss and the heads' BN statistics are the readable
    images' alone) and from the evaluation count, and `ProbeResult.skipped` lists it.
    """
    if train_list.classes != val_list.classes:
        raise ValueError(f"{name}: train and val class lists differ ({len(train_list.classes)} vs {len(val_list.classes)})")
    if not recipe.final_eval and not 0 < recipe.eval_interval <= recipe.epochs:
        raise ValueError(
            f"{name}: no evaluation would run in {recipe.epochs} epochs (eval_interval {recipe.eval_interval}, "
            "final_eval false); set final_eval: true"
        )
    world, rank = dist.world_size(), dist.rank()
    key = key or engine.ResumeKey("", "", seed, world)
    plan = plan_batch(recipe, world)
    probe = Probe(backbone, build_heads(recipe, backbone, len(train_list.classes), seed), device)
    optimizer = torch.optim.SGD(
        probe.heads.parameters(),
        lr=plan.lr,
        momentum=recipe.momentum,
        nesterov=recipe.nesterov,
        weight_decay=recipe.weight_decay,
    )

    size, pin = recipe.image_size, device.type == "cuda"
    train_set = engine.SeededDataset(ImageListDataset(train_list, build_train(recipe.train_aug, size), on_bad_image), seed)
    # shuffle with the seed and stride over ranks: global batch i is the same images for any world size
    sampler = DistributedSampler(train_set, num_replicas=world, rank=rank, shuffle=True, seed=seed)
    # unreadable images (`on_bad_image: skip`) leave the batch in collate_readable
    train_data = engine.EpochLoader(train_set, sampler, plan.batch_size_per_gpu, num_workers=num_workers,
                                    pin_memory=pin, collate_fn=collate_readable)
    val_set = ImageListDataset(val_list, build_eval(recipe.test_aug, size), on_bad_image)
    val_loader = DataLoader(Subset(val_set, range(rank, len(val_set), world)), plan.batch_size_per_gpu,
                            num_workers=num_workers, pin_memory=pin, collate_fn=collate_readable)
    train_labels = torch.as_tensor(train_list.labels, dtype=torch.long, device=device)
    val_labels = torch.as_tensor(val_list.labels, dtype=torch.long, device=device)
    train_skipped = UnreadableImages(len(train_list), device)  # this epoch's (after a mid-epoch resume: since it)
    evaluator = engine.DatasetEvaluators([
        engine.ClassificationAccuracy((1, 5), targets=lambda batch: val_labels[batch[1].to(device)], device=device),
        UnreadableImages(len(val_list), device),
    ])

    def step(trainer: engine.Trainer, batch: tuple[Tensor, Tensor, Tensor]) -> dict[str, Tensor]:
        images, index, _ = batch
        if trainer.inner_iter == 0:
            train_skipped.reset()
        train_skipped.process(batch, None)
        return probe.loss(images, train_labels[index.to(device)])

    def evaluate() -> dict[str, Any]:
        results = engine.inference_on_dataset(
            probe.heads, val_loader, evaluator, forward=lambda heads, batch: heads(probe.pooled(batch[0])),
            precision=precision, device=device, progress=progress, desc=f"{name} eval",
        )
        results["skipped"] = {train_list.name: train_skipped.evaluate()["skipped"], val_list.name: results["skipped"]}
        if dist.is_main():
            log.info("%s: top-1 %s", name, ", ".join(f"{k} {v:.2f}" for k, v in results["top1"].items()))
        return results

    evaluation = engine.EvalHook(recipe.eval_interval, evaluate, final=recipe.final_eval)
    metrics = engine.MetricLogger(ckpt_path.with_suffix(".metrics.jsonl"), images_per_iter=plan.batch_size_per_gpu,
                                  progress=progress)
    schedule = engine.LRSchedule("step", total=recipe.epochs, steps=recipe.lr_steps, gamma=recipe.lr_gamma)
    trainer = engine.Trainer(
        probe.model, optimizer, train_data, step, max_iters=recipe.epochs * len(train_data),
        hooks=[engine.LRSchedulerHook(engine.LRScheduler(optimizer, schedule)), evaluation, metrics,
               engine.PeriodicCheckpointer(0)],
        checkpointer=engine.Checkpointer(ckpt_path.parent, key, latest=ckpt_path.name),
        accumulate=plan.accumulate_steps, precision=precision, device=device, name=name,
    )
    trainer.train()

    final = evaluation.history[-1]
    return ProbeResult(
        top1=final["top1"],
        top5=final["top5"],
        evaluated_epoch=final["epoch"],
        plan=plan,
        history=metrics.history,
        resumed_from_epoch=trainer.start_iter // trainer.iters_per_epoch,
        skipped={name: rows for name, rows in final["skipped"].items() if rows},
    )
