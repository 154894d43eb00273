"""The native decode step (rag/native/decode_step.c) against transformers, and its
Lookahead guarantees."""

from __future__ import annotations

import pytest
import torch

from rag.engine import native_step
from rag.engine.decode_step import DecodeStep
from rag.engine.lookahead import compact
from tests.test_lookahead import _two_branch_tree
from tests.test_model import hf_logits

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def lm16(models_dir):
    """bf16 on every CPU: the step's bf16 build has an AVX-512 BF16 path and a generic one."""
    from rag.model.loader import load_model

    return load_model("", models_dir, "bfloat16")


@pytest.fixture(params=["lm16", "lm32"])
def lm(request):
    """The real model in bf16 (where the CPU has it) and in float32: the step's two builds."""
    lm = request.getfixturevalue(request.param)
    if native_step.for_model(lm.model) is None:
        pytest.skip("the native step can't be built here (no C compiler?)")
    return lm


def _kl(ref: torch.Tensor, got: torch.Tensor) -> float:
    lr, lg = ref.float().log_softmax(-1), got.float().log_softmax(-1)
    return float((lr.exp() * (lr - lg)).sum(-1).mean())


def test_native_steps_are_as_close_to_transformers_as_the_pytorch_step(lm, paragraphs):
    """Teacher-forced decode steps after a prefill, against transformers' float32 logits of the
    whole text: the native step (float32 activations) errs no more than the PyTorch step."""
    model = lm.model
    ids = lm.tokenizer.encode_text(paragraphs[0] + "\n\n" + paragraphs[1])[:400]
    ref = hf_logits(lm.path, torch.tensor([ids]))[0]
    n = len(ids) - 24
    steps = {"native": native_step.for_model(model), "pytorch": DecodeStep(model)}
    kl, agree = {}, {}
    for name, step in steps.items():
        cache = model.new_cache(len(ids))
        model(torch.tensor([ids[:n]]), cache, 0, logits_for=None)
        rows = torch.cat([step(torch.tensor([ids[i]]), cache, i) for i in range(n, len(ids) - 1)])
        kl[name] = _kl(ref[n:-1], rows)
        agree[name] = float((rows.argmax(-1) == ref[n:-1].argmax(-1)).float().mean())
    assert kl["native"] < (0.01 if model.dtype == torch.bfloat16 else 1e-5)
    assert kl["native"] <= 1.5 * kl["pytorch"] + (
        1e-3 if model.dtype == torch.bfloat16 else 1e-6
    ), kl
    assert agree["native"] >= agree["pytorch"] - 1 / 23, agree


def test_native_step_follows_the_model_forward(lm32, paragraphs):
    """The C step is the CPU fast path of the model's one forward: float32 teacher-forced steps
    give the forward's own logits (a span over the same past) to float32 rounding."""
    step = native_step.for_model(lm32.model)
    if step is None:
        pytest.skip("the native step can't be built here (no C compiler?)")
    model = lm32.model
    ids = lm32.tokenizer.encode_text(paragraphs[2])[:200]
    n = len(ids) - 16
    cache = model.new_cache(len(ids))
    model(torch.tensor([ids[:n]]), cache, 0, logits_for=None)
    ref = model(torch.tensor([ids[n:]]), cache, n, logits_for=slice(None))[0]
    cache = model.new_cache(len(ids))
    model(torch.tensor([ids[:n]]), cache, 0, logits_for=None)
    rows = torch.cat([step(torch.tensor([ids[i]]), cache, i) for i in range(n, len(ids))])
    assert (rows - ref).abs().max() < 2e-3
    assert torch.equal(rows.argmax(-1), ref.argmax(-1))


