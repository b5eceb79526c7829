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


@pytest.mark.parametrize("threads", [1, 2])
def test_pcg_path_matches_direct_path(threads):
    """The guard from issue 8: on some machines one column came back exactly half the other (a halved
    final Newton step taken for convergence). Run at 1 and 2 torch threads: the reductions differ."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        _pcg_vs_direct()
    finally:
        torch.set_num_threads(before)


def _pcg_vs_direct() -> None:
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
    _, f_direct = svm.fit_dual(K, Yb, C, stats=stats)
    np.testing.assert_allclose(f_cg.numpy(), f_direct.numpy(), atol=1e-7)
    assert stats.unconverged == 0 and stats.kkt_failures == 0


def _one(v: float) -> torch.Tensor:
    return torch.tensor([[[v]]], dtype=torch.float64)  # G = n = P = 1


def test_line_search_takes_the_full_step_when_the_slope_is_a_rounding_error():
    """φ'(1) = +8.7e-19 with φ''(1) ≈ 1: the minimiser is 1 − 1e-18, i.e. t = 1 in floats. The Newton
    update rounds to 1.0 and fails the strict bracket; the step must still be 1, not the bisection
    midpoint 0.5 (which the solver then took for convergence, returning a half step)."""
    w, f, df, c = 2.0**-40, 1 - 2.0**-20 - 2.0**-40, 2.0**-20, 2.0**39  # slack at t = 1: exactly 2^-40
    t = svm._line_search(_one(w * df)[0], _one(df)[0], _one(f), _one(df), _one(1.0), _one(c))
    assert t.item() == 1.0


def test_line_search_finds_the_exact_minimiser():
    # One row, y = 1, x̃ = 1: φ(t) = ½(w + t d)² + c (1 − w − t d)₊², minimised at w + t d = 2c / (1 + 2c).
    w, d, c = 0.0, 1.0, 0.25
    t = svm._line_search(_one(w * d)[0], _one(d * d)[0], _one(w), _one(d), _one(1.0), _one(c)).item()
    assert t == pytest.approx((2 * c / (1 + 2 * c) - w) / d, rel=1e-12)


def _liblinear(x: np.ndarray, y: np.ndarray, cost: float, tight: bool) -> LinearSVC:
    """The reference's LinearSVC (PROTOCOLS.md §2.3), or the same problem solved to tol 1e-9."""
    if not tight:
        return svm._linear_svc(cost, 1.0).fit(x, y)
    return LinearSVC(C=cost, class_weight={1: 2, -1: 1}, intercept_scaling=1.0, penalty="l2", loss="squared_hinge",
                     dual=True, tol=1e-9, max_iter=100000).fit(x, y)


def test_warm_started_cost_path_matches_liblinear_when_d_exceeds_n():
    """D ≫ n (K full rank, data separable): each fit warm-starts from the previous cost, as the CV
    path does, and must land on liblinear's optimum, not between two costs' solutions."""
    x, labels = _features(140, 3000, 1, seed=7)
    x = svm.l2_normalize(x)
    xtr, xte, y, yte = x[:80], x[80:], svm.svm_targets(labels[:80, 0]), labels[80:, 0] == 1
    K, Kte = svm.gram(xtr)[None], svm.gram(xte, xtr)
    Y = torch.as_tensor(y)[None, :, None]
    weight = (Y > 0).double() + 1
    stats, A, path = svm.FitStats(), None, {}
    for cost in sorted(svm.cost_grid("mmselfsup")):
        A, _ = svm.fit_dual(K, Y, weight * cost, init=A, stats=stats)
        path[cost] = A
        ours = (Kte @ A[0, :, 0]).numpy()
        tight = _liblinear(xtr, y, cost, tight=True).decision_function(xte)
        np.testing.assert_allclose(ours, tight, rtol=0, atol=1e-8 * np.abs(tight).max())
        ref = _liblinear(xtr, y, cost, tight=False).decision_function(xte)
        np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-4 * np.abs(ref).max())
        assert svm.interpolated_ap(yte, ours) == pytest.approx(svm.interpolated_ap(yte, ref), abs=1e-3)
    # A warm start that is no solution at all (the mean of two other costs' solutions, like the refit's
    # start from the fold means) must still end at the optimum.
    blend = (path[0.5**4] + path[10.0]) / 2
    A, F = svm.fit_dual(K, Y, weight * 1.0, init=blend, stats=stats)
    tight = _liblinear(xtr, y, 1.0, tight=True)
    np.testing.assert_allclose(F[0, :, 0].numpy(), tight.decision_function(xtr), atol=1e-8)
    assert stats.unconverged == 0 and stats.kkt_failures == 0


