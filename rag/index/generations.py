"""Index generations: the docstore and the FAISS index, replaced together, atomically.

Each ingestion run writes a new generation directory (a copy of the current one
plus its changes, and the BM25 index of its chunk texts) and then flips the
`CURRENT` file to name it (write + rename).
A crash or Ctrl-C before the flip leaves the previous generation untouched; the
next run starts again from it. Readers open whatever CURRENT names.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sqlite3
from collections.abc import Iterator
from pathlib import Path

from rag.index.docstore import Docstore
from rag.index.lexical_index import LexicalIndex
from rag.index.vector_index import VectorIndex

DOCSTORE = "docstore.sqlite"
FAISS = "faiss.index"
BM25 = "bm25"


class IndexGenerations:
    def __init__(self, root: Path, dim: int):
        self.root = Path(root)
        self.dim = dim

    def current_dir(self) -> Path | None:
        pointer = self.root / "CURRENT"
        if not pointer.exists():
            return None
        gen = self.root / pointer.read_text().strip()
        return gen if gen.is_dir() else None

    def open(self) -> tuple[Docstore, VectorIndex, LexicalIndex]:
        """The current generation for reading (an empty one if nothing was ingested yet)."""
        gen = self.current_dir()
        if gen is None:
            return Docstore(":memory:"), VectorIndex(self.dim), LexicalIndex([], [])
        docstore = Docstore(gen / DOCSTORE, readonly=True)
        # Generations committed before BM25 existed get theirs built here, once per process.
        lexical = LexicalIndex.load(gen / BM25) if (gen / BM25).is_dir() else _lexical(docstore)
        return docstore, VectorIndex.load(gen / FAISS, self.dim), lexical

    def _next_name(self) -> str:
        gens = [
            int(p.name.split("-")[1])
            for p in self.root.glob("gen-*")
            if p.name.split("-")[1].isdigit()
        ]
        return f"gen-{max(gens, default=0) + 1:06d}"

    @contextlib.contextmanager
    def transaction(self) -> Iterator[tuple[Docstore, VectorIndex]]:
        """A writable copy of the current generation; committed only if the block succeeds."""
        self.root.mkdir(parents=True, exist_ok=True)
        # Leftovers of an interrupted run are never CURRENT: drop them.
        current = self.current_dir()
        for stale in self.root.glob("gen-*"):
            if stale != current:
                shutil.rmtree(stale, ignore_errors=True)
        new = self.root / self._next_name()
        new.mkdir()
        try:
            if current is not None:
                src = sqlite3.connect(f"file:{current / DOCSTORE}?mode=ro", uri=True)
                dst = sqlite3.connect(new / DOCSTORE)
                src.backup(dst)
                src.close()
                dst.close()
            docstore = Docstore(new / DOCSTORE)
            index = (
                VectorIndex.load(current / FAISS, self.dim) if current else VectorIndex(self.dim)
            )
            yield docstore, index
            docstore.commit()
            _lexical(docstore).save(new / BM25)
            docstore.close()
            index.save(new / FAISS)
            _fsync_dir(new)
            tmp = self.root / "CURRENT.tmp"
            tmp.write_text(new.name)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(tmp, self.root / "CURRENT")
        except BaseException:
            shutil.rmtree(new, ignore_errors=True)
            raise
        # Committed: from here an interrupt must not remove the generation CURRENT names.
        _fsync_dir(self.root)
        if current is not None:
            shutil.rmtree(current, ignore_errors=True)


def _lexical(docstore: Docstore) -> LexicalIndex:
    chunks = docstore.all_chunks()
    return LexicalIndex([c.chunk_id for c in chunks], [c.text for c in chunks])


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