@pytest.mark.parametrize("long", [False, True], ids=["short", "long"])
def test_native_tree_rows_are_bitwise_plain_steps(lm, paragraphs, long, request):
    """One masked pass over a two-branch tree gives every node exactly (bitwise) the logits and
    K/V of plain one-token steps: the precondition for lossless Lookahead. Long: a prompt of
    over 300 tokens (its keys and values shared by the rows in several blocks), on two threads,
    and plain steps whose prompt (base) is all their past, ending in other 16-key blocks."""
    model, tok = lm.model, lm.tokenizer
    step = native_step.for_model(model)
    ids = tok.encode_text(
        "The Saltmere lighthouse stands on a granite cliff above the harbour. Its first keeper"
    )
    if long:
        past = tok.encode_text(paragraphs[0] + "\n\n" + paragraphs[1])
        ids = (
            past[: 300 + (14 - 300 - len(ids) + 1) % 16] + ids
        )  # the tree's base: 14 past a block start
        threads = torch.get_num_threads()
        torch.set_num_threads(2)  # the step runs on torch's thread count
        request.addfinalizer(lambda: torch.set_num_threads(threads))
    n = len(ids)
    a, b = tok.encode_text(" was Josiah"), tok.encode_text(", a sailor")

    def prefilled():
        cache = model.new_cache(n + 8)
        model(torch.tensor([ids[:-1]]), cache, 0, logits_for=None)
        return cache

    def plain(branch: list[int]):
        cache = prefilled()
        base = None if long else n - 1
        rows = [
            step(torch.tensor([t]), cache, n - 1 + i, base=base)[0]
            for i, t in enumerate([ids[-1], *branch])
        ]
        return torch.stack(rows), cache

    cache = prefilled()
    tree = _two_branch_tree(a, b, root=ids[-1])
    committed = n - 1
    rows = step(
        torch.tensor(tree.tokens),
        cache,
        committed,
        positions=torch.tensor(tree.depths) + committed,
        mask=tree.mask(committed),
        all_logits=True,
    )
    ref_a, _ = plain(a)
    ref_b, cache_b = plain(b)
    assert torch.equal(rows[[0, *range(1, 1 + len(a))]], ref_a)
    assert torch.equal(rows[[0, *range(1 + len(a), 1 + len(a) + len(b))]], ref_b)
    path = [0, *range(1 + len(a), 1 + len(a) + len(b))]
    compact(cache, committed, path)
    end = committed + len(path)
    assert torch.equal(cache.k[:, :, :, :end], cache_b.k[:, :, :, :end])
    assert torch.equal(cache.v[:, :, :, :end], cache_b.v[:, :, :, :end])


def test_without_a_compiler_decoding_falls_back_to_pytorch(lm16, tmp_path, monkeypatch):
    """No compiler (and nothing built yet): no native step, one warning, and decoding still
    works."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    native_step.library.cache_clear()
    try:
        assert native_step.for_model(lm16.model) is None
        assert not list(tmp_path.rglob("*.so"))
    finally:
        native_step.library.cache_clear()


@pytest.mark.parametrize("family", ["llama2", "llama3-rope-scaling", "qwen2"])
def test_native_step_matches_transformers_on_each_family(family, tmp_path):
    """Untied embeddings (llama2), scaled RoPE (llama3), q/k/v biases (qwen2), two query heads
    per KV
    head: decode steps over a prefilled past against transformers run on the same bf16 weights."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from rag.model.loader import load_transformer
    from tests.test_model import FAMILIES

    kw = dict(FAMILIES[family])
    cfg = AutoConfig.for_model(
        kw.pop("model_type"),
        vocab_size=256,
        hidden_size=128,
        intermediate_size=192,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=256,
        rope_theta=10000.0,
        **kw,
    )
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    if family == "qwen2":
        for layer in hf.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                torch.nn.init.normal_(proj.bias, std=0.5)
    hf = hf.to(torch.bfloat16).to(
        torch.float32
    )  # the weights the bf16 model holds, computed in float32
    hf.save_pretrained(tmp_path)
    ids = torch.randint(0, 256, (1, 48))
    with torch.no_grad():
        ref = hf(ids).logits[0]
    model = load_transformer(tmp_path, torch.bfloat16)
    step = native_step.for_model(model)
    if step is None:
        pytest.skip("the native step can't be built here")
    cache = model.new_cache(48)
    model(ids[:, :32], cache, 0, logits_for=None)
    rows = torch.cat([step(ids[0, i : i + 1], cache, i) for i in range(32, 47)])
    assert _kl(ref[32:47], rows) < 1e-3
    assert (
        rows - ref[32:47]
    ).abs().max() < 0.02  # a random model's logits are near ties: no argmax check
