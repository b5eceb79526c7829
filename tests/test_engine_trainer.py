"""The trainer on a tiny net and random data: exact resume (mid-epoch and mid-iteration schedule),
NaN stop, signals, checkpoint keeping and atomicity, the resume rule, metrics.jsonl, accumulation."""

import json
import logging
import os
import signal

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset, DistributedSampler

from densecl_bench.engine import (
    Checkpointer,
    ClassificationAccuracy,
    EpochLoader,
    EvalHook,
    HookBase,
    LRSchedule,
    LRScheduler,
    LRSchedulerHook,
    MetricLogger,
    NonFiniteLoss,
    PeriodicCheckpointer,
    ResumeKey,
    SeededDataset,
    Trainer,
    TrainingInterrupted,
    inference_on_dataset,
)

KEY = ResumeKey("sha", "fp", seed=0, world_size=1)


class NoisyPoints(Dataset):
    """24 points in 4-D, 3 classes, with noise drawn from torch's global RNG (seeded per sample by SeededDataset)."""

    def __init__(self, n: int = 24) -> None:
        g = torch.Generator().manual_seed(1)
        self.x, self.y = torch.randn(n, 4, generator=g), torch.arange(n) % 3

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        return self.x[i] + 0.1 * torch.randn(4), self.y[i]


def net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Dropout(0.2), nn.Linear(8, 3))


def ce(trainer: Trainer, batch) -> dict:
    return {"ce": F.cross_entropy(trainer.model(batch[0]), batch[1])}


class Kill(HookBase):
    """Sends SIGTERM to this process after iteration `at` (the trainer stops at the next boundary)."""

    def __init__(self, at: int) -> None:
        self.at = at

    def after_step(self) -> None:
        if self.trainer.iter == self.at:
            os.kill(os.getpid(), signal.SIGTERM)


def build(out, *, schedule: LRSchedule, max_iters: int, by_epoch: bool = True, extra=(), key=KEY, step=ce,
          keep: int = 0, batch: int = 4) -> Trainer:
    model = net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    points = NoisyPoints()
    ds = SeededDataset(points, seed=0)
    data = EpochLoader(ds, DistributedSampler(ds, num_replicas=1, rank=0, shuffle=True, seed=0), batch)
    val = [(points.x[i : i + 8], points.y[i : i + 8]) for i in range(0, 24, 8)]

    def evaluate() -> dict:
        return inference_on_dataset(model, val, ClassificationAccuracy(topk=(1, 2)), forward=lambda m, b: m(b[0]))

    hooks = [
        LRSchedulerHook(LRScheduler(opt, schedule)),
        EvalHook(1 if by_epoch else 5, evaluate, by_epoch=by_epoch),
        MetricLogger(out / "metrics.jsonl", period=2, progress=False),
        PeriodicCheckpointer(1 if by_epoch else 4, by_epoch=by_epoch, keep=keep),
        *extra,
    ]
    return Trainer(model, opt, data, step, max_iters=max_iters, hooks=hooks, checkpointer=Checkpointer(out, key))


def load(path):
    return torch.load(path, weights_only=True)


def assert_same_state(a: dict, b: dict) -> None:
    for part in ("state_dict", "rng"):
        assert torch.equal(torch.cat([t.flatten().double() for t in _tensors(a[part])]),
                           torch.cat([t.flatten().double() for t in _tensors(b[part])])), part
    assert a["optimizer"]["param_groups"] == b["optimizer"]["param_groups"]
    for k, state in a["optimizer"]["state"].items():
        assert torch.equal(state["momentum_buffer"], b["optimizer"]["state"][k]["momentum_buffer"])
    assert a["hooks"] == b["hooks"] and a["meta"]["iter"] == b["meta"]["iter"]


def _tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors(v)


