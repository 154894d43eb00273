"""One stored value per chunk: a small fixed header, then raw K bytes, then V bytes.

Layout (little-endian):

    offset  size  field
    0       4     magic b"KVRG"
    4       2     format version
    6       2     header_len (payload starts here; a multiple of 64)
    8       1     dtype code (1 = bfloat16, 2 = float16)
    9       3     reserved (zero)
    12      16    n_layers, n_kv_heads, n_tokens, head_dim (u32 each)
    28      8     base_position (i64)
    36      8     payload_len (u64) = 2 * numel * 2
    44      2     fingerprint length F
    46      2     key length N
    48      8     xxh3-64 of the header (all but these 8 bytes), then K, then V
    56      F     model fingerprint (utf-8)
    56+F    N     the key the value was written under (utf-8), zero padding up to header_len

The key inside the checksummed header is how a value proves it belongs where it was read
from: a value copied or swapped under another key (both intact) is corrupt there, not a hit.

Why this shape: header and payload travel as ONE value (one Redis SET, one file
rename) so no reader sees half an entry; the payload is raw tensor memory so
`loads` wraps it with `torch.frombuffer` without copying; xxh3 checks 12 MB in
~1.9 ms here against ~9 ms for zlib's crc32 (measured), which is what keeps a
Redis load within 80% of a raw GET.
"""

from __future__ import annotations

import math
import struct
import warnings

import torch
import xxhash

from cache.entry import ChunkKV

MAGIC = b"KVRG"
FORMAT_VERSION = 3  # 3: the key in the header
_FIXED = struct.Struct("<4sHHB3xIIIIqQHHQ")
_CRC_OFFSET = 48
_ALIGN = 64  # keeps the payload aligned in mmap'd / bytearray buffers

_DTYPE_CODES = {torch.bfloat16: 1, torch.float16: 2}
_CODE_DTYPES = {code: dtype for dtype, code in _DTYPE_CODES.items()}

assert _FIXED.size == _CRC_OFFSET + 8

# Values read from Redis arrive as immutable `bytes`; wrapping them without a
# copy is the point (ChunkKV documents that its tensors are read-only), so the
# "buffer is not writable" warning is expected and silenced.
warnings.filterwarnings("ignore", message="The given buffer is not writable", category=UserWarning)


