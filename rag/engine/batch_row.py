"""One request's row in a batched decode step."""

from __future__ import annotations

from dataclasses import dataclass

from rag.model.kv_cache import KVCache


@dataclass
class BatchRow:
    token: int  # the input token
    cache: KVCache  # the request's own K/V buffer
    pos: int  # the slot (and position) the token goes to
    base: int  # where the request's prompt ends: slots past it are its generated tail
