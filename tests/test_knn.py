"""kNN voting against hand-computed values and an independent brute-force implementation."""

import math

import numpy as np
import pytest
import torch

from densecl_bench.knn import knn_classify, topk_neighbours, vote


def test_vote_matches_hand_computation():
    # One query, neighbours sorted by similarity with labels 1, 0, 1; T = 0.5.
    sims = torch.tensor([[0.9, 0.8, 0.1]])
    labels = torch.tensor([[1, 0, 1]])
    scores = vote(sims, labels, k=3, temperature=0.5, num_classes=2)
    expected_c1 = math.exp(0.9 / 0.5) + math.exp(0.1 / 0.5)
    expected_c0 = math.exp(0.8 / 0.5)
    assert scores[0, 1].item() == pytest.approx(expected_c1, rel=1e-6)
    assert scores[0, 0].item() == pytest.approx(expected_c0, rel=1e-6)
    # k=2 uses only the prefix of the sorted list: e^1.8 vs e^1.6.
    scores2 = vote(sims, labels, k=2, temperature=0.5, num_classes=2)
    assert scores2[0, 1].item() == pytest.approx(math.exp(1.8), rel=1e-6)


def test_knn_hand_example():
    # Bank on the unit circle; the query at angle 0 is nearest to the class-0 points at +-10 degrees.
    angles = np.deg2rad([10, -10, 90, 180, 100])
    bank = np.stack([np.cos(angles), np.sin(angles)], 1).astype(np.float32)
    labels = np.array([0, 0, 1, 1, 1])
    query = np.array([[2.0, 0.0]], dtype=np.float32)  # not unit norm: normalisation must handle it
    res = knn_classify(bank, labels, query, np.array([0]), ks=(1, 5), temperature=0.07, progress=False)
    assert res[1] == (100.0, 100.0)
    # k=5: class 0 gets 2*e^(cos10/T), class 1 gets e^(cos90/T)+e^(cos180/T)+e^(cos100/T): class 0 wins.
    assert res[5][0] == 100.0


def _brute_force(train, train_labels, test, test_labels, k, T, C):
    train = train / np.linalg.norm(train, axis=1, keepdims=True)
    test = test / np.linalg.norm(test, axis=1, keepdims=True)
    sim = test @ train.T
    top1 = top5 = 0
    for i in range(len(test)):
        order = np.argsort(-sim[i], kind="stable")[:k]
        scores = np.zeros(C)
        for j in order:
            scores[train_labels[j]] += np.exp(sim[i, j] / T)
        pred = np.argsort(-scores, kind="stable")[: min(5, k)]
        top1 += pred[0] == test_labels[i]
        top5 += test_labels[i] in pred and scores[test_labels[i]] > 0
    return 100 * top1 / len(test), 100 * top5 / len(test)


def test_one_pass_equals_brute_force_per_k():
    rng = np.random.default_rng(0)
    C, D = 7, 16
    centers = rng.normal(size=(C, D))
    train_labels = rng.integers(0, C, 300)
    test_labels = rng.integers(0, C, 60)
    train = (centers[train_labels] + 1.5 * rng.normal(size=(300, D))).astype(np.float64)
    test = (centers[test_labels] + 1.5 * rng.normal(size=(60, D))).astype(np.float64)
    ks = (1, 5, 20, 100)
    # Small query chunks and bank blocks exercise the chunked top-k merge.
    res = knn_classify(train, train_labels, test, test_labels, ks=ks, temperature=0.07, num_classes=C,
                       query_chunk=17, block_size=41, progress=False)
    for k in ks:
        expected = _brute_force(train, train_labels, test, test_labels, k, 0.07, C)
        assert res[k] == pytest.approx(expected, abs=1e-9), k


def test_blocked_topk_equals_full_topk():
    rng = np.random.default_rng(1)
    q = torch.from_numpy(rng.normal(size=(9, 8)).astype(np.float32))
    bank = torch.from_numpy(rng.normal(size=(200, 8)).astype(np.float32))
    s_full, i_full = (q @ bank.T).topk(30, dim=1)
    s_blk, i_blk = topk_neighbours(q, bank, 30, block_size=13)
    torch.testing.assert_close(s_blk, s_full)
    assert torch.equal(i_blk, i_full)


def test_fp16_bank_keeps_top1():
    rng = np.random.default_rng(2)
    C, D = 10, 64
    centers = rng.normal(size=(C, D))
    yl, yt = rng.integers(0, C, 500), rng.integers(0, C, 100)
    xl = centers[yl] + rng.normal(size=(500, D))
    xt = centers[yt] + rng.normal(size=(100, D))
    fp32 = knn_classify(xl, yl, xt, yt, ks=(10, 20), progress=False)
    fp16 = knn_classify(xl, yl, xt, yt, ks=(10, 20), bank_dtype=torch.float16, progress=False)
    for k in (10, 20):
        assert abs(fp32[k][0] - fp16[k][0]) <= 1.0  # at most one query of 100 flips
