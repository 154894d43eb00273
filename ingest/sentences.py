"""Sentence splitting with exact character offsets (English and Chinese), pluggable.

Every sentence is a span [start, end) of the document with no leading or
trailing whitespace; the gaps between sentences hold only whitespace, so any run
of consecutive sentences is itself an exact span of the text. Line breaks end a
sentence too: in Markdown, tables, lists and headings a line is a unit.
"""

from __future__ import annotations

import re
from typing import Protocol

from ingest.chunkers.base import Span, strip_span

# Chinese (and other full-width) sentence ends need no following space.
CJK_ENDS = "。！？；"
# Western ends need whitespace (or the end of text) after them.
WEST_ENDS = ".!?…"
CLOSERS = "\"'”’)]}»」』）】"

# Words that end with a period without ending the sentence.
_ABBREVIATIONS = """
mr mrs ms dr prof sr jr st mt rev gen col lt sgt capt gov sen rep hon messrs mme mlle
e.g i.e cf vs viz al approx ca incl dept univ assn bros inc ltd co corp plc llc
jan feb mar apr jun jul aug sep sept oct nov dec
u.s u.k u.n e.u a.k.a ph.d m.d b.a m.a b.sc d.c
"""
ABBREVIATIONS = frozenset(_ABBREVIATIONS.split())
# These are abbreviations only when a number follows ("No. 5", "Fig. 3", "pp. 12").
_NUMBER_ABBREVIATIONS = "no nos fig figs eq eqs vol vols p pp ref refs art sec ch tab"
NUMBER_ABBREVIATIONS = frozenset(_NUMBER_ABBREVIATIONS.split())

_END = re.compile(
    rf"[{re.escape(CJK_ENDS)}]+[{re.escape(CLOSERS)}]*"
    rf"|[{re.escape(WEST_ENDS)}]+[{re.escape(CLOSERS)}]*(?=\s|$)"
    r"|\n"
)
_WORD_BEFORE = re.compile(r"([\w.\-]+)$")
_DOTTED_NUMBER = re.compile(r"\d+(\.\d+)+")
_NUMBER_OR_ROMAN = re.compile(r"\d+|[ivxlcdm]+|[a-z]", re.IGNORECASE)


class SentenceSplitter(Protocol):
    def split(self, text: str) -> list[Span]:
        """Sentences as spans, in order, stripped of whitespace."""
        ...


class RuleSentenceSplitter:
    """Rules for English and Chinese: no model, no download, exact offsets, ~10 MB/s."""

    name = "rules"

    def split(self, text: str) -> list[Span]:
        spans: list[Span] = []
        start = 0
        for m in _END.finditer(text):
            end = m.end()
            if (
                m.group() != "\n"
                and m.group()[0] == "."
                and not self._ends_sentence(text, start, m.start())
            ):
                continue
            s, e = strip_span(text, start, end)
            if e > s:
                spans.append((s, e))
            start = end
        s, e = strip_span(text, start, len(text))
        if e > s:
            spans.append((s, e))
        return spans

    @staticmethod
    def _ends_sentence(text: str, sent_start: int, dot: int) -> bool:
        """Is the period at `dot` a sentence end? (Abbreviations, initials, 5.3., enumerations.)"""
        m = _WORD_BEFORE.search(text, max(sent_start, dot - 40), dot)
        if not m:
            return True
        word = m.group(1).lower().strip("-")
        bare = word.rstrip(".")
        if bare in ABBREVIATIONS:
            return False
        if bare in NUMBER_ABBREVIATIONS:
            nxt = text[dot + 1 : dot + 4].lstrip()
            return not (nxt[:1].isdigit())
        if len(bare) == 1 and text[m.start()].isupper():
            return False  # an initial: "J. Smith", "P. falciparum"
        if _DOTTED_NUMBER.fullmatch(bare):
            return False  # a section number such as "5.3."
        # "14. debt ..." or "iv. results": a list marker at the very start of a sentence.
        leading = text[sent_start : m.start()].strip()
        return not (not leading and _NUMBER_OR_ROMAN.fullmatch(bare))


def make_splitter(name: str = "rules") -> SentenceSplitter:
    if name == "rules":
        return RuleSentenceSplitter()
    if name == "punkt":
        from ingest.punkt import PunktSplitter

        return PunktSplitter()
    raise ValueError(f"unknown sentence splitter {name!r}; choose rules or punkt")


def split_sentences(text: str, splitter: SentenceSplitter | None = None) -> list[Span]:
    return (splitter or RuleSentenceSplitter()).split(text)
