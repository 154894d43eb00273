"""Next-token choice: greedy, or temperature with nucleus (top-p) sampling."""

from __future__ import annotations

import torch


def sample(
    logits: torch.Tensor,
    temperature: float = 0.0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> int:
    """logits [V] (float32) -> token id."""
    if temperature <= 0:
        return int(logits.argmax())
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(descending=True)
        # Keep the smallest set whose mass reaches top_p (always at least the top token).
        keep = sorted_p.cumsum(0) - sorted_p < top_p
        sorted_p = sorted_p * keep
        return int(order[torch.multinomial(sorted_p / sorted_p.sum(), 1, generator=generator)])
    return int(torch.multinomial(probs, 1, generator=generator))
