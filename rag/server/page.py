"""The chat page: GET / serves one static page (rag/server/static: HTML, CSS, JavaScript; no
build step, nothing fetched from elsewhere), and GET /v1/documents/{id}/text gives it the
document a citation points into.

The page itself is open (it holds no data); everything it shows comes through the /v1 API with
the key entered on the page, so auth applies exactly as for any other client.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool

from rag.server.errors import ApiError
from rag.service import RAGService

STATIC = Path(__file__).resolve().parent / "static"


def install_page(app: FastAPI) -> None:
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/", include_in_schema=False)
    async def chat_page() -> FileResponse:
        return FileResponse(STATIC / "chat.html", headers={"Cache-Control": "no-cache"})


def document_text_router(rag: RAGService) -> APIRouter:
    router = APIRouter(tags=["documents"])

    @router.get("/v1/documents/{doc_id:path}/text")
    async def document_text(doc_id: str) -> dict:
        """A document's full text (citations' start/end are character offsets into it)."""
        text = await run_in_threadpool(rag.document_text, doc_id)
        if text is None:
            raise ApiError(404, f"no document {doc_id!r}", "document_not_found", "doc_id")
        return {"object": "document.text", "id": doc_id, "n_chars": len(text), "text": text}

    return router
