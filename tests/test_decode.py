"""The decode loop on the real model: lean steps, Lookahead losslessness, stop rules,
the context limit."""

from __future__ import annotations

import pytest
import torch

from eval.samples import SAMPLE_QUESTIONS
from rag.config import SYSTEM_PROMPT
from rag.engine.decode import decode
from rag.engine.engine import Engine
from rag.engine.lookahead import AnswerMemory, Lookahead
from rag.engine.request import GenerationParams, Request

QUESTIONS = (
    "How tall is the Greywater Point lighthouse?",
    "Who was the first principal keeper of Greywater Point?",
    "What is the light characteristic of Skerra Rock Lighthouse?",
)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def engine(lm32) -> Engine:
    return Engine(lm32, SYSTEM_PROMPT)


def _prompt(engine: Engine, paragraphs: list[str], question: str, n_tokens: int):
    """Paragraphs sharing the most words with the question, up to ~n_tokens of context."""
    words = set(question.lower().split())
    ranked = sorted(paragraphs, key=lambda p: -len(words & set(p.lower().split())))
    chunks, used = [], 0
    for p in ranked:
        n = len(engine.prompts.chunk_ids(p))
        if used + n > n_tokens:
            break
        chunks.append(p)
        used += n
    return engine.prompts.build(chunks, question)


def _run(engine: Engine, pre, prompt, max_new: int, drafter=None, **kw):
    pre.cache.length = len(prompt)
    return decode(
        engine.model,
        engine.step,
        engine.tokenizer,
        pre.cache,
        pre.logits[-1],
        len(prompt),
        max_new,
        drafter=drafter,
        **kw,
    )


def _generate(engine: Engine, prompt, mode: str = "full", **params) -> Request:
    return engine.generate(Request(mode=mode, params=GenerationParams(**params)), prompt)


def test_lean_step_matches_the_model_forward_loop(engine, paragraphs):
    """The lean loop picks the same greedy tokens as plain Transformer.forward steps."""
    prompt = _prompt(engine, paragraphs, QUESTIONS[0], 300)
    pre = engine.prefill(prompt, extra_slots=24)
    lean = _run(engine, pre, prompt, 16)
    cache = engine.prefill(prompt, extra_slots=24).cache
    tok, ref, pos = int(pre.logits[-1].argmax()), [], len(prompt)
    while len(ref) < len(lean.ids) and tok not in engine.tokenizer.stop_ids:
        ref.append(tok)
        tok = int(engine.model(torch.tensor([[tok]]), cache, pos)[0, -1].argmax())
        pos += 1
    assert lean.ids == ref and len(ref) >= 8
    assert lean.steps == len(lean.ids) - (lean.finish != "stop")


@pytest.fixture(scope="module")
def engine16(models_dir) -> Engine:
    """The model in bf16, where the CPU runs bf16 natively (elsewhere it is emulated)."""
    from rag.config import cpu_has_bf16
    from rag.model.loader import load_model

    if not cpu_has_bf16():
        pytest.skip("no native bf16 on this CPU")
    return Engine(load_model("", models_dir, "bfloat16"), SYSTEM_PROMPT)


@pytest.mark.parametrize("context_tokens", [300, 1000])
def test_greedy_lookahead_is_token_for_token_identical(engine, paragraphs, context_tokens):
    _assert_lookahead_identical(engine, paragraphs, context_tokens)


@pytest.mark.parametrize("step", ["default", "pytorch"])
def test_greedy_lookahead_is_token_for_token_identical_in_bf16(
    engine16, paragraphs, step, monkeypatch
):
    """In bf16 a CPU matmul's rows change in the last bit with the batch size: the PyTorch step
    keeps
    every batch >= 2 rows and attends per token, the native step computes every row alone, so a
    draft row equals the plain step's exactly (the native step runs here where it can be built)."""
    # ~2K tokens and 64 new ones, as in `kvrag bench decode`: without the fix, 3 of these 8 differ.
    if step == "pytorch":  # the step of machines without a C compiler
        from rag.engine.decode_step import DecodeStep

        monkeypatch.setattr(engine16, "step", DecodeStep(engine16.model))
    _assert_lookahead_identical(engine16, paragraphs, 2000, SAMPLE_QUESTIONS, 64)


