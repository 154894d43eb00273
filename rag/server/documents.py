"""/v1/documents: upload (JSON text or a multipart file), list, delete; ingestion jobs.

An upload is kept under its client's name where that is safe (`safe_filename`) and ingested
under the stable doc id `uploads/<name>` (uploading the same name again updates it). POST
answers 202 with an ingestion job (rag.server.ingest_jobs) that the client polls; ingestion
runs on its own thread with its own embedder, one writer at a time (a second gets 409), so
chat keeps streaming meanwhile; the committed generation is picked up by the next retrieval.
Cache evictions of removed chunks go through the generation worker, the only thread that may
use the model's tokenizer.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
import unicodedata
from concurrent.futures import ThreadPoolExecutor
from functools import cached_property
from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException

from ingest.chunkers import Resources
from ingest.job import IndexBusy, Ingestor, IngestSummary, delete_documents, index_lock
from ingest.loaders import SUFFIXES, LoadError, load_text
from rag.config import Settings
from rag.index.docstore import Chunk
from rag.index.generations import IndexGenerations
from rag.server.errors import ApiError
from rag.server.ingest_jobs import Busy, IngestJob, IngestJobs, move_into
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


def _describe(e: BaseException) -> tuple[str, str]:
    """A failed job's error: what the client can act on, in its words."""
    if isinstance(e, LoadError):
        return f"cannot ingest the upload: {e}", "unreadable_document"
    if isinstance(e, IndexBusy):
        return str(e), "ingestion_busy"
    if isinstance(e, OSError):
        return f"the data dir cannot take writes: {e.strerror or e}", "storage_unavailable"
    if isinstance(e, ValueError | UnicodeError):  # untrusted bytes a parser choked on
        return f"cannot ingest the upload: {type(e).__name__}: {e}", "unreadable_document"
    return "ingestion failed (see the server log)", "ingestion_failed"


class DocumentService:
    def __init__(self, settings: Settings, rag: RAGService, worker: GenerationWorker):
        self.settings, self.rag, self.worker = settings, rag, worker
        self.uploads = (settings.data_dir / UPLOADS).resolve()
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="kvrag-ingest")
        self.jobs = IngestJobs(
            self.uploads, settings.index_dir, self._executor, self._ingest_upload
        )
        self.jobs.describe = _describe
        try:
            self.jobs.resume()
        except OSError as e:  # a read-only data dir: nothing can be resumed until it is writable
            log.warning("cannot resume pending uploads in %s: %s", self.uploads, e)

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

    def submit(self, name: str, data: bytes) -> dict:
        """Store an upload and queue its ingestion job (202); 409 while another writer runs."""
        path = self._path(name)
        try:
            job = self.jobs.submit(name, f"{UPLOADS}/{name}", data)
        except Busy as e:
            raise ApiError(409, str(e), "ingestion_busy") from e
        except OSError as e:
            raise storage_error(e) from e
        log.info("upload %s (%d bytes) queued as job %s", path.name, len(data), job.id)
        return job.as_dict()

    def _ingest_upload(self, job: IngestJob, pending: Path, progress) -> dict:  # noqa: ANN001
        """One job on the ingestion thread: the pending file -> index, then into uploads/."""
        try:
            text = load_text(pending)
        except Exception as e:  # untrusted bytes: any parser failure is the client's
            raise e if isinstance(e, LoadError) else LoadError(f"{type(e).__name__}: {e}") from e
        dest = self._path(job.name)
        summary = IngestSummary(files=1)
        s, res = self.settings, self.resources
        store = IndexGenerations(s.index_dir, res.embedder.dim)
        t0 = time.perf_counter()
        with index_lock(s.index_dir), store.transaction() as (docstore, index):
            ingestor = Ingestor(
                docstore, index, res, s.chunker, s.chunk_size, s.chunk_overlap, self._evict
            )
            ingestor.put(job.document, str(dest), text, summary, progress)
            n_chunks = len(docstore.chunks_of(job.document))
        move_into(pending, dest)  # after the commit: a crash before it re-runs the job
        ingestor.after_commit()
        status = "added" if summary.added else "updated" if summary.updated else "unchanged"
        return {
            "object": "document",
            "id": job.document,
            "status": status,
            "chunks": n_chunks,
            "bytes": job.bytes,
            "seconds": round(time.perf_counter() - t0, 3),
        }

    def delete(self, doc_id: str) -> dict:
        """Remove a document (on the ingestion thread; the caller holds jobs.exclusive())."""
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
        self.jobs.stop()  # a running job stops at its next section and stays pending
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
        status_code=202,
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
    async def upload_document(request: Request) -> JSONResponse:
        """Add or update a document: JSON `{"text", "name"}` or a multipart `file`. Answers 202
        with an ingestion job at once; poll `Location` (GET /v1/documents/jobs/{id}) until its
        status is "done" or "failed". 409 while another upload or delete is in progress."""
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
        job = await run_in_threadpool(service.submit, name, data)
        location = f"/v1/documents/jobs/{job['id']}"
        return JSONResponse(job, status_code=202, headers={"Location": location})

    @router.get("/v1/documents/jobs/{job_id}")
    async def ingestion_job(job_id: str) -> dict:
        """An upload's ingestion job: queued, running (with progress), done or failed."""
        job = service.jobs.get(job_id)
        if job is None:
            raise ApiError(404, f"no ingestion job {job_id!r}", "job_not_found", "job_id")
        return job.as_dict()

    @router.get("/v1/documents")
    async def list_documents() -> dict:
        return {"object": "list", "data": await run_in_threadpool(service.list)}

    @router.delete("/v1/documents/{doc_id:path}")
    async def delete_document(doc_id: str) -> dict:
        try:
            with service.jobs.exclusive():
                return await service.run(service.delete, doc_id)
        except Busy as e:
            raise ApiError(409, str(e), "ingestion_busy") from e

    return router
