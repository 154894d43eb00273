"""`kvrag eval covidqa`: a SQuAD-format data set (COVID-QA) as a retrieval benchmark.

Writes the Chroma format `kvrag eval retrieval` reads: OUT/corpora/<article>.txt (each
article's context, verbatim) and OUT/questions_df.csv (question, references, corpus_id), each
question's gold answer spans as its references with exact character offsets. Every offset is
checked against its article before anything is written, so a broken record stops the
conversion with its article and question named and leaves OUT untouched.
"""

from __future__ import annotations

import argparse
import csv
import json
from dataclasses import dataclass
from pathlib import Path


class DatasetError(ValueError):
    """A SQuAD record that cannot be turned into a corpus and exact references."""


@dataclass
class Article:
    corpus_id: str
    text: str
    questions: list[tuple[str, list[dict]]]  # (question, [{content, start_index, end_index}])


def _field(record: dict, name: str, where: str):
    if not isinstance(record, dict) or name not in record:
        raise DatasetError(f"{where}: missing field {name!r}")
    return record[name]


def load_squad(path: Path | str) -> list[Article]:
    """Articles with their questions' answer spans; raises DatasetError on any inconsistency."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DatasetError(f"{path}: not JSON ({e})") from None
    articles, seen = [], set()
    for a, article in enumerate(_field(data, "data", str(path))):
        for p, para in enumerate(_field(article, "paragraphs", f"article {a}")):
            where = f"article {a} paragraph {p}"
            context = _field(para, "context", where)
            if not isinstance(context, str) or not context.strip():
                raise DatasetError(f"{where}: empty context")
            doc = str(para.get("document_id", a))
            corpus_id = f"covidqa_{doc}" + (f"_{p}" if p else "")
            if corpus_id in seen:
                raise DatasetError(f"{where}: document_id {doc!r} appears twice")
            seen.add(corpus_id)
            questions = []
            for qa in _field(para, "qas", where):
                qwhere = f"{where} ({corpus_id}) question {qa.get('id', '?')}"
                question = _field(qa, "question", qwhere)
                refs = []
                for ans in _field(qa, "answers", qwhere):
                    content = _field(ans, "text", qwhere)
                    start = _field(ans, "answer_start", qwhere)
                    if not isinstance(start, int) or not isinstance(content, str) or not content:
                        raise DatasetError(f"{qwhere}: answer needs a text and an integer start")
                    end = start + len(content)
                    if start < 0 or context[start:end] != content:
                        raise DatasetError(
                            f"{qwhere}: answer_start {start} does not locate {content[:40]!r} "
                            f"(the context there reads {context[start:end][:40]!r})"
                        )
                    refs.append({"content": content, "start_index": start, "end_index": end})
                if not refs:
                    raise DatasetError(f"{qwhere}: no answer")
                questions.append((question, refs))
            articles.append(Article(corpus_id, context, questions))
    if not articles:
        raise DatasetError(f"{path}: no articles")
    return articles


def write_chroma_format(articles: list[Article], out: Path | str) -> tuple[Path, Path]:
    """OUT/corpora/*.txt and OUT/questions_df.csv; returns (corpora folder, questions file)."""
    out = Path(out)
    corpora = out / "corpora"
    corpora.mkdir(parents=True, exist_ok=True)
    for a in articles:
        # newline="" keeps "\r\n" as it is: offsets count the characters of the original text.
        with open(corpora / f"{a.corpus_id}.txt", "w", encoding="utf-8", newline="") as f:
            f.write(a.text)
    questions = out / "questions_df.csv"
    with open(questions, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=["question", "references", "corpus_id"])
        w.writeheader()
        for a in articles:
            for q, refs in a.questions:
                w.writerow(
                    {"question": q, "references": json.dumps(refs), "corpus_id": a.corpus_id}
                )
    return corpora, questions


def add_eval_covidqa_args(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument(
        "--dataset",
        required=True,
        type=Path,
        help="SQuAD-format JSON, e.g. ../shared/data/covidqa_dev/covidqa_dev.json",
    )
    p.add_argument(
        "--out", required=True, type=Path, help="folder for corpora/ and questions_df.csv"
    )
    return p


def cmd_eval_covidqa(args: argparse.Namespace, settings=None) -> int:
    try:
        articles = load_squad(args.dataset)
    except DatasetError as e:
        raise SystemExit(f"cannot convert: {e}") from None
    corpora, questions = write_chroma_format(articles, args.out)
    n = sum(len(a.questions) for a in articles)
    print(f"{len(articles)} articles in {corpora}, {n} questions in {questions}")
    return 0