def _assert_lookahead_identical(
    engine: Engine,
    paragraphs: list[str],
    context_tokens: int,
    questions=QUESTIONS,
    max_new: int = 40,
) -> None:
    accepted = 0
    memory = AnswerMemory()  # later questions also draft from the earlier answers, as in the engine
    for q in questions:
        prompt = _prompt(engine, paragraphs, q, context_tokens)
        pre = engine.prefill(prompt, extra_slots=max_new)
        lean = _run(engine, pre, prompt, max_new)
        la = _run(
            engine,
            pre,
            prompt,
            max_new,
            Lookahead(prompt.ids()[len(prompt.header) :], memory=memory),
        )
        memory.add(la.ids)
        assert la.ids == lean.ids, (
            q,
            engine.tokenizer.decode(lean.ids),
            engine.tokenizer.decode(la.ids),
        )
        assert la.text == lean.text and la.finish == lean.finish
        assert la.steps + la.accepted == lean.steps
        accepted += la.accepted
    assert accepted > 0  # the drafts did get used


def test_sampling_with_lookahead_draws_the_same_tokens(engine, paragraphs):
    """Each tree node is decided by a draw from the model's own distribution, in order: same
    seed, same text."""
    prompt = _prompt(engine, paragraphs, QUESTIONS[1], 300)
    pre = engine.prefill(prompt, extra_slots=32)
    kw = dict(temperature=0.7, top_p=0.9, seed=3)
    plain = _run(engine, pre, prompt, 32, **kw)
    la = _run(engine, pre, prompt, 32, Lookahead(prompt.ids()[len(prompt.header) :]), **kw)
    assert la.ids == plain.ids


def test_generate_defaults_lookahead_on_for_greedy_only(engine, paragraphs):
    prompt = _prompt(engine, paragraphs, QUESTIONS[0], 300)
    engine.answers = AnswerMemory()  # whatever other tests left there
    on = _generate(engine, prompt, max_new_tokens=24)
    assert engine.answers.answers[-1] == on.output_ids  # later requests draft from it too
    again = _generate(engine, prompt, max_new_tokens=24)
    off = _generate(engine, prompt, max_new_tokens=24, lookahead=False)
    assert on.output_ids == again.output_ids == off.output_ids and on.text == off.text
    # Asked again, the answer's own n-grams are in the memory: more of it is drafted right.
    assert again.accepted_drafts > on.accepted_drafts
    assert on.decode_steps < off.decode_steps and off.accepted_drafts == 0
    sampled = _generate(engine, prompt, max_new_tokens=8, temperature=0.7, seed=1)
    assert sampled.accepted_drafts == 0


@pytest.mark.parametrize("lookahead", [False, True])
@pytest.mark.parametrize(
    "model_engine", ["engine", "engine16"]
)  # the PyTorch step; the native one (bf16)
def test_long_generation_stops_cleanly_at_the_context_limit(
    request, model_engine, paragraphs, lookahead
):
    engine = request.getfixturevalue(model_engine)
    prompt = _prompt(engine, paragraphs, "Repeat the documents word for word.", 200)
    small = Engine(engine.lm, SYSTEM_PROMPT, max_context=len(prompt) + 12)
    gen = _generate(small, prompt, max_new_tokens=200, lookahead=lookahead)
    assert gen.finish_reason == "context" and 0 < len(gen.output_ids) <= 12

    # Directly: a buffer with 6 free slots is filled to the end and never grows.
    pre = engine.prefill(prompt, extra_slots=6)
    k_ptr, max_len = pre.cache.k.data_ptr(), pre.cache.max_len
    drafter = Lookahead(prompt.ids()[len(prompt.header) :]) if lookahead else None
    r = _run(engine, pre, prompt, 200, drafter)
    assert r.finish == "context" and len(r.ids) == 7  # 6 fed tokens + the last one chosen
    assert (
        pre.cache.k.data_ptr() == k_ptr
        and pre.cache.max_len == max_len
        and pre.cache.length == max_len
    )


