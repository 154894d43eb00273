"""A cached chunk that cannot be used is computed instead: never an exception out of the blend.

The real model; the oracle is the same blend told that chunk has no cache.
"""

from __future__ import annotations

import pytest
import torch

from cache.entry import ChunkKV
from rag.config import SYSTEM_PROMPT
from rag.engine.blend import blend_prefill
from rag.engine.engine import Engine
from tests.test_blend import QUESTION, TEXT

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def engine(lm32):
    return Engine(lm32, SYSTEM_PROMPT)


def _logits(engine, prompt, kvs):
    cache = engine.new_cache(len(prompt))
    try:
        return blend_prefill(engine.model, cache, prompt, kvs, 0.15).logits
    finally:
        engine.release(cache)


def test_a_chunk_that_fails_to_stitch_is_computed(engine):
    prompt = engine.prompts.build(list(TEXT), QUESTION)
    kvs = [engine.chunk_kv(c) for c in prompt.chunks]
    good = kvs[1]
    # Intact tensors of the wrong head size: the re-rotation cannot apply them.
    bad = ChunkKV(good.k[..., :32].clone(), good.v[..., :32].clone(), good.base_position)
    got = _logits(engine, prompt, [kvs[0], bad, kvs[2]])
    oracle = _logits(engine, prompt, [kvs[0], None, kvs[2]])
    torch.testing.assert_close(got, oracle)
