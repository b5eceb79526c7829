"""Does the demo DenseCL checkpoint beat a random backbone? A quick kNN on the demo ImageNet.

Not the benchmark suite (that is `densecl-bench run knn ...`): a small stand-in that reads both
backbones through `densecl_bench.checkpoint.load_checkpoint`, takes global-pooled feature5 of
the demo ImageNet train (bank) and val (queries) at 96 px (center crop, BN in eval mode), and runs
the weighted kNN of PROTOCOLS.md §5 (T 0.07, L2-normalised) plus a linear SVM on the same features.

    python perf/pretrain_demo_check.py work_dirs/densecl_demo/latest.pth [--data-root DEMO_ROOT]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from sklearn.svm import LinearSVC

from densecl_bench.backbone import Backbone, freeze
from densecl_bench.checkpoint import load_checkpoint
from densecl_bench.data.base import ImageListDataset
from densecl_bench.data.demo import ensure_demo
from densecl_bench.data.imagenet import imagenet
from densecl_bench.data.transforms import center_crop
from densecl_bench.knn import knn_classify


def features(state_dict: dict, arch: str, split_list, size: int) -> np.ndarray:
    net = Backbone(arch)
    net.load_state_dict(state_dict)
    freeze(net)
    loader = torch.utils.data.DataLoader(ImageListDataset(split_list, center_crop(size)), batch_size=50)
    with torch.no_grad():
        return torch.cat([net(x, ("feature5",))["feature5"].mean((2, 3)) for x, _, _ in loader]).numpy()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("checkpoint")
    ap.add_argument("--data-root", default=None)
    ap.add_argument("--size", type=int, default=96)
    args = ap.parse_args()
    root = Path(args.data_root) if args.data_root else ensure_demo()
    train, val = imagenet(root / "imagenet", "train"), imagenet(root / "imagenet", "val")
    trained = load_checkpoint(args.checkpoint)
    for name, ckpt in (("random", load_checkpoint("random", arch=trained.arch)), ("densecl", trained)):
        bank, queries = features(ckpt.state_dict, ckpt.arch, train, args.size), features(ckpt.state_dict, ckpt.arch, val, args.size)
        knn = knn_classify(bank, train.labels, queries, val.labels, ks=(10, 20), progress=False)
        norm = lambda f: f / np.linalg.norm(f, axis=1, keepdims=True)  # noqa: E731
        svm = LinearSVC(C=1.0, max_iter=5000).fit(norm(bank), train.labels).score(norm(queries), val.labels) * 100
        print(f"{name:8s} kNN top-1 k=10 {knn[10][0]:.1f}  k=20 {knn[20][0]:.1f}  linear SVM {svm:.1f}")


if __name__ == "__main__":
    main()
