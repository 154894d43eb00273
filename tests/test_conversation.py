"""Conversations: what goes into the prompt (and where), the history budget, the query."""

from __future__ import annotations

import pytest

from rag.conversation import Conversation, Turn, preface

MESSAGES = [
    ("system", "Answer in one sentence."),
    ("user", "How tall is the Greywater Point lighthouse?"),
    ("assistant", "It is 34 metres tall."),
    ("user", "Who built it?"),
    ("assistant", "The Saltmere Lights Board."),
    ("tool", "ignored"),
    ("user", "When was it automated?"),
]


def test_from_messages_splits_question_turns_and_instructions():
    conv = Conversation.from_messages(MESSAGES)
    assert conv.question == "When was it automated?"
    assert [t.role for t in conv.turns] == ["user", "assistant", "user", "assistant"]
    assert conv.instructions == "Answer in one sentence."
    assert conv.concat_query() == (
        "How tall is the Greywater Point lighthouse?\nWho built it?\nWhen was it automated?"
    )
    assert Conversation.from_messages([("assistant", "hi")]).question == ""


def test_history_budget_drops_the_oldest_turns_first():
    conv = Conversation.from_messages(MESSAGES)
    words = lambda s: len(s.split())  # noqa: E731 - a stand-in token count
    assert conv.fit_history(words, 1000) == conv.turns
    kept = conv.fit_history(words, 12)
    assert kept == conv.turns[-2:]  # the two newest fit, the older ones do not
    assert conv.fit_history(words, 1) == []  # the question alone: it is never in the budget


def test_preface_order_turns_then_instructions():
    text = preface([Turn("user", "q1"), Turn("assistant", "a1")], "Be terse.")
    assert text.index("User: q1") < text.index("Assistant: a1") < text.index("Be terse.")
    assert preface([], "") == ""


@pytest.fixture(scope="module")
def engine(lm32):
    from rag.engine.engine import Engine

    return Engine(lm32, "You are a helpful assistant.")


def test_conversation_leaves_header_and_chunks_untouched(engine):
    """The chunk K/V keys and positions do not depend on the conversation: they stay reusable."""
    chunks = ["Greywater Point lighthouse is 34 m tall.", "The ferry takes two hours."]
    plain = engine.prompt(chunks, "When was it automated?")
    conv = Conversation.from_messages(MESSAGES)
    chat = engine.prompt(chunks, conv.question, preface(conv.turns, conv.instructions))
    assert chat.header == plain.header and chat.chunks == plain.chunks
    assert chat.chunk_starts == plain.chunk_starts
    assert [engine.chunk_key(c) for c in chat.chunks] == [engine.chunk_key(c) for c in plain.chunks]
    tail = engine.tokenizer.decode(chat.footer)
    assert tail.index("Who built it?") < tail.index("one sentence") < tail.index("automated")
