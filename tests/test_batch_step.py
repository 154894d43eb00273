"""Batched decode steps: each request's row in a batch is bitwise its plain step alone (C and
PyTorch, bf16 and float32)."""

from __future__ import annotations

import pytest
import torch

from rag.engine import native_step
from rag.engine.batch_row import BatchRow
from rag.engine.decode_step import DecodeStep

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def lm16(models_dir):
    from rag.model.loader import load_model

    return load_model("", models_dir, "bfloat16")


@pytest.fixture(params=["lm16", "lm32"])
def lm(request):
    return request.getfixturevalue(request.param)


def _steps(model):
    steps = {"pytorch": DecodeStep(model)}
    if (native := native_step.for_model(model)) is not None:
        steps["native"] = native
    return steps


@pytest.mark.parametrize("kind", ["pytorch", "native"])
def test_a_batch_row_is_its_plain_step_alone(lm, paragraphs, kind):
    """Five requests of different prompt lengths, at different points of their answers, decode
    three steps as one batch; each row's logits equal its own plain step's, bit for bit, and
    the K/V they wrote equal too."""
    model = lm.model
    step = _steps(model).get(kind)
    if step is None:
        pytest.skip("the native step can't be built here")
    prompts = [lm.tokenizer.encode_text(p)[: 40 + 37 * i] for i, p in enumerate(paragraphs[:5])]
    solo, batch = [], []
    for ids in prompts:
        for caches in (solo, batch):
            cache = model.new_cache(len(ids) + 8 + 3 * len(caches) % 5)
            model(torch.tensor([ids]), cache, 0, logits_for=None)
            caches.append(cache)
    # Requests already a few tokens into their answers: tails of different lengths.
    tokens = [ids[-1] for ids in prompts]
    pos = [len(ids) for ids in prompts]
    base = list(pos)
    for i in range(len(prompts)):
        for _ in range(i % 3):
            for caches in (solo, batch):
                step(torch.tensor([tokens[i]]), caches[i], pos[i], base=base[i])
            pos[i] += 1
    for _ in range(3):
        alone = [
            step(torch.tensor([tokens[i]]), solo[i], pos[i], base=base[i])[0]
            for i in range(len(prompts))
        ]
        rows = [BatchRow(tokens[i], batch[i], pos[i], base[i]) for i in range(len(prompts))]
        together = step.batch(rows)
        assert torch.equal(torch.stack(alone), together)
        for a, b in zip(solo, batch, strict=True):
            assert torch.equal(a.k, b.k) and torch.equal(a.v, b.v)
        tokens = [int(x.argmax()) for x in alone]
        pos = [p + 1 for p in pos]
    # A batch of one: the same as alone, too.
    one = step.batch([BatchRow(tokens[0], batch[0], pos[0], base[0])])
    assert torch.equal(one[0], step(torch.tensor([tokens[0]]), solo[0], pos[0], base=base[0])[0])
