"""BM25 over the chunk texts (bm25s), the lexical half of hybrid retrieval.

Exact terms (names, numbers, rare words) are what a small embedder blurs and what
BM25 keys on. Each index generation holds one, built from its docstore when the
ingestion commits (rag/index_store.py; ~0.13 ms a chunk), so serving only loads it.
"""

from __future__ import annotations

import logging
from pathlib import Path

import bm25s
import numpy as np
import Stemmer

logging.getLogger("bm25s").setLevel(
    logging.WARNING
)  # bm25s sets DEBUG: a line on every index build

# Chinese (and other CJK ideographs) has no spaces: each character is a term; elsewhere
# runs of two or more word characters, as bm25s does by default.
CJK = "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
TOKEN_PATTERN = f"[{CJK}]|[^\\W{CJK}]{{2,}}"

_stemmer = Stemmer.Stemmer("english")
PARAMS = "params.index.json"  # one of the files BM25.save writes


def terms(texts: list[str]) -> list[list[str]]:
    """Lower-cased, English stop words dropped, Snowball-stemmed terms of each text."""
    return bm25s.tokenize(
        texts,
        token_pattern=TOKEN_PATTERN,
        stopwords="en",
        stemmer=_stemmer,
        return_ids=False,
        show_progress=False,
    )


class LexicalIndex:
    def __init__(self, ids: list[int], texts: list[str]):
        self.ids = list(ids)
        self.bm25: bm25s.BM25 | None = (
            None  # None: no chunk has a term ("0.1.0"), nothing can match
        )
        corpus = terms(texts)
        if any(corpus):
            self.bm25 = bm25s.BM25()
            self.bm25.index(corpus, show_progress=False)

    def __len__(self) -> int:
        return len(self.ids)

    def save(self, folder: Path) -> None:
        folder.mkdir()
        np.save(folder / "ids.npy", np.asarray(self.ids, dtype=np.int64))
        if self.bm25 is not None:
            self.bm25.save(folder, show_progress=False)

    @classmethod
    def load(cls, folder: Path) -> LexicalIndex:
        index = cls([], [])
        index.ids = np.load(folder / "ids.npy").tolist()
        if (folder / PARAMS).exists():
            index.bm25 = bm25s.BM25.load(folder, show_progress=False)
        return index

    def search(self, query: str, n: int) -> list[tuple[int, float]]:
        """Up to n (id, score), best first; only chunks that share a term with the query."""
        if self.bm25 is None or n <= 0:
            return []
        rows, scores = self.bm25.retrieve(
            terms([query]), k=min(n, len(self.ids)), show_progress=False
        )
        return [
            (self.ids[int(r)], float(s)) for r, s in zip(rows[0], scores[0], strict=True) if s > 0
        ]
