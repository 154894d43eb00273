"""The batching scheduler on the real model: a request's answer is token-for-token the same
alone (the one-request engine, itself held to transformers) and in a batch of 8 with other
questions, greedy and seeded sampling, bf16 and float32; a request that stops early or hits
the context limit leaves the others untouched; the K/V budget holds."""

from __future__ import annotations

import threading

import pytest

from rag.config import SYSTEM_PROMPT
from rag.engine.engine import Engine
from rag.engine.request import GenerationParams, Request
from tests.test_decode import _prompt

pytestmark = pytest.mark.usefixtures("one_thread")

QUESTIONS = (
    "How tall is the Greywater Point lighthouse?",
    "Who was the first principal keeper of Greywater Point?",
    "What is the light characteristic of Skerra Rock Lighthouse?",
    "When was the lighthouse automated?",
    "What fuel did the lamp burn?",
    "Why was the keeper's cottage rebuilt?",
    "How far can the light be seen?",
    "What happened during the storm?",
)
MAX_NEW = 20


@pytest.fixture(scope="module")
def lm16(models_dir):
    from rag.model.loader import load_model

    return load_model("", models_dir, "bfloat16")


@pytest.fixture(params=["lm32", "lm16"])
def lm(request):
    return request.getfixturevalue(request.param)


def _requests(engine: Engine, paragraphs: list[str], **params):
    """Eight different questions over prompts of different sizes, blend and full prefill."""
    out = []
    for i, q in enumerate(QUESTIONS):
        prompt = _prompt(engine, paragraphs, q, 150 + 60 * i)
        mode = "full" if i % 3 == 2 else "blend"
        out.append((prompt, mode, dict({"max_new_tokens": MAX_NEW}, **params)))
    return out


def _alone(engine: Engine, jobs) -> list[Request]:
    return [
        engine.generate(Request(mode=mode, params=GenerationParams(**params)), prompt)
        for prompt, mode, params in jobs
    ]


def _all_prefilled(n: int):
    """on_text callbacks that hold each request at its first token until all n have one: their
    decoding then runs as one batch of n from the first step."""
    barrier = threading.Barrier(n, timeout=600)

    def on_text(i: int):
        first = [True]

        def cb(_delta: str) -> bool:
            if first[0]:
                first[0] = False
                barrier.wait()
            return True

        return cb

    return on_text


def _together(engine: Engine, jobs, on_text=None) -> list[Request]:
    """All jobs at once, each on its own thread, through the engine's scheduler."""
    done: list[Request | None] = [None] * len(jobs)
    errors: list[BaseException] = []

    def one(i: int) -> None:
        prompt, mode, params = jobs[i]
        r = Request(mode=mode, params=GenerationParams(**params))
        r.on_text = on_text(i) if on_text else None
        try:
            done[i] = engine.generate(r, prompt)
        except BaseException as e:  # noqa: BLE001  (re-raised below, on the test's thread)
            errors.append(e)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return done  # type: ignore[return-value]


@pytest.fixture
def engines(lm):
    """The one-request engine (the oracle) and a batching one over the same model."""
    alone = Engine(lm, SYSTEM_PROMPT)
    batched = Engine(lm, SYSTEM_PROMPT, max_batch=8)
    scheduler = batched.start_scheduler(8)
    yield alone, batched
    scheduler.close()


def test_greedy_answers_are_the_same_alone_and_in_a_batch_of_8(engines, paragraphs):
    alone, batched = engines
    jobs = _requests(alone, paragraphs)
    ref = _alone(alone, jobs)
    steps0 = batched.scheduler.steps
    got = _together(batched, jobs, _all_prefilled(len(jobs)))
    for r, g in zip(ref, got, strict=True):
        assert g.output_ids == r.output_ids and g.finish_reason == r.finish_reason
        assert len(g.output_ids) > 3
    assert len({tuple(r.output_ids) for r in ref}) > 4  # different questions, different answers
    # Batched: requests shared steps, several at once.
    assert batched.scheduler.steps - steps0 <= max(len(g.output_ids) for g in got)
    assert batched.scheduler.peak_batch == 8


def test_seeded_sampling_is_the_same_alone_and_in_a_batch(engines, paragraphs):
    alone, batched = engines
    jobs = _requests(alone, paragraphs, temperature=0.9, top_p=0.95, seed=7)
    jobs = [(p, m, dict(params, seed=i)) for i, (p, m, params) in enumerate(jobs)]
    ref = _alone(alone, jobs)
    got = _together(batched, jobs, _all_prefilled(len(jobs)))
    assert [g.output_ids for g in got] == [r.output_ids for r in ref]
    assert len({tuple(r.output_ids) for r in ref}) == len(ref)


