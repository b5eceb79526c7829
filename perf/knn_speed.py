"""kNN: one similarity pass for all k (top-max(k) once) vs one pass per k, and peak memory.

Synthetic L2-normalised features with class structure; an ImageNet-size bank is 1.28M x 2048,
scale it with --bank/--queries to what the machine allows (the memory bound is
query_chunk x block_size similarities plus the bank itself, fp32 or fp16).

    python perf/knn_speed.py [--bank 200000] [--queries 2000] [--dim 2048] [--bank-dtype float16]
"""

from __future__ import annotations

import argparse
import resource
import time

import numpy as np
import torch

from densecl_bench.knn import knn_classify

KS = (10, 20, 100, 200)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bank", type=int, default=200_000)
    parser.add_argument("--queries", type=int, default=2_000)
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--noise", type=float, default=5.0, help="feature noise vs unit class centres")
    parser.add_argument("--bank-dtype", default="float32", choices=["float32", "float16"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    centers = rng.standard_normal((args.classes, args.dim), dtype=np.float32)
    yb = rng.integers(0, args.classes, args.bank)
    yq = rng.integers(0, args.classes, args.queries)
    xb = centers[yb] + args.noise * rng.standard_normal((args.bank, args.dim), dtype=np.float32)
    xq = centers[yq] + args.noise * rng.standard_normal((args.queries, args.dim), dtype=np.float32)
    common = dict(num_classes=args.classes, bank_dtype=getattr(torch, args.bank_dtype), device=args.device,
                  progress=False)

    start = time.perf_counter()
    one = knn_classify(xb, yb, xq, yq, ks=KS, **common)
    t_one = time.perf_counter() - start
    start = time.perf_counter()
    per_k = {k: knn_classify(xb, yb, xq, yq, ks=(k,), **common)[k] for k in KS}
    t_per_k = time.perf_counter() - start
    assert one == per_k, (one, per_k)
    peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"device {args.device}, torch threads {torch.get_num_threads()}, bank {args.bank} x {args.dim} "
          f"({args.bank_dtype}), queries {args.queries}")
    print(f"one pass, all k : {t_one:8.2f} s")
    print(f"one pass per k  : {t_per_k:8.2f} s  ({t_per_k / t_one:.2f}x slower)")
    print(f"peak RSS        : {peak_gib:8.2f} GiB (inputs included)")
    print("top-1 per k     : " + ", ".join(f"k={k}: {one[k][0]:.2f}" for k in KS))


if __name__ == "__main__":
    main()
