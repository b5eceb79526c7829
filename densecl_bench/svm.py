"""Linear SVMs for the VOC07 SVM and low-shot SVM protocols, on feature arrays (no I/O).

PROTOCOLS.md §2.3 and §3; MMSelfSup 0.x `tools/benchmarks/classification/svm_voc07/tools/`
(`svm_helper.py`, `train_svm_kfold.py`, `test_svm.py`, `train_svm_low_shot.py`,
`aggregate_low_shot_svm_stats.py`), themselves FAIR `tools/svm/*`.

The reference fits one `sklearn.svm.LinearSVC` per (class, cost, fold): squared hinge, L2,
class_weight {1: 2, -1: 1}, intercept_scaling 1 (liblinear appends a constant feature, so the
bias is regularised like any weight). That problem is strongly convex, so its minimiser is unique
and any exact solver reproduces it. The `gram` solver here finds the same minimiser faster:

* every fit shares the same rows, so the Gram matrix K = X Xᵀ + s² (s = intercept_scaling) is
  computed once and every fit lives in the span of its training rows, w = Σ aᵢ x̃ᵢ (representer);
  when D + 1 is small next to n the same Newton systems are cheaper in feature space, w ∈ R^{D+1}
  (`GramSystem` / `FeatureSystem`, picked by `newton_space`);
* each fit is a primal Newton iteration on the active set S = {i : yᵢ f(xᵢ) < 1} (Chapelle 2007,
  "Training a support vector machine in the primal"; Keerthi & DeCoste 2005): solve the quadratic
  that treats S as the violators, take an exact line search, stop after a full step that leaves S
  unchanged, and check the optimality conditions of every returned solution (`kkt_residual`);
* in Gram space the linear systems are solved by a batched Cholesky when S is small (large costs)
  and by batched conjugate gradients, preconditioned by a Nyström factor of K, when S is large
  (small costs, well conditioned); fits run in batches (classes × folds) and warm-start along the
  ascending cost path;
* held-out and test decision values come from the same coefficients, so nothing is refitted to
  score folds, and the final refit is done only at each class's chosen cost.

`solver="sklearn"` runs the reference path literally (one LinearSVC per fit, refit at every cost
as MMSelfSup does) and is what the tests and `perf/svm_speed.py` compare against.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from densecl_bench.progress import bar as progress_bar

log = logging.getLogger(__name__)

SOLVERS: tuple[str, ...] = ("gram", "sklearn")
PRECOND_MIN_ROWS = 256  # below this every system is solved directly
POS_WEIGHT = 2.0  # class_weight {1: 2, -1: 1}
_POWERS = [0.5**k for k in range(4, 20)]  # parse_cost_list always appends 0.5^4 .. 0.5^19
# Grid order matters: the per-class argmax keeps the first best cost, as np.argmax does in MMSS.
COST_GRIDS: dict[str, list[float]] = {
    "mmselfsup": [1.0, 10.0, 100.0, *_POWERS],
    "fair": [1e-7, 1e-6, 1e-5, 1e-4, 1e-3, 0.01, 0.1, 1.0, 10.0, 100.0, *_POWERS],
    "vissl": [0.01, 0.1, 1.0, 2.0, 5.0, 10.0, 15.0, 20.0, 50.0, 100.0, 1000.0],
}


def cost_grid(spec: str | Sequence[float]) -> list[float]:
    """The cost list for a named grid (`mmselfsup` = 19 costs, `fair`, `vissl`) or an explicit list."""
    if isinstance(spec, str):
        if spec not in COST_GRIDS:
            raise ValueError(f"unknown cost grid {spec!r}; known: {', '.join(COST_GRIDS)} (or a list of floats)")
        return list(COST_GRIDS[spec])
    costs = [float(c) for c in spec]
    if not costs or min(costs) <= 0:
        raise ValueError(f"costs must be a non-empty list of positive numbers, got {spec!r}")
    return costs


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """Per-sample x / (‖x‖₂ + 1e-5) in float64, as svm_helper.py normalises both splits."""
    x = np.asarray(x, dtype=np.float64)
    return x / (np.linalg.norm(x, axis=1, keepdims=True) + 1e-5)


# ---------------------------------------------------------------------------------------------
# Average precision


def sklearn_ap(y_true: np.ndarray, scores: np.ndarray) -> float:
    """Non-interpolated AP as `sklearn.metrics.average_precision_score` computes it (the CV score).

    Tied scores form one threshold; with no positive the score is 0.0 (sklearn warns and returns 0).
    """
    y = np.asarray(y_true).astype(bool)
    s = np.asarray(scores, dtype=np.float64)
    n_pos = int(y.sum())
    if n_pos == 0:
        return 0.0
    order = np.argsort(-s, kind="mergesort")
    s, y = s[order], y[order]
    last = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]  # last index of each distinct score
    tp = np.cumsum(y)[last]
    precision = tp / (last + 1)
    recall = tp / n_pos
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def reference_rank(scores: np.ndarray, axis: int = -1) -> np.ndarray:
    """Ranking by descending score exactly as svm_helper.py `get_precision_recall` makes it.

    The reference calls `np.argsort(preds)[::-1]`: numpy's *default* sort (quicksort kind, not
    stable), reversed. Tied scores therefore come out in whatever order that sort leaves them,
    which depends on the numpy version and CPU (introsort in numpy 1.x; SIMD sorts on AVX2 /
    AVX-512 since numpy 1.25), and the interpolated AP of a tied group depends on it (all scores
    tied, one positive first of 8: AP 1.0 in input order, 0.125 reversed). Rather than emulate one
    platform's order we make the same call, so our test AP equals the reference's on the same
    install, ties included. Real features do tie: dead units, duplicate images, skipped images.
    """
    return np.flip(np.argsort(np.asarray(scores, dtype=np.float64), axis=axis), axis=axis)


def interpolated_ap(y_true: np.ndarray, scores: np.ndarray) -> float:
    """All-point interpolated AP (VOC2010+ style), svm_helper.py `calculate_ap` on the test scores.

    Rank as the reference does (`reference_rank`), cumulative precision/recall per rank, make
    precision monotone from the right, and sum precision × recall step where recall changes.
    NaN when there is no positive (the class cannot be scored).
    """
    return float(interpolated_ap_columns(y_true, np.asarray(scores)[:, None])[0])


def interpolated_ap_columns(y_true: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """`interpolated_ap` for every column of `scores` (n, P) at once: one sort along axis 0.

    numpy sorts each column of an axis-0 argsort through the same 1-D routine, so a column's order
    (and its ties) is the one `np.argsort(column)` gives.
    """
    y = np.asarray(y_true).astype(bool)
    n_pos = int(y.sum())
    if n_pos == 0:
        return np.full(scores.shape[1], np.nan)
    tp = np.cumsum(y[reference_rank(scores, axis=0)], axis=0)
    precision = tp / np.arange(1, len(y) + 1)[:, None]
    recall = tp / n_pos
    zeros, ones = np.zeros((1, tp.shape[1])), np.ones((1, tp.shape[1]))
    mrec = np.vstack([zeros, recall, ones])
    mpre = np.vstack([zeros, precision, zeros])
    mpre = np.maximum.accumulate(mpre[::-1], axis=0)[::-1]
    # Sum over the rank steps where recall changes; unchanged steps contribute zero width.
    return np.sum((mrec[1:] - mrec[:-1]) * mpre[1:], axis=0)


def stratified_folds(y: np.ndarray, n_splits: int = 3) -> np.ndarray:
    """Test-fold index per row, as `StratifiedKFold(n_splits)` without shuffle assigns them.

    Classes are coded by first appearance; each class's rows go to folds in contiguous blocks
    whose sizes come from a round robin over the sorted codes. (cross_val_score with cv=3 on a
    classifier uses exactly this split.)
    """
    y = np.asarray(y)
    _, first, inverse = np.unique(y, return_index=True, return_inverse=True)
    codes = np.argsort(np.argsort(first))[inverse]
    n_classes = len(first)
    ordered = np.sort(codes)
    alloc = np.stack([np.bincount(ordered[i::n_splits], minlength=n_classes) for i in range(n_splits)])
    folds = np.empty(len(y), dtype=np.int64)
    for k in range(n_classes):
        folds[codes == k] = np.repeat(np.arange(n_splits), alloc[:, k])
    return folds


def svm_targets(labels: np.ndarray) -> np.ndarray:
    """VOC labels (1 present / 0 absent / -1 difficult) -> ±1 training targets.

    Difficult images stay -1, i.e. they are negatives in CV and in the refit (svm_helper.py).
    """
    return np.where(np.asarray(labels) == 1, 1.0, -1.0)


# ---------------------------------------------------------------------------------------------
# The Gram-space Newton solver


@dataclass
class Preconditioner:
    """Top eigenpairs of K (U: (G, n, r), lam: (G, r)); (U Λ Uᵀ + d I)⁻¹ restricted to S preconditions CG.

    Rows of U for a subset of K's rows give a factor bounded by that principal submatrix, so one
    factor of the full trainval K serves every fold and every low-shot draw.
    """

    U: Tensor
    lam: Tensor


def gram(a: np.ndarray | Tensor, b: np.ndarray | Tensor | None = None, *, intercept_scaling: float = 1.0,
         device: torch.device | str = "cpu", dtype: torch.dtype = torch.float64, chunk: int = 2048) -> Tensor:
    """K = A Bᵀ + s² (the linear kernel of the rows with liblinear's bias feature s appended)."""
    ta = torch.as_tensor(a).to(device=device, dtype=dtype)
    tb = ta if b is None else torch.as_tensor(b).to(device=device, dtype=dtype)
    out = torch.empty(ta.shape[0], tb.shape[0], device=device, dtype=dtype)
    for start in range(0, ta.shape[0], chunk):
        torch.matmul(ta[start:start + chunk], tb.T, out=out[start:start + chunk])
    return out.add_(intercept_scaling**2)


def nystrom(K: Tensor, rank: int = 128, iters: int = 3, seed: int = 0) -> Preconditioner:
    """Top-`rank` eigenpairs of PSD K (G, n, n) by seeded randomised subspace iteration + Rayleigh-Ritz."""
    G, n, _ = K.shape
    r = min(rank, n // 4)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    Q = torch.randn(G, n, r, generator=gen, dtype=K.dtype).to(K.device)
    for _ in range(iters):
        Q = torch.linalg.qr(torch.bmm(K, Q)).Q
    lam, V = torch.linalg.eigh(Q.transpose(1, 2) @ K @ Q)
    return Preconditioner(Q @ V, lam.clamp_min(0))


@dataclass
class FitStats:
    """Work and health counters summed over every `fit` call that shares this object.

    `unconverged`: problems still changing after `max_newton` iterations; `kkt_failures`: returned
    solutions whose optimality residual (`kkt_residual`) exceeds the tolerance. Both should be 0;
    the plugins put them into the ledger so a bad fit is never silent.
    """

    newton: int = 0
    cg: int = 0
    direct: int = 0
    unconverged: int = 0
    kkt_failures: int = 0

    def as_dict(self) -> dict[str, int]:
        return {"newton": self.newton, "cg_iters": self.cg, "direct_solves": self.direct,
                "unconverged": self.unconverged, "kkt_failures": self.kkt_failures}


KKT_TOL = 1e-6  # relative gradient norm accepted as optimal (see kkt_residual)


class GramSystem:
    """Problems in dual coefficients over the rows, w = Σ aᵢ x̃ᵢ, sharing K = X̃X̃ᵀ (G, n, n).

    Newton's system is (K_SS + diag(1/(2cᵢ))) a_S = y_S: |S|² per problem, whatever D is, which is
    the cheap side at the protocol's 8192–9216 dims. Solved by a batched Cholesky, or by PCG when
    its preconditioned condition number, bounded by 1 + λ_r·2c_max, is below `cg_cond` and either
    |S| > direct_max or PCG is estimated cheaper.
    """

    def __init__(self, K: Tensor, precond: Preconditioner | None = None, direct_max: int = 1536,
                 cg_cond: float = 200.0) -> None:
        self.K, self.precond, self.direct_max, self.cg_cond = K, precond, direct_max, cg_cond

    def zeros(self, Y: Tensor) -> Tensor:
        return torch.zeros_like(Y)

    def prepare(self, C: Tensor) -> None:
        """Nothing to carry between fits: K does not depend on the costs."""

    def solve(self, Y: Tensor, C: Tensor, S: Tensor, A: Tensor, cols: Tensor, stats: FitStats) -> Tensor:
        Dinv = 2 * C  # 1/d with d = 1/(2c); zero off the training rows
        return _solve_active_set(self.K, Y, Dinv, S, A, self.precond, self.direct_max, self.cg_cond, stats)

    def apply(self, A: Tensor) -> Tensor:
        return torch.bmm(self.K, A)

    def inner(self, A: Tensor, B: Tensor, FB: Tensor) -> Tensor:
        return (A * FB).sum(1)

    def gradient_norms(self, A: Tensor, F: Tensor, hinge: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        # In w-space, not on the coefficients: a is not unique when K is singular (D < n).
        r = A - hinge
        Kr = torch.bmm(self.K, r)
        return tuple((u * Ku).sum(1).clamp_min(0).sqrt() for u, Ku in ((r, Kr), (A, F), (hinge, F - Kr)))


class FeatureSystem:
    """Problems in feature space: the coefficients are w ∈ R^{D+1} itself, X̃ = [X, s] (n, D+1), G = 1.

    Newton's system is (I + 2 X̃ᵀ diag(c·[i ∈ S]) X̃) w = 2 X̃ᵀ (c·[i ∈ S]·y): (D+1)² per problem
    instead of |S|², the cheap side when D + 1 is small next to n (a 512-d layer against VOC's 5011
    trainval rows). M = X̃ᵀ diag(c·[i ∈ S]) X̃ is kept between Newton steps and between fits and
    updated with only the rows whose term changed; when every cost of a problem is multiplied by
    one factor (the next cost on the grid) M is rescaled, not rebuilt.
    """

    def __init__(self, X: Tensor) -> None:
        self.X = X
        self.C: Tensor | None = None  # (n, P) costs M was built for
        self.CS = self.M = None  # (n, P) c·[i ∈ S] and (P, D+1, D+1) M

    def zeros(self, Y: Tensor) -> Tensor:
        return Y.new_zeros(1, self.X.shape[1], Y.shape[2])

    def prepare(self, C: Tensor) -> None:
        C = C[0]
        if self.C is not None and self.C.shape == C.shape and torch.equal(self.C > 0, C > 0):
            ratio = C.amax(0) / self.C.amax(0).clamp_min(1e-300)
            if torch.allclose(C, self.C * ratio, rtol=1e-12, atol=0):
                self.M *= ratio[:, None, None]
                self.CS *= ratio
                self.C = C
                return
        d = self.X.shape[1]
        self.C, self.CS = C, torch.zeros_like(C)
        self.M = C.new_zeros(C.shape[1], d, d)

    def solve(self, Y: Tensor, C: Tensor, S: Tensor, A: Tensor, cols: Tensor, stats: FitStats) -> Tensor:
        cs = C[0] * S[0]  # (n, p)
        delta = cs - self.CS[:, cols]
        every = len(cols) == self.M.shape[0]
        M = self.M if every else self.M[cols]
        for j in range(len(cols)):  # per problem: only its own changed rows (few, along a warm-started path)
            rows = delta[:, j].nonzero().squeeze(1)
            if rows.numel():
                Xr = self.X[rows]
                M[j].addmm_(Xr.T, delta[rows, j, None] * Xr)
        if not every:
            self.M[cols] = M
        self.CS[:, cols] = cs
        H = 2 * M
        H.diagonal(dim1=1, dim2=2).add_(1)
        b = 2 * (self.X.T @ (cs * Y[0])).T[:, :, None]  # (p, D+1, 1)
        L = torch.linalg.cholesky(H)  # I + PSD: always positive definite
        half = torch.linalg.solve_triangular(L, b, upper=False)
        stats.direct += len(cols)
        return torch.linalg.solve_triangular(L.transpose(1, 2), half, upper=True)[:, :, 0].T[None]

    def apply(self, A: Tensor) -> Tensor:
        return (self.X @ A[0])[None]

    def inner(self, A: Tensor, B: Tensor, FB: Tensor) -> Tensor:
        return (A * B).sum(1)

    def gradient_norms(self, A: Tensor, F: Tensor, hinge: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        pull = self.X.T @ hinge[0]
        return tuple(v.norm(dim=0)[None] for v in (A[0] - pull, A[0], pull))


def fit(system: GramSystem | FeatureSystem, Y: Tensor, C: Tensor, *, init: Tensor | None = None, tol: float = 1e-10,
        max_newton: int = 60, stats: FitStats | None = None) -> tuple[Tensor, Tensor]:
    """Minimise ½‖w‖² + Σᵢ cᵢ max(0, 1 − yᵢ wᵀx̃ᵢ)² for a batch of problems (the reference's LinearSVC objective).

    Y: (G, n, P) targets ±1; C: (G, n, P) per-row costs, 0 for rows outside a problem's training set
    (held-out folds, unsampled rows). Returns the coefficients A of `system` and F, the decision
    values of every row (G, n, P). `init` = the coefficients of a nearby problem (the previous cost)
    warm-starts the iteration. Each step is a primal Newton step on the active set
    S = {i : yᵢ fᵢ < 1} (Chapelle 2007, "Training a support vector machine in the primal"; Keerthi &
    DeCoste 2005) followed by an exact line search.

    A problem has converged when a *full* Newton step left its active set unchanged (the point then
    solves the optimality system of its own active set: Chapelle 2007, §4), or when the step taken
    moved no decision value by more than `tol` (the iterate is as exact as the inner solves allow:
    a PCG direction that is only noise gets t ≈ 0). A shortened step with an unchanged active set
    never counts: from a warm start it would stop part-way between the previous solution and the
    new one (a halved step gave A_prev + ½(target − A_prev)). Every returned solution is then
    checked against the optimality conditions (`kkt_residual`); failures are counted in `stats`
    and logged.
    """
    stats = stats if stats is not None else FitStats()
    system.prepare(C)
    A = system.zeros(Y) if init is None else init.clone()
    F = system.apply(A)
    S = (C > 0) & (Y * F < 1)
    todo = torch.ones(Y.shape[2], dtype=torch.bool, device=Y.device)
    for _ in range(max_newton):
        cols = todo.nonzero().squeeze(1)
        if cols.numel() == 0:
            break
        stats.newton += 1
        every = cols.numel() == todo.numel()
        Ac, Fc, Sc, Yc, Cc = (t if every else t[:, :, cols] for t in (A, F, S, Y, C))
        dA = system.solve(Yc, Cc, Sc, Ac, cols, stats) - Ac
        dF = system.apply(dA)
        t = _line_search(system.inner(Ac, dA, dF), system.inner(dA, dA, dF), Fc, dF, Yc, Cc)[:, None, :]
        Ac, Fc = Ac + t * dA, Fc + t * dF
        S_new = (Cc > 0) & (Yc * Fc < 1)
        settled = (t[:, 0] == 1) & (S_new == Sc).all(dim=1)
        stalled = (t * dF).abs().amax(dim=1) <= tol * (1 + Fc.abs().amax(dim=1))
        done = (settled | stalled).all(dim=0)
        if every:
            A, F, S = Ac, Fc, S_new
        else:
            A[:, :, cols], F[:, :, cols], S[:, :, cols] = Ac, Fc, S_new
        todo[cols[done]] = False
    if todo.any():
        stats.unconverged += int(todo.sum())
        log.warning("SVM Newton solver: %d problem(s) did not converge in %d iterations", int(todo.sum()), max_newton)
    F = system.apply(A)  # fresh decision values: no drift from the incremental updates
    failed = int((kkt_residual(system, A, F, Y, C) > KKT_TOL).sum())
    if failed:
        stats.kkt_failures += failed
        log.warning("SVM Newton solver: %d solution(s) fail the optimality check (relative gradient > %g)",
                    failed, KKT_TOL)
    return A, F


def fit_dual(K: Tensor, Y: Tensor, C: Tensor, *, init: Tensor | None = None, precond: Preconditioner | None = None,
             direct_max: int = 1536, max_newton: int = 60, stats: FitStats | None = None) -> tuple[Tensor, Tensor]:
    """`fit` in dual coefficients over a batch of Gram matrices K (G, n, n); returns A and F = K A."""
    return fit(GramSystem(K, precond, direct_max), Y, C, init=init, max_newton=max_newton, stats=stats)


def kkt_residual(system: GramSystem | FeatureSystem, A: Tensor, F: Tensor, Y: Tensor, C: Tensor) -> Tensor:
    """Relative norm of the primal gradient per problem (G, P); 0 at the exact optimum.

    ∇ = w − Σᵢ hᵢ x̃ᵢ with hᵢ = 2cᵢ yᵢ (1 − yᵢ fᵢ)₊, scaled by ‖w‖ + ‖Σ hᵢ x̃ᵢ‖ (equal at the optimum)
    so that every cost, from 0.5¹⁹ to 100, is judged alike.
    """
    hinge = 2 * C * Y * (1 - Y * F).clamp_min(0)
    grad, w, pull = system.gradient_norms(A, F, hinge)
    return grad / (w + pull).clamp_min(1e-300)


def _line_search(ag: Tensor, dg: Tensor, F: Tensor, dF: Tensor, Y: Tensor, C: Tensor, iters: int = 30) -> Tensor:
    """Exact minimiser t ∈ (0, 1] of the primal along w + t dw (piecewise quadratic in t), shape (G, P).

    ag = ⟨w, dw⟩ and dg = ‖dw‖² per problem; F, dF the decision values of w and dw.
    φ'(t) = ag + t dg − 2 Σ cᵢ yᵢ dFᵢ (1 − yᵢ(Fᵢ + t dFᵢ))₊ is increasing. The full Newton
    step t = 1 is taken when φ'(1) ≤ 0 *or is zero to rounding*: near the solution φ'(1) is a tiny
    number of either sign, and treating a positive rounding error as an overshoot would halve a
    step that is exact. Otherwise safeguarded Newton/bisection on φ' over [0, 1]; each problem stops
    at the first t where φ' is zero to rounding, and keeps that t.
    """
    G, n, P = F.shape

    def rows(x: Tensor) -> Tensor:  # (G, n, P) -> (G·P, n), one row per problem
        return x.transpose(1, 2).reshape(G * P, n)

    ag, dg = ag.reshape(-1), dg.reshape(-1)
    c, yd, base = rows(C), rows(Y * dF), rows(1 - Y * F)
    t = torch.ones_like(ag)
    g, h, tol = _slope(t, ag, dg, c, yd, base)
    sel = (g > tol).nonzero().squeeze(1)
    if sel.numel():
        # Only the problems whose full step overshoots: gather their rows once, (B, n).
        ag, dg, c, yd, base = ag[sel], dg[sel], c[sel], yd[sel], base[sel]
        lo, hi = torch.zeros_like(ag), torch.ones_like(ag)
        ts = hi.clone()
        g, h, tol = g[sel], h[sel], tol[sel]
        for _ in range(iters):
            live = g.abs() > tol  # a problem stops at the first t where φ' is zero to rounding
            if not bool(live.any()):
                break
            hi = torch.where(g > 0, ts, hi)
            lo = torch.where(g <= 0, ts, lo)
            newton = ts - g / h.clamp_min(1e-300)
            step = torch.where((newton > lo) & (newton < hi), newton, (lo + hi) / 2)
            ts = torch.where(live, step, ts)
            g, h, tol = _slope(ts, ag, dg, c, yd, base)
        t[sel] = ts
    return t.reshape(G, P)


def _slope(t: Tensor, ag: Tensor, dg: Tensor, c: Tensor, yd: Tensor, base: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """φ'(t), φ''(t) and the rounding level of φ'(t) for problems laid out as rows (B, n).

    The rounding level is 1e-12 × the sum of the magnitudes of φ'(t)'s terms, plus 1e-15 φ''(t)
    (a Newton correction below 1e-15 in t cannot be represented next to t = 1 anyway).
    """
    slack = base - t[:, None] * yd
    w = c * yd * (slack > 0)
    hinge = w * slack
    g = ag + t * dg - 2 * hinge.sum(1)
    h = dg + 2 * (w * yd).sum(1)
    scale = ag.abs() + (t * dg).abs() + 2 * hinge.abs().sum(1)
    return g, h, 1e-12 * scale + 1e-15 * h


def _solve_active_set(K: Tensor, Y: Tensor, Dinv: Tensor, S: Tensor, A0: Tensor, precond: Preconditioner | None,
                      direct_max: int, cg_cond: float, stats: FitStats) -> Tensor:
    """Solve (K_SS + diag(d_S)) a_S = y_S for every problem (a = 0 off S); Cholesky or PCG per problem."""
    sizes = S.sum(1)  # (G, P)
    use_cg = torch.zeros_like(sizes, dtype=torch.bool)
    if precond is not None:
        # Cost model: PCG takes ~12·sqrt(cond) products with K (2n² each); Cholesky |S|³/3.
        cond = 1 + precond.lam.amin(1)[:, None] * (Dinv * S).amax(1)
        cg_flops = 24 * cond.sqrt() * K.shape[1] ** 2
        use_cg = ((sizes > direct_max) | (cg_flops < sizes.to(K.dtype) ** 3 / 3)) & (cond <= cg_cond)
    out = torch.zeros_like(Y)
    direct = (~use_cg & (sizes > 0)).nonzero()
    if direct.numel():
        _solve_direct(K, Y, Dinv, S, direct, out)
        stats.direct += len(direct)
    if bool(use_cg.any()):
        cols = use_cg.any(0).nonzero().squeeze(1)
        Sc = S[:, :, cols] & use_cg[:, None, cols]
        x = _pcg(K, Y[:, :, cols], Dinv[:, :, cols], Sc, A0[:, :, cols] * Sc, precond, stats)
        out[:, :, cols] = torch.where(Sc, x, out[:, :, cols])
    return out


def _solve_direct(K: Tensor, Y: Tensor, Dinv: Tensor, S: Tensor, problems: Tensor, out: Tensor,
                  budget: int = 2**24) -> None:
    """Batched Cholesky on K_SS + diag(d_S), padded with identity; problems sorted by |S|, chunked to bound memory.

    problems: (B, 2) indices (g, p); results are written into out[g, S, p].
    """
    sizes = S.sum(1)[problems[:, 0], problems[:, 1]]
    order = torch.argsort(sizes)
    problems, sizes = problems[order], sizes[order].tolist()
    start = 0
    while start < len(sizes):
        end = start + 1
        while end < len(sizes) and (end - start + 1) * sizes[end] ** 2 <= budget:
            end += 1
        g, p = problems[start:end, 0], problems[start:end, 1]
        m = sizes[end - 1]
        mask = S[g, :, p]  # (B, n)
        # Active indices first (in row order), then padding.
        idx = torch.argsort((~mask).to(torch.int8), dim=1, stable=True)[:, :m]
        valid = torch.arange(m, device=K.device)[None] < mask.sum(1, keepdim=True)
        M = K[g[:, None, None], idx[:, :, None], idx[:, None, :]]
        pair = valid[:, :, None] & valid[:, None, :]
        diag = torch.where(valid, 1 / Dinv[g[:, None], idx, p[:, None]].clamp_min(1e-300), torch.ones_like(M[:, 0]))
        M.masked_fill_(~pair, 0.0)  # M is a fresh gather: edit in place, no (B, m, m) temporaries
        M.diagonal(dim1=1, dim2=2).add_(diag)
        rhs = torch.where(valid, Y[g[:, None], idx, p[:, None]], torch.zeros_like(diag))[:, :, None]
        L, info = torch.linalg.cholesky_ex(M)
        if bool((info > 0).any()):  # K_SS + diag(d) with d > 0 is SPD: only a bug gets here
            raise RuntimeError("SVM solver: Cholesky failed on a system that must be positive definite")
        # Two triangular solves: torch's batched cholesky_solve is ~80x slower on CPU.
        half = torch.linalg.solve_triangular(L, rhs, upper=False)
        sol = torch.linalg.solve_triangular(L.transpose(1, 2), half, upper=True)
        rows = valid.nonzero()
        out[g[rows[:, 0]], idx[rows[:, 0], rows[:, 1]], p[rows[:, 0]]] = sol[rows[:, 0], rows[:, 1], 0]
        start = end


def _pcg(K: Tensor, Y: Tensor, Dinv: Tensor, S: Tensor, x0: Tensor, precond: Preconditioner, stats: FitStats,
         tol: float = 1e-8, max_iter: int = 2000) -> Tensor:
    """Batched preconditioned CG on (K_SS + diag(d_S)) x = y_S; rows off S are held at zero.

    tol 1e-8 (relative residual): on 0.6x VOC07-sized low-shot problems (k = 32..96) it gave the same
    test APs as 1e-10, ~16% sooner.
    """
    s = S.to(K.dtype)
    d = torch.where(S, 1 / Dinv.clamp_min(1e-300), torch.ones_like(Dinv))
    # A scalar shift per problem: the majority (negative-class) diagonal.
    dbar = (d * s).amax(1).clamp_min(1e-12)  # (G, P)
    U, lam = precond.U, precond.lam
    shrink = 1 / (lam[:, :, None] + dbar[:, None, :]) - 1 / dbar[:, None, :]  # (G, r, P)

    ds = d * s

    def matvec(v: Tensor) -> Tensor:  # v is zero off S
        return s * torch.bmm(K, v) + ds * v

    def prec(r: Tensor) -> Tensor:
        rs = s * r
        return s * (torch.bmm(U, shrink * torch.bmm(U.transpose(1, 2), rs)) + rs / dbar[:, None, :])

    b = s * Y
    x = x0.clone()
    r = b - matvec(x)
    z = prec(r)
    p = z.clone()
    rz = (r * z).sum(1)
    bnorm = b.norm(dim=1).clamp_min(1e-300)
    for _ in range(max_iter):
        live = r.norm(dim=1) > tol * bnorm  # (G, P)
        if not bool(live.any()):
            break
        stats.cg += 1
        q = matvec(p)
        pq = (p * q).sum(1)
        alpha = torch.where(live & (pq > 0), rz / pq.clamp_min(1e-300), torch.zeros_like(pq))
        x = x + alpha[:, None] * p
        r = r - alpha[:, None] * q
        z = prec(r)
        rz_new = (r * z).sum(1)
        beta = torch.where(rz > 0, rz_new / rz.clamp_min(1e-300), torch.zeros_like(rz))
        p = z + beta[:, None] * p
        rz = rz_new
    return x * s


# ---------------------------------------------------------------------------------------------
# The full VOC07 SVM protocol


@dataclass
class SvmResult:
    """Per-class test AP (fraction), CV AP per (class, cost), and the cost each class chose."""

    ap: np.ndarray  # (n_classes,)
    cv_ap: np.ndarray  # (n_classes, n_costs)
    costs: list[float]
    chosen: list[float]
    solver: str
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def map(self) -> float:
        """mAP ×100, the unweighted mean over classes (classes without a test positive are skipped)."""
        return float(np.nanmean(self.ap) * 100)


def choose_costs(cv_ap: np.ndarray) -> np.ndarray:
    """Per-class index of the best mean CV AP; the first best in grid order, as np.argmax picks it."""
    return np.argmax(np.nan_to_num(cv_ap, nan=-np.inf), axis=1)


def test_aps(scores: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Test AP per class on (N, n_classes) scores; difficult (-1) rows are dropped per class."""
    out = np.empty(labels.shape[1])
    for c in range(labels.shape[1]):
        keep = labels[:, c] != -1
        out[c] = interpolated_ap(labels[keep, c] == 1, scores[keep, c])
    return out


def voc07_svm(train_x: np.ndarray, train_labels: np.ndarray, test_x: np.ndarray, test_labels: np.ndarray,
              costs: Sequence[float], *, solver: str = "gram", n_splits: int = 3, intercept_scaling: float = 1.0,
              device: torch.device | str = "cpu", dtype: torch.dtype = torch.float64, progress: bool | None = None,
              direct_max: int = 1536, space: str | None = None) -> SvmResult:
    """The full protocol on one layer's features: CV per (class, cost), per-class best cost, refit, test AP.

    Features are L2-normalised here (float64); labels are N x C with 1 / 0 / -1 (difficult).
    `space` (gram solver only): `gram` or `features`; by default `newton_space` picks it by shape.
    `info` holds the solver's counters, `unconverged` and `kkt_failures` among them.
    """
    if solver not in SOLVERS:
        raise ValueError(f"unknown SVM solver {solver!r}; known: {', '.join(SOLVERS)}")
    xtr, xte = l2_normalize(train_x), l2_normalize(test_x)
    targets = svm_targets(train_labels)
    costs = list(costs)
    if solver == "sklearn":
        cv_ap, test_scores = _voc07_sklearn(xtr, targets, xte, costs, n_splits, intercept_scaling, progress)
        chosen = choose_costs(cv_ap)
        scores = test_scores[np.arange(len(chosen)), chosen].T
        info: dict[str, Any] = {}
    else:
        space = space or newton_space(*xtr.shape)
        if space not in ("gram", "features"):
            raise ValueError(f"unknown Newton space {space!r}; known: gram, features")
        cv_ap, scores, info = _voc07_newton(xtr, targets, xte, costs, n_splits, intercept_scaling, device, dtype,
                                            progress, direct_max, space)
        chosen = choose_costs(cv_ap)
    return SvmResult(test_aps(scores, test_labels), cv_ap, costs, [costs[i] for i in chosen], solver, info)


def _linear_svc(cost: float, intercept_scaling: float) -> Any:
    from sklearn.svm import LinearSVC

    return LinearSVC(C=cost, class_weight={1: POS_WEIGHT, -1: 1}, intercept_scaling=intercept_scaling,
                     penalty="l2", loss="squared_hinge", tol=1e-4, dual=True, max_iter=2000)


def _voc07_sklearn(xtr: np.ndarray, targets: np.ndarray, xte: np.ndarray, costs: list[float], n_splits: int,
                   intercept_scaling: float, progress: bool | None) -> tuple[np.ndarray, np.ndarray]:
    """The reference: cross_val_score(LinearSVC, cv=n_splits, average_precision) and a refit per cost."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.model_selection import cross_val_score

    n_cls = targets.shape[1]
    cv_ap = np.zeros((n_cls, len(costs)))
    test_scores = np.zeros((n_cls, len(costs), len(xte)))
    bar = progress_bar(total=n_cls * len(costs), desc="svm (sklearn)", progress=progress)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        for c in range(n_cls):
            for j, cost in enumerate(costs):
                clf = _linear_svc(cost, intercept_scaling)
                cv_ap[c, j] = cross_val_score(clf, xtr, targets[:, c], cv=n_splits, scoring="average_precision").mean()
                test_scores[c, j] = clf.fit(xtr, targets[:, c]).decision_function(xte)
                bar.update()
    bar.close()
    return cv_ap, test_scores


def newton_space(n: int, d: int) -> str:
    """Where the Newton systems are cheaper: `features` ((D+1)² per problem) when D + 1 ≤ n / 3, else
    `gram` (|S|² per problem, |S| ≤ n). Measured in perf/RESULTS.md: at VOC07's 5011 trainval rows
    the feature space wins at 512-d, the Gram space at 2048-d and at the protocol's 8192–9216-d."""
    return "features" if 3 * (d + 1) <= n else "gram"


def _voc07_newton(xtr: np.ndarray, targets: np.ndarray, xte: np.ndarray, costs: list[float], n_splits: int,
                  intercept_scaling: float, device: torch.device | str, dtype: torch.dtype, progress: bool | None,
                  direct_max: int, space: str) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """All (class, fold) CV problems as columns of one batch along the ascending cost path, then one
    refit per class at its chosen cost, warm-started from the mean of its fold solutions."""
    n, n_cls = targets.shape
    xtr_t = torch.as_tensor(xtr, dtype=dtype, device=device)
    if space == "features":
        bias = torch.full((n, 1), intercept_scaling, dtype=dtype, device=device)
        system: GramSystem | FeatureSystem = FeatureSystem(torch.cat([xtr_t, bias], dim=1))
    else:
        K = gram(xtr_t, intercept_scaling=intercept_scaling, device=device, dtype=dtype)[None]
        system = GramSystem(K, nystrom(K) if n >= PRECOND_MIN_ROWS else None, direct_max)
    Yall = torch.as_tensor(targets, dtype=dtype, device=device)
    folds = np.stack([stratified_folds(targets[:, c], n_splits) for c in range(n_cls)], axis=1)  # (n, n_cls)
    # CV problems: column (c, f) trains class c on the rows outside fold f.
    held = torch.as_tensor(folds, device=device)[:, :, None] == torch.arange(n_splits, device=device)
    Y = Yall[:, :, None].expand(n, n_cls, n_splits).reshape(1, n, -1)
    pos = (Y > 0).to(dtype) * (POS_WEIGHT - 1) + 1
    train = (~held).reshape(1, n, -1).to(dtype)
    held_np = held.reshape(n, -1).cpu().numpy()
    labels_np = (targets > 0)
    cv_ap = np.zeros((n_cls, len(costs)))
    stats = FitStats()
    A = None
    fold_mean = {}  # per cost: the fold solutions averaged per class, to warm-start the refit
    for j in progress_bar(np.argsort(costs, kind="stable"), desc=f"svm cv ({space})", progress=progress):
        A, F = fit(system, Y, costs[j] * pos * train, init=A, stats=stats)
        fold_mean[int(j)] = A[0].reshape(-1, n_cls, n_splits).mean(2)
        F = F[0].cpu().numpy()
        for c in range(n_cls):
            cv_ap[c, j] = np.mean([_fold_ap(labels_np[:, c], held_np[:, c * n_splits + f], F[:, c * n_splits + f])
                                   for f in range(n_splits)])
    chosen = choose_costs(cv_ap)
    C_final = torch.as_tensor([costs[i] for i in chosen], dtype=dtype, device=device)
    pos_final = (Yall > 0).to(dtype) * (POS_WEIGHT - 1) + 1
    A0 = torch.stack([fold_mean[int(i)][:, c] for c, i in enumerate(chosen)], dim=1)[None]
    if space == "features":
        system = FeatureSystem(system.X)  # new problems (all rows, one column per class): a fresh M
    A, _ = fit(system, Yall[None], (pos_final * C_final)[None], init=A0, stats=stats)
    xte_t = torch.as_tensor(xte, dtype=dtype, device=device)
    if space == "features":
        scores = xte_t @ A[0, :-1] + intercept_scaling * A[0, -1]
    else:
        scores = xte_t @ (xtr_t.T @ A[0]) + intercept_scaling**2 * A[0].sum(0)
    return cv_ap, scores.cpu().numpy(), {"space": space, **stats.as_dict()}


# ---------------------------------------------------------------------------------------------
# Low-shot


@dataclass
class LowshotDraw:
    """One low-shot training set: targets (N x C, 1 positive / 0 negative / -1 unused) and whether it was capped."""

    sample: int
    k: int
    targets: np.ndarray
    capped: bool


def draw_lowshot(labels: np.ndarray, ks: Sequence[int], n_samples: int, seed: int) -> list[LowshotDraw]:
    """Seeded draws of k positives and 19k negatives per class (PROTOCOLS.md §3).

    Positives are label 1, negatives label 0 (absent); difficult (-1) images are never drawn.
    One numpy Generator(seed) draws in sample, k, class order. If a class has fewer images than
    asked (small demo data), all of them are used and the draw is marked `capped`.
    """
    rng = np.random.default_rng(seed)
    labels = np.asarray(labels)
    out = []
    for sample in range(n_samples):
        for k in ks:
            targets = np.full(labels.shape, -1, dtype=np.int8)
            capped = False
            for c in range(labels.shape[1]):
                for value, count in ((1, k), (0, 19 * k)):
                    pool = np.flatnonzero(labels[:, c] == value)
                    capped |= count > len(pool)
                    targets[rng.choice(pool, min(count, len(pool)), replace=False), c] = value
            out.append(LowshotDraw(sample, int(k), targets, capped))
    return out


def lowshot_svm(train_x: np.ndarray, test_x: np.ndarray, test_labels: np.ndarray, draws: Sequence[LowshotDraw],
                costs: Sequence[float], *, solver: str = "gram", cv_folds: int | None = None,
                intercept_scaling: float = 1.0, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float64,
                progress: bool | None = None, direct_max: int = 1536) -> dict[str, Any]:
    """Train per draw, class and cost on the drawn rows (no CV), test on the full test set.

    Returns `test_ap`: (n_draws, n_classes, n_costs) test AP (fraction); with `cv_folds`, also
    `cv_ap` of the same shape: the mean stratified-CV AP on the drawn rows (for the `cv` variant);
    with the gram solver, `solver_stats` (the Newton counters, `kkt_failures` among them).
    """
    if solver not in SOLVERS:
        raise ValueError(f"unknown SVM solver {solver!r}; known: {', '.join(SOLVERS)}")
    xtr, xte = l2_normalize(train_x), l2_normalize(test_x)
    costs = list(costs)
    n_cls = test_labels.shape[1]
    test_ap = np.zeros((len(draws), n_cls, len(costs)))
    cv_ap = np.zeros_like(test_ap) if cv_folds else None
    if solver == "gram":
        K = gram(xtr, intercept_scaling=intercept_scaling, device=device, dtype=dtype)
        Kte = gram(xte, xtr, intercept_scaling=intercept_scaling, device=device, dtype=dtype)
        precond = nystrom(K[None]) if len(xtr) >= PRECOND_MIN_ROWS else None
    stats = FitStats()
    bar = progress_bar(total=len(draws) * n_cls, desc=f"low-shot svm ({solver})", progress=progress)
    for i, draw in enumerate(draws):
        if solver == "gram":
            scores, cv = _lowshot_gram(K, Kte, precond, draw.targets, costs, cv_folds, direct_max, bar, stats)
        for c in range(n_cls):
            keep = test_labels[:, c] != -1
            if solver == "sklearn":
                rows = np.flatnonzero(draw.targets[:, c] != -1)
                y = np.where(draw.targets[rows, c] == 1, 1.0, -1.0)
                scores_c = _lowshot_sklearn(xtr[rows], y, xte, costs, intercept_scaling)
                if cv_folds:
                    cv_ap[i, c] = _lowshot_sklearn_cv(xtr[rows], y, stratified_folds(y, cv_folds), costs,
                                                      intercept_scaling)
                bar.update()
            else:
                scores_c = scores[c]
                if cv_folds:
                    cv_ap[i, c] = cv[c]
            test_ap[i, c] = interpolated_ap_columns(test_labels[keep, c] == 1, scores_c[keep])
    bar.close()
    out: dict[str, Any] = {"test_ap": test_ap}
    if cv_ap is not None:
        out["cv_ap"] = cv_ap
    if solver == "gram":
        out["solver_stats"] = stats.as_dict()
    return out


def _lowshot_gram(K: Tensor, Kte: Tensor, precond: Preconditioner | None, targets: np.ndarray, costs: list[float],
                  cv_folds: int | None, direct_max: int, bar: tqdm, stats: FitStats, budget: int = 2**25
                  ) -> tuple[list[np.ndarray], list[list[float]]]:
    """One draw: classes batched as groups over their own rows (padded with untrained rows), costs
    (x folds) as columns. Returns per-class test scores (n_test, n_costs) and CV APs per cost."""
    n_cls = targets.shape[1]
    rows = [np.flatnonzero(targets[:, c] != -1) for c in range(n_cls)]
    m = max(len(r) for r in rows)
    n_f = cv_folds or 1
    cost = torch.as_tensor(np.repeat(costs, n_f), dtype=K.dtype, device=K.device)
    per_chunk = max(1, budget // max(1, m * m))
    scores: list[np.ndarray] = []
    cv: list[list[float]] = []
    for lo in range(0, n_cls, per_chunk):
        classes = range(lo, min(n_cls, lo + per_chunk))
        idx = np.zeros((len(classes), m), dtype=np.int64)
        y = np.zeros((len(classes), m))
        train = np.zeros((len(classes), m, len(costs) * n_f), dtype=bool)
        folds = []
        for g, c in enumerate(classes):
            r = rows[c]
            idx[g, : len(r)] = r
            y[g, : len(r)] = np.where(targets[r, c] == 1, 1.0, -1.0)
            if cv_folds:
                f = stratified_folds(y[g, : len(r)], cv_folds)
                folds.append(f)
                train[g, : len(r)] = np.tile(np.arange(n_f), len(costs))[None] != f[:, None]
            else:
                train[g, : len(r)] = True
        tidx = torch.as_tensor(idx, device=K.device)
        Ksub = K[tidx[:, :, None], tidx[:, None, :]]
        Y = torch.as_tensor(y, dtype=K.dtype, device=K.device)[:, :, None].expand(-1, -1, len(cost))
        weight = (Y > 0).to(K.dtype) * (POS_WEIGHT - 1) + 1
        C = weight * cost * torch.as_tensor(train, dtype=K.dtype, device=K.device)
        pre = None if precond is None else Preconditioner(precond.U[0][tidx], precond.lam.expand(len(classes), -1))
        if not cv_folds:
            A, _ = fit_dual(Ksub, Y, C, precond=pre, direct_max=direct_max, stats=stats)
            scores += [(Kte[:, tidx[g]] @ A[g]).cpu().numpy() for g in range(len(classes))]
        else:
            # CV columns first (one per cost and fold), then the full fits for the test scores.
            _, F = fit_dual(Ksub, Y, C, precond=pre, direct_max=direct_max, stats=stats)
            A, _ = fit_dual(Ksub, Y[:, :, :: n_f], (weight * cost)[:, :, :: n_f] * (Y[:, :, :: n_f] != 0),
                            precond=pre, direct_max=direct_max, stats=stats)
            F = F.cpu().numpy()
            for g, c in enumerate(classes):
                n = len(rows[c])
                pos = y[g, :n] > 0
                cv.append([_nanmean([_fold_ap(pos, folds[g] == f, F[g, :n, j * n_f + f]) for f in range(n_f)])
                           for j in range(len(costs))])
                scores.append((Kte[:, tidx[g]] @ A[g]).cpu().numpy())
        bar.update(len(classes))
    return scores, cv


def _lowshot_sklearn(x: np.ndarray, y: np.ndarray, xte: np.ndarray, costs: list[float],
                     intercept_scaling: float) -> np.ndarray:
    from sklearn.exceptions import ConvergenceWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return np.stack([_linear_svc(c, intercept_scaling).fit(x, y).decision_function(xte) for c in costs], axis=1)


def _lowshot_sklearn_cv(x: np.ndarray, y: np.ndarray, folds: np.ndarray, costs: list[float],
                        intercept_scaling: float) -> list[float]:
    out = []
    for cost in costs:
        aps = []
        for f in range(int(folds.max()) + 1):
            tr, te = folds != f, folds == f
            if len(np.unique(y[tr])) < 2:
                aps.append(float("nan"))
                continue
            scores = _lowshot_sklearn(x[tr], y[tr], x[te], [cost], intercept_scaling)[:, 0]
            aps.append(sklearn_ap(y[te] > 0, scores))
        out.append(_nanmean(aps))
    return out


def _fold_ap(positive: np.ndarray, held: np.ndarray, scores: np.ndarray) -> float:
    """sklearn AP on a held-out fold; NaN when the training part has one class (LinearSVC cannot fit;
    cross_val_score's error_score=nan)."""
    train = positive[~held]
    if train.all() or not train.any():
        return float("nan")
    return sklearn_ap(positive[held], scores[held])


def _nanmean(values: Sequence[float]) -> float:
    """Mean over the folds that could be trained (NaN if none could)."""
    values = np.asarray(values, dtype=np.float64)
    return float(values[~np.isnan(values)].mean()) if (~np.isnan(values)).any() else float("nan")


def aggregate_lowshot(draws: Sequence[LowshotDraw], test_ap: np.ndarray, costs: Sequence[float],
                      select: str = "test", cv_ap: np.ndarray | None = None) -> dict[int, dict[str, float]]:
    """Per k: mean / min / max / std (population, ×100) over samples of the test mAP at one cost.

    `select="test"` picks the cost whose mean over samples is best on the test set, as
    aggregate_low_shot_svm_stats.py does (the published numbers); `select="cv"` picks it by the
    mean CV mAP on the drawn training rows instead (honest, not comparable; folds whose training
    part lacks a positive are skipped, so k=1 with 2 folds cannot rank costs and keeps the first).
    Ties: first in grid order.
    """
    if select not in ("test", "cv"):
        raise ValueError(f"unknown low-shot cost selection {select!r}; known: test, cv")
    if select == "cv" and cv_ap is None:
        raise ValueError("select='cv' needs cv_ap (run lowshot_svm with cv_folds)")
    test_map = np.nanmean(test_ap, axis=1)  # (n_draws, n_costs)
    pick_map = test_map if select == "test" else np.nan_to_num(np.nanmean(cv_ap, axis=1), nan=-np.inf)
    out: dict[int, dict[str, float]] = {}
    for k in dict.fromkeys(d.k for d in draws):
        rows = [i for i, d in enumerate(draws) if d.k == k]
        best = int(np.argmax(pick_map[rows].mean(0)))
        vals = test_map[rows, best] * 100
        out[k] = {"mean": float(vals.mean()), "min": float(vals.min()), "max": float(vals.max()),
                  "std": float(vals.std()), "cost": float(costs[best]), "samples": len(rows)}
    return out

