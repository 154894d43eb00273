"""Top-k chunks for a question: the FAISS vector index alone (dense), or fused with BM25 (hybrid).

Hybrid ranks by reciprocal rank fusion: each chunk scores sum(1 / (60 + rank)) over the
two rankings it appears in. RRF needs no score calibration between cosine and BM25, and
its constant is the literature's (Cormack et al., 2009), not tuned on our benchmark.
Measured on Chroma's benchmark in eval/RESULTS_retrieval.md.
"""

from __future__ import annotations

import numpy as np

from rag.index.lexical_index import LexicalIndex
from rag.index.vector_index import VectorIndex

RRF_K = 60
CANDIDATES = 50  # how deep each ranking goes into the fusion


def reciprocal_rank_fusion(rankings: list[list[int]], k: int) -> list[tuple[int, float]]:
    """Top-k (id, fused score); ties go to the smaller id, as in VectorIndex.search."""
    fused: dict[int, float] = {}
    for ranking in rankings:
        for rank, cid in enumerate(ranking):
            fused[cid] = fused.get(cid, 0.0) + 1.0 / (RRF_K + rank + 1)
    return sorted(fused.items(), key=lambda h: (-h[1], h[0]))[:k]


class Retriever:
    def __init__(self, vectors: VectorIndex, lexical: LexicalIndex | None = None):
        self.vectors = vectors
        self.lexical = lexical

    def search(self, vector: np.ndarray, text: str, k: int) -> list[tuple[int, float]]:
        """Top-k (chunk id, score): cosine for dense, the fused score for hybrid."""
        if self.lexical is None:
            return self.vectors.search(vector, k)
        n = max(CANDIDATES, k)
        dense = [cid for cid, _ in self.vectors.search(vector, n)]
        lexical = [cid for cid, _ in self.lexical.search(text, n)]
        return reciprocal_rank_fusion([dense, lexical], k)
