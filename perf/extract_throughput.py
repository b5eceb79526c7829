"""Feature-extraction throughput: the whole pipeline vs the backbone's raw forward on the same batch.

The pipeline (JPEG decode + protocol resize in DataLoader workers, forward, pooling, writes to the
memory-mapped cache) should hide loading: target >= 90% of raw forward throughput at 224 px with
2 workers. Images are synthetic VOC-sized JPEGs (500x375) written to a temp dir.

    python perf/extract_throughput.py [--images 96] [--batch-size 32] [--workers 2] [--size 224]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from densecl_bench.backbone import Backbone, freeze
from densecl_bench.data import transforms
from densecl_bench.data.base import ImageList
from densecl_bench.features import extract


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=96)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    backbone = freeze(Backbone("resnet50")).to(device)
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        paths = []
        for i in range(args.images):
            arr = (rng.random((375, 500, 3)) * 255).astype(np.uint8)
            p = root / f"{i:05d}.jpg"
            Image.fromarray(arr).save(p, quality=90)
            paths.append(p)
        images = ImageList("perf/voc_like", root, paths, np.zeros(len(paths), np.int64), ["x"])

        # Raw forward: one pre-built batch, repeated, same layers and the same number of images.
        batch = torch.stack([transforms.voc_svm(args.size)(Image.open(p).convert("RGB"))
                             for p in paths[: args.batch_size]]).to(device)
        layers = ["feature1", "feature2", "feature3", "feature4", "feature5"]
        with torch.inference_mode():
            backbone(batch, layers)  # warm-up
            _sync(device)
            start = time.perf_counter()
            n = 0
            while n < args.images:
                backbone(batch, layers)
                n += len(batch)
            _sync(device)
        raw = n / (time.perf_counter() - start)

        start = time.perf_counter()
        extract(backbone, images, transform="voc_svm", layers=layers, pooling="protocol", size=args.size,
                batch_size=args.batch_size, num_workers=args.workers, device=device, cache_dir=root / "cache",
                ckpt_key="perf")
        _sync(device)
        pipeline = args.images / (time.perf_counter() - start)

    print(f"device: {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}, "
          f"torch threads: {torch.get_num_threads()}, size {args.size}, batch {args.batch_size}, "
          f"workers {args.workers}, images {args.images}")
    print(f"raw forward   : {raw:8.2f} img/s")
    print(f"full pipeline : {pipeline:8.2f} img/s  ({100 * pipeline / raw:.1f}% of raw)")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


if __name__ == "__main__":
    main()
