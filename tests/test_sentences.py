"""Sentence splitting: English and Chinese rules, exact offsets on the shared corpora."""

from __future__ import annotations

from pathlib import Path

import pytest

from ingest.sentences import RuleSentenceSplitter, make_splitter, split_sentences

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
CORPORA = DATA / "chroma_eval" / "corpora"


def texts(text: str, splitter=None) -> list[str]:
    return [text[s:e] for s, e in split_sentences(text, splitter)]


def test_english_abbreviations_and_numbers_do_not_split():
    text = (
        "Mr. Smith met Dr. J. Watson in the U.S. capital. See Section 5.3. for details, e.g. the "
        "tables in Fig. 3. It rained! Did it? Yes."
    )
    assert texts(text) == [
        "Mr. Smith met Dr. J. Watson in the U.S. capital.",
        "See Section 5.3. for details, e.g. the tables in Fig. 3.",
        "It rained!",
        "Did it?",
        "Yes.",
    ]


def test_lowercase_sentences_and_enumerations():
    # finance.md is all lowercase; "14." opening a sentence is a list marker, "2020." ends one.
    text = (
        "14. debt long-term debt consisted of the following. it expires in 2020. "
        "a deferred tax asset"
    )
    assert texts(text) == [
        "14. debt long-term debt consisted of the following.",
        "it expires in 2020.",
        "a deferred tax asset",
    ]


def test_decimals_and_quotes():
    text = 'He said "it costs 3.5 dollars." Then he left (quietly.) \u201cReally?\u201d Yes.'
    assert texts(text) == [
        'He said "it costs 3.5 dollars."',
        "Then he left (quietly.)",
        "\u201cReally?\u201d",
        "Yes.",
    ]


def test_chinese_sentence_ends():
    text = "今天天气很好。我们去公园吧！你觉得怎么样？好；走吧"
    assert texts(text) == ["今天天气很好。", "我们去公园吧！", "你觉得怎么样？", "好；", "走吧"]


def test_lines_break_sentences_and_whitespace_is_stripped():
    text = "  # Title\n\n| a | b |\n| 1 | 2 |\n\n  Last one.  "
    assert texts(text) == ["# Title", "| a | b |", "| 1 | 2 |", "Last one."]


def test_punkt_is_pluggable():
    text = "Mr. Smith went to Washington. He arrived at 5 p.m. on Monday.\nNew line here."
    spans = make_splitter("punkt").split(text)
    assert [text[s:e] for s, e in spans] == [
        "Mr. Smith went to Washington.",
        "He arrived at 5 p.m. on Monday.",
        "New line here.",
    ]
    with pytest.raises(ValueError):
        make_splitter("nope")


@pytest.mark.skipif(not CORPORA.is_dir(), reason="shared corpora not available")
@pytest.mark.parametrize(
    "path", sorted(CORPORA.glob("*.md")) if CORPORA.is_dir() else [], ids=lambda p: p.stem
)
def test_offsets_are_exact_on_real_corpora(path):
    text = path.read_text(encoding="utf-8")
    spans = RuleSentenceSplitter().split(text)
    assert spans
    prev_end = 0
    for s, e in spans:
        assert prev_end <= s < e
        assert not text[prev_end:s].strip(), "only whitespace between sentences"
        assert text[s:e] == text[s:e].strip()
        prev_end = e
    assert not text[prev_end:].strip()
