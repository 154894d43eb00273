"""Meta-Chunking with each gap's cost from two signals: the LLM's perplexity and embedding distance.

Per gap, the jump in sentence perplexity into the next sentence (ingest.chunkers.meta_ppl)
and the cosine distance between the two sentences' MiniLM vectors (ingest.chunkers.semantic)
are standardized over the text and added. The two are nearly uncorrelated per gap, so each
can outvote the other's noise. Meta-chunks end where the fused score is in the text's top
decile, and the merge (ingest.chunkers.merge) orders its cuts by it. Measured against
meta-ppl and semantic on two benchmarks in eval/RESULTS_retrieval.md (not the default there).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ingest.chunkers.base import Span
from ingest.chunkers.merge import TokenCounter, merge_meta_chunks
from ingest.chunkers.meta_ppl import sentence_perplexities
from ingest.chunkers.semantic import sentence_distances
from ingest.sentences import SentenceSplitter, split_sentences
from rag.index.embedder import MAX_WORDPIECES


def standardize(x: np.ndarray) -> np.ndarray:
    sd = float(x.std())
    return (x - x.mean()) / (sd or 1.0)


def fused_gaps(ppl: Sequence[float], dist: np.ndarray, llm_weight: float) -> np.ndarray:
    """Each gap's split score: llm_weight * z(perplexity jump) + (1 - llm_weight) * z(distance)."""
    p = np.asarray(ppl, dtype=np.float64)
    jump = p[1:] - p[:-1]
    return llm_weight * standardize(jump) + (1.0 - llm_weight) * standardize(
        np.asarray(dist, dtype=np.float64)
    )


class FusedChunker:
    name = "meta-fused"

    def __init__(
        self,
        scorer,
        embedder,
        size: int = 200,
        llm_weight: float = 0.5,
        percentile: float = 90.0,
        max_tokens: int = MAX_WORDPIECES,
        splitter: SentenceSplitter | None = None,
    ):
        self.scorer = scorer
        self.embedder = embedder
        self.size = size
        self.llm_weight = llm_weight
        self.percentile = percentile
        self.max_tokens = max_tokens
        self.splitter = splitter

    def gaps(self, text: str, sentences: list[Span]) -> np.ndarray:
        ppl = sentence_perplexities(text, sentences, self.scorer)
        dist = sentence_distances(self.embedder, text, tuple(sentences))
        return fused_gaps(ppl, dist, self.llm_weight)

    def split(self, text: str) -> list[Span]:
        sentences = split_sentences(text, self.splitter)
        if len(sentences) < 2:
            return sentences
        gaps = self.gaps(text, sentences)
        cut = np.percentile(gaps, self.percentile)
        boundaries = [int(i) for i in np.nonzero(gaps > cut)[0]]
        counter = TokenCounter(self.embedder.tokenizer, text)
        return merge_meta_chunks(
            text,
            sentences,
            boundaries,
            counter,
            self.size,
            self.max_tokens,
            gaps.tolist() + [0.0],
        )
