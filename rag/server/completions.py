"""POST /v1/completions (OpenAI's legacy text completions): the prompt is the question.

Clients such as llama-index's `OpenAILike` call it by default (`is_chat_model=False`); it is
answered exactly like a one-message chat, in the text-completion shape.
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response

from rag.conversation import Conversation
from rag.server.chat import ChatRunner
from rag.server.openai_shapes import TEXT, check_supported
from rag.server.schemas import CompletionRequest


def completions_router(chat: ChatRunner) -> APIRouter:
    router = APIRouter(tags=["chat"])

    @router.post(
        "/v1/completions",
        responses={200: {"content": {"text/event-stream": {}}}},
    )
    async def completions(body: CompletionRequest, request: Request) -> Response:
        """Legacy completion: the prompt is retrieved for and answered over the chunks."""
        check_supported(body)
        return await chat.complete(Conversation(body.text().strip()), body, request, TEXT)

    return router