def test_stop_strings_and_cancellation(engine, paragraphs):
    prompt = _prompt(engine, paragraphs, QUESTIONS[0], 300)
    pre = engine.prefill(prompt, extra_slots=40)
    full = _run(engine, pre, prompt, 40)
    assert len(full.text.split()) > 3
    word = full.text.split()[2]
    cut = _run(engine, pre, prompt, 40, Lookahead(prompt.ids()[len(prompt.header) :]), stop=[word])
    assert cut.finish == "stop" and cut.text == full.text[: full.text.find(word)]
    seen: list[str] = []
    gone = _run(engine, pre, prompt, 40, on_text=lambda d: seen.append(d) or len(seen) < 2)
    assert (
        gone.finish == "cancelled"
        and len(seen) == 2
        and "".join(seen) == full.text[: len("".join(seen))]
    )


def test_decode_pass_linears_are_batch_invariant(lm32):
    """A row's result must not depend on how many rows share the pass (tree vs one token)."""
    layer = lm32.model.layers[0].wqkv
    if layer.packed is None:
        pytest.skip("no packed oneDNN weights on this machine")
    lin = layer.run
    x = torch.randn(16, lm32.model.args.dim)
    rows = lin(x)
    for i in (0, 7, 15):
        assert torch.equal(lin(x[i : i + 1])[0], rows[i])
    other = torch.randn(16, lin(x[:1]).shape[1])
    assert torch.equal(lin(x[3:4], "add", other[3:4])[0], lin(x, "add", other)[3])


def test_plain_step_reads_the_free_room_masked_and_equals_a_gathered_tree_row(lm32):
    """A plain step attends over the buffer's whole free room under a -inf mask (no gather);
    its logits equal those of the same token run through the gathered (tree) path, and stay
    finite because new buffers are zeros (0 * NaN would be NaN)."""
    from rag.engine.decode_step import DecodeStep

    model = lm32.model
    step = DecodeStep(model)
    ids = torch.randint(100, 20000, (120,))
    cache = model.new_cache(140)
    assert not cache.k.any() and not cache.v.any()
    step(ids, cache, 0, base=0)
    snapshot = (cache.k.clone(), cache.v.clone())
    plain = step(torch.tensor([7]), cache, 120, base=120)
    cache.k.copy_(snapshot[0])
    cache.v.copy_(snapshot[1])
    one_node = torch.ones(
        1, 121, dtype=torch.bool
    )  # a one-node "tree": sees every slot up to itself
    tree = step(
        torch.tensor([7]), cache, 120, base=120, positions=torch.tensor([120]), mask=one_node
    )
    assert torch.isfinite(plain).all() and torch.equal(plain, tree)


def test_request_buffers_are_reused_and_leave_no_trace(engine, paragraphs):
    """`generate` hands its buffer back and the next request gets a view of it, sized exactly;
    the old K/V left in it change nothing (a fresh engine's zeroed buffer gives the same answer)."""
    used = Engine(engine.lm, SYSTEM_PROMPT)
    _generate(used, _prompt(used, paragraphs, QUESTIONS[0], 600), mode="blend", max_new_tokens=24)
    prompt = _prompt(used, paragraphs, QUESTIONS[2], 300)
    for mode in ("full", "blend"):
        again = _generate(used, prompt, mode=mode, max_new_tokens=24)
        fresh = _generate(Engine(engine.lm, SYSTEM_PROMPT), prompt, mode=mode, max_new_tokens=24)
        assert again.output_ids == fresh.output_ids and len(again.output_ids) > 4

    a = used.new_cache(100)
    used.release(a)
    used.release(a)  # twice: still one spare, never lent to two requests
    b, c = used.new_cache(80), used.new_cache(80)
    assert b.k.data_ptr() == a.k.data_ptr() and b.max_len == 80
    assert c.k.data_ptr() != b.k.data_ptr()
