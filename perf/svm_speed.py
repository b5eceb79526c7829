"""Time the VOC07 SVM protocol: our default solver vs the reference, side by side, in CPU seconds.

The reference is what MMSelfSup 0.x runs (`solver: sklearn`): one scikit-learn LinearSVC per fit,
20 classes x 19 costs x (3-fold cross_val_score + a refit at every cost). Nothing is scaled or
estimated: every run covers all 20 classes. Features are synthetic but shaped like VOC07
(5011 trainval + 4952 test rows, ReLU, low-rank plus a class signal, VOC-like prevalences, ~1%
difficult labels) at each requested dimension; both solvers see the same arrays.

Time is the process's CPU time (`time.process_time`: every thread of the process, BLAS and torch
included), so that other jobs on a shared machine do not inflate it; wall time is recorded too.
Each (dim, solver) run appends one JSON line to `--out`, so long reference runs can be done one at
a time (in the background, under `timeout`) and `--table` joins them afterwards:

    python perf/svm_speed.py --dims 512,2048 --solvers gram,sklearn --out perf/svm_speed.jsonl
    python perf/svm_speed.py --table perf/svm_speed.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch

from densecl_bench import svm

N_TRAIN, N_TEST = 5011, 4952  # VOC2007 trainval / test


def synthetic_voc(dim: int, n_train: int = N_TRAIN, n_test: int = N_TEST, seed: int = 0,
                  n_cls: int = 20) -> tuple[np.ndarray, ...]:
    """VOC07-shaped features: non-negative, low-rank + class signal + noise; labels 1 / 0 / -1."""
    rng = np.random.default_rng(seed)
    n = n_train + n_test
    present = rng.random((n, n_cls)) < np.linspace(0.03, 0.35, n_cls)  # VOC-like prevalences
    basis = np.abs(rng.standard_normal((64, dim))).astype(np.float32)
    latent = rng.standard_normal((n, 64)).astype(np.float32)
    latent += 0.7 * present.astype(np.float32) @ rng.standard_normal((n_cls, 64)).astype(np.float32)
    x = np.maximum(latent @ basis / 8 + 0.5 * rng.standard_normal((n, dim)).astype(np.float32), 0)
    labels = present.astype(np.int32)
    labels[(rng.random(labels.shape) < 0.01) & ~present] = -1
    return x[:n_train], labels[:n_train], x[n_train:], labels[n_train:]


def run(dim: int, solver: str, n_train: int, n_test: int) -> dict:
    xtr, ytr, xte, yte = synthetic_voc(dim, n_train, n_test)
    cpu, wall = time.process_time(), time.perf_counter()
    res = svm.voc07_svm(xtr, ytr, xte, yte, svm.cost_grid("mmselfsup"), solver=solver, progress=False)
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    return {"dim": dim, "n_train": n_train, "n_test": n_test, "solver": solver, "cpu_s": round(cpu, 2),
            "wall_s": round(wall, 2), "map": res.map, "ap": res.ap.tolist(), "chosen": res.chosen, "info": res.info,
            "torch_threads": torch.get_num_threads(), "machine": f"{platform.machine()}, {os.cpu_count()} cpus",
            "date": time.strftime("%Y-%m-%d")}


def table(path: Path) -> str:
    """Markdown table of every dim that has both solvers in `path` (the latest run of each)."""
    runs: dict[tuple[int, int, str], dict] = {}
    for line in path.read_text().splitlines():
        rec = json.loads(line)
        runs[rec["dim"], rec["n_train"], rec["solver"]] = rec
    out = ["| dims | n (trainval + test) | ours CPU s (wall s) | reference CPU s (wall s) | speed-up (CPU) "
           "| mAP ours / reference | max \\|ΔAP\\| (points) | same chosen costs | solver path |",
           "|---|---|---|---|---|---|---|---|---|"]
    for dim, n, _ in sorted(k for k in runs if k[2] == "sklearn"):
        ref = runs[dim, n, "sklearn"]
        ours = next((runs[k] for k in runs if k[:2] == (dim, n) and k[2] != "sklearn"), None)
        if ours is None:
            continue
        dap = np.abs(np.asarray(ours["ap"]) - np.asarray(ref["ap"])).max() * 100
        same = sum(a == b for a, b in zip(ours["chosen"], ref["chosen"]))
        out.append(f"| {dim} | {n} + {ref['n_test']} | {ours['cpu_s']:.1f} ({ours['wall_s']:.1f}) "
                   f"| {ref['cpu_s']:.1f} ({ref['wall_s']:.1f}) | **{ref['cpu_s'] / ours['cpu_s']:.1f}x** "
                   f"| {ours['map']:.2f} / {ref['map']:.2f} | {dap:.4f} | {same}/20 | {ours['info'].get('space', '')} |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dims", default="512,2048", help="comma-separated feature dimensions")
    ap.add_argument("--solvers", default="gram,sklearn", help="which solvers to run (sklearn = the reference)")
    ap.add_argument("--n-train", type=int, default=N_TRAIN)
    ap.add_argument("--n-test", type=int, default=N_TEST)
    ap.add_argument("--out", type=Path, default=Path("perf/svm_speed.jsonl"), help="JSON lines to append to")
    ap.add_argument("--table", type=Path, help="only print the markdown table of a JSON-lines file")
    args = ap.parse_args()
    if args.table:
        print(table(args.table))
        return
    for dim in (int(d) for d in args.dims.split(",")):
        for solver in args.solvers.split(","):
            rec = run(dim, solver, args.n_train, args.n_test)
            with args.out.open("a") as f:
                f.write(json.dumps(rec) + "\n")
            print(f"dim {dim} {solver}: {rec['cpu_s']:.1f} s CPU ({rec['wall_s']:.1f} s wall), mAP {rec['map']:.3f}, "
                  f"{rec['info']}", flush=True)


if __name__ == "__main__":
    main()
