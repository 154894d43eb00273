"""SQuAD-format QA datasets for `kvrag eval qa`: checked on load, contexts written as files.

`{"data": [{"paragraphs": [{"context", "qas": [{"id", "question", "answers": [{"text",
"answer_start"}]}]}]}]}`. Each paragraph is one document. A record that breaks the format
raises DatasetError naming it (its path in the file and its question id), so nothing is
silently skipped.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path


class DatasetError(ValueError):
    """The dataset file does not follow the SQuAD format; the message names the record."""


@dataclass
class QAItem:
    qid: str
    question: str
    answers: list[str]
    answer_starts: list[int]
    doc: str  # the file stem the paragraph is ingested as


@dataclass
class QADataset:
    contexts: dict[str, str]  # doc -> text
    items: list[QAItem]

    def write_documents(self, folder: Path) -> list[Path]:
        """One .txt file per paragraph, named by its doc (exact text: no newline translation)."""
        folder.mkdir(parents=True, exist_ok=True)
        paths = []
        for doc, text in self.contexts.items():
            path = folder / f"{doc}.txt"
            with open(path, "w", encoding="utf-8", newline="") as f:
                f.write(text)
            paths.append(path)
        return paths

    def sample(self, limit: int | None, seed: int) -> list[QAItem]:
        """`limit` questions drawn with a fixed seed (all of them, in file order, if None)."""
        if limit is None or limit >= len(self.items):
            return list(self.items)
        picked = sorted(random.Random(seed).sample(range(len(self.items)), limit))
        return [self.items[i] for i in picked]


def _need(cond: bool, where: str, what: str) -> None:
    if not cond:
        raise DatasetError(f"{where}: {what}")


def load_squad(path: Path | str) -> QADataset:
    path = Path(path)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DatasetError(f"{path}: cannot read a JSON dataset ({e})") from e
    _need(isinstance(raw, dict) and isinstance(raw.get("data"), list), str(path), "no 'data' list")
    contexts: dict[str, str] = {}
    items: list[QAItem] = []
    seen: set[str] = set()
    for i, article in enumerate(raw["data"]):
        paragraphs = article.get("paragraphs") if isinstance(article, dict) else None
        _need(isinstance(paragraphs, list), f"{path} data[{i}]", "no 'paragraphs' list")
        for j, para in enumerate(paragraphs):
            where = f"{path} data[{i}].paragraphs[{j}]"
            _need(isinstance(para, dict), where, "not an object")
            context = para.get("context")
            _need(isinstance(context, str) and context.strip() != "", where, "empty 'context'")
            _need(isinstance(para.get("qas"), list), where, "no 'qas' list")
            doc = f"d{i:03d}p{j:02d}"
            contexts[doc] = context
            for n, qa in enumerate(para["qas"]):
                items.append(_item(qa, f"{where}.qas[{n}]", doc, context, seen))
    _need(bool(items), str(path), "no questions")
    return QADataset(contexts, items)


def _item(qa: object, where: str, doc: str, context: str, seen: set[str]) -> QAItem:
    _need(isinstance(qa, dict), where, "not an object")
    assert isinstance(qa, dict)
    qid = str(qa.get("id", ""))
    where = f"{where} (id {qid or '?'})"
    _need(qid != "", where, "no 'id'")
    _need(qid not in seen, where, "duplicate id")
    seen.add(qid)
    question = qa.get("question")
    _need(isinstance(question, str) and question.strip() != "", where, "empty 'question'")
    answers = qa.get("answers")
    _need(isinstance(answers, list) and len(answers) > 0, where, "no 'answers'")
    texts, starts = [], []
    for m, a in enumerate(answers):
        at = f"{where} answers[{m}]"
        _need(isinstance(a, dict) and isinstance(a.get("text"), str), at, "no answer 'text'")
        start = a.get("answer_start")
        _need(isinstance(start, int) and 0 <= start < len(context), at, "bad 'answer_start'")
        _need(
            context[start : start + len(a["text"])] == a["text"],
            at,
            f"the context at answer_start {start} is not the answer text {a['text'][:40]!r}",
        )
        texts.append(a["text"])
        starts.append(start)
    return QAItem(qid, question.strip(), texts, starts, doc)
