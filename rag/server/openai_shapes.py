"""The two OpenAI completion shapes kvrag answers in (chat and legacy text), and the request
features it refuses with a clear 400 instead of silently ignoring them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from rag.server.errors import ApiError


@dataclass(frozen=True)
class Shape:
    object: str  # the whole response's "object"
    chunk_object: str  # each streamed event's
    id_prefix: str
    chat: bool

    @property
    def opening(self) -> str | None:
        """The first streamed event's content: chat announces the role, text sends nothing."""
        return "" if self.chat else None

    def choice(self, text: str, finish: str) -> dict[str, Any]:
        if self.chat:
            return {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "finish_reason": finish,
            }
        return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}

    def delta(self, text: str | None, finish: str | None) -> dict[str, Any]:
        if self.chat:
            delta: dict[str, str] = {} if text is None else {"content": text}
            if text == "":
                delta = {"role": "assistant", "content": ""}
            return {"index": 0, "delta": delta, "finish_reason": finish}
        return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}


CHAT = Shape("chat.completion", "chat.completion.chunk", "chatcmpl", chat=True)
TEXT = Shape("text_completion", "text_completion", "cmpl", chat=False)


def unsupported(param: str, why: str) -> ApiError:
    return ApiError(400, f"{param}: {why}", "unsupported_parameter", param)


def check_supported(req: Any) -> None:
    """A 400 for what a client asks and kvrag cannot do (one choice, plain text, no tools)."""
    if req.n != 1:
        raise unsupported("n", "only n=1 is supported (one choice per request)")
    for param in ("tools", "functions"):
        if getattr(req, param, None):
            raise unsupported(param, "tool and function calling are not supported")
    if getattr(req, "tool_choice", None) not in (None, "none"):
        raise unsupported("tool_choice", "tool calling is not supported")
    fmt = getattr(req, "response_format", None)
    if fmt is not None and fmt.get("type") != "text":
        raise unsupported("response_format", "only {'type': 'text'} is supported")
    if getattr(req, "logprobs", None):
        raise unsupported("logprobs", "log probabilities are not returned")
    if getattr(req, "echo", False):
        raise unsupported("echo", "echoing the prompt is not supported")
    if getattr(req, "suffix", None):
        raise unsupported("suffix", "insertion (suffix) is not supported")
    if getattr(req, "best_of", None) not in (None, 1):
        raise unsupported("best_of", "only best_of=1 is supported")
