"""cache.entry, cache.keys and cache.serde: exact round trips and every rejection."""

from __future__ import annotations

import struct

import pytest
import torch

from cache.entry import ChunkKV
from cache.keys import chunk_key, fingerprint_tensors
from cache.serde import CorruptEntry, dumps, loads, peek_header

FP = "model-fp-1"
# Zero-copy loads of immutable bytes make torch warn (once); expected, see cache.serde.
pytestmark = pytest.mark.filterwarnings("ignore:The given buffer is not writable")


def make_entry(dtype=torch.bfloat16, shape=(2, 3, 16, 8), seed=0, base=5) -> ChunkKV:
    g = torch.Generator().manual_seed(seed)
    return ChunkKV(
        torch.randn(shape, generator=g).to(dtype), torch.randn(shape, generator=g).to(dtype), base
    )


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (
        a.dtype == b.dtype
        and a.shape == b.shape
        and torch.equal(a.view(torch.int16), b.view(torch.int16))
    )


# -- entry ---------------------------------------------------------------------


def test_entry_properties():
    e = make_entry()
    assert (e.n_layers, e.n_kv_heads, e.n_tokens, e.head_dim) == (2, 3, 16, 8)
    assert e.nbytes == 2 * 2 * 3 * 16 * 8 * 2
    assert e.to("cpu") is e


@pytest.mark.parametrize(
    "k, v",
    [
        (
            torch.zeros(2, 3, 4, 8, dtype=torch.float32),
            torch.zeros(2, 3, 4, 8, dtype=torch.float32),
        ),
        (
            torch.zeros(2, 3, 4, 8, dtype=torch.bfloat16),
            torch.zeros(2, 3, 5, 8, dtype=torch.bfloat16),
        ),
        (
            torch.zeros(2, 3, 4, 8, dtype=torch.bfloat16),
            torch.zeros(2, 3, 4, 8, dtype=torch.float16),
        ),
        (torch.zeros(3, 4, 8, dtype=torch.bfloat16), torch.zeros(3, 4, 8, dtype=torch.bfloat16)),
    ],
)
def test_entry_rejects_bad_tensors(k, v):
    with pytest.raises(ValueError):
        ChunkKV(k, v, 0)


# -- serde round trips ---------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_round_trip_exact(dtype):
    e = make_entry(dtype)
    back = loads(dumps(e, FP), FP)
    assert same_bits(back.k, e.k) and same_bits(back.v, e.v)
    assert back.base_position == 5 and back.dtype == dtype


def test_round_trip_non_contiguous_input():
    e = make_entry()
    t = ChunkKV(e.k.transpose(1, 2).contiguous().transpose(1, 2), e.v, 0)
    assert not t.k.is_contiguous()
    assert same_bits(loads(dumps(t, FP), FP).k, e.k)


def test_round_trip_writable_buffer_and_memoryview():
    e = make_entry()
    data = bytearray(dumps(e, FP))
    assert same_bits(loads(data, FP).k, e.k)
    assert same_bits(loads(memoryview(data), FP).v, e.v)


def test_loads_without_expected_fingerprint_accepts_any_model():
    e = make_entry()
    assert same_bits(loads(dumps(e, "other"), None).k, e.k)


def test_realistic_size_round_trip():
    """SmolLM2-135M, 512 tokens: 30 layers x 3 heads x 512 x 64, bf16 = 11.8 MB."""
    e = make_entry(shape=(30, 3, 512, 64))
    assert e.nbytes == 11_796_480
    data = dumps(e, FP)
    assert len(data) - e.nbytes <= 128  # header stays small
    back = loads(data, FP)
    assert same_bits(back.k, e.k) and same_bits(back.v, e.v)
    # Zero copy: the tensors view the value's own memory.
    assert back.k.data_ptr() != e.k.data_ptr()


def test_header_fields():
    h = peek_header(dumps(make_entry(), FP))
    assert h["magic"] == b"KVRG" and (h["n_layers"], h["n_tokens"]) == (2, 16)
    assert h["header_len"] % 64 == 0 and h["base_position"] == 5


# -- serde rejections ----------------------------------------------------------


def corrupt_reason(data, fp=FP) -> str:
    with pytest.raises(CorruptEntry) as info:
        loads(data, fp)
    assert isinstance(info.value, ValueError)
    return info.value.reason


