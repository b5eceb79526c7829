"""Run by tests/test_pretrain.py under `torchrun --nproc_per_node 2` (gloo, CPU): one DDP training
iteration through the real loop, then a check that shuffle-BN's gather/shuffle/unshuffle returns
each rank its own keys and that every rank holds the same queues and weights."""

import sys
from pathlib import Path

import numpy as np
import torch

from densecl_bench import dist
from densecl_bench.data.base import ImageList
from densecl_bench.pretrain import DenseCL, train

sys.path.insert(0, str(Path(__file__).parent))
from test_pretrain import tiny_cfg  # noqa: E402

torch.set_num_threads(1)
root, out = Path(sys.argv[1]), Path(sys.argv[2])
paths = sorted(root.glob("*.png"))
images = ImageList("tiny", root, paths, np.arange(len(paths)) % 3, ["a", "b", "c"])
train(tiny_cfg(epochs=1), images, out)  # 12 images, 4 per rank x 2 ranks: one iteration

assert dist.world_size() == 2
torch.manual_seed(0)
model = DenseCL("resnet18", queue_len=16, feat_dim=8).eval()  # eval BN: keys do not depend on batch mates
torch.manual_seed(1 + dist.rank())
im = torch.randn(2, 3, 64, 64)
shuffled = model._encode_keys(im, dense=True)
local = model._encode(model.encoder_k, im, dense=True)
for a, b in zip(shuffled, local, strict=True):
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
model.train()(im, im.flip(3))["loss"].backward()
state = torch.cat([model.queue.flatten(), model.queue2.flatten(), model.encoder_k[0].conv1.weight.flatten()])
gathered = dist.all_gather_cat(state[None])
assert torch.equal(gathered[0], gathered[1]), "ranks disagree"
assert int(model.queue_ptr) == 4
if dist.is_main():
    print("ranks agree")
dist.close()
