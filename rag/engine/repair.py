"""Exact repair of a blended cache while the answer decodes.

After a blend the K/V of every token past the first chunk are approximate: a chunk's cached
K/V never saw the chunks before it, a recomputed token read stale K/V, and the question and
the answer tokens decoded so far read both. A repair job recomputes those slots in position
order, a slice at a time between decode steps. Each slice is an ordinary causal forward over
slots whose prefix is already exact, so its own K/V come out exact too; once the job reaches
the slot being decoded the cache is what a full prefill of the prompt plus the answer so far
would hold, and every later step reads only exact K/V.

The job owns the token ids of the slots it may repair (`ids`): the prompt's, then each answer
token the caller appends once its K/V are in the cache. It knows nothing of decoding, so a
batch scheduler can run it between its own steps.
"""

from __future__ import annotations

import torch

from rag.engine.prompt import Prompt
from rag.model.kv_cache import KVCache
from rag.model.transformer import Transformer


class RepairJob:
    """Recomputes `cache` slots [frontier, len(ids)) in slices, in position order.

    `ids` are the tokens of slots [0, len(ids)): the ones before `frontier` must already hold
    exact K/V (the header and the first chunk, computed where they sit).
    """

    def __init__(
        self,
        model: Transformer,
        cache: KVCache,
        ids: list[int],
        frontier: int,
    ):
        self.model, self.cache = model, cache
        self.ids = list(ids)
        self.frontier = frontier
        self.repaired = 0  # slots recomputed so far

    def append(self, token: int) -> None:
        """The next slot's token (its K/V now in the cache, computed over a stale prefix)."""
        self.ids.append(token)

    @property
    def done(self) -> bool:
        return self.frontier >= len(self.ids)

    @torch.inference_mode()
    def step(self, max_tokens: int) -> bool:
        """Recompute the next `max_tokens` stale slots (at most up to the last one known);
        True once every known slot is exact."""
        end = min(len(self.ids), self.frontier + max(0, max_tokens))
        if end > self.frontier:
            start, model = self.frontier, self.model
            ids = torch.tensor([self.ids[start:end]], device=model.device)
            # logits_for=slice(0, 0): only the K/V are wanted, no output rows.
            model.run(ids, model.context(self.cache, start, end - start), outputs=slice(0, 0))
            self.repaired += end - start
            self.frontier = end
        return self.done


def blend_repair(model: Transformer, cache: KVCache, prompt: Prompt) -> RepairJob | None:
    """The job that makes a blended (or reused) prompt's cache exact: everything after the
    first chunk, which sits where its K/V were computed. None with nothing stale (one chunk)."""
    if len(prompt.chunks) < 2:
        return None
    return RepairJob(model, cache, prompt.ids(), prompt.chunk_starts[1])
