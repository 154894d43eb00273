"""A Llama-family model's shape, read from its Hugging Face config."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class ModelArgs:
    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    ffn_dim: int
    norm_eps: float
    qkv_bias: bool
    tie_embeddings: bool
    max_positions: int
    inv_freq: torch.Tensor  # [head_dim // 2], raw (unscaled) RoPE frequencies
    rope_scale: float  # attention factor applied to cos/sin (YaRN etc.), 1.0 for most

    @property
    def q_per_kv(self) -> int:
        """Query heads that share one KV head (grouped-query attention)."""
        return self.n_heads // self.n_kv_heads

    @classmethod
    def from_hf(cls, cfg) -> ModelArgs:
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        rope = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type == "default":
            theta = rope.get("rope_theta", getattr(cfg, "rope_theta", 10000.0))
            exponents = torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim
            inv_freq = 1.0 / (theta**exponents)
            scale = 1.0
        else:
            inv_freq, scale = ROPE_INIT_FUNCTIONS[rope_type](cfg, "cpu")
        return cls(
            vocab_size=cfg.vocab_size,
            dim=cfg.hidden_size,
            n_layers=cfg.num_hidden_layers,
            n_heads=cfg.num_attention_heads,
            n_kv_heads=getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads,
            head_dim=head_dim,
            ffn_dim=cfg.intermediate_size,
            norm_eps=cfg.rms_norm_eps,
            # Qwen2 has q/k/v biases without saying so in the config.
            qkv_bias=bool(getattr(cfg, "attention_bias", False)) or cfg.model_type == "qwen2",
            tie_embeddings=bool(getattr(cfg, "tie_word_embeddings", False)),
            max_positions=cfg.max_position_embeddings,
            inv_freq=inv_freq.float(),
            rope_scale=float(scale),
        )