class CorruptEntry(ValueError):
    """A stored value that must not be used: truncated, bad checksum, wrong model, ..."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def dumps(entry: ChunkKV, fingerprint: str, key: str = "") -> bytes:
    """Serialize `entry` (any device), stored under `key`, into one self-checking value."""
    k = entry.k.detach().to("cpu").contiguous()
    v = entry.v.detach().to("cpu").contiguous()
    fp, kb = fingerprint.encode("utf-8"), key.encode("utf-8")
    if len(fp) > 0xFFFF or len(kb) > 0xFFFF:
        raise ValueError("fingerprint or key longer than 65535 bytes")
    header_len = -(-(_FIXED.size + len(fp) + len(kb)) // _ALIGN) * _ALIGN
    payload_len = entry.nbytes
    n_layers, n_heads, n_tokens, head_dim = entry.shape
    header = bytearray(header_len)
    _FIXED.pack_into(
        header,
        0,
        MAGIC,
        FORMAT_VERSION,
        header_len,
        _DTYPE_CODES[entry.dtype],
        n_layers,
        n_heads,
        n_tokens,
        head_dim,
        entry.base_position,
        payload_len,
        len(fp),
        len(kb),
        0,
    )
    header[_FIXED.size : _FIXED.size + len(fp)] = fp
    header[_FIXED.size + len(fp) : _FIXED.size + len(fp) + len(kb)] = kb
    k_bytes, v_bytes = _byte_view(k), _byte_view(v)
    struct.pack_into("<Q", header, _CRC_OFFSET, _checksum(header, k_bytes, v_bytes))
    # One allocation + copy; the tensors' memory is read through views.
    return b"".join((header, k_bytes, v_bytes))


def loads(
    data: bytes | bytearray | memoryview,
    expected_fingerprint: str | None = None,
    expected_key: str | None = None,
) -> ChunkKV:
    """Parse and verify a value; the tensors are zero-copy views of `data` (on CPU).

    Raises CorruptEntry with the reason when the value must not be used.
    """
    mv = memoryview(data)
    if mv.format != "B" or mv.ndim != 1:
        mv = mv.cast("B")
    if len(mv) < _FIXED.size:
        raise CorruptEntry(f"truncated header: {len(mv)} bytes < {_FIXED.size}")
    (
        magic,
        version,
        header_len,
        dtype_code,
        n_layers,
        n_heads,
        n_tokens,
        head_dim,
        base_position,
        payload_len,
        fp_len,
        key_len,
        stored,
    ) = _FIXED.unpack_from(mv, 0)
    if magic != MAGIC:
        raise CorruptEntry(f"bad magic {magic!r}, not a kvrag chunk value")
    if version != FORMAT_VERSION:
        raise CorruptEntry(f"format version {version}, this reader knows {FORMAT_VERSION}")
    dtype = _CODE_DTYPES.get(dtype_code)
    if dtype is None:
        raise CorruptEntry(f"unknown dtype code {dtype_code}")
    if header_len < _FIXED.size + fp_len + key_len or header_len % _ALIGN:
        raise CorruptEntry(f"bad header_len {header_len} for field lengths {fp_len}, {key_len}")
    shape = (n_layers, n_heads, n_tokens, head_dim)
    numel = math.prod(shape)
    itemsize = dtype.itemsize
    if payload_len != 2 * numel * itemsize:
        raise CorruptEntry(
            f"shape {shape} {dtype} needs {2 * numel * itemsize} payload bytes, "
            f"header says {payload_len}"
        )
    if len(mv) != header_len + payload_len:
        what = "truncated" if len(mv) < header_len + payload_len else "trailing bytes"
        raise CorruptEntry(
            f"{what}: value is {len(mv)} bytes, header says {header_len + payload_len}"
        )
    try:
        fingerprint = bytes(mv[_FIXED.size : _FIXED.size + fp_len]).decode("utf-8")
    except UnicodeDecodeError as e:
        raise CorruptEntry(f"undecodable fingerprint: {e}") from None
    if expected_fingerprint is not None and fingerprint != expected_fingerprint:
        raise CorruptEntry(f"written by model {fingerprint!r}, expected {expected_fingerprint!r}")
    key = bytes(mv[_FIXED.size + fp_len : _FIXED.size + fp_len + key_len])
    if expected_key is not None and key != expected_key.encode("utf-8"):
        shown = key.decode("utf-8", "replace")
        raise CorruptEntry(f"written under key {shown!r}, read under {expected_key!r}")
    half = numel * itemsize
    k_bytes = mv[header_len : header_len + half]
    v_bytes = mv[header_len + half :]
    actual = _checksum(mv[:header_len], k_bytes, v_bytes)
    if actual != stored:
        raise CorruptEntry(f"checksum mismatch: stored {stored:#018x}, computed {actual:#018x}")
    if numel == 0:
        k = torch.empty(shape, dtype=dtype)
        return ChunkKV(k, torch.empty(shape, dtype=dtype), base_position)
    k = torch.frombuffer(mv, dtype=dtype, count=numel, offset=header_len).view(shape)
    v = torch.frombuffer(mv, dtype=dtype, count=numel, offset=header_len + half).view(shape)
    return ChunkKV(k, v, base_position)


def peek_header(data: bytes | bytearray | memoryview) -> dict:
    """Header fields without verifying the payload (for tools and debugging)."""
    mv = memoryview(data).cast("B")
    if len(mv) < _FIXED.size:
        raise CorruptEntry(f"truncated header: {len(mv)} bytes < {_FIXED.size}")
    fields = _FIXED.unpack_from(mv, 0)
    names = (
        "magic",
        "version",
        "header_len",
        "dtype_code",
        "n_layers",
        "n_kv_heads",
        "n_tokens",
        "head_dim",
        "base_position",
        "payload_len",
        "fingerprint_len",
        "key_len",
        "checksum",
    )
    return dict(zip(names, fields, strict=True))


def _byte_view(t: torch.Tensor) -> memoryview:
    # A uint8 view reads bfloat16 too (numpy has no bfloat16 dtype); no copy.
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


def _checksum(
    header: bytes | bytearray | memoryview, k_bytes: memoryview, v_bytes: memoryview
) -> int:
    """xxh3-64 over the header (minus the checksum field), K and V."""
    h = xxhash.xxh3_64()
    h.update(header[:_CRC_OFFSET])
    h.update(header[_CRC_OFFSET + 8 :])
    h.update(k_bytes)
    h.update(v_bytes)
    return h.intdigest()
