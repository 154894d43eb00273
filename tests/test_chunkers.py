"""Chunkers on real text: exact offsets for every chunker, PPL boundaries at a topic seam,
merging limits."""

from __future__ import annotations

import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from ingest.chunkers import CHUNKERS, Resources, make_chunker
from ingest.chunkers.merge import TokenCounter, merge_meta_chunks
from ingest.chunkers.meta_fused import fused_gaps
from ingest.chunkers.meta_margin import adaptive_boundaries
from ingest.chunkers.meta_ppl import find_minima
from ingest.lm_scorer import LMScorer, plan_windows
from ingest.sentences import split_sentences
from rag.config import Settings
from rag.index.embedder import MAX_WORDPIECES
from rag.model.loader import resolve_model_dir

REPO = Path(__file__).resolve().parents[1]
CORPORA = REPO.parent / "shared" / "data" / "chroma_eval" / "corpora"
needs_corpora = pytest.mark.skipif(not CORPORA.is_dir(), reason="shared corpora not available")


def corpus(name: str, start: int = 0, n: int = 3000) -> str:
    return (CORPORA / f"{name}.md").read_text(encoding="utf-8")[start : start + n]


@pytest.fixture(scope="module")
def resources(tmp_path_factory):
    model = resolve_model_dir("", REPO / "kvrag_data" / "models")  # converted once, reused
    return Resources(Settings(data_dir=tmp_path_factory.mktemp("data"), model=str(model)))


def assert_exact(text: str, spans):
    assert spans
    for s, e in spans:
        assert 0 <= s < e <= len(text)
        assert text[s:e] == text[s:e].strip()
    covered = "".join(text[s:e] for s, e in spans)
    # Nothing but whitespace is dropped (overlapping chunkers may repeat text).
    assert len("".join(covered.split())) >= len("".join(text.split()))


@needs_corpora
@pytest.mark.parametrize("name", CHUNKERS)
def test_every_chunker_keeps_exact_offsets_on_real_text(resources, name):
    text = corpus("pubmed", 20000, 2500) + "\n\n" + corpus("finance", 0, 1500)
    chunker = make_chunker(name, resources, 80)
    spans = chunker.split(text)
    assert_exact(text, spans)
    counter = TokenCounter(resources.embedder.tokenizer, text)
    assert max(counter.count(s, e) for s, e in spans) <= MAX_WORDPIECES
    if name != "token":  # sentence-based chunkers end chunks at sentence ends
        ends = {e for _, e in split_sentences(text)}
        assert all(e in ends for _, e in spans[:-1])


@needs_corpora
def test_ppl_chunking_splits_at_the_seam_of_two_topics(resources):
    a = corpus("state_of_the_union", 0, 1400)
    b = corpus("pubmed", 30000, 1400)
    a = a[: a.rfind(".") + 1]
    b = b[b.find(". ") + 2 :]
    text = a + "\n" + b
    seam = len(a)
    chunker = make_chunker("meta-ppl", resources, 120)
    sentences = split_sentences(text)
    minima, _ = chunker.boundaries(text, sentences)
    seam_sentence = max(i for i, (_, e) in enumerate(sentences) if e <= seam)
    assert seam_sentence in minima
    assert seam in {e for _, e in chunker.split(text)}


@needs_corpora
def test_fused_chunking_splits_at_the_seam_of_two_topics(resources):
    a = corpus("state_of_the_union", 0, 1400)
    b = corpus("pubmed", 30000, 1400)
    a = a[: a.rfind(".") + 1]
    b = b[b.find(". ") + 2 :]
    text = a + " " + b  # no line break: only the signals can find the seam
    chunker = make_chunker("meta-fused", resources, 120)
    sentences = split_sentences(text)
    gaps = chunker.gaps(text, sentences)
    seam_sentence = max(i for i, (_, e) in enumerate(sentences) if e <= len(a))
    assert gaps[seam_sentence] > np.percentile(gaps, 90)
    assert len(a) in {e for _, e in chunker.split(text)}


def test_fused_gaps_weigh_two_standardized_signals():
    ppl = [2.0, 4.0, 3.0, 3.0, 6.0]  # jumps: 2, -1, 0, 3
    dist = np.array([0.1, 0.5, 0.3, 0.3])
    only_llm, only_emb = fused_gaps(ppl, dist, 1.0), fused_gaps(ppl, dist, 0.0)
    assert np.argmax(only_llm) == 3 and np.argmax(only_emb) == 1
    for z in (only_llm, only_emb):
        assert z.mean() == pytest.approx(0.0) and z.std() == pytest.approx(1.0)
    assert fused_gaps(ppl, dist, 0.5) == pytest.approx(0.5 * only_llm + 0.5 * only_emb)
    assert not np.isnan(fused_gaps([1.0, 1.0, 1.0], np.zeros(2), 0.5)).any()  # flat signals


