"""The COVID-QA converter: exact references that `kvrag eval retrieval` reads, clear errors."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from eval.covidqa_corpus import (
    DatasetError,
    add_eval_covidqa_args,
    cmd_eval_covidqa,
    load_squad,
    write_chroma_format,
)
from eval.retrieval import load_corpora, load_questions

REPO = Path(__file__).resolve().parents[1]
COVIDQA = REPO.parent / "shared" / "data" / "covidqa_dev" / "covidqa_dev.json"
needs_data = pytest.mark.skipif(not COVIDQA.is_file(), reason="shared covidqa_dev not available")


def squad(context: str, answers: list[dict], doc: int = 7) -> dict:
    qas = [{"question": "q?", "id": 42, "answers": answers}]
    return {"data": [{"paragraphs": [{"context": context, "document_id": doc, "qas": qas}]}]}


@needs_data
def test_real_dataset_round_trips_through_the_retrieval_loaders(tmp_path):
    corpora_dir, questions_csv = write_chroma_format(load_squad(COVIDQA), tmp_path)
    corpora = load_corpora(corpora_dir)
    questions = load_questions(questions_csv)
    raw = json.loads(COVIDQA.read_text(encoding="utf-8"))["data"]
    assert len(corpora) == len(raw) == 30
    assert len(questions) == sum(len(a["paragraphs"][0]["qas"]) for a in raw) == 213
    answers = [
        a["text"] for art in raw for qa in art["paragraphs"][0]["qas"] for a in qa["answers"]
    ]
    spans = [corpora[x.corpus][x.start : x.end] for q in questions for x in q.excerpts]
    assert spans == answers  # every reference is its gold answer, at its exact offsets


def test_unicode_and_windows_newlines_keep_their_offsets(tmp_path):
    context = "Título: café\r\nSecond line — with a dash.\r\nThe answer is here."
    start = context.index("The answer")
    data = squad(context, [{"text": "The answer is here.", "answer_start": start}])
    path = tmp_path / "d.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    corpora_dir, questions_csv = write_chroma_format(load_squad(path), tmp_path / "out")
    raw = (corpora_dir / "covidqa_7.txt").read_bytes().decode("utf-8")
    (x,) = load_questions(questions_csv)[0].excerpts
    assert raw[x.start : x.end] == "The answer is here." and raw == context


@pytest.mark.parametrize(
    ("answers", "message"),
    [
        ([{"text": "answer", "answer_start": 3}], "does not locate 'answer'"),
        ([{"text": "answer"}], "missing field 'answer_start'"),
        ([], "no answer"),
    ],
)
def test_a_broken_record_names_itself_and_writes_nothing(tmp_path, answers, message):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(squad("The answer is here.", answers)), encoding="utf-8")
    with pytest.raises(DatasetError, match=message) as err:
        load_squad(path)
    assert "covidqa_7" in str(err.value) and "question 42" in str(err.value)
    out = tmp_path / "out"
    args = add_eval_covidqa_args(argparse.ArgumentParser()).parse_args(
        ["--dataset", str(path), "--out", str(out)]
    )
    with pytest.raises(SystemExit, match="cannot convert"):
        cmd_eval_covidqa(args)
    assert not out.exists()


def test_not_json_is_a_clear_error(tmp_path):
    path = tmp_path / "x.json"
    path.write_text("{nope", encoding="utf-8")
    with pytest.raises(DatasetError, match="not JSON"):
        load_squad(path)
