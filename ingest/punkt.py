"""NLTK's Punkt sentence splitter (English), an alternative to the rules; lines still break."""

from __future__ import annotations

from pathlib import Path

from ingest.chunkers.base import Span, strip_span


def _punkt_data_dir() -> str:
    # llama-index-core ships the punkt_tab tables: no download needed.
    import llama_index.core

    return str(Path(llama_index.core.__file__).parent / "_static" / "nltk_cache")


class PunktSplitter:
    name = "punkt"

    def __init__(self, language: str = "english"):
        import nltk
        from nltk.tokenize.punkt import PunktTokenizer

        if _punkt_data_dir() not in nltk.data.path:
            nltk.data.path.insert(0, _punkt_data_dir())
        self.tokenizer = PunktTokenizer(language)

    def split(self, text: str) -> list[Span]:
        spans: list[Span] = []
        pos = 0
        for line in text.split("\n"):
            for s, e in self.tokenizer.span_tokenize(line):
                s, e = strip_span(text, pos + s, pos + e)
                if e > s:
                    spans.append((s, e))
            pos += len(line) + 1
        return spans