def test_resume_mid_epoch_is_bit_identical(tmp_path):
    cosine = LRSchedule("cosine", total=3, warmup_iters=4, warmup_ratio=0.1)
    build(tmp_path / "full", schedule=cosine, max_iters=18).train()  # 3 epochs x 6 iterations
    with pytest.raises(TrainingInterrupted) as err:
        build(tmp_path / "cut", schedule=cosine, max_iters=18, extra=[Kill(8)]).train()
    assert err.value.exit_code == 128 + signal.SIGTERM
    meta = load(tmp_path / "cut" / "latest.pth")["meta"]
    assert (meta["epoch"], meta["iter"], meta["iter_in_epoch"]) == (1, 8, 2)
    resumed = build(tmp_path / "cut", schedule=cosine, max_iters=18)
    resumed.train()
    assert resumed.start_iter == 8 and resumed.iter == 18
    full, cut = load(tmp_path / "full" / "latest.pth"), load(tmp_path / "cut" / "latest.pth")
    assert_same_state(full, cut)
    assert len(full["hooks"]["EvalHook"]["history"]) == 3 and full["hooks"]["MetricLogger"]["history"][2]["epoch"] == 3
    # the metrics file of the interrupted and resumed run reads exactly like the uninterrupted one
    assert (tmp_path / "cut" / "metrics.jsonl").read_text() == (tmp_path / "full" / "metrics.jsonl").read_text()
    names = sorted(p.name for p in (tmp_path / "full").iterdir())
    assert names == ["epoch_1.pth", "epoch_2.pth", "epoch_3.pth", "latest.pth", "metrics.jsonl"]


def test_resume_mid_iteration_schedule_is_bit_identical(tmp_path):
    """Iteration-based: 15 iterations (2.5 passes over the data), poly with warm-up, stopped after 8."""
    poly = LRSchedule("poly", total=15, by_epoch=False, power=0.9, min_lr=1e-3, warmup_iters=3, warmup_ratio=0.01)
    full = build(tmp_path / "full", schedule=poly, max_iters=15, by_epoch=False)
    full.train()
    cut = build(tmp_path / "cut", schedule=poly, max_iters=15, by_epoch=False)
    cut.train(until=8)
    assert cut.iter == 8 and load(tmp_path / "cut" / "latest.pth")["meta"]["iter"] == 8
    build(tmp_path / "cut", schedule=poly, max_iters=15, by_epoch=False).train()
    assert_same_state(load(tmp_path / "full" / "latest.pth"), load(tmp_path / "cut" / "latest.pth"))
    assert sorted(p.name for p in (tmp_path / "full").glob("iter_*")) == ["iter_12.pth", "iter_15.pth", "iter_4.pth",
                                                                          "iter_8.pth"]
    evals = [r["iter"] for r in full.hooks[1].history]
    assert evals == [5, 10, 15]


def test_nan_loss_stops_with_iteration_and_terms(tmp_path):
    def nan_at_5(trainer: Trainer, batch) -> dict:
        terms = ce(trainer, batch)
        bad = torch.tensor(float("nan") if trainer.iter == 4 else 0.0)
        return {**terms, "aux": bad}

    seen = {}

    class Snapshot(HookBase):
        def after_step(self) -> None:
            seen["weights"] = [p.detach().clone() for p in self.trainer.module.parameters()]

    trainer = build(tmp_path, schedule=LRSchedule("constant", total=1), max_iters=18, step=nan_at_5,
                    extra=[Snapshot()])
    with pytest.raises(NonFiniteLoss, match=r"the loss is nan at iteration 5 \(epoch 1.*aux nan") as err:
        trainer.train()
    assert "ce 1." in str(err.value) or "ce 0." in str(err.value)
    # the step with the NaN was not applied
    assert all(torch.equal(a, b) for a, b in zip(seen["weights"], trainer.module.parameters(), strict=True))


def test_checkpoints_keep_the_last_k_and_write_atomically(tmp_path, monkeypatch):
    step = LRSchedule("step", total=4, steps=(2,))
    build(tmp_path, schedule=step, max_iters=24, keep=2).train()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["epoch_3.pth", "epoch_4.pth", "latest.pth", "metrics.jsonl"]
    assert os.path.samefile(tmp_path / "epoch_4.pth", tmp_path / "latest.pth")  # a hard link, no second copy
    before = (tmp_path / "latest.pth").read_bytes()

    def torn_write(obj, path, *args, **kwargs):
        with open(path, "wb") as f:
            f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", torn_write)
    trainer = build(tmp_path, schedule=step, max_iters=24)
    trainer.iter = 24
    with pytest.raises(OSError, match="disk full"):
        trainer.checkpointer.save(trainer, "epoch_5.pth")
    assert (tmp_path / "latest.pth").read_bytes() == before  # the previous state is intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["epoch_3.pth", "epoch_4.pth", "latest.pth", "metrics.jsonl"]


