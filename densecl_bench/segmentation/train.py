"""FCN R50-D8 training and evaluation on the engine (PROTOCOLS.md §8, §13): one function from a checkpoint,
a resolved config and a dataset (VOC12+aug, Cityscapes) to the final mIoU, resumable from its run directory.

What differs between the benchmarks is config, not code: `num_classes`, the train pipeline's scale and
crop, the heads' `align_corners`, the test mode (`whole`, or `slide` with `test_crop` / `test_stride`)
and the schedule."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, DistributedSampler, Subset

from densecl_bench import config, dist, engine
from densecl_bench.checkpoint import LoadedCheckpoint
from densecl_bench.segmentation.data import (
    PhotoMetricDistortion, SegDataset, SegmentationEvalSet, SegmentationTrainSet, TrainPipeline,
)
from densecl_bench.segmentation.evaluator import SemSegEvaluator
from densecl_bench.segmentation.model import FCN, SlideWindow, dilated_backbone_from_checkpoint, predict, seg_loss

TEST_MODES = ("whole", "slide")


@dataclass
class SegResult:
    """The last evaluation (mIoU, aAcc, per-class IoU; percent) and every evaluation of the run."""

    final: dict[str, Any]
    history: list[dict[str, Any]]


def build_model(ckpt: LoadedCheckpoint, cfg: dict[str, Any]) -> FCN:
    """The dilated backbone holding the checkpoint and the two heads, drawn from torch's global RNG."""
    return FCN(dilated_backbone_from_checkpoint(ckpt), cfg["num_classes"], cfg["decode_channels"], cfg["aux_channels"],
               cfg["dropout"])


def inference_window(cfg: dict[str, Any]) -> SlideWindow | None:
    """The config's inference mode: None for `whole`, the crop and stride grid for `slide`."""
    mode = cfg["test_mode"]
    if mode not in TEST_MODES:
        raise config.ConfigError(f"config {cfg.get('_config', '?')}: test_mode must be one of {TEST_MODES}, got {mode!r}")
    return SlideWindow(tuple(cfg["test_crop"]), tuple(cfg["test_stride"])) if mode == "slide" else None


def train_fcn(ckpt: LoadedCheckpoint, cfg: dict[str, Any], dataset: SegDataset, run_dir: Path, *,
              device: torch.device, seed: int = 0, num_workers: int = 2, until: int | None = None) -> SegResult:
    """Train FCN on `dataset.train` and evaluate on `dataset.val` every `eval_interval` iterations and at the end.

    The state is checkpointed in `run_dir` and resumed from there by a run with the same checkpoint,
    config, seed and world size. until: stop after that many iterations (the schedule still spans max_iters).
    """
    if len(dataset.classes) != cfg["num_classes"]:
        raise config.ConfigError(f"config {cfg.get('_config', '?')}: num_classes {cfg['num_classes']}, "
                                 f"but {dataset.name} has {len(dataset.classes)} classes")
    window, align = inference_window(cfg), cfg["align_corners"]
    world, rank = dist.world_size(), dist.rank()
    per_process = engine.per_rank_batch(int(cfg["total_batch_size"]), world)
    torch.manual_seed(seed)  # the heads' init and the dropout masks; a resumed run restores the RNG states
    model = engine.ddp.prepare(build_model(ckpt, cfg), device)
    module = model.module if hasattr(model, "module") else model
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg["lr"], momentum=cfg["momentum"],
                                weight_decay=cfg["weight_decay"])

    scale = tuple(cfg["img_scale"])
    pipeline = TrainPipeline(cfg["crop_size"], scale, tuple(cfg["ratio_range"]), cfg["cat_max_ratio"], cfg["flip_prob"],
                             PhotoMetricDistortion() if cfg["photometric_distortion"] else None)
    train_set = engine.SeededDataset(SegmentationTrainSet(dataset.train, pipeline, dataset.name), seed)
    sampler = DistributedSampler(train_set, world, rank, shuffle=True, seed=seed, drop_last=True)
    data = engine.EpochLoader(train_set, sampler, per_process, drop_last=True, num_workers=num_workers)
    val_set = SegmentationEvalSet(dataset.val, scale, dataset.name)
    val_loader = DataLoader(Subset(val_set, range(rank, len(val_set), world)), batch_size=1, num_workers=num_workers)
    evaluator = SemSegEvaluator(cfg["num_classes"], cfg["ignore_index"], dataset.classes, device=device)

    def step(trainer: engine.Trainer, batch: Any) -> dict[str, torch.Tensor]:
        images, labels = (t.to(device, non_blocking=True) for t in batch)
        out = trainer.model(images)
        return {"decode": cfg["decode_loss_weight"] * seg_loss(out["seg"], labels, cfg["ignore_index"], align),
                "aux": cfg["aux_loss_weight"] * seg_loss(out["aux"], labels, cfg["ignore_index"], align)}

    def evaluate() -> dict[str, Any]:
        # the unwrapped module: DDP's forward would sync buffers, and the ranks' shards may differ in length
        return engine.inference_on_dataset(
            module, val_loader, evaluator, precision=cfg["precision"], device=device, desc="val",
            forward=lambda m, b: [predict(m, b[0].to(device), tuple(b[1].shape[-2:]), align, window)])

    schedule = engine.LRSchedule.from_config(cfg["lr_schedule"], total=cfg["max_iters"])
    eval_hook = engine.EvalHook(cfg["eval_interval"], evaluate, by_epoch=False)
    hooks = [
        engine.LRSchedulerHook(engine.LRScheduler(optimizer, schedule)),
        eval_hook,
        engine.MetricLogger(run_dir / "metrics.jsonl", images_per_iter=per_process, terms=True),
        engine.PeriodicCheckpointer(cfg["checkpoint_interval"], by_epoch=False, keep=1),
    ]
    key = engine.ResumeKey(ckpt.sha256, config.fingerprint(cfg), seed, world)
    trainer = engine.Trainer(model, optimizer, data, step, max_iters=cfg["max_iters"], hooks=hooks,
                             checkpointer=engine.Checkpointer(run_dir, key), precision=cfg["precision"],
                             device=device, name=f"{dataset.name}_fcn")
    trainer.train(until=until)
    return SegResult(eval_hook.history[-1] if eval_hook.history else {}, eval_hook.history)
