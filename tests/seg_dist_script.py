"""Run under torchrun (2 gloo processes): each rank evaluates its half of the images; every rank must
report the metrics of the whole set (the confusion matrices summed, not the ranks' mIoUs averaged).
Each rank writes its results to <argv[1]>/rank<r>.json (the ranks' stdout lines may interleave)."""

import json
import sys
from pathlib import Path

import torch

from densecl_bench import dist
from densecl_bench.segmentation.evaluator import SemSegEvaluator

dist.init_from_env()
LABELS = [torch.tensor([[0, 0, 1], [1, 2, 255]]), torch.tensor([[3, 3], [0, 255]])]
PREDS = [torch.tensor([[0, 1, 1], [1, 0, 2]]), torch.tensor([[3, 0], [0, 1]])]
ev = SemSegEvaluator(4)
r = dist.rank()
ev.process((None, [LABELS[r]]), [torch.nn.functional.one_hot(PREDS[r], 4).permute(2, 0, 1).float()])
(Path(sys.argv[1]) / f"rank{r}.json").write_text(json.dumps(ev.evaluate()))
dist.close()
