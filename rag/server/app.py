"""The HTTP API: an OpenAI-compatible chat endpoint over the RAG pipeline, plus
retrieval, document management, health and Prometheus metrics.

Routes under /v1 need `Authorization: Bearer <key>` when KVRAG_API_KEYS is set;
/healthz and /metrics stay open (probes and scrapers). Model work (chat,
retrieval) runs on one worker thread in arrival order (rag.server.worker), so the
event loop stays free for health checks and streaming while a long generation runs.
"""

from __future__ import annotations

import time
from contextlib import asynccontextmanager
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from rag.config import Settings
from rag.server.auth import bearer_auth, parse_keys
from rag.server.chat import ChatRunner
from rag.server.completions import completions_router
from rag.server.documents import DocumentService, documents_router
from rag.server.errors import ApiError, BodyLimit, install_error_handlers
from rag.server.health import health
from rag.server.metrics import Metrics, RequestCounter
from rag.server.page import document_text_router, install_page
from rag.server.schemas import (
    MAX_BODY_BYTES,
    MAX_UPLOAD_BYTES,
    ChatCompletion,
    ChatRequest,
    ErrorResponse,
    RetrieveRequest,
    RetrieveResponse,
)
from rag.server.worker import GenerationWorker, QueueFull
from rag.service import RAGService

ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse} for code in (400, 401, 413, 503)
}


def create_app(
    settings: Settings | None = None, rag: RAGService | None = None, *, max_queue: int | None = None
) -> FastAPI:
    """The app over `rag` (built from settings when not given: loads the model)."""
    settings = settings or (rag.settings if rag is not None else Settings())
    rag = rag or RAGService(settings)
    max_queue = settings.max_queue if max_queue is None else max_queue
    if settings.scheduler == "batch":
        rag.start_batching(settings.max_batch)
        worker = GenerationWorker(max_queue, running=settings.max_batch)
    else:
        worker = GenerationWorker(max_queue)
    metrics = Metrics(rag.cache_stats, lambda: worker.depth)
    model_id = rag.model_name
    chat = ChatRunner(rag, worker, metrics, model_id)
    docs = DocumentService(settings, rag, worker)
    started = int(time.time())

    @asynccontextmanager
    async def lifespan(app: FastAPI):  # noqa: ANN202
        yield
        worker.shutdown()
        if settings.scheduler == "batch":
            rag.stop_batching()
        docs.shutdown()
        rag.persist_stats()  # what the last few seconds of answers added

    app = FastAPI(
        title="kvrag",
        version="0.1.0",
        lifespan=lifespan,
        # The interactive pages load their scripts from a CDN: off (the schema stays at
        # /openapi.json), so a server in a closed network serves nothing it cannot back.
        docs_url=None,
        redoc_url=None,
        description="RAG serving that reuses precomputed chunk KV caches (CacheBlend).",
    )
    app.state.rag, app.state.worker, app.state.metrics = rag, worker, metrics
    install_error_handlers(app)
    app.add_middleware(BodyLimit, max_bytes=MAX_BODY_BYTES, upload_max_bytes=MAX_UPLOAD_BYTES)
    app.add_middleware(RequestCounter, metrics=metrics)  # outermost: counts 413s and 401s too

    keys = parse_keys(settings.api_keys)
    v1 = APIRouter(dependencies=[Depends(bearer_auth(keys))] if keys else [], responses=ERRORS)

    @v1.post(
        "/v1/chat/completions",
        response_model=ChatCompletion,
        tags=["chat"],
        responses={
            200: {
                "content": {"text/event-stream": {}},
                "description": "JSON, or server-sent events when stream is true",
            }
        },
    )
    async def chat_completions(body: ChatRequest, request: Request) -> Response:
        """OpenAI chat completion; the last user message is the retrieval query."""
        return await chat.handle(body, request)

    model_card = {"id": model_id, "object": "model", "created": started, "owned_by": "kvrag"}

    @v1.get("/v1/models", tags=["chat"])
    async def list_models() -> dict:
        return {"object": "list", "data": [model_card]}

    @v1.get("/v1/models/{model:path}", tags=["chat"])
    async def retrieve_model(model: str) -> dict:
        if model != model_id:
            raise ApiError(
                404,
                f"model {model!r} not found; this server has {model_id!r}",
                "model_not_found",
                "model",
            )
        return model_card

    @v1.post("/v1/retrieve", response_model=RetrieveResponse, tags=["retrieval"])
    async def retrieve(body: RetrieveRequest) -> dict:
        """The top-k chunks for a query, with scores and exact character spans."""
        if not body.query.strip():  # as chat refuses a blank question
            raise ApiError(400, "query: must contain text", "invalid_request", "query")
        k = body.k or settings.top_k
        t0 = time.perf_counter()
        try:  # through the worker: the embedder is not thread-safe either
            hits = await worker.call(lambda: rag.retrieve(body.query, k))
        except QueueFull as e:
            raise ApiError(
                503, f"server busy: {e}; retry later", "queue_full", headers={"Retry-After": "5"}
            ) from e
        return {
            "object": "list",
            "data": [h.citation(with_text=True) for h in hits],
            "timings_ms": {"retrieve": round(1000 * (time.perf_counter() - t0), 1)},
        }

    v1.include_router(completions_router(chat))
    v1.include_router(document_text_router(rag))
    v1.include_router(documents_router(docs))
    app.include_router(v1)
    install_page(app)

    @app.get("/healthz", tags=["ops"])
    async def healthz() -> JSONResponse:
        """Liveness and readiness: answers while a generation runs (it never waits on the
        worker)."""
        await run_in_threadpool(rag.reload_index)
        deps = await run_in_threadpool(health, rag)
        body = {
            "status": deps.pop("status"),
            "model_loaded": True,
            "model": model_id,
            "index_size": len(rag.index),
            **deps,
            "queue_depth": worker.depth,
            "generating": worker.busy,
        }
        return JSONResponse(body)

    @app.get("/metrics", tags=["ops"], response_class=Response)
    async def prometheus() -> Response:
        data, ctype = await run_in_threadpool(metrics.render)
        return Response(data, media_type=ctype)

    return app
