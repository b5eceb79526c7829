"""The hooks every training benchmark uses: LR schedule, periodic checkpoints, evaluation, PreciseBN, metrics.

Put them in this order: LRSchedulerHook, PreciseBNHook, EvalHook, MetricLogger, PeriodicCheckpointer,
so that evaluation sees the recomputed BN statistics, the metrics carry the evaluation results and
a checkpoint carries both.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from densecl_bench import dist
from densecl_bench.engine.precise_bn import update_bn_stats
from densecl_bench.engine.schedule import LRScheduler
from densecl_bench.engine.trainer import HookBase
from densecl_bench.paths import atomic_write_text
from densecl_bench.progress import bar as progress_bar


class LRSchedulerHook(HookBase):
    """Sets the LR of every param group before each step, from (epoch, iteration)."""

    def __init__(self, scheduler: LRScheduler) -> None:
        self.scheduler = scheduler

    def before_step(self) -> None:
        self.scheduler.set(self.trainer.epoch, self.trainer.iter)


class PeriodicHook(HookBase):
    """Runs `run()` every `period` epochs (by_epoch) or iterations, and at the end when `final`."""

    def __init__(self, period: int, by_epoch: bool = True, final: bool = True) -> None:
        self.period, self.by_epoch, self.final = period, by_epoch, final

    def count(self) -> int:
        """Completed epochs (by_epoch) or iterations."""
        t = self.trainer
        return t.iter // t.iters_per_epoch if self.by_epoch else t.iter

    def due(self, period: int) -> bool:
        return (period > 0 and self.count() % period == 0) or (self.final and self.trainer.iter == self.trainer.max_iters)

    def after_step(self) -> None:
        if not self.by_epoch and self.due(self.period):
            self.run()

    def after_epoch(self) -> None:
        if self.by_epoch and self.due(self.period):
            self.run()

    def run(self) -> None:
        raise NotImplementedError


class PeriodicCheckpointer(PeriodicHook):
    """Refreshes the trainer's `latest` checkpoint every `latest_period` epochs/iterations and publishes
    a numbered snapshot (`epoch_N.pth` / `iter_N.pth`) every `period` and at the end (period 0: never),
    keeping the newest `keep` snapshots (0: all). latest_period defaults to 1 epoch, or `period` iterations."""

    def __init__(self, period: int, by_epoch: bool = True, keep: int = 0, latest_period: int | None = None) -> None:
        super().__init__(latest_period or (1 if by_epoch else period), by_epoch, final=True)
        self.snapshot_period, self.keep = period, keep

    def run(self) -> None:
        checkpointer = self.trainer.checkpointer
        if checkpointer is None:
            raise ValueError(f"{self.trainer.name}: PeriodicCheckpointer needs a trainer with a checkpointer")
        if self.trainer.failing:  # e.g. the final evaluation failed: never save a state that looks finished
            return
        snapshot = None
        if self.snapshot_period > 0 and (self.count() % self.snapshot_period == 0 or self.trainer.iter == self.trainer.max_iters):
            snapshot = f"{'epoch' if self.by_epoch else 'iter'}_{self.count()}.pth"
        checkpointer.save(self.trainer, snapshot, self.keep)


class EvalHook(PeriodicHook):
    """Calls `evaluate()` (a dict of results) periodically and at the end; keeps every result in `history`."""

    def __init__(self, period: int, evaluate: Callable[[], dict[str, Any]], by_epoch: bool = True,
                 final: bool = True) -> None:
        super().__init__(period, by_epoch, final)
        self.evaluate = evaluate
        self.history: list[dict[str, Any]] = []

    def run(self) -> None:
        results = self.evaluate()
        self.trainer.eval_results = results
        self.history.append({"epoch": self.trainer.iter // self.trainer.iters_per_epoch, "iter": self.trainer.iter,
                             **results})

    def state_dict(self) -> dict[str, Any]:
        return {"history": self.history}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.history = list(state["history"])


class PreciseBNHook(PeriodicHook):
    """Recomputes the BN statistics of the trained module over `num_iters` batches of `batches()`
    before an evaluation (give it the EvalHook's period and place it before the EvalHook)."""

    def __init__(self, period: int, batches: Callable[[], Iterable[Any]], forward: Callable[[Any], Any],
                 num_iters: int = 200, by_epoch: bool = True, final: bool = True) -> None:
        super().__init__(period, by_epoch, final)
        self.batches, self.forward, self.num_iters = batches, forward, num_iters

    def run(self) -> None:
        update_bn_stats(self.trainer.module, self.batches(), self.forward, self.num_iters)


def _fmt_eta(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class MetricLogger(HookBase):
    """Progress bar (loss, LR, throughput, ETA), a `metrics.jsonl`, and the per-epoch history.

    Every `period` iterations a record {iter, max_iters, epoch, lr, loss, loss terms} is appended to `path`
    (rank 0, one line per write, so a crash leaves at most one partial line, which readers skip); at
    each epoch's end a record with the epoch's mean losses over all ranks and any evaluation results
    is appended and kept in `history`. Evaluations between epochs get a record of their own. On a
    resumed run the file is cut back to the resumed iteration first. Without a terminal, the bar
    gives way to a log line every `period` iterations. images_per_iter (one process's batch) adds img/s;
    terms shows each loss term beside the total (a few terms, such as a global and a dense loss).
    """

    def __init__(self, path: str | Path | None = None, period: int = 20, images_per_iter: int | None = None,
                 progress: bool | None = None, terms: bool = False) -> None:
        self.path = None if path is None else Path(path)
        self.period, self.images_per_iter, self.progress, self.terms = period, images_per_iter, progress, terms
        self.history: list[dict[str, Any]] = []
        self._sums: dict[str, float] = {}
        self._count = 0
        self._bar: tqdm | None = None
        self._tick = 0.0
        self._step_time = 0.0

    def state_dict(self) -> dict[str, Any]:
        return {"history": self.history, "sums": self._sums, "count": self._count}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.history, self._sums, self._count = list(state["history"]), dict(state["sums"]), state["count"]

    def _write(self, record: dict[str, Any]) -> None:
        if self.path is not None and dist.is_main():
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")

    def before_train(self) -> None:
        if self.path is None or not dist.is_main() or not self.path.is_file():
            return
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a partial line left by a crash
            if record.get("iter", 0) <= self.trainer.iter:
                kept.append(line + "\n")
        atomic_write_text(self.path, "".join(kept))

    def before_epoch(self) -> None:
        t = self.trainer
        if t.inner_iter == 0:
            self._sums, self._count = {}, 0
        total = min(t.iters_per_epoch, t.end_iter - t.epoch * t.iters_per_epoch)
        self._bar = progress_bar(total=total, initial=t.inner_iter, desc=f"{t.name} {t.epoch + 1}/{t.max_epochs}",
                                 leave=False, progress=self.progress)
        self._tick = time.perf_counter()

    def after_step(self) -> None:
        t = self.trainer
        for k, v in t.losses.items():
            self._sums[k] = self._sums.get(k, 0.0) + v
        self._count += 1
        now = time.perf_counter()
        dt, self._tick = now - self._tick, now
        self._step_time = dt if self._step_time == 0.0 else 0.9 * self._step_time + 0.1 * dt
        lr = t.optimizer.param_groups[0]["lr"]
        shown = t.losses if self.terms else {"loss": t.losses["loss"]}
        status = {k: f"{v:.4f}" for k, v in shown.items()}
        status["lr"] = f"{lr:.4g}"
        if self.images_per_iter:
            status["img_s"] = f"{self.images_per_iter * dist.world_size() / self._step_time:.1f}"
        else:
            status["it_s"] = f"{1 / self._step_time:.2f}"
        status["eta"] = _fmt_eta(self._step_time * (t.end_iter - t.iter))
        if self._bar is not None:
            self._bar.update(1)
            self._bar.set_postfix(status, refresh=False)
        if self.period > 0 and t.iter % self.period == 0:
            self._write({"iter": t.iter, "max_iters": t.max_iters, "epoch": t.epoch + 1, "lr": lr, **t.losses})
            if self._bar is not None and self._bar.disable and dist.is_main():
                tqdm.write(f"{t.name} epoch {t.epoch + 1} iter {t.inner_iter}/{t.iters_per_epoch}: "
                           + ", ".join(f"{k} {v}" for k, v in status.items()))
        if t.eval_results is not None:
            self._write({"iter": t.iter, "epoch": t.epoch + 1, "eval": t.eval_results})

    def after_epoch(self) -> None:
        t = self.trainer
        if self._bar is not None:
            self._bar.close()
        keys = list(self._sums)
        sums = torch.tensor([*(self._sums[k] for k in keys), self._count], dtype=torch.float64)
        sums = dist.all_reduce_sum(sums.to(t.device)).cpu()
        record: dict[str, Any] = {"epoch": t.epoch + 1, "iter": t.iter, "max_iters": t.max_iters,
                                  "lr": t.optimizer.param_groups[0]["lr"]}
        record.update({k: (sums[i] / sums[-1].clamp_min(1)).item() for i, k in enumerate(keys)})
        if t.eval_results is not None:
            record.update(t.eval_results)
        self.history.append(record)
        self._write(record)
        if dist.is_main():
            tqdm.write(f"{t.name} epoch {t.epoch + 1}/{t.max_epochs}: loss {record.get('loss', float('nan')):.4f}, "
                       f"lr {record['lr']:.5g}")

    def after_train(self) -> None:
        if self._bar is not None:
            self._bar.close()
