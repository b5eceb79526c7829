"""The training engine: one loop with hooks for everything that trains, and the evaluator interface.

    schedule.py    LR schedules (step, cosine, poly; by epoch or iteration), warm-up, param groups
    trainer.py     Trainer (position, step, loss check, hooks), HookBase
    hooks.py       LR, periodic checkpoints, evaluation, PreciseBN, metric logging
    checkpoint.py  atomic checkpoints with RNG states and the one resume rule
    data.py        training data that resumes mid-epoch
    evaluator.py   DatasetEvaluator, inference_on_dataset, top-k accuracy
    precise_bn.py  BN statistics recomputed over many batches
    precision.py   fp32 / bf16 as a protocol setting
    ddp.py         DDP and SyncBN for the run at hand
    sync.py        failures on one rank reach every rank
"""

from densecl_bench.engine import ddp, precision
from densecl_bench.engine.checkpoint import Checkpointer, ResumeKey
from densecl_bench.engine.data import EpochLoader, SeededDataset, TrainData, per_rank_batch
from densecl_bench.engine.evaluator import (
    ClassificationAccuracy,
    DatasetEvaluator,
    DatasetEvaluators,
    gather,
    inference_on_dataset,
)
from densecl_bench.engine.hooks import EvalHook, LRSchedulerHook, MetricLogger, PeriodicCheckpointer, PreciseBNHook
from densecl_bench.engine.schedule import LRSchedule, LRScheduler, param_groups
from densecl_bench.engine.sync import PeerFailure
from densecl_bench.engine.trainer import HookBase, NonFiniteLoss, Trainer, TrainingInterrupted

__all__ = [
    "Checkpointer", "ClassificationAccuracy", "DatasetEvaluator", "DatasetEvaluators", "EpochLoader", "EvalHook",
    "HookBase", "LRSchedule", "LRScheduler", "LRSchedulerHook", "MetricLogger", "NonFiniteLoss", "PeerFailure",
    "PeriodicCheckpointer", "PreciseBNHook", "ResumeKey", "SeededDataset", "TrainData", "Trainer", "TrainingInterrupted", "gather",
    "ddp", "inference_on_dataset", "param_groups", "per_rank_batch", "precision",
]
