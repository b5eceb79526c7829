"""VOC07 SVM / low-shot SVM maths (densecl_bench.svm) against hand-computed values and scikit-learn."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score
from sklearn.model_selection import StratifiedKFold
from sklearn.svm import LinearSVC

from densecl_bench import svm

torch.set_num_threads(1)


def _features(n: int, d: int, n_cls: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Non-negative low-rank features with a class signal; labels 1 / 0 / -1 (a few difficult)."""
    rng = np.random.default_rng(seed)
    present = rng.random((n, n_cls)) < np.linspace(0.15, 0.4, n_cls)
    present[np.arange(n_cls), np.arange(n_cls)] = True  # every class has a positive
    basis = np.abs(rng.standard_normal((16, d)))
    latent = rng.standard_normal((n, 16)) + present @ rng.standard_normal((n_cls, 16))
    x = np.maximum(latent @ basis / 4 + 0.5 * rng.standard_normal((n, d)), 0)
    labels = present.astype(np.int32)
    labels[(rng.random((n, n_cls)) < 0.05) & ~present] = -1
    return x, labels


def test_interpolated_ap_hand_computed():
    # Ranked: P N P N -> precision 1, 1/2, 2/3, 1/2; recall .5 .5 1 1.
    # Interpolated precision at recall 0.5 is max(1, 1/2, 2/3, 1/2) = 1; at recall 1 it is 2/3.
    assert svm.interpolated_ap(np.array([1, 0, 1, 0]), np.array([4.0, 3, 2, 1])) == pytest.approx(0.5 + 0.5 * 2 / 3)
    # N P P: precision 0, 1/2, 2/3 -> both recall steps take 2/3.
    assert svm.interpolated_ap(np.array([0, 1, 1]), np.array([3.0, 2, 1])) == pytest.approx(2 / 3)
    # Order comes from the scores, not the input order; a perfect ranking scores 1.
    assert svm.interpolated_ap(np.array([0, 1, 1]), np.array([0.1, 0.9, 0.5])) == pytest.approx(1.0)
    assert np.isnan(svm.interpolated_ap(np.array([0, 0]), np.array([1.0, 2.0])))


def test_interpolated_ap_differs_from_sklearn_ap():
    y, s = np.array([0, 1, 0, 1, 1]), np.array([5.0, 4, 3, 2, 1])
    # precision 0, 1/2, 1/3, 1/2, 3/5; interpolated: 3/5 at every recall step -> 3/5.
    assert svm.interpolated_ap(y, s) == pytest.approx(0.6)
    # sklearn (non-interpolated): (1/2 + 1/2 + 3/5) / 3.
    assert svm.sklearn_ap(y, s) == pytest.approx((0.5 + 0.5 + 0.6) / 3)


def test_sklearn_ap_matches_sklearn_with_ties():
    rng = np.random.default_rng(0)
    for _ in range(5):
        y = rng.random(40) < 0.3
        s = np.round(rng.standard_normal(40), 1)  # many ties
        assert svm.sklearn_ap(y, s) == pytest.approx(average_precision_score(y, s))
    assert svm.sklearn_ap(np.zeros(4, bool), np.arange(4.0)) == 0.0


def test_cost_grids():
    mmss = svm.cost_grid("mmselfsup")
    assert len(mmss) == 19 and mmss[:3] == [1.0, 10.0, 100.0]
    assert mmss[3:] == [0.5**k for k in range(4, 20)]
    fair = svm.cost_grid("fair")
    assert fair[:10] == [1e-7, 1e-6, 1e-5, 1e-4, 1e-3, 0.01, 0.1, 1.0, 10.0, 100.0] and len(fair) == 26
    assert svm.cost_grid("vissl") == [0.01, 0.1, 1.0, 2.0, 5.0, 10.0, 15.0, 20.0, 50.0, 100.0, 1000.0]
    assert svm.cost_grid([0.5, 2]) == [0.5, 2.0]
    with pytest.raises(ValueError):
        svm.cost_grid("nope")


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_stratified_folds_match_sklearn(seed):
    rng = np.random.default_rng(seed)
    y = np.where(rng.random(61) < 0.2, 1.0, -1.0)
    ours = svm.stratified_folds(y, 3)
    for f, (_, test) in enumerate(StratifiedKFold(3).split(np.zeros(len(y)), y)):
        np.testing.assert_array_equal(np.flatnonzero(ours == f), test)