def test_kkt_check_counts_and_reports_bad_solutions(caplog):
    x, labels = _features(120, 30, 1, seed=8)
    x = svm.l2_normalize(x)
    K, Y = svm.gram(x)[None], torch.as_tensor(svm.svm_targets(labels[:, 0]))[None, :, None].repeat(1, 1, 3)
    C = ((Y > 0).double() + 1) * torch.tensor([0.5**8, 1.0, 100.0]).double()  # three costs as columns
    A, F = svm.fit_dual(K, Y, C)
    system = svm.GramSystem(K)
    assert svm.kkt_residual(system, A, F, Y, C).max() < 1e-9
    # Half a step from zero, the failure this check exists for: clearly not optimal.
    assert (svm.kkt_residual(system, A / 2, F / 2, Y, C) > 0.1).all()
    # One Newton iteration from zero cannot finish the large costs: counted, logged.
    stats = svm.FitStats()
    with caplog.at_level("WARNING", logger="densecl_bench.svm"):
        svm.fit_dual(K, Y, C, max_newton=1, stats=stats)
    assert stats.unconverged >= 1 and stats.kkt_failures >= 1
    assert "fail the optimality check" in caplog.text


def test_voc07_protocol_within_0_1_map_of_linearsvc():
    """README claim: the whole protocol (3-fold CV over the 19-cost grid, per-class cost, refit, test AP)
    with our solver lands within 0.1 mAP of the reference path (one LinearSVC per fit), on VOC07-shaped
    features: 20 classes, labels 1 / 0 / -1, D > n, enough rows for the preconditioned CG path."""
    x, labels = _features(500, 1024, 20, seed=11)
    xtr, ytr, xte, yte = x[:300], labels[:300], x[300:], labels[300:]
    assert (ytr == -1).any() and (yte == -1).any()
    costs = svm.cost_grid("mmselfsup")
    ours = svm.voc07_svm(xtr, ytr, xte, yte, costs, solver="gram", progress=False)
    ref = svm.voc07_svm(xtr, ytr, xte, yte, costs, solver="sklearn", progress=False)
    assert ours.info["cg_iters"] > 0 and ours.info["direct_solves"] > 0  # both inner solvers ran
    assert ours.info["unconverged"] == 0 and ours.info["kkt_failures"] == 0
    assert abs(ours.map - ref.map) < 0.1
    # Our fits are exact, the reference's stop at liblinear's tol 1e-4: CV APs agree to that accuracy.
    np.testing.assert_allclose(ours.cv_ap, ref.cv_ap, atol=2e-3)


def test_feature_space_path_matches_gram_path_and_liblinear():
    """D + 1 ≤ n / 3 picks the feature-space Newton systems; they solve the same problems as the Gram
    path (CV along the warm-started cost path, refit from the fold means), so every number agrees."""
    x, labels = _features(400, 64, 4, seed=12)
    xtr, ytr, xte, yte = x[:260], labels[:260], x[260:], labels[260:]
    assert svm.newton_space(*xtr.shape) == "features" and svm.newton_space(260, 1024) == "gram"
    costs = svm.cost_grid("mmselfsup")
    feat = svm.voc07_svm(xtr, ytr, xte, yte, costs, progress=False)
    gram = svm.voc07_svm(xtr, ytr, xte, yte, costs, progress=False, space="gram")
    assert feat.info["space"] == "features" and gram.info["space"] == "gram"
    for res in (feat, gram):
        assert res.info["unconverged"] == 0 and res.info["kkt_failures"] == 0
    np.testing.assert_allclose(feat.cv_ap, gram.cv_ap, atol=1e-9)
    np.testing.assert_allclose(feat.ap, gram.ap, atol=1e-9)
    # The refit at class 0's chosen cost equals liblinear's optimum.
    scores = _refit_scores(xtr, ytr, xte, feat.chosen[0])
    keep = yte[:, 0] != -1
    assert feat.ap[0] == pytest.approx(svm.interpolated_ap(yte[keep, 0] == 1, scores[keep]), abs=1e-9)


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
    assert ours["solver_stats"]["unconverged"] == 0 and ours["solver_stats"]["kkt_failures"] == 0


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


