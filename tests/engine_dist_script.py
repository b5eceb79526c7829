"""Run by tests/test_engine_dist.py under `torchrun --nproc_per_node 2` (gloo, CPU).

Rank 1 fails in a different place per scenario (the step, a hook, the data, an evaluator); each rank
prints what it caught. The ranks stay in step after each failure, so the scenarios share one
process group, and a last clean DDP run checks that both ranks end with the same weights.
"""

import torch
import torch.nn.functional as F
from torch import nn

from densecl_bench import dist
from densecl_bench.engine import ClassificationAccuracy, HookBase, Trainer, inference_on_dataset
from densecl_bench.engine.ddp import prepare

torch.set_num_threads(1)
dist.init_from_env()
assert dist.world_size() == 2
rank = dist.rank()


class Points:
    """Six batches per epoch of this rank's random points; rank 1 cannot read batch `bad`."""

    def __init__(self, bad: int | None = None) -> None:
        self.bad = bad

    def __len__(self) -> int:
        return 6

    def epoch(self, epoch: int, start: int = 0):
        for i in range(start, 6):
            if rank == 1 and i == self.bad:
                raise OSError(f"cannot read batch {i}")
            g = torch.Generator().manual_seed(100 * epoch + 10 * i + rank)
            yield torch.randn(4, 3, generator=g), torch.randint(0, 2, (4,), generator=g)


class FailAt(HookBase):
    def __init__(self, at: int | None) -> None:
        self.at = at

    def after_step(self) -> None:
        if rank == 1 and self.trainer.iter == self.at:
            raise RuntimeError(f"hook failed after iteration {self.at}")


def run(name: str, fail_step: int | None = None, fail_hook: int | None = None, bad_batch: int | None = None):
    torch.manual_seed(0)
    model = prepare(nn.Linear(3, 2), torch.device("cpu"))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)

    def step(trainer, batch):
        if rank == 1 and trainer.iter + 1 == fail_step:
            raise ValueError(f"boom at iteration {fail_step}")
        return {"ce": F.cross_entropy(trainer.model(batch[0]), batch[1])}

    trainer = Trainer(model, opt, Points(bad_batch), step, max_iters=12, hooks=[FailAt(fail_hook)], name=name)
    try:
        trainer.train()
    except Exception as e:
        print(f"rank {rank} {name}: {type(e).__name__}: {e}", flush=True)
    return trainer


run("step", fail_step=3)
run("hook", fail_hook=2)
run("data", bad_batch=4)


class Broken(ClassificationAccuracy):
    def process(self, inputs, outputs):
        if rank == 1:
            raise KeyError("no labels")
        super().process(inputs, outputs)


net = nn.Linear(3, 2)
try:
    inference_on_dataset(net, list(Points().epoch(0)), Broken(), forward=lambda m, b: m(b[0]))
except Exception as e:
    print(f"rank {rank} eval: {type(e).__name__}: {e}", flush=True)

# SyncBN only on CUDA: under a gloo group on CPU the BN stays plain BatchNorm (SyncBatchNorm would raise)
with_bn = prepare(nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3)), torch.device("cpu"))
assert isinstance(with_bn, nn.parallel.DistributedDataParallel)
assert not any(isinstance(m, nn.SyncBatchNorm) for m in with_bn.modules())
with_bn(torch.randn(4, 3)).sum().backward()

clean = run("clean")
weights = torch.cat([p.detach().flatten() for p in clean.module.parameters()])
both = dist.all_gather_cat(weights[None])
assert torch.equal(both[0], both[1]), "ranks disagree"
acc = inference_on_dataset(clean.model, list(Points().epoch(0)), ClassificationAccuracy(topk=(1,)),
                           forward=lambda m, b: m(b[0]))
print(f"rank {rank} clean: iter {clean.iter}, top1 {acc['top1']:.4f}", flush=True)
dist.close()
