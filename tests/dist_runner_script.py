"""Run by tests/test_run_record.py under `torchrun --nproc_per_node 2` (gloo, CPU): the runner under torchrun.

argv: mode (`rank0` or `fail`), image folder, output folder.
rank0: a `rank0_only` benchmark runs on rank 0 while both ranks extract its features.
fail: rank 1 raises while rank 0 waits in a collective; both processes must end with the message.
"""

import sys
from pathlib import Path

import numpy as np
import torch

from densecl_bench import dist, registry, runner
from densecl_bench.benchmarks.base import Benchmark, Metric, RunContext
from densecl_bench.data.base import ImageList

mode, images_dir, out = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])


class Probe(Benchmark):
    name = "probe"
    table = "probe"
    config = "knn_imagenet"
    rank0_only = True

    def required_data(self, data_root: Path) -> list[Path]:
        return []

    def run(self, ctx: RunContext) -> list[Metric]:
        (out / f"ran_on_rank{dist.rank()}").touch()
        paths = sorted(images_dir.glob("*.png"))
        images = ImageList("toy/train", images_dir, paths, np.arange(len(paths)), [str(i) for i in range(len(paths))])
        ctx.features(images, "voc_svm", ["feature5"], "adaptive", 64, 2)  # lands in the feature cache
        return [Metric(self.name, "rows", float(len(images)))]


class Boom(Probe):
    name = "boom"
    rank0_only = False

    def run(self, ctx: RunContext) -> list[Metric]:
        if dist.rank() == 1:
            raise RuntimeError("boom on rank 1")
        dist.barrier()  # rank 1 never joins this collective
        return []


torch.set_num_threads(1)
bench = {"rank0": Probe, "fail": Boom}[mode]
registry.available = lambda: {bench.name: bench}
result = runner.run_suite([bench.name], "random", arch="resnet18", data_root=out, runs_dir=out / "runs",
                          run_id="r", num_workers=0)
assert [s.status for s in result.stages] == ["done"]
