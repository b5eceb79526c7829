"""The one training loop: iterations grouped in epochs, hooks around them, resumable anywhere.

In the spirit of detectron2's `TrainerBase` + `HookBase`. The trainer owns the position
(`iter`, the number of completed iterations; `epoch`), runs the step (the caller's function from a
batch to named loss terms; their sum is backpropagated), checks the loss, and calls the hooks:

    before_train
    for each epoch:          before_epoch (also when resuming into the middle of it)
        for each batch:      before_step, step, after_step  (iter counts the step done)
        when it is complete: after_epoch
    after_train

Epoch-based runs set `max_iters = epochs * len(data)`; iteration-based runs any `max_iters` (the
data is then walked epoch after epoch and the run may end mid-epoch). Schedules and hooks choose
whether they count epochs or iterations. With `accumulate` > 1 an optimizer step follows every
`accumulate` batches (a shorter group at the end of an epoch), each group's loss divided by its size;
signals stop the run between groups, and periodic checkpoints inside an epoch should fall there too.

Every rank calls every hook; a hook that fails does not stop the others of its phase, so all ranks
keep running the same collectives, and the failure reaches every rank at the next agreed point
(`sync.agree`: after fetching a batch and after the forward pass). SIGINT/SIGTERM stop the run at
the next optimizer-step boundary with the state saved (a second SIGINT aborts at once).
"""

from __future__ import annotations

import math
import signal
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from densecl_bench import dist
from densecl_bench.engine import precision as precision_mod
from densecl_bench.engine.checkpoint import Checkpointer
from densecl_bench.engine.data import TrainData
from densecl_bench.engine.sync import agree

StepFn = Callable[["Trainer", Any], Mapping[str, Tensor]]


class NonFiniteLoss(FloatingPointError):
    """The loss became NaN or infinite; the message names the iteration and every loss term."""


class TrainingInterrupted(RuntimeError):
    """SIGINT/SIGTERM stopped training; the state is in `checkpoint`. exit_code is 128 + signal number."""

    def __init__(self, checkpoint: Path | None, signum: int) -> None:
        saved = f"state saved to {checkpoint}; run the same command again to resume" if checkpoint else "nothing saved"
        super().__init__(f"interrupted by {signal.Signals(signum).name}; {saved}")
        self.checkpoint, self.exit_code = checkpoint, 128 + signum


class HookBase:
    """A hook sees the trainer as `self.trainer`; `state_dict` is saved with every checkpoint."""

    trainer: Trainer

    @property
    def name(self) -> str:
        return type(self).__name__

    def before_train(self) -> None: ...

    def after_train(self) -> None: ...

    def before_epoch(self) -> None: ...

    def after_epoch(self) -> None: ...

    def before_step(self) -> None: ...

    def after_step(self) -> None: ...

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@contextmanager
def _stop_on_signals() -> Iterator[list[int]]:
    """Turn SIGINT/SIGTERM into a request to stop (a second SIGINT aborts at once); yields the signals seen."""
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


