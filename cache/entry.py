"""The unit the store holds: one document chunk's K/V cache."""

from __future__ import annotations

from dataclasses import dataclass

import torch

# 16-bit only: it barely moves the next-token distribution (DESIGN.md) and halves every tier's
# bytes against fp32.
SUPPORTED_DTYPES: tuple[torch.dtype, ...] = (torch.bfloat16, torch.float16)


@dataclass
class ChunkKV:
    """K and V of one chunk, shaped [n_layers, n_kv_heads, n_tokens, head_dim].

    Treat it as immutable: tensors loaded from Redis may be zero-copy views of a
    read-only ``bytes`` value, so clone before any in-place operation.
    """

    k: torch.Tensor
    v: torch.Tensor
    base_position: int  # absolute position at which the keys were RoPE-rotated (first token)

    def __post_init__(self) -> None:
        if self.k.dim() != 4:
            raise ValueError(
                f"k must be 4-d [layers, heads, tokens, dim], got {tuple(self.k.shape)}"
            )
        if self.k.shape != self.v.shape:
            raise ValueError(f"k {tuple(self.k.shape)} and v {tuple(self.v.shape)} differ in shape")
        if self.k.dtype != self.v.dtype:
            raise ValueError(f"k {self.k.dtype} and v {self.v.dtype} differ in dtype")
        if self.k.dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"dtype {self.k.dtype} unsupported; use bfloat16 or float16")
        if self.k.device != self.v.device:
            raise ValueError(f"k on {self.k.device} and v on {self.v.device}")
        self.base_position = int(self.base_position)
        if self.base_position < 0:
            raise ValueError(f"base_position must be >= 0, got {self.base_position}")

    @property
    def shape(self) -> tuple[int, int, int, int]:
        n_layers, n_heads, n_tokens, head_dim = self.k.shape
        return (n_layers, n_heads, n_tokens, head_dim)

    @property
    def dtype(self) -> torch.dtype:
        return self.k.dtype

    @property
    def device(self) -> torch.device:
        return self.k.device

    @property
    def n_layers(self) -> int:
        return self.k.shape[0]

    @property
    def n_kv_heads(self) -> int:
        return self.k.shape[1]

    @property
    def n_tokens(self) -> int:
        return self.k.shape[2]

    @property
    def head_dim(self) -> int:
        return self.k.shape[3]

    @property
    def nbytes(self) -> int:
        """Bytes of K plus V (the payload; what the byte budgets count)."""
        return 2 * self.k.numel() * self.k.element_size()

    def to(self, device: torch.device | str, non_blocking: bool = False) -> ChunkKV:
        """Same entry on `device`; returns self when already there (no copy)."""
        device = torch.device(device)
        if _same_device(self.k.device, device):
            return self
        return ChunkKV(
            self.k.to(device, non_blocking=non_blocking),
            self.v.to(device, non_blocking=non_blocking),
            self.base_position,
        )


def _same_device(a: torch.device, b: torch.device) -> bool:
    return _normalize(a) == _normalize(b)


def _normalize(d: torch.device) -> torch.device:
    # "cuda" means the current CUDA device; spell it out so "cuda" == "cuda:0" there.
    if d.type == "cuda" and d.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return d
