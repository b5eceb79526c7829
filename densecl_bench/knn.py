"""Weighted k-nearest-neighbour classification on frozen features.

PROTOCOLS.md §5 (MMSelfSup 0.x `knn_classifier.py`, itself from DINO's `eval_knn.py`): cosine
similarity of L2-normalised features, the k most similar training images vote for their class with
weight exp(sim / T). All k are answered from one similarity pass: the top-max(k) neighbours are
found once and every smaller k reads a prefix of that sorted list.

Memory stays bounded for an ImageNet-size bank: queries go in chunks, and the bank is scanned in
blocks whose partial top-k lists are merged, so no chunk x N similarity matrix is ever materialised
beyond one block.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from densecl_bench.progress import bar as progress_bar


def _as_tensor(x: np.ndarray | torch.Tensor, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A tensor view of (possibly read-only, memory-mapped) features; never written to in place."""
    if isinstance(x, torch.Tensor):
        return x.to(device=device, dtype=dtype)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        t = torch.from_numpy(np.ascontiguousarray(x))
    return t.to(device=device, dtype=dtype)


def topk_neighbours(
    queries: torch.Tensor,
    bank: torch.Tensor,
    k: int,
    block_size: int = 65536,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k similarities (sorted, descending) and bank indices for each query row.

    `bank` may be stored in a lower precision (fp16); each block is cast to the queries' dtype
    before the matmul, so the similarities are computed in fp32.
    """
    best_sim = torch.full((len(queries), 0), float("-inf"), dtype=queries.dtype, device=queries.device)
    best_idx = torch.zeros((len(queries), 0), dtype=torch.long, device=queries.device)
    for start in range(0, len(bank), block_size):
        block = bank[start : start + block_size].to(queries.dtype)
        sim = queries @ block.T
        kb = min(k, sim.shape[1])
        s, i = sim.topk(kb, dim=1, largest=True, sorted=True)
        best_sim = torch.cat([best_sim, s], dim=1)
        best_idx = torch.cat([best_idx, i + start], dim=1)
        if best_sim.shape[1] > k:
            best_sim, order = best_sim.topk(k, dim=1, largest=True, sorted=True)
            best_idx = best_idx.gather(1, order)
    return best_sim, best_idx


def vote(
    sims: torch.Tensor, neighbour_labels: torch.Tensor, k: int, temperature: float, num_classes: int
) -> torch.Tensor:
    """Class scores from the first k (sorted) neighbours: sum of one-hot(label) * exp(sim / T)."""
    weights = (sims[:, :k] / temperature).exp()
    scores = torch.zeros(len(sims), num_classes, dtype=weights.dtype, device=sims.device)
    return scores.scatter_add_(1, neighbour_labels[:, :k], weights)


def knn_classify(
    train_features: np.ndarray | torch.Tensor,
    train_labels: np.ndarray | torch.Tensor,
    test_features: np.ndarray | torch.Tensor,
    test_labels: np.ndarray | torch.Tensor,
    ks: Sequence[int] = (10, 20, 100, 200),
    temperature: float = 0.07,
    num_classes: int | None = None,
    l2_normalize: bool = True,
    query_chunk: int = 500,
    block_size: int = 65536,
    bank_dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    backend: str = "torch",
    progress: bool = True,
) -> dict[int, tuple[float, float]]:
    """Top-1 and top-5 accuracy (percent) of the weighted kNN classifier for every k in `ks`.

    Args:
        train_features, test_features: (N, D) features; the bank and the queries.
        ks: neighbour counts, answered from one top-max(ks) search.
        temperature: T in exp(sim / T) (0.07 in MMSelfSup/DINO; VISSL uses 0.1).
        l2_normalize: cosine similarity (True, MMSelfSup) or raw dot product (VISSL default).
        query_chunk: queries per chunk (MMSelfSup splits 50k val images in 100 chunks of 500).
        block_size: bank rows per matmul block, bounding memory to query_chunk x block_size.
        bank_dtype: fp16 halves the bank's memory (1.28M x 2048: 5 GB instead of 10 GB).
        backend: `torch` (exact matmul search) or `faiss` (exact inner-product index, optional dep).
    """
    device = torch.device(device)
    bank = _build_bank(train_features, l2_normalize, bank_dtype, device, block_size)
    bank_labels = _as_tensor(train_labels, torch.long, device)
    test_labels_t = _as_tensor(test_labels, torch.long, device)
    num_classes = num_classes or int(max(bank_labels.max(), test_labels_t.max())) + 1
    max_k = min(max(ks), len(bank))
    index = _faiss_index(bank) if backend == "faiss" else None
    top1 = dict.fromkeys(ks, 0)
    top5 = dict.fromkeys(ks, 0)
    n_test = len(test_labels_t)
    chunks = range(0, n_test, query_chunk)
    for start in progress_bar(chunks, desc="knn", unit="chunk", progress=None if progress else False):
        q = _as_tensor(test_features[start : start + query_chunk], torch.float32, device)
        if l2_normalize:
            q = F.normalize(q, dim=1)
        if index is not None:
            sims, idx = _faiss_search(index, q, max_k)
        else:
            sims, idx = topk_neighbours(q, bank, max_k, block_size)
        neighbour_labels = bank_labels[idx]
        target = test_labels_t[start : start + query_chunk, None]
        for k in ks:
            scores = vote(sims, neighbour_labels, min(k, max_k), temperature, num_classes)
            top_scores, pred = scores.topk(min(5, k, num_classes), dim=1, largest=True, sorted=True)
            # A class no neighbour voted for never counts: the order among zero scores is arbitrary.
            hit = (pred == target) & (top_scores > 0)
            top1[k] += int(hit[:, 0].sum())
            top5[k] += int(hit.any(dim=1).sum())
    return {k: (100.0 * top1[k] / n_test, 100.0 * top5[k] / n_test) for k in ks}


def _build_bank(features: np.ndarray | torch.Tensor, l2_normalize: bool, dtype: torch.dtype, device: torch.device,
                block_size: int) -> torch.Tensor:
    """The (normalised) bank in `dtype`, filled block by block: peak memory is the bank plus one fp32 block."""
    bank = torch.empty(tuple(features.shape), dtype=dtype, device=device)
    for start in range(0, len(bank), block_size):
        block = _as_tensor(features[start : start + block_size], torch.float32, device)
        bank[start : start + block_size] = F.normalize(block, dim=1) if l2_normalize else block
    return bank


def _faiss_index(bank: torch.Tensor):
    try:
        import faiss
    except ImportError as err:
        raise RuntimeError("kNN backend 'faiss' needs faiss-cpu: pip install 'densecl-bench[faiss]'") from err
    index = faiss.IndexFlatIP(bank.shape[1])
    index.add(bank.float().cpu().numpy())
    return index


def _faiss_search(index, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    sims, idx = index.search(queries.float().cpu().numpy(), k)
    return torch.from_numpy(sims).to(queries.device), torch.from_numpy(idx).to(queries.device)
