"""FAISS ids, BM25, their fusion, docstore spans and atomic index generations."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from rag.index.docstore import Chunk, Document, sha256
from rag.index.generations import IndexGenerations
from rag.index.lexical_index import LexicalIndex, terms
from rag.index.retriever import Retriever, reciprocal_rank_fusion
from rag.index.vector_index import VectorIndex


def unit(rows: int, dim: int = 8, seed: int = 0) -> np.ndarray:
    v = np.random.default_rng(seed).normal(size=(rows, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def test_vector_index_remove_and_tie_break(tmp_path):
    index = VectorIndex(8)
    vecs = unit(4)
    index.add([10, 11, 12, 13], vecs)
    index.add([14], vecs[2:3])  # an exact duplicate of id 12
    hits = index.search(vecs[2], 2)
    assert [h[0] for h in hits] == [12, 14]  # tie broken by the earlier id
    assert index.remove([12]) == 1
    assert [h[0] for h in index.search(vecs[2], 1)] == [14]
    index.save(tmp_path / "f.index")
    again = VectorIndex.load(tmp_path / "f.index", 8)
    assert len(again) == 4 and again.search(vecs[0], 1)[0][0] == 10
    with pytest.raises(ValueError):
        VectorIndex.load(tmp_path / "f.index", 16)


def add_doc(docstore, index, doc_id: str, text: str, spans):
    ids = docstore.next_ids(len(spans))
    docstore.put_document(Document(doc_id, doc_id, sha256(text), text), 0.0)
    docstore.add_chunks(
        [
            Chunk(i, doc_id, s, e, text[s:e], e - s, sha256(text[s:e]))
            for i, (s, e) in zip(ids, spans, strict=True)
        ]
    )
    index.add(ids, unit(len(ids), seed=len(text)))
    return ids


def test_generation_commits_atomically_and_ids_only_grow(tmp_path):
    store = IndexGenerations(tmp_path / "index", 8)
    with store.transaction() as (docstore, index):
        first = add_doc(docstore, index, "a", "alpha beta gamma", [(0, 5), (6, 16)])
    with store.transaction() as (docstore, index):
        docstore.delete_document("a")
        index.remove(first)
        second = add_doc(docstore, index, "a", "alpha beta delta", [(0, 16)])
    assert min(second) > max(first)  # a deleted id is never handed out again

    # A run that fails half-way leaves the committed generation as it was.
    before = store.current_dir()
    with pytest.raises(RuntimeError), store.transaction() as (docstore, index):
        add_doc(docstore, index, "b", "half written", [(0, 4)])
        raise RuntimeError("crash")
    assert store.current_dir() == before
    docstore, index, lexical = store.open()
    assert docstore.document_ids() == ["a"] and len(index) == 1
    assert (
        lexical.ids == second and [cid for cid, _ in lexical.search("delta", 5)] == second
    )  # BM25 too
    shutil.rmtree(before / "bm25")  # a generation committed before BM25 existed gets one built
    assert [cid for cid, _ in store.open()[2].search("delta", 5)] == second
    for c in docstore.chunks_of("a"):
        assert c.text == docstore.get_document("a").text[c.start : c.end]
    assert [p.name for p in (tmp_path / "index").glob("gen-*")] == [before.name]


def test_an_interrupt_once_current_has_flipped_keeps_the_new_generation(tmp_path, monkeypatch):
    """Ctrl-C between CURRENT's replacement and the end of the commit: the generation CURRENT
    names is the new one, so the cleanup of a failed run must not delete it."""
    import rag.index.generations

    store = IndexGenerations(tmp_path / "index", 8)
    with store.transaction() as (docstore, index):
        add_doc(docstore, index, "a", "alpha beta gamma", [(0, 5)])
    before, fsync = store.current_dir(), rag.index.generations._fsync_dir

    def interrupted(path):
        if path == store.root and (store.root / "CURRENT").read_text() != before.name:
            raise KeyboardInterrupt
        fsync(path)

    monkeypatch.setattr(rag.index.generations, "_fsync_dir", interrupted)
    with pytest.raises(KeyboardInterrupt), store.transaction() as (docstore, index):
        add_doc(docstore, index, "b", "beta delta", [(0, 4)])
    assert store.current_dir() != before and store.current_dir().is_dir()
    assert store.open()[0].document_ids() == ["a", "b"]


def test_lexical_terms_stem_drop_stop_words_and_split_chinese():
    assert terms(["The dogs are Running in 2021"]) == [["dog", "run", "2021"]]
    assert terms(["北京是首都"]) == [["北", "京", "是", "首", "都"]]


def test_lexical_index_finds_only_chunks_sharing_a_term():
    index = LexicalIndex(
        [7, 8, 9], ["the cat sat on the mat", "dogs running in the park", "北京是中国的首都"]
    )
    assert [cid for cid, _ in index.search("a dog runs", 5)] == [8]
    assert [cid for cid, _ in index.search("中国的首都在哪里", 5)] == [9]
    assert index.search("zebra", 5) == [] and index.search("", 5) == []
    assert LexicalIndex([], []).search("cat", 5) == []
    assert LexicalIndex([1], ["0.1.0 a"]).search("0.1.0 a", 5) == []  # chunks without a single term


def test_rrf_fuses_two_rankings_and_breaks_ties_by_id():
    fused = reciprocal_rank_fusion([[2, 1, 3], [1, 2, 4], [5]], 4)
    assert [cid for cid, _ in fused] == [
        1,
        2,
        5,
        3,
    ]  # 1 and 2 tie on 1/61 + 1/62: the smaller id first
    assert [score for _, score in fused] == pytest.approx([1 / 61 + 1 / 62] * 2 + [1 / 61, 1 / 63])


def test_hybrid_finds_an_exact_term_the_vectors_miss():
    vecs = np.eye(8, dtype=np.float32)[:3]
    dense = VectorIndex(8)
    dense.add([1, 2, 3], vecs)
    texts = ["the harbour opened in spring", "ferries run daily", "the Kellhaven lighthouse keeper"]
    hybrid = Retriever(dense, LexicalIndex([1, 2, 3], texts))
    query = vecs[0] + 0.3 * vecs[1]
    query /= np.linalg.norm(query)
    assert [cid for cid, _ in Retriever(dense).search(query, "Kellhaven", 2)] == [1, 2]
    assert [cid for cid, _ in hybrid.search(query, "Kellhaven", 2)] == [3, 1]
