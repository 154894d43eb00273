"""The ingestion job: files -> documents -> chunks -> vectors, committed as one generation.

Idempotent by content hash and chunker settings: an unchanged file costs a hash.
A changed file replaces its chunks and vectors; a file that cannot be read is
reported with its reason and skipped while the rest go in. Nothing is visible to
readers until the whole run commits (see rag.index.generations); the chunk-cache
cleanup hook runs only after the commit, so a crash never strands the previous
index without its caches. One run at a time per index (a lock file).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from ingest.chunkers import Resources, make_chunker
from ingest.loaders import LoadError, discover, load_text
from ingest.sections import sections
from rag.config import Settings
from rag.index.docstore import Chunk, Docstore, Document, sha256
from rag.index.generations import IndexGenerations
from rag.index.vector_index import VectorIndex

log = logging.getLogger(__name__)


@dataclass
class IngestSummary:
    chunker: str = ""  # name:size:overlap
    files: int = 0
    added: int = 0
    updated: int = 0
    unchanged: int = 0
    deleted: int = 0
    chunks_added: int = 0
    chunks_removed: int = 0
    tokens: int = 0
    seconds: float = 0.0
    failed: list[tuple[str, str]] = field(default_factory=list)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0

    def describe(self) -> str:
        """One human line, plus one per failed file."""
        lines = [
            f"{self.chunker}: {self.files} files: {self.added} added, {self.updated} updated, "
            f"{self.unchanged} unchanged, "
            f"{self.deleted} deleted, {len(self.failed)} failed; chunks +{self.chunks_added} "
            f"-{self.chunks_removed}; {self.seconds:.1f} s, {self.tokens_per_s:,.0f} tokens/s"
        ]
        lines += [f"  skipped {p}: {r}" for p, r in self.failed]
        return "\n".join(lines)

    def as_dict(self) -> dict:
        d = {k: v for k, v in self.__dict__.items() if k != "failed"}
        d["failed"] = [{"path": p, "reason": r} for p, r in self.failed]
        d["tokens_per_s"] = round(self.tokens_per_s, 1)
        return d


def doc_id_for(path: Path) -> str:
    """The path relative to the working directory when inside it, else absolute. Symbolic
    links are not resolved: a file reached through a link is known by the link's path (under
    the folder ingested, where --delete-missing finds it)."""
    absolute = Path(os.path.abspath(path))
    for cwd in (Path(os.path.abspath(os.getcwd())), Path.cwd().resolve()):
        if absolute.is_relative_to(cwd):
            return absolute.relative_to(cwd).as_posix()
    return absolute.as_posix()


RemovedHook = Callable[[list[Chunk]], None]


class Ingestor:
    """Adds, replaces and deletes documents inside one open generation."""

    def __init__(
        self,
        docstore: Docstore,
        index: VectorIndex,
        resources: Resources,
        chunker_name: str,
        chunk_size: int,
        overlap: int = 0,
        on_removed: RemovedHook | None = None,
    ):
        self.docstore = docstore
        self.index = index
        self.resources = resources
        self.chunker = make_chunker(chunker_name, resources, chunk_size, overlap)
        self.chunker_tag = f"{chunker_name}:{chunk_size}:{overlap}"
        self.on_removed = on_removed
        self.removed: list[Chunk] = []  # handed to on_removed after the commit
        self.added_hashes: set[str] = set()

    def remove(self, doc_id: str) -> int:
        chunks = self.docstore.chunks_of(doc_id)
        self.docstore.delete_document(doc_id)
        self.index.remove([c.chunk_id for c in chunks])
        self.removed.extend(chunks)
        return len(chunks)

    def after_commit(self) -> None:
        """Drop the caches of removed chunks, except those whose text is still indexed (same KV)."""
        gone = [c for c in self.removed if c.content_hash not in self.added_hashes]
        if gone and self.on_removed:
            self.on_removed(gone)

    def put(
        self,
        doc_id: str,
        source: str,
        text: str,
        summary: IngestSummary,
        progress: Callable[[int, int], None] | None = None,
    ) -> None:
        """Add or replace one document, a section at a time (ingest.sections): memory stays
        bounded by a section whatever the document's size. `progress(done, total)` counts
        characters after each section (it may raise to abandon the job: nothing commits)."""
        digest = sha256(text)
        old = self.docstore.get_document(doc_id)
        if old and old.sha256 == digest and old.chunker == self.chunker_tag:
            summary.unchanged += 1
            return
        if old:
            summary.chunks_removed += self.remove(doc_id)
        self.docstore.put_document(
            Document(doc_id, source, digest, text, self.chunker_tag), time.time()
        )
        embedder = self.resources.embedder
        for first, last in sections(text):
            spans = [(s + first, e + first) for s, e in self.chunker.split(text[first:last])]
            texts = [text[s:e] for s, e in spans]
            ids = self.docstore.next_ids(len(spans))
            chunks = [
                Chunk(cid, doc_id, s, e, t, embedder.count_tokens(t), sha256(t))
                for cid, (s, e), t in zip(ids, spans, texts, strict=True)
            ]
            self.docstore.add_chunks(chunks)
            if chunks:
                self.index.add(ids, embedder.embed(texts))
            self.added_hashes.update(c.content_hash for c in chunks)
            summary.chunks_added += len(chunks)
            summary.tokens += sum(c.n_tokens for c in chunks)
            if progress is not None:
                progress(last, len(text))
        if old:
            summary.updated += 1
        else:
            summary.added += 1


class IndexBusy(RuntimeError):
    """Another ingestion job holds the index (a second writer fails fast, nothing changed)."""


@contextlib.contextmanager
def index_lock(root: Path) -> Iterator[None]:
    """Exclusive lock on an index folder for one job; a second job fails fast instead of racing."""
    root.mkdir(parents=True, exist_ok=True)
    fd = os.open(root / "LOCK", os.O_CREAT | os.O_RDWR, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise IndexBusy(f"another ingestion job holds {root / 'LOCK'}") from None
        yield
    finally:
        os.close(fd)  # closing releases the lock; a killed process releases it too


def ingest(
    paths: Iterable[Path | str],
    settings: Settings,
    *,
    chunker: str | None = None,
    chunk_size: int | None = None,
    chunk_overlap: int | None = None,
    delete_missing: bool = False,
    follow_links: bool = False,
    resources: Resources | None = None,
    on_removed: RemovedHook | None = None,
    progress: bool = True,
) -> IngestSummary:
    """Ingest files and folders as one atomic run; see the module doc."""
    t0 = time.perf_counter()
    paths = list(paths)
    found = discover(paths, follow_links)
    files = found.files
    resources = resources or Resources(settings)
    summary = IngestSummary(files=len(files), failed=list(found.refused))
    for path, why in found.refused:
        log.warning("refused %s: %s", path, why)
    store = IndexGenerations(settings.index_dir, resources.embedder.dim)
    overlap = settings.chunk_overlap if chunk_overlap is None else chunk_overlap
    with index_lock(settings.index_dir), store.transaction() as (docstore, index):
        job = Ingestor(
            docstore,
            index,
            resources,
            chunker or settings.chunker,
            chunk_size or settings.chunk_size,
            overlap,
            on_removed,
        )
        summary.chunker = job.chunker_tag
        seen = set()
        bar = tqdm(files, desc="ingest", unit="file", disable=not progress or None)
        for path in bar:
            doc_id = doc_id_for(path)
            seen.add(doc_id)
            bar.set_postfix_str(path.name[-40:])
            try:
                text = load_text(path)
            except (LoadError, OSError) as e:
                summary.failed.append((str(path), str(e)))
                log.warning("skipped %s: %s", path, e)
                continue
            job.put(doc_id, str(path), text, summary)
        if delete_missing:
            roots = [doc_id_for(Path(p)) for p in paths]
            for doc_id in docstore.document_ids():
                under = any(doc_id == r or doc_id.startswith(r.rstrip("/") + "/") for r in roots)
                if under and doc_id not in seen:
                    summary.chunks_removed += job.remove(doc_id)
                    summary.deleted += 1
    job.after_commit()
    summary.seconds = time.perf_counter() - t0
    return summary


def delete_documents(
    doc_ids: list[str],
    settings: Settings,
    on_removed: RemovedHook | None = None,
    resources: Resources | None = None,
) -> dict[str, int]:
    """Remove documents by id; returns {doc_id: chunks removed}; unknown ids raise KeyError."""
    resources = resources or Resources(settings)
    store = IndexGenerations(settings.index_dir, resources.embedder.dim)
    removed = {}
    with index_lock(settings.index_dir), store.transaction() as (docstore, index):
        # Deleting needs no chunker: the token baseline is the cheapest to construct.
        job = Ingestor(docstore, index, resources, "token", settings.chunk_size, 0, on_removed)
        for doc_id in doc_ids:
            if docstore.get_document(doc_id) is None:
                raise KeyError(doc_id)
            removed[doc_id] = job.remove(doc_id)
    job.after_commit()
    return removed
