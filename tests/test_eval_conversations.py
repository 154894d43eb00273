"""The shipped multi-turn set (eval/conversations.json) is what it claims to be."""

from __future__ import annotations

import re

from eval.conversations import conversation_at, load_set, write_corpus


def _norm(text: str) -> str:
    return re.sub(r"\s+", " ", text).lower()


def test_every_gold_answer_is_in_a_gold_document(shared_data, tmp_path):
    spec = load_set()
    write_corpus(spec, tmp_path)
    convs = spec["conversations"]
    assert len(convs) >= 20 and len({c["id"] for c in convs}) == len(convs)
    for conv in convs:
        assert len(conv["turns"]) >= 2
        for turn in conv["turns"]:
            texts = [(tmp_path / doc).read_text(encoding="utf-8") for doc in turn["docs"]]
            assert any(_norm(turn["answer"]) in _norm(t) for t in texts), (conv["id"], turn)


def test_a_follow_up_carries_the_first_turn():
    turns = load_set()["conversations"][0]["turns"]
    conv = conversation_at(turns, 1, ["It is 34 metres tall."])
    assert conv.question == turns[1]["user"]
    assert [t.role for t in conv.turns] == ["user", "assistant"]
    assert conv.turns[0].text == turns[0]["user"] and "34 metres" in conv.turns[1].text
    assert turns[0]["user"] in conv.concat_query() and conv.concat_query().endswith(conv.question)
