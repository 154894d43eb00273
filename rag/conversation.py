"""A chat conversation as the RAG pipeline uses it: the question, the earlier turns, the client's
instructions, and the query that retrieves for it.

The prompt keeps its fixed header and chunk layout (so every stored chunk K/V stays valid);
what a conversation adds goes after the chunks, before the question:
`[header][chunk 1..k][earlier turns][client instructions][question]`. The earlier turns are
bounded by tokens, the oldest dropped first; the question itself is never dropped.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

QueryMethod = Literal["last", "concat", "rewrite"]
QUERY_METHODS: tuple[str, ...] = ("last", "concat", "rewrite")
HISTORY_HEADER = "Earlier conversation:\n"
INSTRUCTIONS_HEADER = "Instructions: "
ROLE_NAMES = {"user": "User", "assistant": "Assistant"}
# `concat`: the user messages joined, newest last; this many earlier ones go with the question.
CONCAT_USER_TURNS = 2
REWRITE_PROMPT = (
    "Rewrite the last question of this conversation as one standalone question that names "
    "what it is about. Reply with the question only.\n\n{history}\nLast question: {question}"
)


@dataclass
class Turn:
    role: str  # "user" or "assistant"
    text: str


@dataclass
class Conversation:
    question: str
    turns: list[Turn] = field(default_factory=list)  # before the question, oldest first
    instructions: str = ""  # the client's system/developer messages, joined

    @classmethod
    def from_messages(cls, messages: list[tuple[str, str]]) -> Conversation:
        """From OpenAI-style (role, text) messages: the last user message is the question."""
        last = max((i for i, (role, _) in enumerate(messages) if role == "user"), default=-1)
        question = messages[last][1].strip() if last >= 0 else ""
        turns = [
            Turn(role, text.strip())
            for role, text in messages[: max(last, 0)]
            if role in ROLE_NAMES and text.strip()
        ]
        instructions = "\n".join(
            text.strip()
            for role, text in messages
            if role in ("system", "developer") and text.strip()
        )
        return cls(question, turns, instructions)

    def fit_history(self, count_tokens: Callable[[str], int], budget: int) -> list[Turn]:
        """The most recent earlier turns whose rendering fits `budget` tokens (oldest dropped
        first, never leaving a gap)."""
        kept: list[Turn] = []
        used = count_tokens(HISTORY_HEADER)
        for turn in reversed(self.turns):
            cost = count_tokens(render_turn(turn))
            if used + cost > budget:
                break
            kept.append(turn)
            used += cost
        return kept[::-1]

    def user_messages(self) -> list[str]:
        return [t.text for t in self.turns if t.role == "user"] + [self.question]

    def concat_query(self, user_turns: int = CONCAT_USER_TURNS) -> str:
        return "\n".join(self.user_messages()[-(user_turns + 1) :])

    def rewrite_prompt(self) -> str:
        history = "".join(render_turn(t) for t in self.turns[-4:])
        return REWRITE_PROMPT.format(history=history, question=self.question)


def render_turn(turn: Turn) -> str:
    return f"{ROLE_NAMES[turn.role]}: {turn.text}\n"


def preface(history: list[Turn], instructions: str) -> str:
    """The text between the chunks and the question: earlier turns, then the instructions."""
    out = ""
    if history:
        out += HISTORY_HEADER + "".join(render_turn(t) for t in history) + "\n"
    if instructions:
        out += INSTRUCTIONS_HEADER + instructions.strip() + "\n\n"
    return out
