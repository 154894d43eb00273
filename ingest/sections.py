"""Long documents in sections, so chunking and embedding hold one section at a time.

A 10 MB upload chunked and embedded in one piece held gigabytes (the tokenizer's offsets, the
chunker's scores, every embedding at once). Sections end at a paragraph break where one is
near the limit (else a line break, a sentence end, a space), so a chunk rarely straddles one;
documents under the limit are one section, chunked exactly as before.
"""

from __future__ import annotations

from collections.abc import Iterator

SECTION_CHARS = 64_000
_BREAKS = ("\n\n", "\n", ". ", " ")


def sections(text: str, max_chars: int = SECTION_CHARS) -> Iterator[tuple[int, int]]:
    """[start, end) spans covering `text` in order, each at most max_chars long."""
    start = 0
    while len(text) - start > max_chars:
        limit = start + max_chars
        end = limit
        for mark in _BREAKS:
            at = text.rfind(mark, start + max_chars // 2, limit)
            if at != -1:
                end = at + len(mark)
                break
        yield start, end
        start = end
    if start < len(text):
        yield start, len(text)
