"""Request K/V buffers: spares of different sizes are handed out by identity."""

from __future__ import annotations

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
