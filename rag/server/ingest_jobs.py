"""Uploads ingested as jobs: POST answers 202 at once, the client polls the job.

An upload is first written to `uploads/.pending/<job id>/<name>` (the job's durable record),
then ingested on the ingestion thread, one job at a time; when it commits, the file moves to
`uploads/<name>` and the pending folder goes. A second writer (upload or delete) while a job is
queued or running gets 409 at once instead of waiting. A server stopped or killed mid-job
leaves the pending folder: the next start queues it again under the same id, so nothing a
client was told was accepted is lost, and no half-ingested document is ever visible (each job
is one index transaction).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from ingest.job import IndexBusy, index_lock

log = logging.getLogger(__name__)

PENDING = ".pending"
KEEP_FINISHED = 200  # finished jobs remembered for polling (oldest forgotten first)


class Busy(Exception):
    """A job is queued or running: the caller answers 409."""


class Stopped(Exception):
    """The server is shutting down: the job stays pending for the next start."""


@dataclass
class IngestJob:
    id: str
    name: str  # the stored file name (uploads/<name>)
    document: str  # the doc id it becomes
    bytes: int
    status: str = "queued"  # queued -> running -> done | failed
    error: dict | None = None  # {"message", "code"} when failed
    result: dict | None = None  # the document's summary when done
    progress: float = 0.0  # share of the document's characters chunked and embedded
    created_at: float = field(default_factory=time.time)
    finished_at: float | None = None
    seconds: float = 0.0

    def as_dict(self) -> dict:
        return {
            "id": self.id,
            "object": "ingest.job",
            "status": self.status,
            "document": self.document,
            "error": self.error,
            "result": self.result,
            "bytes": self.bytes,
            "progress": round(self.progress, 4),
            "seconds": round(self.seconds, 3),
            "created_at": int(self.created_at),
            "finished_at": int(self.finished_at) if self.finished_at else None,
        }


# ingest(job, path, progress) -> the document's summary dict; raises to fail the job.
Runner = Callable[[IngestJob, Path, Callable[[int, int], None]], dict]
# An exception -> (message, code) for the job's error.
Describe = Callable[[BaseException], tuple[str, str]]


class IngestJobs:
    """The upload queue over one ingestion thread (shared with deletes, which it also guards)."""

    def __init__(
        self, uploads: Path, index_dir: Path, executor: ThreadPoolExecutor, runner: Runner
    ):
        self.uploads, self.index_dir = uploads, index_dir
        self.pending_dir = uploads / PENDING
        self.executor, self.runner = executor, runner
        self._jobs: dict[str, IngestJob] = {}
        self._lock = threading.Lock()
        self._active: str | None = None  # the queued or running upload job
        self._writing = False  # a delete in progress (also a writer)
        self.stopping = threading.Event()
        self.describe: Describe = lambda e: (f"{type(e).__name__}: {e}", "ingestion_failed")

    # -- writers ----------------------------------------------------------------
    def submit(self, name: str, document: str, data: bytes) -> IngestJob:
        """Store the upload and queue its job; Busy if another writer is active; OSError if
        the data dir cannot take the file (nothing is queued then)."""
        job = IngestJob(uuid.uuid4().hex[:24], name, document, len(data))
        with self._lock:
            self._claim(job.id)
        try:
            folder = self.pending_dir / job.id
            folder.mkdir(parents=True)
            (folder / name).write_bytes(data)
        except BaseException:
            shutil.rmtree(self.pending_dir / job.id, ignore_errors=True)
            with self._lock:
                self._active = None
            raise
        self._queue(job)
        return job

    def exclusive(self) -> _Exclusive:
        """Held around a delete: Busy if an upload job is queued or running."""
        return _Exclusive(self)

    def _claim(self, owner: str) -> None:
        if self._active is not None or self._writing:
            raise Busy("another upload or delete is in progress; retry when it finishes")
        try:  # a CLI `kvrag ingest` on the same data dir: say so now, not when the job runs
            with index_lock(self.index_dir):
                pass
        except IndexBusy as e:
            raise Busy(str(e)) from e
        self._active = owner

    def _queue(self, job: IngestJob) -> None:
        with self._lock:
            self._jobs[job.id] = job
            while len(self._jobs) > KEEP_FINISHED:
                oldest = next(iter(self._jobs))
                if self._jobs[oldest].status in ("queued", "running"):
                    break
                del self._jobs[oldest]
        self.executor.submit(self._run, job)

    # -- the ingestion thread ---------------------------------------------------
    def _run(self, job: IngestJob) -> None:
        folder = self.pending_dir / job.id
        t0 = time.perf_counter()
        job.status = "running"
        with contextlib.suppress(OSError, AttributeError):  # Linux: per-thread niceness
            # Background work: the kernel runs the event loop and generation first.
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)

        def progress(done: int, total: int) -> None:
            job.progress = done / total if total else 1.0
            if self.stopping.is_set():
                raise Stopped()

        try:
            job.result = self.runner(job, folder / job.name, progress)
            job.status, job.progress = "done", 1.0
            shutil.rmtree(folder, ignore_errors=True)
        except Stopped:
            job.status = "queued"  # resumed by the next start
            log.warning("ingestion of %s stopped by shutdown; resumes at the next start", job.name)
        except BaseException as e:
            message, code = self.describe(e)
            job.status, job.error = "failed", {"message": message, "code": code}
            shutil.rmtree(folder, ignore_errors=True)
            if code == "ingestion_failed":
                log.error("ingestion of %s failed", job.name, exc_info=e)
        finally:
            job.seconds = time.perf_counter() - t0
            job.finished_at = time.time() if job.status in ("done", "failed") else None
            with self._lock:
                if self._active == job.id:
                    self._active = None
                # A job resumed at start-up queues the next one behind it.
                nxt = next((j for j in self._jobs.values() if j.status == "queued"), None)
                if nxt is not None and not self.stopping.is_set() and self._active is None:
                    self._active = nxt.id

    # -- readers ----------------------------------------------------------------
    def get(self, job_id: str) -> IngestJob | None:
        with self._lock:
            return self._jobs.get(job_id)

    # -- start / stop -----------------------------------------------------------
    def resume(self) -> list[IngestJob]:
        """Queue the uploads a stopped or killed server left pending (same job ids), oldest
        first, and drop what is not a pending upload (an empty folder, a stray temp file)."""
        resumed = []
        for stray in self.uploads.glob(".*.tmp*"):  # temp files of older versions
            stray.unlink(missing_ok=True)
        if not self.pending_dir.is_dir():
            return resumed
        folders = sorted(self.pending_dir.iterdir(), key=lambda p: p.stat().st_mtime)
        for folder in folders:
            files = [f for f in folder.iterdir() if f.is_file()] if folder.is_dir() else []
            if len(files) != 1:
                shutil.rmtree(folder, ignore_errors=True) if folder.is_dir() else folder.unlink()
                continue
            name = files[0].name
            job = IngestJob(folder.name, name, f"uploads/{name}", files[0].stat().st_size)
            with self._lock:
                self._active = self._active or job.id
            self._queue(job)
            resumed.append(job)
            log.warning("resuming the ingestion of %s (job %s) left by the last run", name, job.id)
        return resumed

    def stop(self) -> None:
        self.stopping.set()


class _Exclusive:
    def __init__(self, jobs: IngestJobs):
        self.jobs = jobs

    def __enter__(self) -> None:
        with self.jobs._lock:
            if self.jobs._active is not None or self.jobs._writing:
                raise Busy("an upload is being ingested; retry when its job finishes")
            self.jobs._writing = True

    def __exit__(self, *exc: object) -> None:
        with self.jobs._lock:
            self.jobs._writing = False


def move_into(src: Path, dest: Path) -> None:
    """The pending file becomes the stored upload (same file system: a rename)."""
    os.replace(src, dest)
