"""The DenseCL training loop: one process or DDP under torchrun, resumable bit for bit.

PROTOCOLS.md §1.3 (MMSelfSup 0.x `configs/selfsup/_base_/schedules/sgd_coslr-200e_in1k.py`,
`densecl_resnet50_8xb32-coslr-200e_in1k.py`): SGD momentum 0.9, weight decay 1e-4 on every
parameter, lr 0.03 for a global batch of 256 (scaled linearly for other global batches), mmcv
CosineAnnealing to 0 updated once per epoch (`cosine`; `cosine_per_iter` is the per-iteration
variant), 200 epochs, drop_last batches.

On CUDA the step runs in bf16 autocast with channels_last tensors and a fused SGD; the contrastive
logits stay in fp32 (TF32 matmuls). CPU runs are plain fp32 and deterministic, which is what makes
a resumed run continue bit-identically: the checkpoint restores the model with its queues and
pointers, the optimizer, the epoch/iteration position and every RNG, and the augmentations are
seeded per sample (see `augment.py`), so the interrupted epoch resumes on the same views.
"""

from __future__ import annotations

import math
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from densecl_bench import __version__, dist
from densecl_bench import config as config_mod
from densecl_bench.config import ConfigError
from densecl_bench.data.base import ImageList
from densecl_bench.pretrain import checkpointing
from densecl_bench.pretrain.augment import EpochSampler, TwoViewDataset, mocov2
from densecl_bench.pretrain.model import DenseCL, cosine_lr, lambda_at

