"""Preallocated per-layer K/V buffers, indexed by slot.

A slot is a row of the buffer; for an ordinary prompt the slot of a token is its
position. Writing into a fixed buffer (instead of concatenating per step) keeps
decoding free of reallocation, and lets the blend write fresh K/V of selected
tokens in place, in the middle of a stitched cache.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


class ContextFull(RuntimeError):
    """The request needs more slots than the buffer holds."""


@dataclass
class KVCache:
    k: torch.Tensor  # [n_layers, batch, n_kv_heads, max_len, head_dim]
    v: torch.Tensor
    length: int = 0  # slots [0, length) hold valid K/V

    @classmethod
    def allocate(
        cls,
        n_layers: int,
        n_kv_heads: int,
        head_dim: int,
        max_len: int,
        *,
        batch: int = 1,
        dtype: torch.dtype = torch.bfloat16,
        device: str | torch.device = "cpu",
    ) -> KVCache:
        shape = (n_layers, batch, n_kv_heads, max_len, head_dim)
        # Zeros, not empty: slots not yet written are read under a -inf mask (the decode step's
        # free room, the blend's uncached chunks in the question pass), and 0 * NaN is NaN.
        return cls(
            torch.zeros(shape, dtype=dtype, device=device),
            torch.zeros(shape, dtype=dtype, device=device),
        )

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    def ensure(self, n_slots: int) -> None:
        if n_slots > self.max_len:
            raise ContextFull(f"needs {n_slots} KV slots, the buffer holds {self.max_len}")

    def write(
        self, layer: int, slots: torch.Tensor | slice, k: torch.Tensor, v: torch.Tensor
    ) -> None:
        """k, v: [batch, n_kv_heads, n, head_dim] for the n given slots."""
        self.k[layer, :, :, slots] = k
        self.v[layer, :, :, slots] = v

    def load(self, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Copy all layers' K/V ([n_layers, n_kv_heads, n, head_dim]) into slots start..start+n."""
        n = k.shape[2]
        self.ensure(start + n)
        self.k[:, 0, :, start : start + n] = k
        self.v[:, 0, :, start : start + n] = v

    def view(self, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """All layers' K/V of slots [start, end) for batch row 0: [n_layers, n_kv, n, head_dim]."""
        return self.k[:, 0, :, start:end], self.v[:, 0, :, start:end]
