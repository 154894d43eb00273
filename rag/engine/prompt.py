"""Prompt layout: [header][chunk 1]..[chunk k][preface + question + assistant start].

The header (system prompt and the start of the user turn) is a true prefix, the
same for every request, so its K/V is computed once. Each chunk's tokens are
its own text plus a separator, tokenized alone, so its K/V depends on nothing
but its content and the header it was computed behind. A conversation's earlier turns and
the client's instructions (the preface) go in the footer, so they never touch a chunk's K/V.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

from rag.model.tokenizer import ChatTokenizer

# Bump when the layout changes (preamble, separators, framing): part of every KV key.
LAYOUT_VERSION = 1
PREAMBLE = "Documents:\n\n"
CHUNK_SEPARATOR = "\n\n"
QUESTION_PREFIX = "Question: "


@dataclass
class Prompt:
    header: list[int]
    chunks: list[list[int]]
    footer: list[int]
    chunk_starts: list[int] = field(init=False)  # absolute position of each chunk's first token

    def __post_init__(self) -> None:
        pos = len(self.header)
        self.chunk_starts = []
        for c in self.chunks:
            self.chunk_starts.append(pos)
            pos += len(c)

    @property
    def context_end(self) -> int:
        """Position of the first footer token."""
        return len(self.header) + sum(len(c) for c in self.chunks)

    def __len__(self) -> int:
        return self.context_end + len(self.footer)

    def ids(self) -> list[int]:
        out = list(self.header)
        for c in self.chunks:
            out += c
        return out + self.footer


def ids_fingerprint(ids: list[int]) -> str:
    return hashlib.blake2b(repr(ids).encode(), digest_size=16).hexdigest()


class PromptBuilder:
    def __init__(self, tokenizer: ChatTokenizer, system_prompt: str):
        self.tokenizer = tokenizer
        self.header = tokenizer.header_ids(system_prompt, PREAMBLE)
        self.header_fingerprint = ids_fingerprint(self.header)
        self.system_prompt = system_prompt

    def chunk_ids(self, text: str) -> list[int]:
        return self.tokenizer.encode_text(text.strip() + CHUNK_SEPARATOR)

    def build(self, chunk_texts: list[str], question: str, preface: str = "") -> Prompt:
        footer = self.tokenizer.footer_ids(
            self.system_prompt, preface + QUESTION_PREFIX + question.strip()
        )
        return Prompt(list(self.header), [self.chunk_ids(t) for t in chunk_texts], footer)
