"""DenseCL pretraining (Wang et al., CVPR 2021): model, MoCo v2 augmentations, training loop.

PROTOCOLS.md §1 (MMSelfSup 0.x `densecl_resnet50_8xb32-coslr-200e_in1k`, WXinlong/DenseCL).
"""

from densecl_bench.pretrain.model import DenseCL, DenseCLNeck, QueueSizeError, dense_correspondence
from densecl_bench.pretrain.train import pretrain, train

__all__ = [
    "DenseCL",
    "DenseCLNeck",
    "QueueSizeError",
    "dense_correspondence",
    "pretrain",
    "train",
]