def test_svm_targets_keep_difficult_as_negatives():
    np.testing.assert_array_equal(svm.svm_targets(np.array([1, 0, -1])), [1.0, -1.0, -1.0])


def test_gram_solver_matches_liblinear():
    """Decision values of the Gram/Newton solver equal LinearSVC's over the whole cost range."""
    x, labels = _features(150, 40, 2, seed=3)
    x = svm.l2_normalize(x)
    y = svm.svm_targets(labels[:, 0])
    K = svm.gram(x)[None]
    for cost in (0.5**19, 0.5**6, 1.0, 100.0):
        c = torch.as_tensor(np.where(y > 0, 2 * cost, cost))[None, :, None]
        _, F = svm.fit_dual(K, torch.as_tensor(y)[None, :, None], c)
        ref = LinearSVC(C=cost, class_weight={1: 2, -1: 1}, intercept_scaling=1.0, loss="squared_hinge",
                        tol=1e-8, dual=True, max_iter=200000).fit(x, y).decision_function(x)
        np.testing.assert_allclose(F[0, :, 0].numpy(), ref, rtol=1e-4, atol=1e-5 * np.abs(ref).max())


def test_pcg_path_matches_direct_path():
    x, labels = _features(300, 60, 3, seed=4)
    x = svm.l2_normalize(x)
    K = svm.gram(x)[None]
    Y = torch.as_tensor(svm.svm_targets(labels))[None]
    C = (Y > 0).double() + 1.0
    costs = torch.tensor([0.5**10, 0.5**5, 0.5**3]).double()[None, None, :].repeat(1, 1, 1)
    C = torch.cat([C * c for c in costs[0, 0]], dim=2)
    Yb = Y.repeat(1, 1, 3)
    stats = svm.FitStats()
    _, f_cg = svm.fit_dual(K, Yb, C, precond=svm.nystrom(K, rank=32), direct_max=0, stats=stats)
    assert stats.cg > 0
    _, f_direct = svm.fit_dual(K, Yb, C)
    np.testing.assert_allclose(f_cg.numpy(), f_direct.numpy(), atol=1e-7)


def test_voc07_protocol_matches_sklearn_reference():
    """The whole protocol (CV, cost choice, refit, test AP) with both solvers; mAP within 0.1 point."""
    x, labels = _features(330, 48, 3, seed=5)
    xtr, ytr, xte, yte = x[:180], labels[:180], x[180:], labels[180:]
    costs = [0.5**12, 0.5**6, 0.5**4, 1.0, 10.0]
    ours = svm.voc07_svm(xtr, ytr, xte, yte, costs, solver="gram", progress=False)
    ref = svm.voc07_svm(xtr, ytr, xte, yte, costs, solver="sklearn", progress=False)
    np.testing.assert_allclose(ours.cv_ap, ref.cv_ap, atol=2e-3)
    np.testing.assert_allclose(ours.ap, ref.ap, atol=1e-3)  # per class, as fractions: 0.1 point
    assert abs(ours.map - ref.map) < 0.1


def test_difficult_are_train_negatives_and_dropped_at_test():
    x, labels = _features(120, 24, 1, seed=6)
    xtr, ytr, xte, yte = x[:60], labels[:60].copy(), x[60:], labels[60:].copy()
    ytr[:5, 0], yte[:5, 0] = -1, -1
    res = svm.voc07_svm(xtr, ytr, xte, yte, [0.5**4], progress=False)
    # Training: -1 rows must act exactly like 0 rows (negatives).
    as_neg = svm.voc07_svm(xtr, np.where(ytr == -1, 0, ytr), xte, yte, [0.5**4], progress=False)
    np.testing.assert_allclose(res.ap, as_neg.ap)
    # Test: AP is computed on the non-difficult rows only.
    scores = _refit_scores(xtr, ytr, xte, 0.5**4)
    keep = yte[:, 0] != -1
    assert res.ap[0] == pytest.approx(svm.interpolated_ap(yte[keep, 0] == 1, scores[keep]))


def _refit_scores(xtr: np.ndarray, ytr: np.ndarray, xte: np.ndarray, cost: float) -> np.ndarray:
    clf = LinearSVC(C=cost, class_weight={1: 2, -1: 1}, intercept_scaling=1.0, tol=1e-8, max_iter=100000)
    return clf.fit(svm.l2_normalize(xtr), svm.svm_targets(ytr[:, 0])).decision_function(svm.l2_normalize(xte))


