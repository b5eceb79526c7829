"""Time the VOC07 SVM and low-shot SVM protocols: the batched Gram/Newton solver vs the reference.

The reference is what MMSelfSup 0.x runs: one scikit-learn LinearSVC per fit (20 classes x 19
costs x 3-fold cross_val_score + a refit per cost; low-shot: one fit per draw, class and cost).
Features are synthetic but shaped like VOC07 feature5 (5011 trainval + 4952 test x 8192, ReLU,
low-rank plus a class signal, ~1% difficult labels). Both solvers see the same arrays in the same
run. `--scale` shrinks N and D; `--ref-classes R` runs the (slow) reference on R classes spread over
the prevalence range and scales its time by 20/R, comparing APs on those classes (it says so).

    python perf/svm_speed.py --scale 0.25 --ref-classes 4
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from densecl_bench import svm


def synthetic_voc(scale: float, seed: int = 0, n_cls: int = 20) -> tuple[np.ndarray, ...]:
    """VOC07-shaped features: non-negative, low-rank + class signal + noise; labels 1 / 0 / -1."""
    rng = np.random.default_rng(seed)
    n_tr, n_te, d = int(5011 * scale), int(4952 * scale), int(8192 * scale)
    present = rng.random((n_tr + n_te, n_cls)) < np.linspace(0.03, 0.35, n_cls)  # VOC-like prevalences
    basis = np.abs(rng.standard_normal((64, d))).astype(np.float32)
    latent = rng.standard_normal((n_tr + n_te, 64)).astype(np.float32)
    latent += 0.7 * present.astype(np.float32) @ rng.standard_normal((n_cls, 64)).astype(np.float32)
    x = np.maximum(latent @ basis / 8 + 0.5 * rng.standard_normal((n_tr + n_te, d)).astype(np.float32), 0)
    labels = present.astype(np.int32)
    labels[(rng.random(labels.shape) < 0.01) & ~present] = -1
    return x[:n_tr], labels[:n_tr], x[n_tr:], labels[n_tr:]


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scale", type=float, default=1.0, help="fraction of N and D (1.0 = 5011/4952 x 8192)")
    ap.add_argument("--ref-classes", type=int, default=20, help="classes the reference runs on (time x 20/R)")
    ap.add_argument("--ks", default="1,2,4,8,16,32,64,96")
    ap.add_argument("--samples", type=int, default=5)
    ap.add_argument("--skip-full", action="store_true")
    ap.add_argument("--skip-lowshot", action="store_true")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    xtr, ytr, xte, yte = synthetic_voc(args.scale)
    n_cls, R = ytr.shape[1], args.ref_classes
    ref_idx = np.linspace(0, n_cls - 1, R).round().astype(int)  # spread over the prevalence range
    costs = svm.cost_grid("mmselfsup")
    print(f"features: {xtr.shape[0]} + {xte.shape[0]} x {xtr.shape[1]}, {n_cls} classes, {len(costs)} costs, "
          f"device {args.device}, torch threads {torch.get_num_threads()}; reference on classes {ref_idx.tolist()}")
    rows = []
    if not args.skip_full:
        ours, t_ours = timed(lambda: svm.voc07_svm(xtr, ytr, xte, yte, costs, device=args.device, progress=True))
        ref, t_ref = timed(lambda: svm.voc07_svm(xtr, ytr[:, ref_idx], xte, yte[:, ref_idx], costs, solver="sklearn",
                                                 progress=True))
        delta = np.nanmean(ours.ap[ref_idx]) * 100 - ref.map
        rows.append(("VOC07 SVM (CV + refit)", t_ours, t_ref * n_cls / R, delta,
                     np.abs(ours.ap[ref_idx] - ref.ap).max() * 100, ours.map))
        same = np.sum(np.equal(np.asarray(ours.chosen)[ref_idx], ref.chosen))
        print(f"  gram solver stats: {ours.info}; same chosen cost for {same}/{R} classes")
    if not args.skip_lowshot:
        ks = [int(k) for k in args.ks.split(",")]
        draws = svm.draw_lowshot(ytr, ks, args.samples, seed=0)
        ours, t_ours = timed(lambda: svm.lowshot_svm(xtr, xte, yte, draws, costs, device=args.device, progress=True))
        sub = [svm.LowshotDraw(d.sample, d.k, d.targets[:, ref_idx], d.capped) for d in draws]
        ref, t_ref = timed(lambda: svm.lowshot_svm(xtr, xte, yte[:, ref_idx], sub, costs, solver="sklearn",
                                                   progress=True))
        agg_ours = svm.aggregate_lowshot(draws, ours["test_ap"][:, ref_idx], costs)
        agg_ref = svm.aggregate_lowshot(sub, ref["test_ap"], costs)
        deltas = [agg_ours[k]["mean"] - agg_ref[k]["mean"] for k in ks]
        rows.append((f"low-shot SVM (k={args.ks}, {args.samples} samples)", t_ours, t_ref * n_cls / R,
                     max(deltas, key=abs), np.abs(ours["test_ap"][:, ref_idx] - ref["test_ap"]).max() * 100,
                     np.mean([v["mean"] for v in svm.aggregate_lowshot(draws, ours["test_ap"], costs).values()])))
    print("\n| protocol | ours (s) | reference (s) | speed-up | mAP delta (ours - ref) | max per-class AP delta | our mAP |")
    print("|---|---|---|---|---|---|---|")
    for name, t_o, t_r, d, dmax, m in rows:
        est = "" if R == n_cls else f" (est. from {R} classes)"
        print(f"| {name} | {t_o:.1f} | {t_r:.1f}{est} | {t_r / t_o:.1f}x | {d:+.4f} | {dmax:.4f} | {m:.2f} |")


if __name__ == "__main__":
    main()
