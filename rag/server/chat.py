"""POST /v1/chat/completions: an OpenAI chat completion answered by the RAG pipeline.

The last user message is the question; the earlier turns and the client's system messages go
after the retrieved chunks (rag/conversation.py), so the server's header and chunk layout stay
fixed and every chunk K/V reusable. A follow-up retrieves with the conversation's latest user
messages. The answer carries a `kvrag` object: citations, timings, cache use, turns used.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from rag.conversation import Conversation
from rag.engine.request import GenerationParams, PromptTooLong
from rag.server.errors import ApiError, error_body
from rag.server.metrics import Metrics
from rag.server.openai_shapes import CHAT, Shape, check_supported
from rag.server.schemas import ChatRequest, CompletionRequest
from rag.server.worker import Cancel, GenerationWorker, Job, QueueFull
from rag.service import Answer, RAGService

log = logging.getLogger(__name__)

# The engine's own reasons, in OpenAI's vocabulary ("cancelled" only reaches a client that left).
FINISH = {"stop": "stop", "length": "length", "context": "length", "cancelled": "stop"}
DISCONNECT_POLL_S = 0.5
MIN_TEMPERATURE = 1e-4


def kvrag_info(ans: Answer, queued_ms: float) -> dict[str, Any]:
    r = ans.request
    t = r.timings_ms
    timings = {
        "queue": queued_ms,
        "retrieve": t["retrieve"],
        "kv_load": t["kv_load"],
        "prefill": t["prefill"],
        "blend": t["prefill"] if r.mode != "full" else 0.0,
        "ttft": t["ttft"],
        "decode": t["decode"],
        "total": t["total"],
    }
    return {
        "mode": r.mode,
        "citations": [h.citation() for h in ans.hits],
        "timings_ms": {k: round(v, 1) for k, v in timings.items()},
        "cache": r.cache_report(),
        "conversation": ans.conversation_info(),
    }


class ChatRunner:
    """Runs a chat (or legacy text) completion on the generation worker and shapes its reply."""

    def __init__(self, rag: RAGService, worker: GenerationWorker, metrics: Metrics, model_id: str):
        self.rag, self.worker, self.metrics, self.model_id = rag, worker, metrics, model_id

    def _job(
        self, conv: Conversation, req: ChatRequest | CompletionRequest
    ) -> Callable[[Callable[[str], bool] | None, Cancel | None], Any]:
        if not conv.question:
            raise ApiError(
                400, "messages: no user message with text to answer", "invalid_request", "messages"
            )
        opts = req.kvrag
        where = {
            "k": opts.k if opts else None,
            "mode": opts.mode if opts else None,
            "ratio": opts.ratio if opts else None,
            "conversation": conv,
        }
        max_new = getattr(req, "max_completion_tokens", None) or req.max_tokens
        params = GenerationParams(
            max_new_tokens=self.rag.settings.max_new_tokens if max_new is None else max_new,
            # A vanishing temperature overflows logits/T to inf (NaN probabilities): it means
            # greedy.
            temperature=req.temperature if req.temperature >= MIN_TEMPERATURE else 0.0,
            top_p=req.top_p,
            stop=req.stop_list(),
            seed=req.seed,
            ignore_eos=req.ignore_eos,
        )

        def run(on_text: Callable[[str], bool] | None, cancel: Cancel | None) -> Answer:
            return self.rag.answer(conv.question, params=params, on_text=on_text, **where)

        return run

    def _observe(self, ans: Answer, job: Job) -> None:
        self.metrics.observe_answer(ans.request, job.queued_ms)

    async def handle(self, req: ChatRequest, request: Request) -> Response:
        check_supported(req)
        return await self.complete(req.conversation(), req, request, CHAT)

    async def complete(
        self,
        conv: Conversation,
        req: ChatRequest | CompletionRequest,
        request: Request,
        shape: Shape,
    ) -> Response:
        run = self._job(conv, req)
        cid, created = f"{shape.id_prefix}-{uuid.uuid4().hex[:24]}", int(time.time())
        cancel, job = Cancel(), Job()
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        try:
            if req.stream:
                deltas = await _started(self.worker.stream(run, cancel, job))
                if isinstance(job.error, PromptTooLong):  # failed before any text: a real 400
                    raise job.error
                return StreamingResponse(
                    self._sse(deltas, job, shape, cid, created, include_usage),
                    media_type="text/event-stream",
                    headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
                )
            # No text to forward, but the per-token callback is where a departed client stops it.
            task = asyncio.ensure_future(
                self.worker.call(lambda: run(lambda _: not cancel, cancel), cancel, job)
            )
            while not (await asyncio.wait({task}, timeout=DISCONNECT_POLL_S))[0]:
                if await request.is_disconnected():  # free the worker: drop or stop the job
                    task.cancel()
                    return Response(status_code=499)
            result = task.result()
        except QueueFull as e:
            raise ApiError(
                503, f"server busy: {e}; retry later", "queue_full", headers={"Retry-After": "5"}
            ) from e
        except PromptTooLong as e:
            raise _context_error(e) from e
        if result is None:
            return Response(status_code=499)
        ans = result
        self._observe(ans, job)
        finish = FINISH.get(ans.request.finish_reason, "stop")
        return JSONResponse(
            {
                "id": cid,
                "object": shape.object,
                "created": created,
                "model": self.model_id,
                "choices": [shape.choice(ans.text, finish)],
                "usage": ans.request.usage(),
                "kvrag": kvrag_info(ans, job.queued_ms),
            }
        )

    async def _sse(
        self,
        deltas: AsyncIterator[str],
        job: Job,
        shape: Shape,
        cid: str,
        created: int,
        include_usage: bool,
    ) -> AsyncIterator[str]:
        def event(choices: list[dict], **extra: Any) -> str:
            body = {
                "id": cid,
                "object": shape.chunk_object,
                "created": created,
                "model": self.model_id,
                "choices": choices,
                **extra,
            }
            return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

        if shape.opening is not None:
            yield event([shape.delta(shape.opening, None)])
        sent = ""
        async for delta in deltas:
            # The engine strips the final answer; keep leading whitespace out of the stream too.
            piece = delta if sent else delta.lstrip()
            if piece:
                sent += piece
                yield event([shape.delta(piece, None)])
        if job.error is not None:
            if isinstance(job.error, PromptTooLong):
                e = _context_error(job.error)
            else:
                log.error("generation failed", exc_info=job.error)
                e = ApiError(500, "internal server error", "internal_error")
            yield f"data: {json.dumps(error_body(e.detail, e.type, e.code))}\n\n"
        elif job.result is not None:
            ans = job.result
            self._observe(ans, job)
            finish = FINISH.get(ans.request.finish_reason, "stop")
            yield event([shape.delta(None, finish)], kvrag=kvrag_info(ans, job.queued_ms))
            if include_usage:  # OpenAI's stream_options: one more chunk, usage and no choices
                yield event([], usage=ans.request.usage())
        yield "data: [DONE]\n\n"


async def _started(deltas: AsyncIterator[str]) -> AsyncIterator[str]:
    """Wait for the first delta or the end, so an error raised before any text (the prompt
    does not fit) is answered with its own status instead of 200 and an error event."""
    it = aiter(deltas)
    first = await anext(it, None)

    async def rest() -> AsyncIterator[str]:
        if first is not None:
            yield first
            async for delta in it:
                yield delta

    return rest()


def _context_error(e: PromptTooLong) -> ApiError:
    """A prompt over the context limit is the client's 400."""
    return ApiError(400, str(e), "context_length_exceeded", "messages")
