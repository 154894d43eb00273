"""FAISS ids, docstore spans and atomic index generations."""

from __future__ import annotations

import numpy as np
import pytest

from rag.docstore import Chunk, Document, sha256
from rag.index_store import IndexStore
from rag.vector_index import VectorIndex


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
    docstore.add_chunks([Chunk(i, doc_id, s, e, text[s:e], e - s, sha256(text[s:e]))
                         for i, (s, e) in zip(ids, spans, strict=True)])
    index.add(ids, unit(len(ids), seed=len(text)))
    return ids


def test_generation_commits_atomically_and_ids_only_grow(tmp_path):
    store = IndexStore(tmp_path / "index", 8)
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
    docstore, index = store.open()
    assert docstore.document_ids() == ["a"] and len(index) == 1
    for c in docstore.chunks_of("a"):
        assert c.text == docstore.get_document("a").text[c.start:c.end]
    assert [p.name for p in (tmp_path / "index").glob("gen-*")] == [before.name]
