"""CacheBlend against an oracle: the real SmolLM2-135M model, float32, short real-text chunks.

Full prefill is the reference: ratio 1.0 must reproduce it, the first chunk
(placed right behind the header, where it was computed) must be exact with no
recompute, re-rotated keys must equal keys computed at the new positions, and a
recomputed middle token must never see later tokens.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from rag.config import SYSTEM_PROMPT
from rag.engine import blend
from rag.engine.blend import blend_prefill
from rag.engine.engine import Engine
from rag.engine.selection import keep_counts
from rag.engine.stitch import rerotate
from rag.model.attention import causal_attention, causal_groups

TEXT = (  # three short paragraphs adapted from samples/saltmere_history.md, one chunk each
    "The Saltmere Lights Act received assent on 14 March 1871 and created the Saltmere Lights "
    "Board, "
    "which could raise light dues from every vessel calling at Port Ellery and build lighthouses "
    "throughout the chain of islands. Its first chairman was Captain Edmund Harrow.",
    "The Board's engineer, Thomas Lydgate, chose Greywater Point as the site of the first light "
    "because it could be seen from both the northern approach and the Kellhaven crossing. "
    "The tower "
    "was built of granite quarried at Tollan Hill and first lit at dusk on 1 November 1871.",
    "Skerra Rock, the most exposed station, took four summers to build because work was only "
    "possible at low water in calm weather. Its keepers were relieved every six weeks by boat, and "
    "storms sometimes stretched a tour of duty to three months.",
)
QUESTION = "Who chose the site of the first light, and why was it chosen?"


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def engine(lm32):
    return Engine(lm32, SYSTEM_PROMPT)


@pytest.fixture(scope="module")
def case(engine):
    prompt = engine.prompts.build(list(TEXT), QUESTION)
    kvs = [engine.chunk_kv(c) for c in prompt.chunks]
    full = engine.prefill(prompt, "full")
    return prompt, kvs, full


def _blend(engine, prompt, kvs, ratio, **kw):
    cache = engine.new_cache(len(prompt))
    return cache, blend_prefill(engine.model, cache, prompt, kvs, ratio, **kw)


def test_ratio_one_reproduces_full_prefill(engine, case):
    prompt, kvs, full = case
    cache, r = _blend(engine, prompt, kvs, 1.0)
    assert r.recomputed == r.reused == sum(len(c) for c in prompt.chunks)
    n = len(prompt)
    fk, fv = full.cache.view(0, n)
    k, v = cache.view(0, n)
    torch.testing.assert_close(k, fk, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(v, fv, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(r.logits, full.logits, rtol=1e-4, atol=2e-3)
    assert torch.equal(r.logits.argmax(-1), full.logits.argmax(-1))


def test_first_chunk_is_exact_without_recompute(engine, case):
    prompt, kvs, full = case
    cache, r = _blend(engine, prompt, kvs, 0.0)
    assert r.recomputed == 0 and r.computed == len(prompt.footer)
    s0, s1, s2 = prompt.chunk_starts[0], prompt.chunk_starts[1], prompt.chunk_starts[2]
    k, v = cache.view(0, len(prompt))
    fk, fv = full.cache.view(0, len(prompt))
    # Chunk K/V are stored in bf16: compare with full prefill's, rounded the same way.
    bf = engine.kv_dtype
    tol = {"rtol": 1e-2, "atol": 1e-2}
    torch.testing.assert_close(k[:, :, s0:s1], fk[:, :, s0:s1].to(bf).float(), **tol)
    torch.testing.assert_close(v[:, :, s0:s1], fv[:, :, s0:s1].to(bf).float(), **tol)
    # ... while the second chunk, computed without the first in front of it, is not.
    assert not torch.allclose(v[5:, :, s1:s2], fv[5:, :, s1:s2].to(bf).float(), **tol)
    # And a blend spends no budget on the exact chunk while others remain.
    cache, r = _blend(engine, prompt, kvs, 0.3)
    assert r.recomputed > 0 and bool((r.selected >= s1).all())
    assert torch.equal(cache.k[:, 0, :, s0:s1], k[:, :, s0:s1])


def test_rerotation_equals_prefill_at_the_new_position(engine):
    model = engine.model
    ids = torch.tensor([engine.prompts.chunk_ids(TEXT[1])])
    n, p = ids.shape[1], 1234
    at0, atp = model.new_cache(n), model.new_cache(n)
    model(ids, at0, 0, logits_for=None)
    model(ids, atp, positions=torch.arange(p, p + n), slots=torch.arange(n), logits_for=None)
    k0, v0 = at0.view(0, n)
    kp, vp = atp.view(0, n)
    torch.testing.assert_close(rerotate(k0, p, model.inv_freq), kp, rtol=1e-4, atol=2e-4)
    torch.testing.assert_close(v0, vp, rtol=1e-4, atol=2e-4)
    assert not torch.allclose(k0, kp, atol=1e-2)  # the rotation did something


@pytest.mark.parametrize("ratio", [0.05, 0.15, 0.5, 0.9])
def test_selects_ceil_ratio_of_reused_tokens(engine, case, ratio):
    prompt, kvs, _ = case
    _, r = _blend(engine, prompt, kvs, ratio)
    assert r.recomputed == math.ceil(ratio * r.reused) == len(r.selected)
    assert r.computed == r.recomputed + len(prompt.footer)
    _, g = _blend(engine, prompt, kvs, ratio, gradual=3)
    assert g.recomputed == r.recomputed
    assert g.layer_tokens == sorted(g.layer_tokens, reverse=True)


def test_uncached_chunk_is_computed_in_full(engine, case):
    """A chunk without a cache (a store miss) is computed in every layer; the budget counts
    only the reused tokens, and ratio 1.0 still reproduces full prefill."""
    prompt, kvs, full = case
    mixed = [kvs[0], None, kvs[2]]
    reused = len(prompt.chunks[0]) + len(prompt.chunks[2])
    _, r = _blend(engine, prompt, mixed, 0.3)
    assert r.reused == reused and r.recomputed == math.ceil(0.3 * reused)
    assert r.computed == r.recomputed + len(prompt.chunks[1]) + len(prompt.footer)
    assert torch.isfinite(r.logits).all()
    _, r = _blend(engine, prompt, mixed, 1.0)
    torch.testing.assert_close(r.logits, full.logits, rtol=1e-4, atol=2e-3)


def test_question_pass_attends_like_the_model(engine, case):
    """The question pass's explicit attention (it needs the weights, which SDPA does not give)
    must propagate the question as the model's own forward does: the same K/V in every layer
    over the same stitched cache. Its attention mass is a distribution over the visible slots
    (none on an uncached chunk)."""
    prompt, kvs, _ = case
    model, h = engine.model, len(prompt.header)
    mixed = [kvs[0], None, kvs[2]]
    ours, ref = engine.new_cache(len(prompt)), engine.new_cache(len(prompt))
    for cache in (ours, ref):
        blend.stitch(cache, prompt, mixed, model.inv_freq)
    visible = torch.ones(prompt.context_end, dtype=torch.bool)
    uncached = slice(prompt.chunk_starts[1], prompt.chunk_starts[1] + len(prompt.chunks[1]))
    visible[uncached] = False
    with torch.inference_mode():
        mass = blend.question_attention(model, ours, prompt, visible)
        # The same question over the same cache, with the uncached chunk's slots skipped.
        seen = torch.cat([visible, torch.ones(len(prompt.footer), dtype=torch.bool)])
        allowed = (
            torch.arange(len(prompt))[None, :]
            <= torch.arange(prompt.context_end, len(prompt))[:, None]
        ) & seen
        model(
            torch.tensor([prompt.footer]),
            ref,
            positions=torch.arange(prompt.context_end, len(prompt)),
            mask=allowed,
        )
    footer = slice(prompt.context_end, len(prompt))
    torch.testing.assert_close(
        ours.k[:, :, :, footer], ref.k[:, :, :, footer], rtol=1e-4, atol=1e-4
    )
    torch.testing.assert_close(
        ours.v[:, :, :, footer], ref.v[:, :, :, footer], rtol=1e-4, atol=1e-4
    )
    assert mass.shape == (model.args.n_layers, len(prompt))
    torch.testing.assert_close(mass.sum(1), torch.ones(model.args.n_layers), rtol=0, atol=1e-4)
    assert (mass[:, uncached] == 0).all() and (mass[:, h : prompt.context_end] > 0).any()


def test_keep_counts_shrink_to_target():
    assert keep_counts(0.15, 1000, 1) == [150]
    assert keep_counts(0.15, 1000, 3) == [450, 300, 150]
    assert keep_counts(0.5, 1000, 3) == [1000, 1000, 500]


def _reference_attention(q, k, v, allowed):
    """Plain softmax attention; allowed [T, S] bool."""
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    s = (q @ k.transpose(-1, -2)) / q.shape[-1] ** 0.5
    return s.masked_fill(~allowed, float("-inf")).softmax(-1) @ v


@pytest.mark.parametrize(
    "dtype, fold", [(torch.float32, 1), (torch.float32, 3), (torch.bfloat16, 3)]
)
def test_scattered_queries_are_causal_by_position(dtype, fold):
    """Folded bf16 groups run as matmuls on CPU (rag.model.attention._matmul_attend), the others
    in SDPA."""
    torch.manual_seed(0)
    s_len = 700
    slots = torch.tensor(
        sorted(torch.randperm(s_len)[:300].tolist())
    )  # several groups of ATTN_GROUP
    q = (2 * torch.randn(1, 9, len(slots), 64)).to(dtype)
    k, v = (2 * torch.randn(1, 3, s_len, 64)).to(dtype), torch.randn(1, 3, s_len, 64).to(dtype)
    groups = causal_groups(slots, None, dtype, fold)
    assert all(g.matmul == (dtype == torch.bfloat16) for g in groups)
    got = causal_attention(q, k, v, groups)
    keys = torch.arange(s_len)
    by_position = keys[None, :] <= slots[:, None]
    want = _reference_attention(q.double(), k.double(), v.double(), by_position)
    if dtype == torch.float32:
        torch.testing.assert_close(got, want.float(), rtol=1e-4, atol=1e-5)
    else:  # as close as SDPA's own bf16 kernel gets
        sdpa = F.scaled_dot_product_attention(q, k, v, attn_mask=by_position, enable_gqa=True)
        err, sdpa_err = (got.double() - want).abs(), (sdpa.double() - want).abs()
        assert err.max() <= 2 * sdpa_err.max() and err.mean() <= 1.5 * sdpa_err.mean()
    # The original CacheBlend mask is bottom-right aligned (query i of T sees keys < S - T + i + 1):
    # it lets middle tokens see later ones, and gives a different answer.
    bottom_right = keys[None, :] <= (s_len - len(slots) + torch.arange(len(slots)))[:, None]
    assert not torch.allclose(
        got.double(),
        _reference_attention(q.double(), k.double(), v.double(), bottom_right),
        atol=2e-2,
    )


def test_recomputed_middle_tokens_never_see_later_ones(engine, case, monkeypatch):
    """Change the last chunk's cached K/V in the layers past the check: a recomputed token of
    the middle chunk must come out the same (a bottom-right mask would let it read them)."""
    prompt, kvs, _ = case
    n_layers = engine.model.args.n_layers
    # A fixed question ranking, so the selection cannot depend on the last chunk.
    monkeypatch.setattr(
        blend,
        "question_attention",
        lambda model, cache, prompt, visible: torch.ones(n_layers, len(prompt)),
    )
    last = kvs[-1]
    deep = torch.arange(n_layers)[:, None, None, None] > blend.CHECK_LAYER
    noisy = type(last)(last.k, torch.where(deep, last.v * 3 + 1, last.v), last.base_position)
    s1, s2 = prompt.chunk_starts[1], prompt.chunk_starts[2]
    cache_a, a = _blend(engine, prompt, kvs, 0.4)
    cache_b, b = _blend(engine, prompt, [*kvs[:-1], noisy], 0.4)
    middle = slice(s1, s2)
    torch.testing.assert_close(
        cache_a.k[:, 0, :, middle], cache_b.k[:, 0, :, middle], rtol=0, atol=0
    )
    torch.testing.assert_close(
        cache_a.v[:, 0, :, middle], cache_b.v[:, 0, :, middle], rtol=0, atol=0
    )
    # ... and the middle chunk really had tokens recomputed (its K/V differ from the cached ones).
    stitched = engine.new_cache(len(prompt))
    blend.stitch(stitched, prompt, kvs, engine.model.inv_freq)
    assert not torch.equal(cache_a.v[-1, 0, :, middle], stitched.v[-1, 0, :, middle])
    assert not torch.equal(a.logits, b.logits)  # the question does see the last chunk


@pytest.mark.parametrize("mode", ["full", "blend"])
def test_last_position_logits_alone_are_the_same(engine, case, mode):
    """Serving computes the logits of the last question position only: the same row."""
    prompt, kvs, _ = case
    every = engine.prefill(prompt, mode, 0.15, kvs)
    last = engine.prefill(prompt, mode, 0.15, kvs, logit_rows=1)
    assert every.logits.shape[0] == len(prompt.footer) and last.logits.shape[0] == 1
    torch.testing.assert_close(last.logits, every.logits[-1:], rtol=1e-4, atol=1e-4)
    engine.release(every.cache)
    engine.release(last.cache)
