"""Character-level retrieval metrics of Chroma's chunking report: recall, precision,
precision_omega, IoU.

For one question with excerpts e (character ranges in one corpus) and retrieved
chunks r: recall = |e ∩ r| / |e|; precision = |e ∩ r| / |r|, where |r| adds up
every retrieved chunk's length (overlaps and other corpora included);
IoU = |e ∩ r| / (|r| + |e| - |e ∩ r|); precision_omega is the precision of the
best retrieval at full recall: every chunk that touches an excerpt, taken once.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

Range = tuple[int, int]


def union(ranges: Iterable[Range]) -> list[Range]:
    """Sorted, disjoint, non-empty ranges covering the same characters."""
    out: list[list[int]] = []
    for a, b in sorted(r for r in ranges if r[1] > r[0]):
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return [(a, b) for a, b in out]


def total(ranges: Iterable[Range]) -> int:
    return sum(b - a for a, b in ranges)


def intersect(xs: Sequence[Range], ys: Sequence[Range]) -> list[Range]:
    """Intersection of two unions (each sorted and disjoint)."""
    out, i, j = [], 0, 0
    while i < len(xs) and j < len(ys):
        a, b = max(xs[i][0], ys[j][0]), min(xs[i][1], ys[j][1])
        if a < b:
            out.append((a, b))
        if xs[i][1] < ys[j][1]:
            i += 1
        else:
            j += 1
    return out


@dataclass(frozen=True)
class Located:
    """A chunk or excerpt: a character range of one corpus."""

    corpus: str
    start: int
    end: int

    def __len__(self) -> int:
        return self.end - self.start


@dataclass
class QuestionScores:
    recall: float
    precision: float
    iou: float
    precision_omega: float


def score_question(
    excerpts: Sequence[Located],
    retrieved: Sequence[Located],
    touching: Sequence[Located] | None = None,
) -> QuestionScores:
    """Scores of one question; `touching` = every chunk of the collection that overlaps an
    excerpt."""
    corpus = excerpts[0].corpus
    e = union((x.start, x.end) for x in excerpts)
    e_len = total(e)
    r_same = union((c.start, c.end) for c in retrieved if c.corpus == corpus)
    hit = total(intersect(e, r_same))
    r_len = sum(len(c) for c in retrieved)
    recall = hit / e_len if e_len else 0.0
    precision = hit / r_len if r_len else 0.0
    iou_den = r_len + e_len - hit
    iou = hit / iou_den if iou_den else 0.0
    omega = 0.0
    if touching:
        t = union((c.start, c.end) for c in touching if c.corpus == corpus)
        num = total(intersect(e, t))
        den = total(union(list(t) + list(e)))
        omega = num / den if den else 0.0
    return QuestionScores(recall, precision, iou, omega)


class ChunkLocator:
    """Finds the chunks of a collection that overlap a range (per corpus, sorted by start)."""

    def __init__(self, chunks: Sequence[Located]):
        self.by_corpus: dict[str, list[Located]] = {}
        for c in chunks:
            self.by_corpus.setdefault(c.corpus, []).append(c)
        for v in self.by_corpus.values():
            v.sort(key=lambda c: (c.start, c.end))
        self.starts = {k: [c.start for c in v] for k, v in self.by_corpus.items()}
        # Chunks may overlap (windows with overlap): no chunk starts before start - longest.
        self.longest = {k: max(len(c) for c in v) for k, v in self.by_corpus.items()}

    def touching(self, x: Located) -> list[Located]:
        chunks = self.by_corpus.get(x.corpus, [])
        if not chunks:
            return []
        lo = bisect_left(self.starts[x.corpus], x.start - self.longest[x.corpus])
        out = []
        for c in chunks[lo:]:
            if c.start >= x.end:
                break
            if c.end > x.start:
                out.append(c)
        return out


def mean_scores(scores: Sequence[QuestionScores]) -> dict[str, float]:
    n = max(1, len(scores))
    return {
        "recall": sum(s.recall for s in scores) / n,
        "precision": sum(s.precision for s in scores) / n,
        "precision_omega": sum(s.precision_omega for s in scores) / n,
        "iou": sum(s.iou for s in scores) / n,
    }
