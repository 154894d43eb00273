"""Retrieval metrics on hand-made cases, and the evaluation end to end on one real corpus."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from eval.metrics_retrieval import ChunkLocator, Located, intersect, score_question, union
from eval.report import markdown_table, pct, text
from eval.retrieval import (
    add_eval_retrieval_args,
    cmd_eval_retrieval,
    load_questions,
    run_retrieval_eval,
)
from rag.config import Settings
from rag.model.loader import resolve_model_dir

REPO = Path(__file__).resolve().parents[1]
CHROMA = REPO.parent / "shared" / "data" / "chroma_eval"
needs_data = pytest.mark.skipif(not CHROMA.is_dir(), reason="shared chroma_eval data not available")


def test_union_and_intersection():
    assert union([(5, 8), (0, 3), (2, 4), (8, 9), (10, 10)]) == [(0, 4), (5, 9)]
    assert intersect([(0, 4), (5, 9)], [(3, 6), (8, 20)]) == [(3, 4), (5, 6), (8, 9)]


def test_scores_follow_the_definitions():
    excerpts = [Located("a", 10, 20), Located("a", 40, 50)]  # |e| = 20
    retrieved = [
        Located("a", 0, 15),
        Located("b", 10, 20),
        Located("a", 45, 60),
    ]  # |r| = 15 + 10 + 15
    s = score_question(excerpts, retrieved)
    hit = 5 + 5
    assert s.recall == pytest.approx(hit / 20)
    assert s.precision == pytest.approx(hit / 40)
    assert s.iou == pytest.approx(hit / (40 + 20 - hit))
    # Omega: every chunk touching an excerpt, each once, vs their union with the excerpts.
    touching = [
        Located("a", 0, 15),
        Located("a", 15, 30),
        Located("a", 35, 45),
        Located("a", 45, 60),
    ]
    s = score_question(excerpts, retrieved, touching)
    assert s.precision_omega == pytest.approx(20 / (30 + 25))


def test_overlapping_chunks_count_twice_in_precision_once_in_recall():
    s = score_question([Located("a", 0, 10)], [Located("a", 0, 10), Located("a", 0, 10)])
    assert (s.recall, s.precision, s.iou) == (1.0, 0.5, 0.5)


def test_locator_finds_touching_chunks():
    chunks = [Located("a", 0, 10), Located("a", 5, 30), Located("a", 30, 40), Located("b", 0, 100)]
    loc = ChunkLocator(chunks)
    assert loc.touching(Located("a", 12, 31)) == [Located("a", 5, 30), Located("a", 30, 40)]
    assert loc.touching(Located("c", 0, 5)) == []


def test_markdown_table():
    md = markdown_table([{"name": "x", "v": 0.1234}], [("name", "name", text), ("v", "v %", pct)])
    assert md.splitlines() == ["| name | v % |", "|---|---:|", "| x | 12.3 |"]


@pytest.fixture
def one_corpus(tmp_path):
    """state_of_the_union and its questions only: the same format, a fraction of the work."""
    corpora = tmp_path / "corpora"
    corpora.mkdir()
    (corpora / "state_of_the_union.md").write_text(
        (CHROMA / "corpora" / "state_of_the_union.md").read_text(encoding="utf-8"), encoding="utf-8"
    )
    with open(CHROMA / "questions_df.csv", newline="", encoding="utf-8") as f:
        rows = [r for r in csv.DictReader(f) if r["corpus_id"] == "state_of_the_union"]
    questions = tmp_path / "questions.csv"
    with open(questions, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return corpora, questions, len(rows)


@needs_data
def test_questions_reference_exact_spans():
    corpora = {p.stem: p.read_text(encoding="utf-8") for p in (CHROMA / "corpora").glob("*.md")}
    questions = load_questions(CHROMA / "questions_df.csv")
    assert len(questions) == 472
    assert all(x.end > x.start and x.corpus in corpora for q in questions for x in q.excerpts)


@needs_data
def test_eval_several_chunkers_and_sizes_writes_json_table_and_plot(one_corpus, tmp_path):
    corpora, questions, n = one_corpus
    model = resolve_model_dir("", REPO / "kvrag_data" / "models")
    settings = Settings(data_dir=tmp_path / "data", model=str(model))
    out = tmp_path / "out" / "res.json"
    rows = run_retrieval_eval(
        corpora,
        questions,
        ["token", "recursive", "semantic"],
        [150, 300],
        5,
        out,
        settings,
        progress=False,
        boundary_pairs=2,
    )
    keys = {
        "chunker",
        "chunk_size",
        "k",
        "n_questions",
        "n_chunks",
        "mean_chunk_tokens",
        "chunking_seconds",
        "recall",
        "precision",
        "precision_omega",
        "iou",
    }
    assert [(r["chunker"], r["chunk_size"]) for r in rows] == [
        ("token", 150),
        ("token", 300),
        ("recursive", 150),
        ("recursive", 300),
        ("semantic", 150),
        ("semantic", 300),
    ]
    for r in rows:
        assert keys <= set(r)
        assert r["n_questions"] == n and r["k"] == 5
        for m in ("recall", "precision", "precision_omega", "iou"):
            assert 0.0 <= r[m] <= 1.0
        assert r["recall"] > 0.3  # retrieval works at all on this corpus
        assert r["iou"] <= r["precision"] + 1e-9 and r["precision"] <= r["precision_omega"] + 0.2
        assert r["boundary_pairs"] == 2 and 0 < r["boundary_clarity"] < 2
    # The semantic chunker's sentence embeddings at 300 came from memory: no speed to report there.
    assert all(r["tokens_per_s"] > 0 for r in rows[:5]) and rows[5]["tokens_per_s"] is None
    for small, large in (rows[:2], rows[2:4], rows[4:]):  # each size really was cut at that size
        assert large["n_chunks"] < small["n_chunks"]
        assert small["mean_chunk_tokens"] <= 150 < large["mean_chunk_tokens"] <= 300
    assert json.loads(out.read_text()) == rows
    assert out.with_suffix(".md").read_text().count("\n") == 8
    assert out.with_suffix(".png").stat().st_size > 1000


@needs_data
def test_cli_single_chunker_writes_one_object(one_corpus, tmp_path, monkeypatch, capsys):
    import argparse

    corpora, questions, _ = one_corpus
    monkeypatch.setenv("KVRAG_MODEL", str(resolve_model_dir("", REPO / "kvrag_data" / "models")))
    monkeypatch.setenv("KVRAG_DATA_DIR", str(tmp_path / "data"))
    out = tmp_path / "one.json"
    args = add_eval_retrieval_args(argparse.ArgumentParser()).parse_args(
        [
            "--corpora",
            str(corpora),
            "--questions",
            str(questions),
            "--chunker",
            "recursive",
            "--chunk-size",
            "100",
            "--k",
            "3",
            "--json",
            str(out),
            "--boundary-pairs",
            "0",
            "--no-progress",
        ]
    )
    assert cmd_eval_retrieval(args) == 0
    result = json.loads(out.read_text())
    assert result["chunker"] == "recursive" and result["k"] == 3
    assert not out.with_suffix(".png").exists()
    assert "| recursive |" in capsys.readouterr().out


@needs_data
def test_hybrid_retrieval_beats_dense_on_real_questions(one_corpus, tmp_path):
    """BM25 fused with the vectors finds more of the excerpts than the vectors alone (same
    chunks)."""
    corpora, questions, _ = one_corpus
    settings = Settings(
        data_dir=tmp_path / "data", model=str(resolve_model_dir("", REPO / "kvrag_data" / "models"))
    )
    dense, hybrid = run_retrieval_eval(
        corpora,
        questions,
        ["recursive"],
        150,
        5,
        tmp_path / "r.json",
        settings,
        progress=False,
        boundary_pairs=0,
        retrievals=["dense", "hybrid"],
    )
    assert (dense["retrieval"], hybrid["retrieval"]) == ("dense", "hybrid")
    assert dense["n_chunks"] == hybrid["n_chunks"]
    assert hybrid["recall"] > dense["recall"] + 0.02 and hybrid["iou"] > dense["iou"]
