"""Metrics of `kvrag eval qa`: SQuAD answer scores, retrieval rank, agreement with full prefill.

Answer scores follow the SQuAD v1.1 evaluation script: lower case, punctuation and the articles
a/an/the removed, whitespace collapsed; EM and token F1 take the best over the gold answers.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Sequence

import torch

_PUNCT = set(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(s: str) -> str:
    s = "".join(ch for ch in s.lower() if ch not in _PUNCT)
    return " ".join(_ARTICLES.sub(" ", s).split())


def token_f1(prediction: str, reference: str) -> float:
    """Token F1 of two strings after normalization (both empty: 1.0, one empty: 0.0)."""
    p, r = normalize_answer(prediction).split(), normalize_answer(reference).split()
    if not p or not r:
        return float(p == r)
    common = sum((Counter(p) & Counter(r)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(p), common / len(r)
    return 2 * precision * recall / (precision + recall)


def exact_match(prediction: str, reference: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(reference))


def best_em(prediction: str, golds: Sequence[str]) -> float:
    return max((exact_match(prediction, g) for g in golds), default=0.0)


def best_f1(prediction: str, golds: Sequence[str]) -> float:
    return max((token_f1(prediction, g) for g in golds), default=0.0)


def identical(answer: str, reference: str) -> bool:
    """The same answer as the reference, up to surrounding whitespace."""
    return answer.strip() == reference.strip()


def first_difference(ids: Sequence[int], ref: Sequence[int]) -> int | None:
    """The first answer token position where `ids` and `ref` differ (None: the same tokens)."""
    for i, (a, b) in enumerate(zip(ids, ref, strict=False)):
        if a != b:
            return i
    return None if len(ids) == len(ref) else min(len(ids), len(ref))


def hit_rank(
    spans: Sequence[tuple[str, int, int]], doc_id: str, answer_starts: Sequence[int]
) -> int | None:
    """1-based rank of the first retrieved chunk (doc_id, start, end) of the right document that
    covers a gold answer's start; None if none does."""
    for rank, (doc, start, end) in enumerate(spans, 1):
        if doc == doc_id and any(start <= a < end for a in answer_starts):
            return rank
    return None


def hit_at_k(ranks: Sequence[int | None]) -> float:
    return sum(r is not None for r in ranks) / len(ranks) if ranks else 0.0


def mrr(ranks: Sequence[int | None]) -> float:
    return sum(1.0 / r for r in ranks if r is not None) / len(ranks) if ranks else 0.0


def kl_top1(ref: torch.Tensor, got: torch.Tensor) -> tuple[float, float]:
    """From next-token logits [n, V] at the same positions: mean KL(ref || got) and the share of
    positions whose argmax agrees."""
    lr, lg = ref.float().log_softmax(-1), got.float().log_softmax(-1)
    kl = max(0.0, (lr.exp() * (lr - lg)).sum(-1).mean().item())  # no -0.0 from rounding
    return kl, (ref.argmax(-1) == got.argmax(-1)).float().mean().item()
