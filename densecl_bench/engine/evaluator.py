"""The evaluator interface (detectron2's): reset / process(inputs, outputs) / evaluate() -> dict.

`inference_on_dataset` runs a model over a loader in eval mode and feeds an evaluator; each rank
sees its shard of the data, and `evaluate()` combines the ranks' partial state (a sum for counts,
`gather` for anything else), so every rank returns the results of the whole dataset.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.distributed as td
from torch import Tensor, nn

from densecl_bench import dist
from densecl_bench.engine import precision as precision_mod
from densecl_bench.engine.sync import agree
from densecl_bench.progress import bar as progress_bar


class DatasetEvaluator:
    """Accumulates over batches (`process`) and reports (`evaluate`); `reset` before each evaluation."""

    def reset(self) -> None: ...

    def process(self, inputs: Any, outputs: Any) -> None: ...

    def evaluate(self) -> dict[str, Any]:
        return {}


class DatasetEvaluators(DatasetEvaluator):
    """Several evaluators fed the same batches; their results are merged (keys must not clash)."""

    def __init__(self, evaluators: Sequence[DatasetEvaluator]) -> None:
        self.evaluators = list(evaluators)

    def reset(self) -> None:
        for e in self.evaluators:
            e.reset()

    def process(self, inputs: Any, outputs: Any) -> None:
        for e in self.evaluators:
            e.process(inputs, outputs)

    def evaluate(self) -> dict[str, Any]:
        results: dict[str, Any] = {}
        for e in self.evaluators:
            for k, v in e.evaluate().items():
                if k in results:
                    raise KeyError(f"two evaluators report {k!r}")
                results[k] = v
        return results


def gather(obj: Any) -> list[Any]:
    """Every rank's `obj`, in rank order, on every rank (a list of one without a process group)."""
    if not dist.is_dist():
        return [obj]
    out: list[Any] = [None] * dist.world_size()
    td.all_gather_object(out, obj)
    return out


def inference_on_dataset(
    model: nn.Module,
    loader: Iterable[Any],
    evaluator: DatasetEvaluator,
    *,
    forward: Callable[[nn.Module, Any], Any] | None = None,
    precision: str = precision_mod.DEFAULT,
    device: torch.device | str = "cpu",
    progress: bool | None = None,
    desc: str = "eval",
) -> dict[str, Any]:
    """Evaluate `model` (in eval mode, restored afterwards) on this rank's `loader`.

    forward(model, batch) gives the outputs handed to `evaluator.process(batch, outputs)`; by default
    `model(batch)`. A failure on any rank is agreed before the evaluator gathers, so no rank waits.
    """
    forward = forward or (lambda m, batch: m(batch))
    was_training = model.training
    evaluator.reset()
    error: Exception | None = None
    model.eval()
    try:
        with torch.inference_mode(), precision_mod.autocast(precision, device):
            for batch in progress_bar(loader, desc=desc, leave=False, progress=progress):
                evaluator.process(batch, forward(model, batch))
    except Exception as e:  # noqa: BLE001 - agreed below
        error = e
    finally:
        model.train(was_training)
    agree(desc, error)
    return evaluator.evaluate()


class ClassificationAccuracy(DatasetEvaluator):
    """Top-k accuracy (percent) of one classifier or of several heads (outputs a dict head -> logits).

    targets(inputs) gives the labels of a batch, or (labels, valid) where `valid` masks samples
    left out (unreadable images); by default inputs is (images, labels). Results:
    {"top1": value, "top5": value} for one classifier, {"top1": {head: value}, ...} for heads.
    k is capped at the number of classes.
    """

    def __init__(self, topk: Sequence[int] = (1, 5), targets: Callable[[Any], Any] | None = None,
                 device: torch.device | str = "cpu") -> None:
        self.topk, self.device = tuple(topk), torch.device(device)
        self.targets = targets or (lambda inputs: inputs[1])
        self.reset()

    def reset(self) -> None:
        self.heads: list[str] | None = None
        self.single = False
        self.correct: Tensor | None = None  # len(topk) x heads, float64
        self.count = torch.zeros(1, dtype=torch.float64, device=self.device)

    def process(self, inputs: Any, outputs: Tensor | Mapping[str, Tensor]) -> None:
        target = self.targets(inputs)
        labels, valid = target if isinstance(target, tuple) else (target, None)
        labels = labels.to(self.device)
        keep = torch.ones_like(labels, dtype=torch.bool) if valid is None else valid.to(self.device, torch.bool)
        if self.heads is None:
            self.single = isinstance(outputs, Tensor)
            self.heads = [""] if self.single else list(outputs)
            self.correct = torch.zeros(len(self.topk), len(self.heads), dtype=torch.float64, device=self.device)
        logits = {"": outputs} if self.single else outputs
        for j, head in enumerate(self.heads):
            out = logits[head].float()
            top = out.topk(min(max(self.topk), out.shape[1]), dim=1).indices
            hit = top.eq(labels[:, None])
            for i, k in enumerate(self.topk):
                self.correct[i, j] += (hit[:, :k].any(1) & keep).sum()
        self.count += keep.sum()

    def evaluate(self) -> dict[str, Any]:
        if self.heads is None or self.correct is None:
            raise ValueError("ClassificationAccuracy: no batch was processed")
        correct = dist.all_reduce_sum(self.correct.clone())
        count = dist.all_reduce_sum(self.count.clone())
        acc = (100.0 * correct / count.clamp_min(1)).tolist()
        if self.single:
            return {f"top{k}": acc[i][0] for i, k in enumerate(self.topk)}
        return {f"top{k}": dict(zip(self.heads, acc[i], strict=True)) for i, k in enumerate(self.topk)}
