"""Repair of a blended cache while decoding, against the oracle: a full prefill of the prompt
plus the answer so far (the real SmolLM2-135M model, float32, real-text chunks)."""

from __future__ import annotations

import pytest
import torch

from eval.qa import Run, probe_logits
from rag.config import SYSTEM_PROMPT
from rag.engine.engine import Engine
from rag.engine.lookahead import Lookahead
from rag.engine.repair import RepairJob, blend_repair
from rag.engine.request import GenerationParams, Request
from tests.test_blend import QUESTION, TEXT
from tests.test_decode import _run

pytestmark = pytest.mark.usefixtures("one_thread")

TOL = {"rtol": 1e-4, "atol": 1e-4}


@pytest.fixture(scope="module")
def engine(lm32) -> Engine:
    return Engine(lm32, SYSTEM_PROMPT)


@pytest.fixture(scope="module")
def prompt(engine):
    return engine.prompts.build(list(TEXT), QUESTION)


def _blend(engine: Engine, prompt, extra: int):
    kvs = [engine.chunk_kv(c) for c in prompt.chunks]
    return engine.prefill(prompt, "blend", 0.15, kvs, extra_slots=extra)


def _full(engine: Engine, prompt, ids: list[int], extra: int = 0):
    """Full prefill of `ids` (the prompt's, then answer tokens) after the blend's exact prefix:
    the header's K/V and the first chunk's as the store keeps them (16 bits, the blend's only
    inexactness there), then everything after it in one forward. (cache, last logits)."""
    model, h, s1 = engine.model, len(prompt.header), prompt.chunk_starts[1]
    cache = model.new_cache(len(ids) + extra)
    cache.load(0, *engine.header_kv)
    first = engine.chunk_kv(prompt.chunks[0])
    cache.load(h, first.k.to(model.dtype), first.v.to(model.dtype))
    return cache, model(torch.tensor([ids[s1:]]), cache, s1)[0, -1]


def _full_kv(engine: Engine, prompt, ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    return _full(engine, prompt, ids)[0].view(0, len(ids))


def _greedy(engine: Engine, prompt, ids: list[int], n: int) -> list[int]:
    """n greedy tokens after a full prefill of `ids`, each step the model's own forward."""
    model = engine.model
    cache, logits = _full(engine, prompt, ids, extra=n)
    out = []
    for _ in range(n):
        out.append(int(logits.argmax()))
        logits = model(torch.tensor([[out[-1]]]), cache, len(ids) + len(out) - 1)[0, -1]
    return out


def _decode(engine: Engine, pre, prompt, n: int, repair=None, repair_tokens=0, drafter=None):
    return _run(engine, pre, prompt, n, drafter, repair=repair, repair_tokens=repair_tokens)


def test_repaired_cache_equals_full_prefill(engine, prompt):
    """Stale K/V of the later chunks, the question and answer tokens decoded over them: after
    the job, every slot holds what a full prefill of prompt + answer would."""
    pre = _blend(engine, prompt, extra=8)
    answer = _decode(engine, pre, prompt, 6).ids  # the last one's K/V is not in the cache
    ids = prompt.ids() + answer[:5]
    fk, fv = _full_kv(engine, prompt, ids)
    k, v = pre.cache.view(0, len(ids))
    s1 = prompt.chunk_starts[1]
    assert torch.equal(k[:, :, :s1], fk[:, :, :s1])
    assert not torch.allclose(v[:, :, s1:], fv[:, :, s1:], **TOL)

    job = blend_repair(engine.model, pre.cache, prompt)
    assert job is not None and job.frontier == s1
    for t in answer[:5]:
        job.append(t)
    steps = 0
    while not job.step(7):
        steps += 1
    assert steps == -(-(len(ids) - s1) // 7) - 1
    assert job.repaired == len(ids) - s1
    k, v = pre.cache.view(0, len(ids))
    torch.testing.assert_close(k[:, :, s1:], fk[:, :, s1:], **TOL)
    torch.testing.assert_close(v[:, :, s1:], fv[:, :, s1:], **TOL)
    engine.release(pre.cache)


@pytest.mark.parametrize("drafts", [False, True])
def test_answer_after_the_repair_is_full_prefills(engine, prompt, drafts):
    """Repairing 16 slots before each step: from the step where the repair reaches the slot
    being decoded, the greedy answer is full prefill's continuation of the answer so far, and
    Lookahead (drafting once the repair is done) changes nothing."""
    n, per_step = 24, 16
    pre = _blend(engine, prompt, extra=n)
    ctx = prompt.ids()[len(prompt.header) :]
    drafter = Lookahead(ctx, budget=engine.step.draft_budget) if drafts else None
    job = blend_repair(engine.model, pre.cache, prompt)
    r = _decode(engine, pre, prompt, n, repair=job, repair_tokens=per_step, drafter=drafter)
    assert len(r.ids) == n
    # Before the step feeding answer token j the frontier is s1 + (j + 1) * per_step: the
    # first step that reads an exact cache is the first j where that reaches start + j.
    s1, start = prompt.chunk_starts[1], len(prompt)
    j = next(j for j in range(n) if s1 + (j + 1) * per_step >= start + j)
    assert 0 < j < n - 8
    assert r.repaired == start + j - s1
    assert r.ids[j + 1 :] == _greedy(engine, prompt, prompt.ids() + r.ids[: j + 1], n - j - 1)
    fk, fv = _full_kv(engine, prompt, prompt.ids() + r.ids[:-1])
    k, v = pre.cache.view(0, start + n - 1)
    torch.testing.assert_close(k, fk, **TOL)
    torch.testing.assert_close(v, fv, **TOL)
    engine.release(pre.cache)


def test_job_waits_for_tokens_it_does_not_know(engine, prompt):
    """A job never runs past the slots whose tokens it was given, and an exact cache stays
    done until the next token arrives."""
    pre = _blend(engine, prompt, extra=4)
    job = RepairJob(engine.model, pre.cache, prompt.ids(), len(prompt) - 3)
    assert not job.done
    assert job.step(100) and job.repaired == 3
    assert job.step(100) and job.repaired == 3
    job.append(5)
    assert not job.done
    engine.release(pre.cache)


def test_eval_probe_follows_the_served_repair_schedule(engine, prompt):
    """`kvrag eval qa`'s teacher-forced probe, forced along the blend's own answer, predicts
    that answer: its repair schedule is the one decoding serves (Lookahead included)."""
    n, per_step = 16, 16
    request = Request(mode="blend", ratio=0.15, repair=per_step)
    request.params = GenerationParams(max_new_tokens=n)
    engine.generate(request, prompt)
    assert len(request.output_ids) == n and request.repaired_tokens > 0
    logits = probe_logits(engine, prompt, Run("blend", 0.15, per_step), request.output_ids[:-1])
    assert logits[len(prompt.footer) - 1 :].argmax(-1).tolist() == request.output_ids