def _reference_test_ap(targets: np.ndarray, preds: np.ndarray) -> float:
    """svm_helper.py `get_precision_recall` + `calculate_ap`, written out rank by rank (independent of svm.py):
    rank by np.argsort(preds) reversed, running precision / recall, precision made monotone from the
    right, area summed where recall changes."""
    order = np.argsort(preds)[::-1]
    positives = targets[order] > 0
    n_pos = int(positives.sum())
    precision, recall, tp = [], [], 0
    for rank, hit in enumerate(positives, start=1):
        tp += int(hit)
        precision.append(tp / rank)
        recall.append(tp / n_pos)
    mrec, mpre = [0.0, *recall, 1.0], [0.0, *precision, 0.0]
    for i in range(len(mpre) - 2, -1, -1):
        mpre[i] = max(mpre[i], mpre[i + 1])
    return sum((mrec[i] - mrec[i - 1]) * mpre[i] for i in range(1, len(mrec)) if mrec[i] != mrec[i - 1])


def _tied_cases() -> list[tuple[str, np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(0)
    cases = [("all tied, one positive first", np.r_[1, np.zeros(7)], np.zeros(8)),
             ("all tied", rng.random(40) < 0.3, np.full(40, 0.25)),
             ("two levels", rng.random(17) < 0.4, rng.integers(0, 2, 17).astype(float))]
    for n in (12, 300, 2000):
        cases.append((f"coarse ties, n={n}", rng.random(n) < 0.3, np.round(rng.standard_normal(n), 1)))
    # Every score shared by exactly one positive and one negative (duplicate images, opposite labels).
    s = np.repeat(rng.standard_normal(30), 2)
    cases.append(("ties across positive / negative", np.tile([1, 0], 30), s))
    return [(name, np.asarray(y).astype(int), np.asarray(sc)) for name, y, sc in cases]


@pytest.mark.parametrize("name,y,scores", _tied_cases(), ids=lambda v: v if isinstance(v, str) else "")
def test_test_ap_breaks_ties_as_the_reference(name, y, scores):
    assert y.any()
    expected = _reference_test_ap(y, scores)
    assert svm.interpolated_ap(y, scores) == pytest.approx(expected, abs=1e-12)
    # The column-wise form (low-shot) ranks every column the same way.
    columns = np.stack([scores, scores[::-1], -scores], axis=1)
    want = [expected, _reference_test_ap(y, scores[::-1]), _reference_test_ap(y, -scores)]
    np.testing.assert_allclose(svm.interpolated_ap_columns(y, columns), want, rtol=0, atol=1e-12)


def test_test_ap_with_order_free_ties_equals_sklearn():
    """Ties inside one label cannot be broken differently, and when precision only falls from one
    positive to the next, interpolation changes nothing: here the reference AP is sklearn's."""
    y = np.array([1, 1, 0, 1, 0, 0, 0, 1, 0])
    s = np.array([5.0, 5, 4, 3, 2, 2, 2, 1, 0])  # precision at the positives: 1, 1, 3/4, 4/8
    expected = average_precision_score(y, s)
    assert svm.interpolated_ap(y, s) == pytest.approx(expected, abs=1e-12)
    assert _reference_test_ap(y, s) == pytest.approx(expected, abs=1e-12)