SCHEDULES = ("cosine", "cosine_per_iter")


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the message names the epoch and iteration."""


class PretrainInterrupted(RuntimeError):
    """SIGINT/SIGTERM stopped training after the current iteration; the state is saved in `checkpoint`.

    `exit_code` is the shell convention 128 + signal number.
    """

    def __init__(self, checkpoint: Path, signum: int) -> None:
        super().__init__(f"interrupted by {signal.Signals(signum).name}; state saved to {checkpoint}; "
                         "run the same command again to resume")
        self.checkpoint, self.exit_code = checkpoint, 128 + signum


def _get(cfg: dict[str, Any], dotted: str, types: type | tuple[type, ...]) -> Any:
    node: Any = cfg
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
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
    )


@contextmanager
def _stop_on_signals() -> Iterator[list[int]]:
    """Turn SIGINT/SIGTERM into a request to stop after the current iteration (a second SIGINT
    aborts at once). Yields a list that holds the signal number once one arrived."""
    got: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield got
        return

    def handler(signum: int, frame: Any) -> None:
        if got and signum == signal.SIGINT:
            raise KeyboardInterrupt
        got.append(signum)

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield got
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def build_optimizer(cfg: dict[str, Any], model: DenseCL, lr: float, fused: bool) -> torch.optim.SGD:
    """SGD over every trainable parameter, weight decay on all of them (BN and biases included)."""
    return torch.optim.SGD(
        [p for p in model.parameters() if p.requires_grad], lr=lr,
        momentum=float(_get(cfg, "optimizer.momentum", (int, float))),
        weight_decay=float(_get(cfg, "optimizer.weight_decay", (int, float))), **({"fused": True} if fused else {}),
    )


def train_step(net: torch.nn.Module, optimizer: torch.optim.Optimizer, im_q: torch.Tensor, im_k: torch.Tensor,
               bf16: bool, loss_lambda: float | None = None, dense: bool = True) -> dict[str, torch.Tensor]:
    """One iteration: both encoders, queues, loss, backward, optimizer step (perf/ times exactly this)."""
    with torch.autocast(im_q.device.type, dtype=torch.bfloat16, enabled=bf16):
        out = net(im_q, im_k, dense=dense, loss_lambda=loss_lambda)
    optimizer.zero_grad(set_to_none=True)
    out["loss"].backward()
    optimizer.step()
    return out


def _agreed_stop(got: list[int], device: torch.device) -> int:
    """The signal to stop on, agreed by every rank (they must all stop at the same iteration)."""
    if not dist.is_dist():
        return got[0] if got else 0
    flag = torch.tensor([got[0] if got else 0], device=device)
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    return int(flag)


def _fmt_eta(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def train(
    cfg: dict[str, Any],
    image_list: ImageList,
    work_dir: str | Path,
    resume: bool = True,
    max_epochs: int | None = None,
    device: str | torch.device | None = None,
    on_iter: Callable[[int, dict[str, float]], None] | None = None,
) -> Path:
    """Train DenseCL on `image_list` per `cfg`; returns `work_dir/latest.pth`.

    resume: continue from `work_dir/latest.pth` when it exists. max_epochs: stop once this many
    epochs are complete (the LR schedule still spans the config's `epochs`, so a later run
    continues the same schedule). on_iter(global_iter, losses) is called after every iteration.
    Raises PretrainInterrupted (state saved) on SIGINT/SIGTERM, TrainingDiverged on a NaN loss.
    """
    dist.init_from_env()
    device = torch.device(device) if device is not None else dist.default_device()
    cuda = device.type == "cuda"
    work_dir = Path(work_dir)
    rank, world = dist.rank(), dist.world_size()
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
    total_iters = epochs * iters_per_epoch
    warmup_iters = _get(cfg, "model.loss_lambda_warmup_iters", int)
    bf16 = cuda and _get(cfg, "precision", str) == "bf16"
    channels_last = cuda and _get(cfg, "channels_last", bool)

    model = build_model(cfg)
    model.check_batch(global_batch)
    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    if cuda:
        torch.backends.cudnn.benchmark = True
        if bf16:
            torch.backends.cuda.matmul.allow_tf32 = True
    if _get(cfg, "compile", bool):
        model.encoder_q[0].compile()
        model.encoder_k[0].compile()
    optimizer = build_optimizer(cfg, model, base_lr, fused=cuda)

    start_epoch, skip_iters = 0, 0
    latest = work_dir / "latest.pth"
    if resume and latest.is_file():
        ckpt = checkpointing.load(latest)
        meta = ckpt["meta"]
        if meta.get("global_batch") != global_batch:
            raise ConfigError(f"{latest} was trained with a global batch of {meta.get('global_batch')}, this run has "
                              f"{global_batch}; resume with the same batch size and number of processes")
        if meta["config"].get("epochs", epochs) != epochs:
            raise ConfigError(f"{latest} follows a {meta['config']['epochs']}-epoch schedule, this run has {epochs}; "
                              "resume with the same --epochs (or --no-resume)")
        model.load_state_dict(ckpt["state_dict"])
        optimizer.load_state_dict(ckpt["optimizer"])
        checkpointing.set_rng_state(ckpt["rng"])
        start_epoch, skip_iters = meta["epoch"], meta["iter_in_epoch"]
        if dist.is_main():
            tqdm.write(f"resumed from {latest}: epoch {start_epoch}, iteration {meta['iter']}")
    end_epoch = epochs if max_epochs is None else min(epochs, max_epochs)

    net: torch.nn.Module = model
    if dist.is_dist():
        net = DistributedDataParallel(model, device_ids=[device] if cuda else None, broadcast_buffers=False)

    dataset = TwoViewDataset(image_list, mocov2(_get(cfg, "data.image_size", int)), seed=seed,
                             on_bad_image=_get(cfg, "data.on_bad_image", str))
    sampler = EpochSampler(len(image_list), batch, 0, seed, rank, world)
    workers = _get(cfg, "data.num_workers", int)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=batch, sampler=sampler, num_workers=workers, pin_memory=cuda, drop_last=True,
        persistent_workers=workers > 0, generator=torch.Generator().manual_seed(seed),
    )

    resolved = dict(cfg, lr=base_lr, world_size=world, global_batch=global_batch)

    def state(epoch: int, iter_in_epoch: int) -> dict[str, Any]:
        return {
            "meta": {"epoch": epoch, "iter": epoch * iters_per_epoch + iter_in_epoch, "iter_in_epoch": iter_in_epoch,
                     "config": resolved, "global_batch": global_batch, "densecl_bench_version": __version__,
                     "time": time.strftime("%Y-%m-%d %H:%M:%S")},
            "state_dict": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "rng": checkpointing.rng_state(),
        }

    interval = _get(cfg, "checkpoint_interval", int)
    keep = _get(cfg, "keep_checkpoints", int)
    log_interval = _get(cfg, "log_interval", int)

    def save(epoch: int, iter_in_epoch: int, epoch_file: bool) -> None:
        if dist.is_main():
            checkpointing.save(work_dir, state(epoch, iter_in_epoch), epoch_file, keep)
        dist.barrier()

    step_time = 0.0
    net.train()
    with _stop_on_signals() as got:
        for epoch in range(start_epoch, end_epoch):
            if schedule == "cosine":
                for group in optimizer.param_groups:
                    group["lr"] = cosine_lr(base_lr, epoch / epochs)
            sampler.epoch, sampler.skip = epoch, skip_iters * batch
            done = skip_iters
            skip_iters = 0
            loss_sum, seen = 0.0, 0
            bar = tqdm(loader, total=iters_per_epoch, initial=done, desc=f"epoch {epoch + 1}/{epochs}",
                       disable=None if dist.is_main() else True, dynamic_ncols=True)
            tick = time.perf_counter()
            for im_q, im_k in bar:
                it = epoch * iters_per_epoch + done
                if schedule == "cosine_per_iter":
                    for group in optimizer.param_groups:
                        group["lr"] = cosine_lr(base_lr, it / total_iters)
                fmt = torch.channels_last if channels_last else torch.contiguous_format
                im_q = im_q.to(device, non_blocking=True, memory_format=fmt)
                im_k = im_k.to(device, non_blocking=True, memory_format=fmt)
                out = train_step(net, optimizer, im_q, im_k, bf16, lambda_at(it, model.loss_lambda, warmup_iters))
                loss = out["loss"].item()
                if not math.isfinite(loss):  # nothing of this step is saved: the last checkpoint stays good
                    raise TrainingDiverged(f"loss is {loss} at epoch {epoch + 1}, iteration {it + 1}; "
                                           f"lower the learning rate or check the data (last checkpoint: {latest})")
                done += 1
                loss_sum, seen = loss_sum + loss, seen + 1
                now = time.perf_counter()
                dt, tick = now - tick, now
                step_time = dt if step_time == 0.0 else 0.9 * step_time + 0.1 * dt
                status = dict(loss=f"{loss:.4f}", img_s=f"{global_batch / step_time:.1f}",
                              eta=_fmt_eta(step_time * (end_epoch * iters_per_epoch - it - 1)))
                bar.set_postfix(status, refresh=False)
                if bar.disable and dist.is_main() and done % log_interval == 0:  # no terminal: plain log lines
                    tqdm.write(f"epoch {epoch + 1} iter {done}/{iters_per_epoch}: " + ", ".join(f"{k} {v}" for k, v in status.items()))
                if on_iter is not None:
                    on_iter(it + 1, {k: v.item() for k, v in out.items()})
                signum = _agreed_stop(got, device)
                if signum:
                    bar.close()
                    save(epoch, done, epoch_file=False)
                    raise PretrainInterrupted(latest, signum)
            bar.close()
            if dist.is_main():
                tqdm.write(f"epoch {epoch + 1}/{epochs}: loss {loss_sum / max(seen, 1):.4f}, "
                           f"lr {optimizer.param_groups[0]['lr']:.5f}")
            save(epoch + 1, 0, epoch_file=(epoch + 1) % interval == 0 or epoch + 1 == epochs)
    return latest


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
