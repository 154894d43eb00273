"""What every layer of one forward needs about the tokens it computes (nano-vllm's `Context`).

Their positions (for RoPE), the buffer slots their K/V go to, and how they attend. The
forward itself (`Transformer.run`) is the same for prefill, the blend's passes and a decode
step; only the Context differs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from rag.model.kv_cache import KVCache


class Attention(Protocol):
    """How the queries of one forward attend over a layer's whole K/V buffer."""

    def __call__(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> torch.Tensor:
        """q [B, H, T, D]; k, v [B, KH, S, D] -> [B, H, T, D]."""
        ...

    def rows(self, keep: torch.Tensor | slice, slots: torch.Tensor) -> Attention:
        """The same attention for a subset of the queries, now at `slots`."""
        ...


@dataclass
class Context:
    cache: KVCache
    positions: torch.Tensor  # [T] RoPE positions
    slots: torch.Tensor | slice  # where the tokens' K/V are written (a slice: a contiguous span)
    cos: torch.Tensor  # [T, head_dim], in the model's dtype
    sin: torch.Tensor
    attention: Attention

    @property
    def end(self) -> int:
        """One past the highest slot written."""
        if isinstance(self.slots, slice):
            return self.slots.stop
        return int(self.slots.max()) + 1

    def slot_tensor(self) -> torch.Tensor:
        if isinstance(self.slots, slice):
            return torch.arange(self.slots.start, self.slots.stop, device=self.positions.device)
        return self.slots

    def store(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        self.cache.write(layer, self.slots, k, v)

    def attend(self, layer: int, q: torch.Tensor) -> torch.Tensor:
        return self.attention(layer, q, self.cache.k[layer], self.cache.v[layer])

    def finish(self, end: int) -> None:
        """The forward wrote K/V up to slot `end`."""
        self.cache.length = max(self.cache.length, end)

    def rows(self, keep: torch.Tensor | slice) -> Context:
        """The context of a subset of the tokens (in order): the blend's selection, or the rows
        whose output the last layer computes."""
        slots = self.slot_tensor()[keep]
        return Context(
            self.cache,
            self.positions[keep],
            slots,
            self.cos[keep],
            self.sin[keep],
            self.attention.rows(keep, slots),
        )