class Trainer:
    """Runs `step` over `data` for `max_iters` iterations with `hooks`.

    model: the network the step calls (DDP-wrapped when distributed, see `ddp.prepare`); `module`
    is the unwrapped one whose state is saved. step(trainer, batch) returns named loss terms. The
    checkpointer, when given, is resumed from at the start and saved to on a signal.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        data: TrainData,
        step: StepFn,
        *,
        max_iters: int,
        hooks: Sequence[HookBase] = (),
        checkpointer: Checkpointer | None = None,
        accumulate: int = 1,
        precision: str = precision_mod.DEFAULT,
        device: torch.device | str = "cpu",
        name: str = "train",
    ) -> None:
        if len(data) == 0:
            raise ValueError(f"{name}: the training data gives no batch per epoch")
        if accumulate < 1:
            raise ValueError(f"{name}: accumulate must be >= 1, got {accumulate}")
        self.model, self.optimizer, self.data, self.step_fn = model, optimizer, data, step
        self.module = model.module if isinstance(model, DistributedDataParallel) else model
        self.max_iters, self.iters_per_epoch = max_iters, len(data)
        self.max_epochs = math.ceil(max_iters / self.iters_per_epoch)
        self.checkpointer, self.accumulate = checkpointer, accumulate
        self.precision, self.device, self.name = precision_mod.check(precision), torch.device(device), name
        self.hooks = list(hooks)
        names = [hook.name for hook in self.hooks]
        if len(set(names)) != len(names):
            raise ValueError(f"{name}: hooks are saved by name; give repeated hooks their own `name` ({names})")
        for hook in self.hooks:
            hook.trainer = self
        self.iter = self.epoch = self.start_iter = 0
        self.end_iter = max_iters
        self.losses: dict[str, float] = {}  # the last step's total ("loss") and terms
        self.eval_results: dict[str, Any] | None = None  # set by an evaluation in the current phase
        self._pending: Exception | None = None

    @property
    def inner_iter(self) -> int:
        """Iterations completed in the current epoch."""
        return self.iter - self.epoch * self.iters_per_epoch

    def train(self, until: int | None = None, resume: bool = True) -> None:
        """Resume if the checkpointer allows, then train to `max_iters` (or stop after `until` iterations;
        the schedules still span max_iters, so a later call continues the same run). resume=False starts
        afresh even from a resumable checkpoint (the checkpointer then overwrites it)."""
        if self.checkpointer is not None and resume:
            try:
                self.checkpointer.load(self)
            except Exception as e:  # noqa: BLE001 - a rank that cannot read it fails every rank below
                self._pending = e
            self._agree("resuming")
        self.start_iter = self.iter
        self.end_iter = self.max_iters if until is None else min(until, self.max_iters)
        self.optimizer.zero_grad(set_to_none=True)
        with _stop_on_signals() as got:
            self._phase("before_train")
            while self.iter < self.end_iter:
                self.epoch = self.iter // self.iters_per_epoch
                self._phase("before_epoch")
                batches = iter(self.data.epoch(self.epoch, self.inner_iter))
                epoch_end = min((self.epoch + 1) * self.iters_per_epoch, self.end_iter)
                while self.iter < epoch_end:
                    self._iteration(batches, got)
                if self.inner_iter == self.iters_per_epoch:
                    self._phase("after_epoch")
            self._phase("after_train")
            self._agree("after training")

    @property
    def failing(self) -> bool:
        """A step or hook on this rank failed since the last agreed point (to be reported there)."""
        return self._pending is not None

    def _phase(self, name: str) -> None:
        """Call every hook's `name`; the first failure is kept for the next agreed point."""
        if name in ("after_step", "after_epoch"):
            self.eval_results = None
        for hook in self.hooks:
            try:
                getattr(hook, name)()
            except Exception as e:  # noqa: BLE001 - reported to every rank at the next agreed point
                self._pending = self._pending or e

    def _agree(self, where: str, signum: int = 0) -> int:
        error, self._pending = self._pending, None
        return agree(f"{self.name}: {where}", error, signum)

    def _iteration(self, batches: Iterator[Any], got: list[int]) -> None:
        try:
            batch = next(batches)
        except StopIteration:
            self._pending = self._pending or RuntimeError(
                f"{self.name}: epoch {self.epoch + 1} ended after {self.inner_iter} batches, "
                f"but the data promised {self.iters_per_epoch}")
        except Exception as e:  # noqa: BLE001 - agreed below
            self._pending = self._pending or e
        self._phase("before_step")
        boundary = self.inner_iter % self.accumulate == 0
        signum = self._agree(f"iteration {self.iter + 1}", got[0] if got and boundary else 0)
        if signum:
            saved = self.checkpointer.save(self) if self.checkpointer is not None else None
            dist.barrier()  # rank 0 writes; no rank may exit (and end the others) before the file is complete
            raise TrainingInterrupted(saved, signum)
        self._run_step(batch)
        self.iter += 1
        self._phase("after_step")

    def _run_step(self, batch: Any) -> None:
        """Forward, agree (loss finite everywhere), backward, and an optimizer step at a group's end."""
        group_start = self.inner_iter - self.inner_iter % self.accumulate
        group = min(self.accumulate, self.iters_per_epoch - group_start)
        stepping = self.inner_iter == group_start + group - 1
        ddp = isinstance(self.model, DistributedDataParallel)
        with nullcontext() if stepping or not ddp else self.model.no_sync():
            try:
                with precision_mod.autocast(self.precision, self.device):
                    terms = self.step_fn(self, batch)
                total = sum(terms.values())
                values = torch.stack([total.detach().float(), *(t.detach().float() for t in terms.values())]).tolist()
                self.losses = dict(zip(["loss", *terms], values, strict=True))
                if not all(math.isfinite(v) for v in values):
                    raise NonFiniteLoss(self._non_finite_message())
            except Exception as e:  # noqa: BLE001 - agreed below
                self._pending = self._pending or e
            self._agree(f"iteration {self.iter + 1}")
            (total / group if group > 1 else total).backward()
        if stepping:
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)

    def _non_finite_message(self) -> str:
        terms = ", ".join(f"{k} {v:.6g}" for k, v in self.losses.items() if k != "loss")
        where = f"{self.checkpointer.latest}" if self.checkpointer is not None else "none"
        return (
            f"{self.name}: the loss is {self.losses['loss']} at iteration {self.iter + 1} (epoch {self.epoch + 1}, "
            f"lr {self.optimizer.param_groups[0]['lr']:g}): {terms}. Nothing of this step was applied; "
            f"lower the learning rate or check the data (last checkpoint: {where})"
        )