def test_rejects_flipped_payload_bit():
    data = bytearray(dumps(make_entry(), FP))
    data[-1] ^= 0x01
    assert "checksum" in corrupt_reason(data)
    data = bytearray(dumps(make_entry(), FP))
    data[200] ^= 0x80  # inside K
    assert "checksum" in corrupt_reason(data)


def test_rejects_flipped_header_field():
    data = bytearray(dumps(make_entry(), FP))
    struct.pack_into("<q", data, 28, 6)  # base_position 5 -> 6
    assert "checksum" in corrupt_reason(data)


@pytest.mark.parametrize("cut", [0, 10, 60, 100, 1])
def test_rejects_truncation(cut):
    data = dumps(make_entry(), FP)
    truncated = data[:cut] if cut < 60 else data[:-cut]
    assert "truncated" in corrupt_reason(truncated)


def test_rejects_trailing_bytes():
    assert "trailing" in corrupt_reason(dumps(make_entry(), FP) + b"\0")


def test_rejects_other_models_fingerprint():
    assert "expected" in corrupt_reason(dumps(make_entry(), "someone-else"))


def test_rejects_garbage_and_wrong_shape():
    assert "magic" in corrupt_reason(b"x" * 1000)
    data = bytearray(dumps(make_entry(), FP))
    struct.pack_into("<I", data, 20, 17)  # n_tokens 16 -> 17: payload no longer matches
    assert "payload" in corrupt_reason(data)
    data = bytearray(dumps(make_entry(), FP))
    data[8] = 9  # dtype code
    assert "dtype" in corrupt_reason(data)


# -- keys ----------------------------------------------------------------------


def test_chunk_key_is_content_address():
    k = chunk_key("m", "h", [1, 2, 3], 1)
    assert k == chunk_key("m", "h", (1, 2, 3), 1)
    assert len(k) == 40 and int(k, 16) >= 0
    variants = {
        chunk_key("m2", "h", [1, 2, 3], 1),
        chunk_key("m", "h2", [1, 2, 3], 1),
        chunk_key("m", "h", [1, 2, 4], 1),
        chunk_key("m", "h", [1, 2, 3, 0], 1),
        chunk_key("m", "h", [1, 2, 3], 2),
        chunk_key("mh", "", [1, 2, 3], 1),  # field boundaries are unambiguous
    }
    assert k not in variants and len(variants) == 6


def test_fingerprint_tensors_tracks_values_dtype_shape_names():
    w = {
        "a.weight": torch.arange(10_000, dtype=torch.float32).reshape(100, 100),
        "b": torch.ones(3),
    }
    fp = fingerprint_tensors(w)
    assert fp == fingerprint_tensors(list(reversed(list(w.items()))))  # order-independent
    assert fp != fingerprint_tensors({**w, "b": torch.ones(3) * 2})
    assert fp != fingerprint_tensors({**w, "b": torch.ones(3, dtype=torch.bfloat16)})
    assert fp != fingerprint_tensors({**w, "b": torch.ones(1, 3)})
    assert fp != fingerprint_tensors({"c": w["a.weight"], "b": w["b"]})
    big = torch.zeros(5_000_000, dtype=torch.bfloat16)  # sampled, not fully hashed
    fp_big = fingerprint_tensors({"x": big})
    big[-1] = 1.0  # the last element is always sampled
    assert fingerprint_tensors({"x": big}) != fp_big


def test_value_names_its_key_and_a_value_under_another_key_is_corrupt():
    e = make_entry()
    data = dumps(e, FP, "a" * 40)
    assert peek_header(data)["version"] == 3 and peek_header(data)["key_len"] == 40
    assert same_bits(loads(data, FP, expected_key="a" * 40).k, e.k)
    with pytest.raises(CorruptEntry, match="written under key"):
        loads(data, FP, expected_key="b" * 40)
    # The key is checksummed: editing it in place is caught as well.
    forged = bytearray(data)
    at = forged.index(b"a" * 40)
    forged[at : at + 40] = b"b" * 40
    with pytest.raises(CorruptEntry, match="checksum"):
        loads(forged, FP, expected_key="b" * 40)
