"""Request K/V buffers: spares of different sizes are handed out by identity."""

from __future__ import annotations

import torch

from rag.engine.buffers import BufferPool


def test_two_spares_of_different_sizes_are_lent_and_returned(lm32):
    pool = BufferPool(lm32.model, 4096)
    small, large = pool.take(200), pool.take(1100)  # 256 and 1280 slots underneath
    pool.give_back(small)
    pool.give_back(large)
    # the larger spare fits only the second request; taking it must not compare the buffers
    got = pool.take(1000)
    assert got.k.data_ptr() == large.k.data_ptr() and got.max_len == 1000
    assert pool.take(100).k.data_ptr() == small.k.data_ptr()


def test_buffers_taken_under_inference_mode_come_back(lm32):
    """Requests take buffers inside inference mode, where a view has no `_base`: each one
    given back must free its bytes, or a budgeted pool runs dry after a few requests."""
    budget = 3 * 256 * BufferPool(lm32.model, 4096).slot_bytes
    pool = BufferPool(lm32.model, 4096, budget_bytes=budget)
    with torch.inference_mode():
        for n in (200, 250, 100, 200) * 3:
            a, b = pool.take(n), pool.take(n)
            pool.give_back(a)
            pool.give_back(b)
    assert pool._held == 0 and pool.used_bytes <= budget
    reused = pool.take(200)  # ... and the next taker may write it outside inference mode
    reused.k[0, 0, 0, 0] = 1.0
