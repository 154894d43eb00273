"""Streamed text under stop strings: send only what can no longer become part of a stop string.

Decoding grows the text a token at a time; a stop string can arrive split across tokens
("is 3" then "4"). Text that ends with a proper prefix of a stop string is held back until the
next token settles it: it is either the start of the stop (cut, never sent) or plain text
(sent with the next delta, or when generation ends).
"""

from __future__ import annotations


def held_back(text: str, stops: list[str]) -> int:
    """How many trailing characters of `text` could still begin one of `stops`."""
    hold = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), hold, -1):
            if text.endswith(stop[:n]):
                hold = n
                break
    return hold


class StopStream:
    """Cuts the text at the first stop string and tells which part is safe to send yet."""

    def __init__(self, stops: list[str] | None) -> None:
        self.stops = [s for s in (stops or []) if s]
        self.text = ""  # the answer so far, cut at a stop string
        self.sent = 0  # characters of it already handed out
        self.stopped = False

    def update(self, text: str) -> str:
        """The full decoded text so far -> the new delta that is safe to send (may be "")."""
        cuts = [text.find(s) for s in self.stops if s in text]
        if cuts:
            text, self.stopped = text[: min(cuts)], True
        self.text = text
        end = len(text) if self.stopped else len(text) - held_back(text, self.stops)
        delta = text[self.sent : end] if end > self.sent else ""
        self.sent = max(self.sent, end)
        return delta

    def flush(self) -> str:
        """At the end of generation: whatever was held back (it never became a stop)."""
        delta = self.text[self.sent :]
        self.sent = len(self.text)
        return delta
