"""Run by tests/test_features.py under `torchrun --nproc_per_node 2` (gloo, CPU): sharded extraction.

argv: image folder, cache dir. Every rank extracts its shard; rank 0 merges into the cache file and
the skipped (unreadable) rows of all shards into its sidecar.
"""

import sys
from pathlib import Path

import numpy as np
import torch

from densecl_bench import dist
from densecl_bench.backbone import Backbone, freeze, random_state_dict
from densecl_bench.data.base import ImageList
from densecl_bench.features import extract

torch.set_num_threads(1)
dist.init_from_env()
assert dist.world_size() == 2
root, cache = Path(sys.argv[1]), Path(sys.argv[2])
paths = sorted(root.glob("*.jpg"))
images = ImageList("toy/train", root, paths, np.arange(len(paths)), [str(i) for i in range(len(paths))])
backbone = Backbone("resnet18")
backbone.load_state_dict(random_state_dict("resnet18"))
out = extract(freeze(backbone), images, transform="voc_svm", layers=["feature5"], pooling="adaptive", size=64,
              batch_size=2, num_workers=0, cache_dir=cache, ckpt_key="dist", on_bad_image="skip")
assert out.arrays["feature5"].shape == (len(paths), 2048)
assert out.skipped == [i for i, p in enumerate(paths) if "broken" in p.name]
