"""The own forward pass against transformers' logits: the real model and one tiny model
per family."""

from __future__ import annotations

import pytest
import torch

from rag.model.loader import load_transformer


def hf_logits(path, ids):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return hf(ids).logits


def test_smollm2_logits_match_transformers(lm32):
    text = "The Saltmere lighthouse stands on a granite cliff. Its keeper, Josiah Penrose, climbed"
    ids = torch.tensor([lm32.tokenizer.encode_text(text)])
    ref = hf_logits(lm32.path, ids)
    n = ids.shape[1]
    model = lm32.model
    cache = model.new_cache(n + 4)
    out = model(ids, cache, 0, logits_for=slice(None))
    assert (out - ref).abs().max() < 1e-3

    # A span over a past (positions 7..n) and single-token decode steps give the same logits.
    cache = model.new_cache(n)
    model(ids[:, :7], cache, 0, logits_for=None)
    rest = model(ids[:, 7:], cache, 7, logits_for=slice(None))
    assert (rest - ref[:, 7:]).abs().max() < 1e-3
    cache = model.new_cache(n)
    model(ids[:, :5], cache, 0, logits_for=None)
    for i in range(5, n):
        step = model(ids[:, i : i + 1], cache, i)
        assert (step[0, -1] - ref[0, i]).abs().max() < 1e-3


def test_bf16_masked_attention_is_as_close_to_transformers_as_sdpa(
    lm32, models_dir, paragraphs, monkeypatch
):
    """bf16 on CPU: a span over a past of over 512 keys attends in masked groups as float32-score
    matmuls; its logits are as close to transformers' float32 ones as with SDPA's own bf16
    kernel."""
    from rag.model import attention as model_mod
    from rag.model.loader import load_model

    ids = torch.tensor([lm32.tokenizer.encode_text(" ".join(paragraphs))[:700]])
    ref = hf_logits(lm32.path, ids)[0, 40:].log_softmax(-1)
    bf = load_model("", models_dir, "bfloat16").model

    def kl_and_top1() -> tuple[float, float]:
        cache = bf.new_cache(ids.shape[1])
        bf(ids[:, :40], cache, 0, logits_for=None)
        got = bf(ids[:, 40:], cache, 40, logits_for=slice(None))[0].log_softmax(-1)
        kl = (ref.exp() * (ref - got)).sum(-1).mean().item()
        return kl, (got.argmax(-1) == ref.argmax(-1)).float().mean().item()

    assert model_mod.causal_groups(torch.arange(40, ids.shape[1]), 40, torch.bfloat16, 3)[0].matmul
    matmul = kl_and_top1()
    monkeypatch.setattr(model_mod, "_matmul_attention", lambda device, dtype, keys: False)
    sdpa = kl_and_top1()
    assert matmul[0] < 0.02 and matmul[1] > 0.9
    assert matmul[0] <= 1.5 * sdpa[0] and matmul[1] >= sdpa[1] - 0.02


FAMILIES = {
    "llama2": dict(model_type="llama"),
    "llama3-rope-scaling": dict(
        model_type="llama",
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
    ),
    "mistral": dict(model_type="mistral", sliding_window=None),
    "qwen2": dict(model_type="qwen2", tie_word_embeddings=True),
}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_tiny_random_model_matches_transformers(family, tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    kw = dict(FAMILIES[family])
    model_type = kw.pop("model_type")
    cfg = AutoConfig.for_model(
        model_type,
        vocab_size=128,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rope_theta=10000.0,
        **kw,
    )
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    if model_type == "qwen2":  # make the q/k/v biases matter
        for layer in hf.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                torch.nn.init.normal_(proj.bias, std=0.5)
    hf.save_pretrained(tmp_path)
    ids = torch.randint(0, 128, (1, 40))
    with torch.no_grad():
        ref = hf(ids).logits
    ours = load_transformer(tmp_path, torch.float32)
    out = ours(ids, ours.new_cache(48), 0, logits_for=slice(None))
    assert (out - ref).abs().max() < 1e-4
    # Positions far from 0 exercise the (scaled) RoPE frequencies.
    cache = ours.new_cache(48)
    ours(ids[:, :30], cache, 0, logits_for=None)
    tail = ours(ids[:, 30:], cache, 30, logits_for=slice(None))
    assert (tail - ref[:, 30:]).abs().max() < 1e-4


def test_unsupported_model_type_is_a_clear_error(tmp_path):
    from transformers import GPT2Config

    GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="Llama family"):
        load_transformer(tmp_path)
