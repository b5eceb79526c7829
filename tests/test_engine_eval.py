"""Evaluators against hand-computed accuracies, gather on one process, PreciseBN, precision."""

import pytest
import torch
from torch import nn

from densecl_bench.config import ConfigError
from densecl_bench.engine import ClassificationAccuracy, DatasetEvaluator, DatasetEvaluators, gather, inference_on_dataset
from densecl_bench.engine.precise_bn import update_bn_stats
from densecl_bench.engine.precision import autocast, check


def test_multi_head_accuracy_by_hand():
    """Head a: sample 0 right at top-1, sample 1 right at top-2, sample 2 wrong at both, sample 3
    (right) masked out -> top-1 1/3, top-2 2/3. Head b is always right. Two batches."""
    a = torch.tensor([[3.0, 2, 1], [1, 3, 2], [2, 1, 3], [0, 1, 2]])
    labels = torch.tensor([0, 2, 1, 2])
    b = torch.nn.functional.one_hot(labels, 3).float()
    valid = torch.tensor([True, True, True, False])
    ev = ClassificationAccuracy(topk=(1, 2, 5), targets=lambda inputs: (inputs["y"], inputs["ok"]))
    for part in (slice(0, 2), slice(2, 4)):
        ev.process({"y": labels[part], "ok": valid[part]}, {"a": a[part], "b": b[part]})
    res = ev.evaluate()
    assert res["top1"] == {"a": pytest.approx(100 / 3), "b": 100.0}
    assert res["top2"] == {"a": pytest.approx(200 / 3), "b": 100.0}
    assert res["top5"] == {"a": 100.0, "b": 100.0}  # k capped at the 3 classes
    assert ev.evaluate() == res  # evaluating twice does not double the counts
    ev.reset()
    ev.targets = lambda inputs: inputs[1]
    ev.process((None, labels), a)  # one classifier
    assert ev.evaluate() == {"top1": 50.0, "top2": 75.0, "top5": 100.0}  # samples 0 and 3; and 1 at top-2


def test_single_classifier_and_several_evaluators():
    class Count(DatasetEvaluator):
        def reset(self) -> None:
            self.n = 0

        def process(self, inputs, outputs) -> None:
            self.n += len(outputs)

        def evaluate(self) -> dict:
            return {"n": self.n}

    model = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.eye(2))
    model.train()
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [2.0, 3.0]])
    y = torch.tensor([0, 1, 1, 0])
    loader = [(x[:2], y[:2]), (x[2:], y[2:])]
    both = DatasetEvaluators([ClassificationAccuracy(topk=(1,)), Count()])
    res = inference_on_dataset(model, loader, both, forward=lambda m, b: m(b[0]))
    assert res == {"top1": 50.0, "n": 4}
    assert model.training  # restored
    twice = DatasetEvaluators([Count(), Count()])
    twice.reset()
    with pytest.raises(KeyError, match="n"):
        twice.evaluate()


def test_gather_on_one_process():
    assert gather({"rank": 0}) == [{"rank": 0}]


def test_precise_bn_gives_the_average_of_batch_statistics():
    """Channel 0 batches [0,2,4,6], [1,1,1,1], [2,4,6,8]: means 3, 1, 5 (population mean 3), unbiased
    variances 20/3, 0, 20/3 (average 40/9). Channel 1 is channel 0 times -2."""
    c0 = [torch.tensor([0.0, 2, 4, 6]), torch.tensor([1.0, 1, 1, 1]), torch.tensor([2.0, 4, 6, 8])]
    batches = [torch.stack([v, -2 * v], dim=1) for v in c0]
    model = nn.Sequential(nn.BatchNorm1d(2, momentum=0.1))
    model.eval()
    used = update_bn_stats(model, iter(batches), lambda b: model(b), num_iters=200)
    bn = model[0]
    assert used == 3 and bn.momentum == 0.1 and not model.training
    torch.testing.assert_close(bn.running_mean, torch.tensor([3.0, -6.0]))
    torch.testing.assert_close(bn.running_var, torch.tensor([40 / 9, 4 * 40 / 9]))
    assert update_bn_stats(model, iter(batches), lambda b: model(b), num_iters=2) == 2
    torch.testing.assert_close(bn.running_mean, torch.tensor([2.0, -4.0]))
    with pytest.raises(ValueError, match="no batch"):
        update_bn_stats(model, iter([]), lambda b: model(b))


def test_precision_is_explicit():
    lin = nn.Linear(3, 2)
    x = torch.randn(4, 3)
    with autocast("fp32", "cpu"):
        assert lin(x).dtype == torch.float32
    with autocast("bf16", torch.device("cpu")):
        assert lin(x).dtype == torch.bfloat16
    with pytest.raises(ConfigError, match="precision must be one of"):
        check("fp16")


def test_precise_bn_hook_runs_before_each_evaluation():
    import torch.nn.functional as F

    from densecl_bench.engine import EvalHook, PreciseBNHook, Trainer

    torch.manual_seed(0)
    batches = [(torch.randn(4, 3) + i, torch.tensor([0, 1, 0, 1])) for i in range(3)]
    model = nn.Sequential(nn.BatchNorm1d(3), nn.Linear(3, 2))  # BN sees the raw batches

    class Data:
        def __len__(self) -> int:
            return 3

        def epoch(self, epoch: int, start: int = 0):
            return iter(batches[start:])

    seen = []
    hooks = [PreciseBNHook(1, lambda: iter(batches), lambda b: model(b[0]), num_iters=3),
             EvalHook(1, lambda: seen.append(model[0].running_mean.clone()) or {})]
    Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), Data(),
            lambda t, b: {"ce": F.cross_entropy(t.model(b[0]), b[1])}, max_iters=6, hooks=hooks).train()
    expected = torch.stack([b[0].mean(0) for b in batches]).mean(0)
    assert len(seen) == 2
    for mean in seen:
        torch.testing.assert_close(mean, expected)


def test_prepare_without_a_process_group_is_the_plain_model():
    from densecl_bench.engine.ddp import prepare

    model = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3))
    assert prepare(model, torch.device("cpu")) is model