def test_find_minima_threshold_and_plateau():
    values = [3.0, 1.0, 2.0, 2.0, 1.9, 5.0, 4.0, 4.0, 6.0]
    assert find_minima(values) == [1, 4, 6]
    assert find_minima(values, threshold=1.5) == [1, 4]


def test_adaptive_threshold_follows_recent_margins():
    margins = [0.5, 0.1, 0.6, 0.6, 0.6, 0.2, 0.9, -0.1]
    # Threshold 0 for the first five, then the mean of the last five.
    assert adaptive_boundaries(margins) == [5, 7]


def test_windows_cover_every_token_with_context():
    ids = list(range(5000))
    plan = plan_windows(ids, 512, 64)
    kept = [i for _, e, keep in plan for i in range(keep, e)]
    assert kept == list(range(1, 5000))
    for s, e, keep in plan:
        assert e - s <= 512 and (keep - s >= 64 or s == 0)


def test_repeated_text_gets_identical_windows():
    block = [(i * 7919) % 3000 for i in range(3000)]
    plan = plan_windows([1, 2, 3] + block + [9] * 50 + block, 512, 64)
    first = {tuple(block[s - 3 : e - 3]) for s, e, _ in plan if s >= 3 and e <= 3003}
    second = {tuple(block[s - 3053 : e - 3053]) for s, e, _ in plan if s >= 3053}
    assert len(first & second) >= 3


@needs_corpora
def test_windowed_losses_match_a_full_pass(lm32):
    # float32: in bf16 a batch of windows rounds differently from one long row (AMX kernels block
    # by batch shape), by up to 0.2 nats after 30 layers; windowing is what is tested here.
    scorer = LMScorer(lm32.model, lm32.tokenizer)
    ids = scorer.tokenizer.encode_text(corpus("wikitexts", 0, 2000))[:300]
    full = scorer.model(
        torch.tensor([ids]), scorer.model.new_cache(len(ids)), start=0, logits_for=slice(None)
    )
    ref = torch.nn.functional.cross_entropy(full[0, :-1], torch.tensor(ids[1:]), reduction="none")
    old = scorer.window, scorer.context
    try:
        scorer.window, scorer.context = 400, 64
        got = scorer.token_losses(ids)
        assert (
            not got.requires_grad
        )  # no autograd graph: it chained every batch of a corpus run (18 GB)
        assert math.isnan(got[0])
        assert torch.allclose(got[1:], ref, atol=1e-3)
        scorer.window, scorer.context = 128, 100  # many windows, batched with padding
        windowed = scorer.token_losses(ids)
        # Tokens up to 100 still see the whole text before them: exact.
        assert torch.allclose(windowed[1:101], ref[:100], atol=1e-3)
        # Later ones see 100+ tokens instead of up to 300: close, not equal.
        assert (windowed[101:] - ref[100:]).abs().mean() < 0.5
        # Exactly what each window alone gives, though the windows ran batched and padded and
        # the lm_head ran only on the rows whose losses are kept.
        for s, e, keep in plan_windows(ids, 128, 100):
            alone = scorer.model(
                torch.tensor([ids[s:e]]),
                scorer.model.new_cache(e - s),
                start=0,
                logits_for=slice(None),
            )
            want = torch.nn.functional.cross_entropy(
                alone[0, :-1], torch.tensor(ids[s + 1 : e]), reduction="none"
            )
            assert torch.allclose(windowed[keep:e], want[keep - s - 1 :], atol=1e-3), (s, e, keep)
    finally:
        scorer.window, scorer.context = old


@needs_corpora
def test_chunk_signals_are_computed_once_per_text_across_sizes(resources):
    """A size sweep re-merges; the LLM (or the embedder) is not asked again for a text it has
    scored."""
    text = corpus("state_of_the_union", 0, 3000)
    small = make_chunker("meta-ppl", resources, 60).split(text)
    hits = resources.scorer.memo_hits
    large = make_chunker("meta-ppl", resources, 200).split(text)
    assert resources.scorer.memo_hits == hits + 1
    assert len(large) < len(small)
    assert (
        make_chunker("meta-ppl", resources, 60).split(text) == small
    )  # the memo gives the same answer
    # The embedding signal of the semantic chunker likewise.
    from ingest.chunkers.semantic import sentence_distances

    small = make_chunker("semantic", resources, 60).split(text)
    hits = sentence_distances.cache_info().hits
    large = make_chunker("semantic", resources, 200).split(text)
    assert sentence_distances.cache_info().hits == hits + 1 and len(large) < len(small)


