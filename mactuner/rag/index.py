"""Inner-product search over unit-length vectors: an exact scan, or an IVF index for large collections.

Search is exact (one matrix product) up to ``IndexSettings.ivf_threshold``
chunks; above it an IVF index (k-means partitions, the nearest ``nprobe``
partitions scanned exactly) keeps a query to a few milliseconds on a CPU
(``bench/retrieval.py`` measures latency and recall against exact search).
"""

from __future__ import annotations

import math

import numpy as np
import torch


def kmeans(vectors: torch.Tensor, k: int, *, iterations: int = 10, sample_per_centroid: int = 40,
           seed: int = 0) -> torch.Tensor:
    """Spherical k-means centroids (unit length, ``k x dim``) from a sample of unit-length ``vectors``."""
    generator = torch.Generator().manual_seed(seed)
    n = vectors.shape[0]
    sample = vectors[torch.randperm(n, generator=generator)[: min(n, k * sample_per_centroid)]]
    centroids = sample[torch.randperm(sample.shape[0], generator=generator)[:k]].clone()
    for _ in range(iterations):
        assign = (sample @ centroids.T).argmax(dim=1)
        sums = torch.zeros_like(centroids).index_add_(0, assign, sample)
        empty = torch.bincount(assign, minlength=k) == 0
        if empty.any():  # re-seed empty partitions so none is wasted
            sums[empty] = sample[torch.randint(0, sample.shape[0], (int(empty.sum()),), generator=generator)]
        centroids = torch.nn.functional.normalize(sums, dim=1)
    return centroids


class VectorIndex:
    """Inner-product search over unit-length vectors: exact below a size, IVF above it.

    The IVF index partitions the vectors with k-means (``4 * sqrt(n)`` partitions)
    and files every vector under its **two** nearest centroids, so a neighbour that
    sits near a partition border is found from either side; vectors are stored
    sorted by partition, so scanning one is a single small matrix product. A query
    scores the centroids, scans the ``nprobe`` nearest partitions exactly and
    returns exact cosine scores. ``bench/retrieval.py`` measures recall and latency.
    On a GPU the exact product is faster than any of this, so it is always exact there.
    """

    ASSIGNMENTS = 2  # partitions each vector is filed under

    def __init__(self, vectors: np.ndarray | torch.Tensor, *, ivf_threshold: int = 20_000,
                 nprobe: int | None = None, centroids: np.ndarray | torch.Tensor | None = None,
                 device: str | torch.device = "cpu"):
        self.device = torch.device(device)
        matrix = torch.as_tensor(vectors, dtype=torch.float32)
        self.size = int(matrix.shape[0])
        self.dimension = int(matrix.shape[1]) if matrix.ndim == 2 else 0
        self.kind = "ivf" if self.size >= ivf_threshold and self.device.type == "cpu" else "exact"
        self.centroids = None
        if self.kind == "exact":
            self.matrix = matrix.to(self.device)
            return
        nlist = max(1, min(self.size, int(round(4 * math.sqrt(self.size)))))
        if centroids is not None and len(centroids) and 0.5 * nlist <= len(centroids) <= 2 * nlist:
            self.centroids = torch.as_tensor(centroids, dtype=torch.float32)  # reuse: k-means takes seconds
        else:
            self.centroids = kmeans(matrix, nlist)
        nlist = len(self.centroids)
        # ~8 % of the partitions: recall@10 ≈ 0.96 on real MiniLM text at 3k chunks, ≥ 0.99 on
        # text-like synthetic vectors at 100k (bench/retrieval.py)
        self.nprobe = min(nlist, nprobe or max(16, nlist // 12))
        lists = self._assign(matrix).reshape(-1)
        rows = torch.arange(self.size).repeat_interleave(self.ASSIGNMENTS if nlist > 1 else 1)
        order = torch.argsort(lists, stable=True)
        self.ids = rows[order]
        self.matrix = matrix[self.ids].contiguous()
        offsets = [0] + torch.cumsum(torch.bincount(lists, minlength=nlist), 0).tolist()
        # views (no copies) of each partition, so a query does no slicing work
        self.partitions = [(self.matrix[a:b], self.ids[a:b]) for a, b in zip(offsets, offsets[1:])]

    def _assign(self, matrix: torch.Tensor) -> torch.Tensor:
        """The nearest ``ASSIGNMENTS`` centroids of every row (``n x ASSIGNMENTS``), in bounded blocks."""
        k = min(self.ASSIGNMENTS, len(self.centroids))
        out = torch.empty(matrix.shape[0], k, dtype=torch.long)
        for begin in range(0, matrix.shape[0], 32768):
            out[begin : begin + 32768] = torch.topk(matrix[begin : begin + 32768] @ self.centroids.T, k, dim=1).indices
        return out

    def search(self, queries: np.ndarray | torch.Tensor, k: int = 5) -> tuple[np.ndarray, np.ndarray]:
        """Top ``k`` rows per query: ``(scores, ids)``, each ``[queries, k']`` with ``k' = min(k, size)``.

        An IVF search that finds fewer than ``k`` vectors in its partitions pads with score ``-inf`` and id ``-1``.
        """
        q = torch.as_tensor(queries, dtype=torch.float32)
        if q.ndim == 1:
            q = q[None]
        k = min(k, self.size)
        if k == 0:
            return np.zeros((q.shape[0], 0), np.float32), np.zeros((q.shape[0], 0), np.int64)
        with torch.inference_mode():
            if self.kind == "exact":
                top = torch.topk(q.to(self.device) @ self.matrix.T, k, dim=1)
                return top.values.float().cpu().numpy(), top.indices.cpu().numpy()
            out_scores = np.full((q.shape[0], k), -np.inf, np.float32)
            out_ids = np.full((q.shape[0], k), -1, np.int64)
            probes = torch.topk(q @ self.centroids.T, self.nprobe, dim=1).indices.tolist()
            for row, lists in enumerate(probes):
                query = q[row]
                parts = [self.partitions[p] for p in lists]
                scores = torch.cat([vectors @ query for vectors, _ in parts])
                ids = torch.cat([ids for _, ids in parts])
                # a vector filed twice can come up twice: take enough to keep k distinct ones
                top = torch.topk(scores, min(self.ASSIGNMENTS * k, scores.shape[0]))
                found, seen = 0, set()
                for score, i in zip(top.values.tolist(), ids[top.indices].tolist()):
                    if i in seen:
                        continue
                    seen.add(i)
                    out_scores[row, found], out_ids[row, found] = score, i
                    found += 1
                    if found == k:
                        break
            return out_scores, out_ids
