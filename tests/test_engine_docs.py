"""The example plugin of docs/ENGINE.md runs: a tiny backbone fine-tuned on a toy ImageNet folder,
then run again to show that the finished stage resumes instead of training anew."""

import re
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from densecl_bench.backbone import Backbone, freeze
from densecl_bench.benchmarks.base import RunContext
from densecl_bench.checkpoint import load_checkpoint

DOC = Path(__file__).parents[1] / "docs" / "ENGINE.md"


def toy_imagenet(root: Path) -> None:
    rng = np.random.default_rng(0)
    for split, n in (("train", 8), ("val", 4)):
        for c, wnid in enumerate(("n01", "n02")):
            folder = root / "imagenet" / split / wnid
            folder.mkdir(parents=True)
            for i in range(n):
                arr = rng.integers(0, 256, (24, 24, 3)).astype(np.uint8)
                arr[..., c] = 255
                Image.fromarray(arr).save(folder / f"{i}.png")


def test_engine_doc_example_plugin(tmp_path):
    code = re.search(r"```python\n(.*?)```", DOC.read_text(), re.S).group(1)
    namespace: dict = {}
    exec(compile(code, str(DOC), "exec"), namespace)
    toy_imagenet(tmp_path)
    torch.manual_seed(0)
    ctx = RunContext(
        backbone=freeze(Backbone("resnet18")),
        checkpoint=load_checkpoint("random", arch="resnet18"),
        data_root=tmp_path, demo=True, device=torch.device("cpu"), run_dir=tmp_path / "run",
        cache_dir=tmp_path / "cache", num_workers=0,
        config={"lr": 0.05, "weight_decay": 1e-4, "epochs": 2, "warmup_iters": 2, "batch_size": 4, "size": 16},
    )
    metrics = namespace["TinyFinetune"]().run(ctx)
    assert [m.name for m in metrics] == ["top1"] and 0.0 <= metrics[0].value <= 100.0
    assert sorted(p.name for p in (tmp_path / "run" / "tiny_finetune").iterdir()) == ["latest.pth", "metrics.jsonl"]
    again = namespace["TinyFinetune"]().run(ctx)  # resumes the finished run: same number, no training
    assert again[0].value == metrics[0].value
