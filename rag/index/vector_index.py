"""FAISS inner-product index with stable int64 ids (IndexIDMap2 over IndexFlatIP).

IndexIDMap2 supports removal by id; ids are chunk ids from the docstore's counter,
which only grows, so an id is never reused for other content.
"""

from __future__ import annotations

from pathlib import Path

import faiss
import numpy as np


class VectorIndex:
    def __init__(self, dim: int, index: faiss.Index | None = None):
        self.dim = dim
        self.index = index if index is not None else faiss.IndexIDMap2(faiss.IndexFlatIP(dim))

    def __len__(self) -> int:
        return self.index.ntotal

    def add(self, ids: list[int], vectors: np.ndarray) -> None:
        if len(ids) == 0:
            return
        if vectors.shape != (len(ids), self.dim):
            raise ValueError(
                f"expected vectors of shape ({len(ids)}, {self.dim}), got {vectors.shape}"
            )
        self.index.add_with_ids(
            np.ascontiguousarray(vectors, dtype=np.float32), np.asarray(ids, dtype=np.int64)
        )

    def remove(self, ids: list[int]) -> int:
        if not ids:
            return 0
        return int(self.index.remove_ids(np.asarray(ids, dtype=np.int64)))

    def search(self, query: np.ndarray, k: int) -> list[tuple[int, float]]:
        """Top-k (id, score); ties broken by the smaller id (earlier chunk) for determinism."""
        if len(self) == 0 or k <= 0:
            return []
        # Ask for a few more than k so exact ties at the cut can be ordered by id.
        n = min(len(self), k + 8)
        scores, ids = self.index.search(np.asarray(query, dtype=np.float32).reshape(1, -1), n)
        hits = [(int(i), float(s)) for i, s in zip(ids[0], scores[0], strict=True) if i >= 0]
        hits.sort(key=lambda h: (-round(h[1], 6), h[0]))
        return hits[:k]

    def save(self, path: Path) -> None:
        faiss.write_index(self.index, str(path))

    @classmethod
    def load(cls, path: Path, dim: int) -> VectorIndex:
        if not path.exists():
            return cls(dim)
        index = faiss.read_index(str(path))
        if index.d != dim:
            raise ValueError(f"{path} holds {index.d}-d vectors, the embedder makes {dim}-d")
        return cls(dim, index)