def test_a_checkpoint_of_another_run_is_not_resumed(tmp_path, caplog):
    step = LRSchedule("step", total=2, steps=(1,))
    build(tmp_path, schedule=step, max_iters=12).train()
    other = build(tmp_path, schedule=step, max_iters=12, key=ResumeKey("sha", "fp", seed=1, world_size=1))
    with caplog.at_level(logging.WARNING):
        other.train(until=6)
    assert other.start_iter == 0
    assert "not resuming" in caplog.text and "seed is 0, this run's is 1" in caplog.text
    same = build(tmp_path, schedule=step, max_iters=12, key=ResumeKey("sha", "fp", seed=1, world_size=1))
    same.train()
    assert same.start_iter == 6  # the fresh run's own checkpoint is resumed


def test_accumulation_steps_once_per_group_with_a_short_last_group(tmp_path):
    """5 batches of 4 with accumulate 2: groups of 2, 2, 1 batches; each group's mean gradient is one SGD step."""
    torch.manual_seed(0)
    x, y = torch.randn(20, 4, dtype=torch.float64), torch.arange(20) % 3
    batches = [(x[i : i + 4], y[i : i + 4]) for i in range(0, 20, 4)]

    class Fixed:
        def __len__(self) -> int:
            return len(batches)

        def epoch(self, epoch: int, start: int = 0):
            return iter(batches[start:])

    def linear() -> nn.Module:
        torch.manual_seed(3)
        return nn.Linear(4, 3).double()

    model = linear()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    Trainer(model, opt, Fixed(), lambda t, b: {"ce": F.cross_entropy(t.model(b[0]), b[1])}, max_iters=5,
            accumulate=2).train()
    ref = linear()
    for group in ((0, 1), (2, 3), (4,)):
        idx = torch.cat([torch.arange(4 * g, 4 * g + 4) for g in group])
        ref.zero_grad()
        F.cross_entropy(ref(x[idx]), y[idx]).backward()
        with torch.no_grad():
            for p in ref.parameters():
                p -= 0.5 * p.grad
    for a, b in zip(model.parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_metrics_jsonl_records(tmp_path):
    build(tmp_path, schedule=LRSchedule("step", total=2, steps=(1,)), max_iters=12).train()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "ce" in r and "top1" not in r]
    epochs = [r for r in records if "top1" in r]
    assert [r["iter"] for r in steps] == [2, 4, 6, 8, 10, 12]
    assert [r["lr"] for r in steps] == [0.1, 0.1, 0.1, pytest.approx(0.01), pytest.approx(0.01), pytest.approx(0.01)]
    assert [(r["epoch"], r["iter"]) for r in epochs] == [(1, 6), (2, 12)]
    assert set(epochs[0]) >= {"loss", "ce", "lr", "top1", "top2"}


def test_data_shorter_than_promised_and_repeated_hooks_are_errors():
    class Short:
        def __len__(self) -> int:
            return 3

        def epoch(self, epoch: int, start: int = 0):
            return iter([(torch.randn(2, 4), torch.tensor([0, 1]))] * 2)

    model = net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(RuntimeError, match="epoch 1 ended after 2 batches, but the data promised 3"):
        Trainer(model, opt, Short(), ce, max_iters=3).train()
    with pytest.raises(ValueError, match="own `name`"):
        Trainer(model, opt, Short(), ce, max_iters=3, hooks=[Kill(1), Kill(2)])


def test_a_failed_final_evaluation_leaves_no_checkpoint_that_looks_finished(tmp_path):
    """The checkpointer runs after the eval hook; had it saved, a re-run would skip the evaluation."""

    class FailingEval(HookBase):
        def after_step(self) -> None:
            if self.trainer.iter == self.trainer.max_iters:
                raise RuntimeError("evaluation failed")

    schedule = LRSchedule("step", total=30, steps=(20,), by_epoch=False)
    t = build(tmp_path, schedule=schedule, max_iters=6, by_epoch=False)
    failing = FailingEval()
    failing.trainer = t
    t.hooks.insert(1, failing)  # before the checkpointer, as the EvalHook is
    with pytest.raises(RuntimeError, match="evaluation failed"):
        t.train()
    assert load(tmp_path / "latest.pth")["meta"]["iter"] == 4  # the last periodic save, not iteration 6
