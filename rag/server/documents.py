"""/v1/documents: upload (JSON text or a multipart file), list, delete.

An upload is stored as `<data_dir>/uploads/<sanitized name>` and ingested under
the stable doc id `uploads/<name>` (uploading the same name again updates it).
Ingestion runs on its own thread with its own embedder, one job at a time, so
chat keeps streaming meanwhile; the committed generation is picked up by the
next retrieval. Cache evictions of removed chunks go through the generation
worker, the only thread that may use the model's tokenizer.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import unicodedata
from concurrent.futures import ThreadPoolExecutor
from functools import cached_property
from pathlib import Path

from fastapi import APIRouter, Request
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException

from ingest.chunkers import Resources
from ingest.job import Ingestor, IngestSummary, delete_documents, index_lock
from ingest.loaders import SUFFIXES, LoadError, load_text
from rag.config import Settings
from rag.index.docstore import Chunk
from rag.index.generations import IndexGenerations
from rag.server.errors import ApiError
from rag.server.schemas import DocumentText
from rag.server.worker import GenerationWorker
from rag.service import RAGService

log = logging.getLogger(__name__)
UPLOADS = "uploads"
_SPECIAL = set('/\\:*?"<>|')
MAX_NAME_BYTES = 160


def storage_error(e: OSError) -> ApiError:
    return ApiError(
        507, f"the data dir cannot take writes: {e.strerror or e}", "storage_unavailable"
    )


def safe_filename(raw: str | None) -> str:
    """A bare file name from a client's, kept as written where that is safe (Unicode letters,
    spaces): no directories, no leading dots, no control or format characters, a known suffix.
    A name that had to be changed gets a digest of the original, so two different names never
    end up as one file (`my notes.md` and `my_notes.md`, or `日本.md` and `中文.md`)."""
    base = unicodedata.normalize("NFC", (raw or "").replace("\\", "/").rsplit("/", 1)[-1])
    clean = "".join("_" if _unsafe_char(c) else c for c in base).strip().lstrip(".")
    suffix = Path(clean).suffix
    if not clean or suffix.lower() not in SUFFIXES:
        raise ApiError(
            400,
            f"file name must end with one of {', '.join(sorted(SUFFIXES))}",
            "invalid_file_name",
            "name",
        )
    stem = clean[: -len(suffix)]
    if len(clean.encode()) > MAX_NAME_BYTES:  # file systems allow 255 bytes
        stem = stem.encode()[: MAX_NAME_BYTES - 20].decode(errors="ignore")
    if stem + suffix != base:
        stem += "-" + hashlib.sha256(base.encode()).hexdigest()[:8]
    return stem + suffix


def _unsafe_char(c: str) -> bool:
    # Control, format (bidi overrides, zero-width), surrogate and unassigned characters, and the
    # characters shells and other file systems treat specially.
    return unicodedata.category(c)[0] == "C" or c in _SPECIAL


class DocumentService:
    def __init__(self, settings: Settings, rag: RAGService, worker: GenerationWorker):
        self.settings, self.rag, self.worker = settings, rag, worker
        self.uploads = (settings.data_dir / UPLOADS).resolve()
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="kvrag-ingest")

    @cached_property
    def resources(self) -> Resources:
        return Resources(self.settings)  # its own embedder: never shared across threads

    def _evict(self, chunks: list[Chunk]) -> None:
        def drop() -> None:
            try:
                self.rag.forget_chunks(chunks)
            except Exception:
                log.exception("evicting the caches of %d removed chunks failed", len(chunks))

        self.worker.post(drop)

    def _path(self, name: str) -> Path:
        path = (self.uploads / name).resolve()
        if path.parent != self.uploads:  # belt and braces: safe_filename already forbids this
            raise ApiError(400, "file name escapes the upload folder", "invalid_file_name", "name")
        return path

    def add(self, name: str, data: bytes) -> dict:
        """Store and ingest one upload (runs on the ingestion thread)."""
        path = self._path(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        # Hidden (the CLI skips dot files), with the real suffix (the loader dispatches on it).
        tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")
        tmp.write_bytes(data)
        try:
            text = load_text(tmp)
        except Exception as e:  # untrusted bytes: any parser failure is the client's 400
            tmp.unlink(missing_ok=True)
            reason = str(e) if isinstance(e, LoadError | OSError) else f"{type(e).__name__}: {e}"
            raise ApiError(
                400, f"cannot ingest {name}: {reason}", "unreadable_document", "file"
            ) from e
        os.replace(tmp, path)
        doc_id = f"{UPLOADS}/{name}"
        summary = IngestSummary(files=1)
        s, res = self.settings, self.resources
        store = IndexGenerations(s.index_dir, res.embedder.dim)
        try:
            with index_lock(s.index_dir), store.transaction() as (docstore, index):
                job = Ingestor(
                    docstore, index, res, s.chunker, s.chunk_size, s.chunk_overlap, self._evict
                )
                job.put(doc_id, str(path), text, summary)
                n_chunks = len(docstore.chunks_of(doc_id))
        except RuntimeError as e:  # another ingestion job holds the index
            raise ApiError(409, str(e), "ingestion_busy") from e
        job.after_commit()
        status = "added" if summary.added else "updated" if summary.updated else "unchanged"
        return {
            "object": "document",
            "id": doc_id,
            "status": status,
            "chunks": n_chunks,
            "bytes": len(data),
            "seconds": round(summary.seconds, 3),
        }

    def delete(self, doc_id: str) -> dict:
        try:
            with_lock = delete_documents([doc_id], self.settings, self._evict, self.resources)
        except KeyError as e:
            raise ApiError(404, f"no document {doc_id!r}", "document_not_found", "doc_id") from e
        except RuntimeError as e:
            raise ApiError(409, str(e), "ingestion_busy") from e
        if doc_id.startswith(UPLOADS + "/"):
            name = doc_id[len(UPLOADS) + 1 :]
            if "/" not in name and name:
                self._path(name).unlink(missing_ok=True)
        return {
            "object": "document.deleted",
            "id": doc_id,
            "deleted": True,
            "chunks": with_lock[doc_id],
        }

    def list(self) -> list[dict]:
        return [
            {
                "id": d["doc_id"],
                "object": "document",
                "source": d["source"],
                "n_chars": d["n_chars"],
                "chunks": d["n_chunks"],
                "sha256": d["sha256"],
                "added_at": d["added_at"],
            }
            for d in self.rag.documents()
        ]

    async def run(self, fn, *args):  # noqa: ANN001, ANN201 - a thin await over the ingestion thread
        try:
            return await asyncio.wrap_future(self._executor.submit(fn, *args))
        except OSError as e:  # a full or read-only data dir: nothing changed, say so
            raise storage_error(e) from e

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


_FILE_SCHEMA = {
    "type": "object",
    "required": ["file"],
    "properties": {"file": {"type": "string", "format": "binary"}},
}


def documents_router(service: DocumentService) -> APIRouter:
    router = APIRouter(tags=["documents"])

    @router.post(
        "/v1/documents",
        status_code=201,
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {
                    "application/json": {"schema": DocumentText.model_json_schema()},
                    "multipart/form-data": {"schema": _FILE_SCHEMA},
                },
            }
        },
    )
    async def upload_document(request: Request) -> dict:
        """Add or update a document: JSON `{"text", "name"}` or a multipart `file`."""
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype == "multipart/form-data":
            try:
                form = await request.form(max_files=1, max_fields=8)
            except MultiPartException as e:
                raise ApiError(400, f"bad multipart body: {e.message}", "invalid_multipart") from e
            file = form.get("file")
            if not isinstance(file, UploadFile):
                raise ApiError(
                    400, "the multipart body needs a 'file' part", "missing_file", "file"
                )
            name, data = safe_filename(file.filename), await file.read()
        elif ctype == "application/json":
            try:
                doc = DocumentText.model_validate_json(await request.body())
            except ValidationError as e:
                err = e.errors()[0]
                param = ".".join(str(p) for p in err["loc"]) or "body"
                raise ApiError(400, f"{param}: {err['msg']}", "invalid_request", param) from e
            data = doc.text.encode()
            name = safe_filename(doc.name or f"text-{hashlib.sha256(data).hexdigest()[:12]}.txt")
        else:
            raise ApiError(
                415, "send application/json or multipart/form-data", "unsupported_media_type"
            )
        return await service.run(service.add, name, data)

    @router.get("/v1/documents")
    async def list_documents() -> dict:
        return {"object": "list", "data": await run_in_threadpool(service.list)}

    @router.delete("/v1/documents/{doc_id:path}")
    async def delete_document(doc_id: str) -> dict:
        return await service.run(service.delete, doc_id)

    return router
