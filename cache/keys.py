"""Cache keys: content addresses of chunks, and cheap model fingerprints.

A chunk's key depends only on its OWN content (model, prompt header, its token
ids, layout version), never on the chunks before it: prefix-chained keys made
LMCache's reuse decay to ~1x under a stream of RAG queries, because the same
chunk retrieved behind a different neighbour got a different key.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import torch

KEY_DIGEST_BYTES = 20  # 40 hex chars: collision-safe for any realistic corpus
_KEY_DOMAIN = b"kvrag/chunk-kv/v1\0"
_FP_DOMAIN = b"kvrag/tensors/v1\0"
_SAMPLES_PER_TENSOR = 1024


def chunk_key(
    model_fingerprint: str,
    header_fingerprint: str,
    token_ids: Sequence[int],
    layout_version: int,
) -> str:
    """Hex blake2b digest naming one chunk's KV cache."""
    h = hashlib.blake2b(digest_size=KEY_DIGEST_BYTES)
    h.update(_KEY_DOMAIN)
    # Length-prefix every variable field so no two inputs serialize the same.
    for field in (model_fingerprint, header_fingerprint):
        raw = field.encode("utf-8")
        h.update(struct.pack("<Q", len(raw)))
        h.update(raw)
    h.update(struct.pack("<q", int(layout_version)))
    ids = np.asarray(token_ids, dtype=np.int64)
    if ids.ndim != 1:
        raise ValueError(f"token_ids must be a flat sequence, got shape {ids.shape}")
    h.update(struct.pack("<Q", ids.size))
    h.update(ids.astype("<i8", copy=False).tobytes())
    return h.hexdigest()


def fingerprint_tensors(
    named_tensors: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]],
) -> str:
    """Cheap fingerprint of a set of named tensors (e.g. a model's state dict).

    Hashes each tensor's name, dtype, shape and ~1K evenly strided elements, so
    it costs milliseconds even for large models, yet changes with the weights'
    dtype, architecture, or values (a different checkpoint or quantization).
    Order-independent: tensors are hashed sorted by name.
    """
    items = named_tensors.items() if isinstance(named_tensors, Mapping) else named_tensors
    h = hashlib.blake2b(digest_size=16)
    h.update(_FP_DOMAIN)
    for name, tensor in sorted(items, key=lambda kv: kv[0]):
        t = tensor.detach()
        meta = f"{name}|{t.dtype}|{tuple(t.shape)}".encode()
        h.update(struct.pack("<Q", len(meta)))
        h.update(meta)
        h.update(_sample_bytes(t))
    return h.hexdigest()


def _sample_bytes(t: torch.Tensor) -> bytes:
    n = t.numel()
    if n == 0 or t.device.type == "meta":
        return b""
    flat = t.reshape(-1)
    if n > _SAMPLES_PER_TENSOR:
        # Integer stride: float linspace rounds past the end for n > 2**24.
        steps = torch.arange(_SAMPLES_PER_TENSOR, dtype=torch.int64, device=t.device)
        idx = steps * (n - 1) // (_SAMPLES_PER_TENSOR - 1)
        flat = flat[idx]
    flat = flat.contiguous().cpu()
    if flat.dtype == torch.bool:
        flat = flat.to(torch.uint8)
    # A byte view works for every dtype, including bfloat16 (which numpy lacks).
    return flat.view(torch.uint8).numpy().tobytes()
