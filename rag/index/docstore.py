"""SQLite docstore: documents, their chunks (exact char spans) and a growing id counter."""

from __future__ import annotations

import hashlib
import sqlite3
from dataclasses import dataclass
from pathlib import Path

SCHEMA = """
CREATE TABLE IF NOT EXISTS documents (
    doc_id TEXT PRIMARY KEY,
    source TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    text TEXT NOT NULL,
    chunker TEXT NOT NULL DEFAULT '',
    added_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS chunks (
    chunk_id INTEGER PRIMARY KEY,
    doc_id TEXT NOT NULL REFERENCES documents(doc_id),
    start INTEGER NOT NULL,
    end INTEGER NOT NULL,
    text TEXT NOT NULL,
    n_tokens INTEGER NOT NULL,
    content_hash TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS chunks_by_doc ON chunks(doc_id, start);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class Document:
    doc_id: str
    source: str
    sha256: str
    text: str
    chunker: str = ""


@dataclass(frozen=True)
class Chunk:
    chunk_id: int
    doc_id: str
    start: int
    end: int
    text: str
    n_tokens: int
    content_hash: str


class Docstore:
    def __init__(self, path: Path | str, readonly: bool = False):
        self.path = Path(path)
        if readonly:
            self.db = sqlite3.connect(
                f"file:{self.path}?mode=ro", uri=True, check_same_thread=False
            )
        else:
            self.db = sqlite3.connect(self.path, check_same_thread=False)
            self.db.executescript(SCHEMA)

    def close(self) -> None:
        self.db.close()

    def commit(self) -> None:
        self.db.commit()

    # -- ids ---------------------------------------------------------------
    def next_ids(self, n: int) -> list[int]:
        """n fresh chunk ids from a counter that only grows (never reused after delete)."""
        row = self.db.execute("SELECT value FROM meta WHERE key = 'next_chunk_id'").fetchone()
        first = int(row[0]) if row else 1
        self.db.execute(
            "INSERT OR REPLACE INTO meta VALUES ('next_chunk_id', ?)", (str(first + n),)
        )
        return list(range(first, first + n))

    # -- documents -----------------------------------------------------------
    def get_document(self, doc_id: str) -> Document | None:
        row = self.db.execute(
            "SELECT doc_id, source, sha256, text, chunker FROM documents WHERE doc_id = ?",
            (doc_id,),
        ).fetchone()
        return Document(*row) if row else None

    def document_ids(self) -> list[str]:
        return [r[0] for r in self.db.execute("SELECT doc_id FROM documents ORDER BY doc_id")]

    def list_documents(self) -> list[dict]:
        rows = self.db.execute(
            "SELECT d.doc_id, d.source, d.sha256, length(d.text), d.chunker, d.added_at, "
            "COUNT(c.chunk_id) "
            "FROM documents d LEFT JOIN chunks c ON c.doc_id = d.doc_id "
            "GROUP BY d.doc_id ORDER BY d.doc_id"
        )
        keys = ("doc_id", "source", "sha256", "n_chars", "chunker", "added_at", "n_chunks")
        return [dict(zip(keys, r, strict=True)) for r in rows]

    def put_document(self, doc: Document, added_at: float) -> None:
        self.db.execute(
            "INSERT OR REPLACE INTO documents VALUES (?, ?, ?, ?, ?, ?)",
            (doc.doc_id, doc.source, doc.sha256, doc.text, doc.chunker, added_at),
        )

    def delete_document(self, doc_id: str) -> list[int]:
        """Remove a document and its chunks; returns the removed chunk ids."""
        ids = [
            r[0] for r in self.db.execute("SELECT chunk_id FROM chunks WHERE doc_id = ?", (doc_id,))
        ]
        self.db.execute("DELETE FROM chunks WHERE doc_id = ?", (doc_id,))
        self.db.execute("DELETE FROM documents WHERE doc_id = ?", (doc_id,))
        return ids

    # -- chunks --------------------------------------------------------------
    def add_chunks(self, chunks: list[Chunk]) -> None:
        self.db.executemany(
            "INSERT INTO chunks VALUES (?, ?, ?, ?, ?, ?, ?)",
            [
                (c.chunk_id, c.doc_id, c.start, c.end, c.text, c.n_tokens, c.content_hash)
                for c in chunks
            ],
        )

    def get_chunks(self, ids: list[int]) -> dict[int, Chunk]:
        if not ids:
            return {}
        marks = ",".join("?" * len(ids))
        rows = self.db.execute(f"SELECT * FROM chunks WHERE chunk_id IN ({marks})", list(ids))
        return {r[0]: Chunk(*r) for r in rows}

    def chunks_of(self, doc_id: str) -> list[Chunk]:
        rows = self.db.execute("SELECT * FROM chunks WHERE doc_id = ? ORDER BY start", (doc_id,))
        return [Chunk(*r) for r in rows]

    def all_chunks(self) -> list[Chunk]:
        return [Chunk(*r) for r in self.db.execute("SELECT * FROM chunks ORDER BY chunk_id")]

    def counts(self) -> dict[str, int]:
        n_docs = self.db.execute("SELECT COUNT(*) FROM documents").fetchone()[0]
        n_chunks, n_tokens = self.db.execute(
            "SELECT COUNT(*), COALESCE(SUM(n_tokens), 0) FROM chunks"
        ).fetchone()
        return {"documents": n_docs, "chunks": n_chunks, "chunk_tokens": n_tokens}