def test_lowshot_sampler_counts_and_seeding():
    rng = np.random.default_rng(0)
    labels = np.where(rng.random((400, 4)) < 0.2, 1, 0).astype(np.int32)
    labels[rng.random((400, 4)) < 0.05] = -1
    draws = svm.draw_lowshot(labels, [1, 3], n_samples=2, seed=7)
    assert [(d.sample, d.k) for d in draws] == [(0, 1), (0, 3), (1, 1), (1, 3)]
    for d in draws:
        assert not d.capped
        for c in range(4):
            col = d.targets[:, c]
            assert (col == 1).sum() == d.k and (col == 0).sum() == 19 * d.k
            assert (labels[col == 1, c] == 1).all() and (labels[col == 0, c] == 0).all()  # no difficult drawn
    again = svm.draw_lowshot(labels, [1, 3], n_samples=2, seed=7)
    assert all((a.targets == b.targets).all() for a, b in zip(draws, again))
    assert not (draws[1].targets == draws[3].targets).all()  # samples differ
    other = svm.draw_lowshot(labels, [1, 3], n_samples=2, seed=8)
    assert not all((a.targets == b.targets).all() for a, b in zip(draws, other))
    capped = svm.draw_lowshot(labels, [40], n_samples=1, seed=0)[0]
    assert capped.capped and ((capped.targets == 0).sum(0) == (labels == 0).sum(0)).all()


def test_lowshot_matches_sklearn_reference():
    x, labels = _features(260, 32, 2, seed=9)
    labels[labels == 1] = np.where(np.random.default_rng(1).random((labels == 1).sum()) < 0.1, -1, 1)
    xtr, ytr, xte, yte = x[:140], labels[:140], x[140:], labels[140:]
    draws = svm.draw_lowshot(ytr, [1, 2], n_samples=2, seed=0)
    costs = [0.5**8, 0.5**4, 1.0]
    ours = svm.lowshot_svm(xtr, xte, yte, draws, costs, solver="gram", cv_folds=2, progress=False)
    ref = svm.lowshot_svm(xtr, xte, yte, draws, costs, solver="sklearn", cv_folds=2, progress=False)
    np.testing.assert_allclose(ours["test_ap"], ref["test_ap"], atol=1e-3)
    np.testing.assert_allclose(ours["cv_ap"], ref["cv_ap"], atol=1e-3)


def test_aggregate_lowshot_picks_best_mean_cost():
    draws = [svm.LowshotDraw(s, k, np.zeros((1, 1)), False) for s in range(2) for k in (1, 2)]
    # test_ap: (draws, classes=1, costs=2). k=1: cost0 -> .5, .7 (mean .6); cost1 -> .9, .2 (mean .55).
    test_ap = np.array([[[0.5, 0.9]], [[0.1, 0.3]], [[0.7, 0.2]], [[0.2, 0.4]]])
    out = svm.aggregate_lowshot(draws, test_ap, [1.0, 10.0])
    assert out[1]["cost"] == 1.0 and out[1]["mean"] == pytest.approx(60.0)
    assert out[1]["min"] == pytest.approx(50.0) and out[1]["max"] == pytest.approx(70.0)
    assert out[1]["std"] == pytest.approx(10.0)
    assert out[2]["cost"] == 10.0 and out[2]["mean"] == pytest.approx(35.0)
    # The `cv` variant picks by the CV score, then reports test numbers at that cost.
    cv_ap = np.array([[[0.1, 0.9]], [[0.9, 0.1]], [[0.1, 0.9]], [[0.9, 0.1]]])
    picked = svm.aggregate_lowshot(draws, test_ap, [1.0, 10.0], select="cv", cv_ap=cv_ap)
    assert picked[1]["cost"] == 10.0 and picked[1]["mean"] == pytest.approx(55.0)
    assert picked[2]["cost"] == 1.0 and picked[2]["mean"] == pytest.approx(15.0)


def test_columnwise_ap_equals_per_column_ap_with_ties():
    from densecl_bench.svm import interpolated_ap, interpolated_ap_columns

    rng = np.random.default_rng(0)
    for _ in range(50):
        n = int(rng.integers(1, 40))
        y = rng.random(n) < 0.3
        scores = rng.integers(0, 4, (n, 5)).astype(float)  # many ties: order must stay stable
        expected = [interpolated_ap(y, scores[:, j]) for j in range(5)]
        np.testing.assert_allclose(interpolated_ap_columns(y, scores), expected, equal_nan=True)