def test_early_stops_leave_the_others_untouched(lm32, paragraphs):
    """A stop string, a small max_tokens and a client that leaves after two deltas, in a batch
    with five plain requests, and one request whose prompt nearly fills the context: each
    ends its own way, every other answer is the one it gets alone."""
    long_prompt = _prompt(Engine(lm32, SYSTEM_PROMPT), paragraphs, QUESTIONS[0], 700)
    limit = len(long_prompt) + 5
    alone = Engine(lm32, SYSTEM_PROMPT, max_context=limit)
    batched = Engine(lm32, SYSTEM_PROMPT, max_context=limit, max_batch=8)
    scheduler = batched.start_scheduler(8)
    try:
        jobs = _requests(alone, paragraphs)[:7] + [(long_prompt, "blend", {"max_new_tokens": 30})]
        ref = _alone(alone, jobs)
        word = ref[0].text.split()[2]
        jobs[0] = (jobs[0][0], jobs[0][1], {"max_new_tokens": MAX_NEW, "stop": [word]})
        jobs[1] = (jobs[1][0], jobs[1][1], {"max_new_tokens": 4})
        seen: list[str] = []
        gate = _all_prefilled(len(jobs))

        def on_text(i):
            held = gate(i)
            if i != 2:
                return held
            return lambda d: held(d) and (seen.append(d) or len(seen) < 2)

        got = _together(batched, jobs, on_text)
        cut = ref[0].text[: ref[0].text.find(word)].strip()
        assert got[0].finish_reason == "stop" and got[0].text == cut
        assert got[1].finish_reason == "length" and got[1].output_ids == ref[1].output_ids[:4]
        assert got[2].finish_reason == "cancelled" and len(seen) == 2
        assert got[2].output_ids == ref[2].output_ids[: len(got[2].output_ids)]
        assert got[7].finish_reason == "context" and got[7].output_ids == ref[7].output_ids
        assert len(got[7].output_ids) <= 5
        for i in range(3, 7):
            assert got[i].output_ids == ref[i].output_ids
            assert got[i].finish_reason == ref[i].finish_reason
        # (a stop string holds its first text back, so that request may join the batch before
        # the gate opens, and a short one may leave before the last joins)
        assert not scheduler.running and scheduler.peak_batch >= 6
    finally:
        scheduler.close()


def test_the_kv_budget_holds_and_every_request_still_finishes(lm32, paragraphs):
    """A budget for about two requests' buffers: eight requests wait their turn for memory,
    the pool never holds more than the budget, and the answers are the ones alone."""
    alone = Engine(lm32, SYSTEM_PROMPT)
    jobs = _requests(alone, paragraphs)
    biggest = max(len(p) for p, _, _ in jobs) + MAX_NEW
    budget_mb = 2.5 * biggest * alone.buffers.slot_bytes / 2**20
    batched = Engine(lm32, SYSTEM_PROMPT, kv_budget_mb=budget_mb, max_batch=8)
    scheduler = batched.start_scheduler(8)
    try:
        got = _together(batched, jobs)
        ref = _alone(alone, jobs)
        assert [g.output_ids for g in got] == [r.output_ids for r in ref]
        assert 0 < batched.buffers.peak_bytes <= batched.buffers.budget
        assert batched.buffers.peak_bytes > biggest * alone.buffers.slot_bytes  # more than one
    finally:
        scheduler.close()


def test_the_pool_lends_spares_of_any_size_and_keeps_to_its_budget(lm32):
    """Spare buffers of different sizes go back out by size (the larger one, not the first);
    past the budget a request that does not fit is refused instead of allocated."""
    from rag.engine.buffers import BufferPool, OverBudget

    pool = BufferPool(lm32.model, 4096, budget_bytes=3000 * 23040 * 2, spare=4)
    small, large = pool.take(300), pool.take(600)
    pool.give_back(small)
    pool.give_back(large)
    again = pool.take(600)
    assert again.k.data_ptr() == large.k.data_ptr() and again.max_len == 600
    with pytest.raises(OverBudget):
        pool.take(4096)
    held = pool.take(2000)  # fits once the small spare is dropped
    assert pool.used_bytes <= pool.budget and held.max_len == 2000


def test_ignore_eos_runs_every_answer_to_max_tokens_alone_and_in_a_batch(lm32, paragraphs):
    """A benchmark's fixed-length answers: past the end token to max_tokens, the same tokens
    as the natural answer up to there, and the same alone and batched."""
    alone = Engine(lm32, SYSTEM_PROMPT)
    jobs = [(p, m, {"max_new_tokens": 48}) for p, m, _ in _requests(alone, paragraphs)[:4]]
    ref = _alone(alone, jobs)
    assert any(r.finish_reason == "stop" for r in ref)  # some end on the end token before 48
    forced = [(p, m, dict(params, ignore_eos=True)) for p, m, params in jobs]
    got_alone = _alone(alone, forced)
    batched = Engine(lm32, SYSTEM_PROMPT, max_batch=8)
    scheduler = batched.start_scheduler(8)
    try:
        got = _together(batched, forced, _all_prefilled(len(forced)))
    finally:
        scheduler.close()
    for r, a, g in zip(ref, got_alone, got, strict=True):
        assert len(a.output_ids) == 48 and a.finish_reason == "length"
        assert a.output_ids[: len(r.output_ids)] == r.output_ids
        assert g.output_ids == a.output_ids


def test_repaired_answers_are_the_same_alone_and_through_the_scheduler(lm32, paragraphs):
    """With the blend's stale K/V repaired before the second token (rag.engine.repair), four
    requests at once through the scheduler (each repairing in turns between the others' steps)
    answer as the one-request engine does, and repair as much."""
    alone = Engine(lm32, SYSTEM_PROMPT)
    jobs = [
        (_prompt(alone, paragraphs, q, 400 + 60 * i), "blend", {"max_new_tokens": MAX_NEW})
        for i, q in enumerate(QUESTIONS[:4])
    ]
    assert all(len(p.chunks) > 1 for p, _, _ in jobs)  # something stale to repair

    def request(params):
        return Request(mode="blend", repair=8192, params=GenerationParams(**params))

    ref = [alone.generate(request(params), p) for p, _, params in jobs]
    batched = Engine(lm32, SYSTEM_PROMPT, max_batch=8)
    scheduler = batched.start_scheduler(8)
    done: list[Request] = [request(params) for _, _, params in jobs]
    threads = [
        threading.Thread(target=batched.generate, args=(r, p))
        for r, (p, _, _) in zip(done, jobs, strict=True)
    ]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        scheduler.close()
    for r, g in zip(ref, done, strict=True):
        assert r.repaired_tokens > 0 and g.repaired_tokens == r.repaired_tokens
        assert g.output_ids == r.output_ids
