"""DenseCL pretraining on the engine: one process or DDP under torchrun, resumable bit for bit.

PROTOCOLS.md §1.3 (MMSelfSup 0.x `configs/selfsup/_base_/schedules/sgd_coslr-200e_in1k.py`,
`densecl_resnet50_8xb32-coslr-200e_in1k.py`): SGD momentum 0.9, weight decay 1e-4 on every
parameter, lr 0.03 for a global batch of 256 (scaled linearly for other global batches), mmcv
CosineAnnealing to 0 updated once per epoch (`cosine`; `cosine_per_iter` is the per-iteration
variant), 200 epochs, drop_last batches.

The loop, LR schedule, loss check, signals, checkpoints and logging are `densecl_bench.engine`'s;
this module supplies the model, the data and the step. `precision` (fp32 or bf16 autocast) is the
config's on every device; on CUDA the step also uses channels_last tensors and a fused SGD (the
contrastive logits stay in fp32). A CPU fp32 run is deterministic, which is what makes a resumed
run continue bit-identically: the checkpoint restores the model with its queues and pointers, the
optimizer, the position and every RNG, and the augmentations are seeded per sample (see
`augment.py`), so the interrupted epoch resumes on the same views.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from densecl_bench import __version__, dist, engine
from densecl_bench import config as config_mod
from densecl_bench.config import ConfigError
from densecl_bench.data.base import ImageList
from densecl_bench.engine.trainer import StepFn
from densecl_bench.pretrain.augment import EpochSampler, TwoViewDataset, augmentation, mocov2
from densecl_bench.pretrain.batch_augment import Recipe
from densecl_bench.pretrain.gpu_loader import GPUTwoViewLoader
from densecl_bench.pretrain.model import DenseCL, lambda_at

SCHEDULES = ("cosine", "cosine_per_iter")
# data.loader: `cpu` augments in PIL in the loader workers (the reference's way); `gpu` decodes and augments
# whole batches on the training device (gpu_loader.py). Same drawn parameters, other pixel arithmetic: part of
# the protocol.
LOADERS = ("cpu", "gpu")
# settings that do not change what is trained: a run resumes across changes of these
OPERATIONAL_KEYS = ("_config", "log_interval", "checkpoint_interval", "keep_checkpoints")


_REQUIRED = object()


def _get(cfg: dict[str, Any], dotted: str, types: type | tuple[type, ...], default: Any = _REQUIRED) -> Any:
    """The value at `dotted`, type-checked; a missing key fails unless a `default` is given."""
    node: Any = cfg
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            if default is not _REQUIRED:
                return default
            raise ConfigError(f"pretrain config {cfg.get('_config', '?')}: missing key {dotted!r}")
        node = node[part]
    if isinstance(node, bool) and types in (int, float, (int, float)) or not isinstance(node, types):
        raise ConfigError(f"pretrain config {cfg.get('_config', '?')}: {dotted!r} must be {types}, got {node!r}")
    return node


def build_model(cfg: dict[str, Any]) -> DenseCL:
    """The DenseCL module of a config (seeded by `seed`, so every rank builds the same one)."""
    torch.manual_seed(_get(cfg, "seed", int))
    return DenseCL(
        arch=_get(cfg, "model.arch", str),
        queue_len=_get(cfg, "model.queue_len", int),
        feat_dim=_get(cfg, "model.feat_dim", int),
        momentum=float(_get(cfg, "model.momentum", (int, float))),
        temperature=float(_get(cfg, "model.temperature", (int, float))),
        loss_lambda=float(_get(cfg, "model.loss_lambda", (int, float))),
        zero_init_residual=_get(cfg, "model.zero_init_residual", bool, default=False),
    )


def build_optimizer(cfg: dict[str, Any], model: DenseCL, lr: float, fused: bool) -> torch.optim.SGD:
    """SGD over every trainable parameter, weight decay on all of them (BN and biases included)."""
    return torch.optim.SGD(
        [p for p in model.parameters() if p.requires_grad], lr=lr,
        momentum=float(_get(cfg, "optimizer.momentum", (int, float))),
        weight_decay=float(_get(cfg, "optimizer.weight_decay", (int, float))), **({"fused": True} if fused else {}),
    )


def build_step(model: DenseCL, device: torch.device, channels_last: bool, warmup_iters: int,
               dense: bool = True) -> StepFn:
    """The trainer's step: both views to the device, both encoders, queues, and the weighted
    global and dense losses (the engine backpropagates their sum, in this order, as the model's `loss`)."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format

    def step(trainer: engine.Trainer, batch: tuple[torch.Tensor, torch.Tensor]) -> dict[str, torch.Tensor]:
        im_q, im_k = (im.to(device, non_blocking=True, memory_format=fmt) for im in batch)
        lam = lambda_at(trainer.iter, model.loss_lambda, warmup_iters)
        out = trainer.model(im_q, im_k, dense=dense, loss_lambda=lam)
        return {k: v for k, v in out.items() if k != "loss"}

    return step


def protocol_fingerprint(cfg: dict[str, Any]) -> str:
    """The config's fingerprint without the settings that only change logging, checkpoint files, workers
    and the data's location."""
    protocol = {k: v for k, v in cfg.items() if k not in OPERATIONAL_KEYS}
    # where the images live is not the protocol (a dataset copied to a local disk resumes)
    protocol["data"] = {k: v for k, v in cfg.get("data", {}).items() if k not in ("num_workers", "root")}
    return config_mod.fingerprint(protocol)


def _check_resumable(checkpointer: engine.Checkpointer, global_batch: int, epochs: int) -> None:
    """Refuse to resume another run rather than silently start over and overwrite it.

    The engine's rule would start afresh when the resume key differs; for pretraining (days of GPU
    time in `latest.pth`) that is an error unless the user says `--no-resume`. The global batch and
    the schedule length get their own messages: the queues and the data order are cut in global
    batches, and the cosine spans `epochs`.
    """
    latest = checkpointer.latest
    if not latest.is_file():
        return
    meta = torch.load(latest, map_location="cpu", weights_only=True, mmap=True).get("meta", {})
    if meta.get("global_batch") != global_batch:
        raise ConfigError(f"{latest} was trained with a global batch of {meta.get('global_batch')}, this run has "
                          f"{global_batch}; resume with the same batch size and number of processes")
    done_epochs = meta.get("config", {}).get("epochs", epochs)
    if done_epochs != epochs:
        raise ConfigError(f"{latest} follows a {done_epochs}-epoch schedule, this run has {epochs}; "
                          "resume with the same --epochs (or --no-resume)")
    why = checkpointer.key.mismatch(meta.get("resume_key"))
    if why is not None:
        raise ConfigError(f"{latest} belongs to another run: {why}; resume with the same config, seed and "
                          "number of processes, or start afresh over it with --no-resume (or another --work-dir)")


def train(
    cfg: dict[str, Any],
    image_list: ImageList,
    work_dir: str | Path,
    resume: bool = True,
    max_epochs: int | None = None,
    device: str | torch.device | None = None,
    hooks: Sequence[engine.HookBase] = (),
) -> Path:
    """Train DenseCL on `image_list` per `cfg`; returns `work_dir/latest.pth`.

    resume: continue from `work_dir/latest.pth` when it belongs to this config, seed and world size
    (another global batch or schedule length is an error). max_epochs: stop once this many epochs are complete (the LR
    schedule still spans the config's `epochs`, so a later run continues the same schedule). hooks
    run after the built-in ones. Raises engine.TrainingInterrupted (state saved) on SIGINT/SIGTERM
    and engine.NonFiniteLoss on a NaN/inf loss.
    """
    loader = cfg.get("data", {}).get("loader", "cpu")
    if loader not in LOADERS:
        raise ConfigError(f"pretrain config {cfg.get('_config', '?')}: data.loader must be one of {LOADERS}, got {loader!r}")
    cfg = dict(cfg, data=dict(cfg["data"], loader=loader))  # named in the checkpoint meta and the fingerprint
    dist.init_from_env()
    device = torch.device(device) if device is not None else dist.default_device()
    cuda = device.type == "cuda"
    work_dir = Path(work_dir)
    world = dist.world_size()
    seed = _get(cfg, "seed", int)
    batch = _get(cfg, "data.batch_size_per_gpu", int)
    global_batch = batch * world
    epochs = _get(cfg, "epochs", int)
    schedule = _get(cfg, "lr_schedule", str)
    if schedule not in SCHEDULES:
        raise ConfigError(f"pretrain config {cfg.get('_config', '?')}: lr_schedule must be one of {SCHEDULES}, got {schedule!r}")
    base_lr = float(_get(cfg, "optimizer.lr", (int, float))) * global_batch / _get(cfg, "optimizer.lr_reference_batch", int)
    iters_per_epoch = len(image_list) // global_batch
    if iters_per_epoch == 0:
        raise ConfigError(f"{len(image_list)} training images are fewer than one global batch of {global_batch}")
    precision = engine.precision.check(_get(cfg, "precision", str))
    channels_last = cuda and _get(cfg, "channels_last", bool)

    model = build_model(cfg)
    model.check_batch(global_batch)
    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    if cuda:
        torch.backends.cudnn.benchmark = True
    if precision == "fp32":  # IEEE fp32 as the reference, not torch's TF32 convolutions
        engine.precision.ieee_fp32()
    if _get(cfg, "compile", bool):
        model.encoder_q[0].compile()
        model.encoder_k[0].compile()
    # shuffle-BN gives each rank's keys their own batch statistics: no SyncBN, no buffer broadcast
    net = engine.ddp.prepare(model, device, sync_bn=False, broadcast_buffers=False)
    optimizer = build_optimizer(cfg, model, base_lr, fused=cuda)

    workers = _get(cfg, "data.num_workers", int)
    size, on_bad_image = _get(cfg, "data.image_size", int), _get(cfg, "data.on_bad_image", str)
    try:
        augment = augmentation(cfg["data"].get("augmentation"))
    except ValueError as e:
        raise ConfigError(f"pretrain config {cfg.get('_config', '?')}: {e}") from None
    sampler = EpochSampler(len(image_list), batch, seed, dist.rank(), world)
    loader_kwargs = {"num_workers": workers, "persistent_workers": workers > 0,
                     "generator": torch.Generator().manual_seed(seed)}
    if loader == "gpu":
        data = GPUTwoViewLoader(image_list, Recipe.mocov2(size, augment), sampler, batch, device, seed, on_bad_image,
                                **loader_kwargs)
    else:
        dataset = TwoViewDataset(image_list, mocov2(size, augment), seed=seed, on_bad_image=on_bad_image)
        data = engine.EpochLoader(dataset, sampler, batch, drop_last=True, pin_memory=cuda, **loader_kwargs)
    lr_schedule = (engine.LRSchedule("cosine", total=epochs) if schedule == "cosine"
                   else engine.LRSchedule("cosine", total=epochs * iters_per_epoch, by_epoch=False))
    resolved = dict(cfg, lr=base_lr, world_size=world, global_batch=global_batch)
    checkpointer = engine.Checkpointer(
        work_dir, engine.ResumeKey("", protocol_fingerprint(cfg), seed, world),
        meta={"config": resolved, "global_batch": global_batch, "densecl_bench_version": __version__},
    )
    if resume:
        _check_resumable(checkpointer, global_batch, epochs)
    trainer = engine.Trainer(
        net, optimizer, data,
        build_step(model, device, channels_last, _get(cfg, "model.loss_lambda_warmup_iters", int)),
        max_iters=epochs * iters_per_epoch,
        hooks=[
            engine.LRSchedulerHook(engine.LRScheduler(optimizer, lr_schedule)),
            engine.MetricLogger(work_dir / "metrics.jsonl", _get(cfg, "log_interval", int), images_per_iter=batch,
                                terms=True),
            engine.PeriodicCheckpointer(_get(cfg, "checkpoint_interval", int), keep=_get(cfg, "keep_checkpoints", int)),
            *hooks,
        ],
        checkpointer=checkpointer, precision=precision, device=device, name="pretrain",
    )
    net.train()
    trainer.train(until=None if max_epochs is None else max_epochs * iters_per_epoch, resume=resume)
    return checkpointer.latest


def resolve_data_root(data_root: str | Path | None, demo: bool) -> Path:
    """The ImageNet-style folder (with `train/<wnid>/`): given directly, or as a data root holding `imagenet/`."""
    if data_root is None:
        if not demo:
            raise ConfigError("this config trains on real data: pass --data-root (a folder with train/<wnid>/*)")
        from densecl_bench.data.demo import ensure_demo

        return ensure_demo() / "imagenet"
    root = Path(data_root)
    if not (root / "train").is_dir() and (root / "imagenet" / "train").is_dir():
        return root / "imagenet"
    return root


def pretrain(
    config_path_or_name: str | Path,
    data_root: str | Path | None = None,
    work_dir: str | Path | None = None,
    resume: bool = True,
    max_epochs: int | None = None,
    device: str | torch.device | None = None,
    epochs: int | None = None,
) -> Path:
    """Load a pretrain config, read the ImageNet-style training set and train; returns the latest checkpoint.

    work_dir defaults to `work_dirs/<config name>/` (as mmcv's runner). Configs with `data.demo: true`
    train on the embedded demo data when no data root is given. epochs: the schedule's length in
    place of the config's `epochs` (the cosine spans it); max_epochs: stop early within the schedule.
    """
    from densecl_bench.data.imagenet import imagenet

    cfg = config_mod.load(config_path_or_name, "pretrain")
    if epochs is not None:
        cfg["epochs"] = epochs
    root = resolve_data_root(data_root, bool(cfg.get("data", {}).get("demo", False)))
    cfg["data"] = dict(cfg["data"], root=str(root))
    image_list = imagenet(root, "train")
    return train(cfg, image_list, work_dir or Path("work_dirs") / cfg["_config"], resume, max_epochs, device)