@needs_corpora
def test_sentence_distances_in_bf16_match_float32(resources, monkeypatch):
    """The chunkers' sentence vectors run in bf16 where the CPU has it: the distances must stay
    those of float32 to within what could reorder only near ties."""
    import ingest.chunkers.semantic as semantic

    text = corpus("state_of_the_union", 3000, 2500)
    sentences = tuple(split_sentences(text))
    found = {}
    for bf16 in (False, True):
        semantic.sentence_distances.cache_clear()
        monkeypatch.setattr(semantic, "cpu_has_bf16", lambda bf16=bf16: bf16)
        found[bf16] = semantic.sentence_distances(resources.embedder, text, sentences)
    semantic.sentence_distances.cache_clear()
    assert found[True].dtype == np.float32 and len(found[True]) == len(sentences) - 1
    assert np.abs(found[True] - found[False]).max() < 0.02
    assert np.corrcoef(found[True], found[False])[0, 1] > 0.99
    # The embedder itself stays float32 for the index: only the chunker's call is autocast.
    assert next(resources.embedder.model.parameters()).dtype == torch.float32


@needs_corpora
def test_merge_respects_target_and_hard_max(resources):
    text = corpus("wikitexts", 0, 6000)
    sentences = split_sentences(text)
    counter = TokenCounter(resources.embedder.tokenizer, text)
    # No boundaries at all: one meta-chunk that must be split under the hard max.
    spans = merge_meta_chunks(text, sentences, [], counter, target=100, max_tokens=60)
    assert all(counter.count(s, e) <= 60 for s, e in spans)
    assert len(spans) > 1
    # A boundary after every sentence: chunks grow up to the target.
    spans = merge_meta_chunks(text, sentences, list(range(len(sentences))), counter, target=100)
    sizes = [counter.count(s, e) for s, e in spans]
    singles = {(s, e) for s, e in sentences}
    assert all(n <= 100 or span in singles for n, span in zip(sizes, spans, strict=True))
    assert max(sizes) <= MAX_WORDPIECES
    assert sum(sizes) / len(sizes) > 50


@needs_corpora
def test_merge_makes_as_few_chunks_as_the_target_allows(resources):
    # One paragraph: no structure, so every cut costs about the same whatever the signal says
    # (a random one here), and the fewest chunks win. Left-to-right packing finds that count;
    # the weakest-gap-first merge this replaced cut 26 chunks where 21 fit at 150.
    text = corpus("pubmed", 0, 12000).replace("\n", " ")
    sentences = split_sentences(text)
    counter = TokenCounter(resources.embedder.tokenizer, text)
    rng = random.Random(0)
    ppl = [rng.gauss(3.0, 1.0) for _ in sentences]
    strength = [b - a for a, b in zip(ppl, ppl[1:], strict=False)] + [0.0]
    for target in (60, 150):
        fewest, total = 0, target + 1
        for n in (counter.count(s, e) for s, e in sentences):
            fewest, total = (fewest + 1, n) if total + n > target else (fewest, total + n)
        spans = merge_meta_chunks(
            text, sentences, find_minima(ppl), counter, target=target, strength=strength
        )
        assert len(spans) == fewest
        assert all(counter.count(s, e) <= target or (s, e) in sentences for s, e in spans)


@needs_corpora
def test_merge_keeps_paragraphs_before_sentences(resources):
    tok = resources.embedder.tokenizer
    paragraphs = corpus("state_of_the_union", 0, 20000).split("\n\n")
    n = [len(tok(p, add_special_tokens=False)["input_ids"]) for p in paragraphs]
    i = next(
        i
        for i in range(len(n) - 1)
        if 40 <= n[i] <= 90
        and 40 <= n[i + 1] <= 90
        and len(split_sentences(paragraphs[i])) > 1
        and len(split_sentences(paragraphs[i + 1])) > 1
    )
    text = paragraphs[i] + "\n\n" + paragraphs[i + 1]
    counter = TokenCounter(tok, text)
    target = max(n[i], n[i + 1]) + 5  # each paragraph fits, both together do not
    spans = merge_meta_chunks(text, split_sentences(text), [], counter, target=target)
    # Left-to-right packing would pull the second paragraph's first sentences into the first chunk.
    assert spans == [(0, len(paragraphs[i])), (len(paragraphs[i]) + 2, len(text))]


@needs_corpora
def test_llama_index_node_parser_keeps_offsets(resources):
    from llama_index.core.schema import Document

    from ingest.llama_index_adapter import MetaChunkingNodeParser

    text = corpus("state_of_the_union", 0, 2500)
    text = text + "\n\n" + text  # repeated text: offsets must not come from a text search
    parser = MetaChunkingNodeParser.from_name("meta-ppl", 60, resources=resources)
    nodes = parser.get_nodes_from_documents([Document(text=text)])
    assert len(nodes) > 2
    assert all(n.text == text[n.start_char_idx : n.end_char_idx] for n in nodes)
    assert nodes[-1].end_char_idx > len(text) // 2
