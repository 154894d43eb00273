"""POST /v1/chat/completions: an OpenAI chat completion answered by the RAG pipeline.

The last user message is both the retrieval query and the question; earlier
turns and client system prompts are not part of the RAG prompt (the server's
system prompt and chunk layout are fixed, which is what makes chunk K/V
reusable). The answer carries a `kvrag` object: citations, timings, cache use.
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

from rag.engine.request import GenerationParams, PromptTooLong
from rag.server.errors import ApiError, error_body
from rag.server.metrics import Metrics
from rag.server.schemas import ChatRequest
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
    }


class ChatRunner:
    def __init__(self, rag: RAGService, worker: GenerationWorker, metrics: Metrics, model_id: str):
        self.rag, self.worker, self.metrics, self.model_id = rag, worker, metrics, model_id

    def _job(
        self, req: ChatRequest
    ) -> Callable[[Callable[[str], bool] | None, Cancel | None], Any]:
        question = req.question().strip()
        if not question:
            raise ApiError(
                400, "messages: no user message with text to answer", "invalid_request", "messages"
            )
        opts = req.kvrag
        where = {
            "k": opts.k if opts else None,
            "mode": opts.mode if opts else None,
            "ratio": opts.ratio if opts else None,
        }
        max_new = req.max_completion_tokens or req.max_tokens
        params = GenerationParams(
            max_new_tokens=self.rag.settings.max_new_tokens if max_new is None else max_new,
            # A vanishing temperature overflows logits/T to inf (NaN probabilities): it means
            # greedy.
            temperature=req.temperature if req.temperature >= MIN_TEMPERATURE else 0.0,
            top_p=req.top_p,
            stop=req.stop_list(),
            seed=req.seed,
        )

        def run(on_text: Callable[[str], bool] | None, cancel: Cancel | None) -> Answer:
            return self.rag.answer(question, params=params, on_text=on_text, **where)

        return run

    def _observe(self, ans: Answer, job: Job) -> None:
        self.metrics.observe_answer(ans.request, job.queued_ms)

    async def handle(self, req: ChatRequest, request: Request) -> Response:
        run = self._job(req)
        cid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        cancel, job = Cancel(), Job()
        try:
            if req.stream:
                deltas = self.worker.stream(run, cancel, job)
                return StreamingResponse(
                    self._sse(deltas, job, cid, created),
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
        return JSONResponse(
            {
                "id": cid,
                "object": "chat.completion",
                "created": created,
                "model": self.model_id,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": ans.text},
                        "finish_reason": FINISH.get(ans.request.finish_reason, "stop"),
                    }
                ],
                "usage": ans.request.usage(),
                "kvrag": kvrag_info(ans, job.queued_ms),
            }
        )

    async def _sse(
        self, deltas: AsyncIterator[str], job: Job, cid: str, created: int
    ) -> AsyncIterator[str]:
        def chunk(delta: dict, finish: str | None = None, **extra: Any) -> str:
            body = {
                "id": cid,
                "object": "chat.completion.chunk",
                "created": created,
                "model": self.model_id,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
                **extra,
            }
            return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

        yield chunk({"role": "assistant", "content": ""})
        sent = ""
        async for delta in deltas:
            # The engine strips the final answer; keep leading whitespace out of the stream too.
            piece = delta if sent else delta.lstrip()
            if piece:
                sent += piece
                yield chunk({"content": piece})
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
            yield chunk(
                {},
                FINISH.get(ans.request.finish_reason, "stop"),
                usage=ans.request.usage(),
                kvrag=kvrag_info(ans, job.queued_ms),
            )
        yield "data: [DONE]\n\n"


def _context_error(e: PromptTooLong) -> ApiError:
    """A prompt over the context limit is the client's 400."""
    return ApiError(400, str(e), "context_length_exceeded", "messages")
