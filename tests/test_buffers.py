"""Request K/V buffers: spares of different sizes are handed out by identity."""

from __future__ import annotations

import torch

from rag.config import SYSTEM_PROMPT
from rag.engine.buffers import BufferPool
from rag.engine.engine import Engine
from rag.engine.request import GenerationParams, Request
from tests.test_decode import _prompt


def test_two_spares_of_different_sizes_are_lent_and_returned(lm32):
    pool = BufferPool(lm32.model, 4096)
    small, large = pool.take(200), pool.take(1100)  # 256 and 1280 slots underneath
    pool.give_back(small)
    pool.give_back(large)
    # the larger spare fits only the second request; taking it must not compare the buffers
    got = pool.take(1000)
    assert got.k.data_ptr() == large.k.data_ptr() and got.max_len == 1000
    assert pool.take(100).k.data_ptr() == small.k.data_ptr()


def test_a_buffer_taken_under_inference_mode_comes_back(lm32):
    """Views made under inference_mode have no `_base`: the pool must still find the buffer
    (the one-request engine takes its buffer inside the prefill's inference_mode)."""
    pool = BufferPool(lm32.model, 4096, budget_bytes=4 * 512 * BufferPool(lm32.model, 1).slot_bytes)
    for _ in range(8):  # eight requests in turn, each buffer half the budget
        with torch.inference_mode():
            buf = pool.take(1000)
        pool.give_back(buf)
        assert pool._held == 0
    assert pool.used_bytes <= pool.budget


def test_the_one_request_engine_gives_every_buffer_back(lm32, paragraphs):
    engine = Engine(lm32, SYSTEM_PROMPT, kv_budget_mb=64)
    prompt = _prompt(engine, paragraphs, "How tall is the lighthouse?", 300)
    for mode in ("blend", "full", "blend"):
        engine.generate(Request(mode=mode, params=GenerationParams(max_new_tokens=4)), prompt)
        assert engine.buffers._held == 0


def test_a_buffer_never_given_back_frees_its_share_of_the_budget(lm32):
    pool = BufferPool(lm32.model, 4096, budget_bytes=600 * BufferPool(lm32.model, 1).slot_bytes)
    buf = pool.take(500)
    assert pool._held > 0
    del buf  # a caller that never gives it back
    assert pool._held == 0
    pool.give_back(pool.take(500))  # and the budget is whole again
