"""The ingestion job on real text: idempotence, updates and deletes, broken files, killed runs."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import faiss
import pytest

from ingest.chunkers import Resources
from ingest.job import delete_documents, doc_id_for, ingest
from ingest.loaders import LoadError, load_text
from rag.config import Settings
from rag.index.generations import IndexGenerations
from rag.model.loader import resolve_model_dir

REPO = Path(__file__).resolve().parents[1]
CORPORA = REPO.parent / "shared" / "data" / "chroma_eval" / "corpora"
pytestmark = pytest.mark.skipif(not CORPORA.is_dir(), reason="shared corpora not available")


@pytest.fixture(scope="module")
def model_dir() -> Path:
    return resolve_model_dir("", REPO / "kvrag_data" / "models")


@pytest.fixture(scope="module")
def resources(model_dir, tmp_path_factory):
    return Resources(Settings(data_dir=tmp_path_factory.mktemp("res"), model=str(model_dir)))


def settings_for(tmp_path: Path, model_dir: Path) -> Settings:
    return Settings(
        data_dir=tmp_path / "data", model=str(model_dir), chunker="token", chunk_size=120
    )


def write_docs(folder: Path, n: int, chars: int = 2500, corpus: str = "wikitexts") -> list[Path]:
    text = (CORPORA / f"{corpus}.md").read_text(encoding="utf-8")
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        p = folder / f"doc{i:03d}.md"
        p.write_text(text[i * chars : (i + 1) * chars], encoding="utf-8")
        paths.append(p)
    return paths


def consistent(settings: Settings, dim: int = 384):
    """The current generation: docstore chunk ids must equal FAISS ids (and BM25's)."""
    docstore, index, lexical = IndexGenerations(settings.index_dir, dim).open()
    ds_ids = sorted(c.chunk_id for c in docstore.all_chunks())
    faiss_ids = sorted(int(i) for i in faiss.vector_to_array(index.index.id_map))
    assert ds_ids == faiss_ids
    assert sorted(lexical.ids) == ds_ids
    for c in docstore.all_chunks():
        doc = docstore.get_document(c.doc_id)
        assert doc.text[c.start : c.end] == c.text
    return docstore, index


def test_reingestion_is_idempotent(tmp_path, model_dir, resources):
    s = settings_for(tmp_path, model_dir)
    write_docs(tmp_path / "docs", 3)
    first = ingest([tmp_path / "docs"], s, resources=resources, progress=False)
    assert (first.added, first.unchanged, first.failed) == (3, 0, [])
    assert first.chunks_added > 3 and first.tokens_per_s > 0
    before = sorted(c.chunk_id for c in consistent(s)[0].all_chunks())
    again = ingest([tmp_path / "docs"], s, resources=resources, progress=False)
    assert (again.added, again.updated, again.unchanged, again.chunks_added) == (0, 0, 3, 0)
    assert sorted(c.chunk_id for c in consistent(s)[0].all_chunks()) == before
    # Another chunk size is another chunking: every document is redone.
    resized = ingest([tmp_path / "docs"], s, chunk_size=60, resources=resources, progress=False)
    assert resized.updated == 3 and resized.chunks_removed == len(before)


def test_update_and_delete_remove_old_vectors(tmp_path, model_dir, resources):
    s = settings_for(tmp_path, model_dir)
    paths = write_docs(tmp_path / "docs", 3)
    removed_batches = []
    ingest(
        [tmp_path / "docs"],
        s,
        resources=resources,
        progress=False,
        on_removed=removed_batches.append,
    )
    docstore, _ = consistent(s)
    doc0 = doc_id_for(paths[0])
    old_ids = {c.chunk_id for c in docstore.chunks_of(doc0)}

    paths[0].write_text(
        (CORPORA / "pubmed.md").read_text(encoding="utf-8")[5000:7000], encoding="utf-8"
    )
    upd = ingest(
        [tmp_path / "docs"],
        s,
        resources=resources,
        progress=False,
        on_removed=removed_batches.append,
    )
    assert (upd.updated, upd.unchanged) == (1, 2) and upd.chunks_removed == len(old_ids)
    docstore, index = consistent(s)
    new_ids = {c.chunk_id for c in docstore.chunks_of(doc0)}
    assert new_ids and not new_ids & old_ids
    assert not old_ids & {int(i) for i in faiss.vector_to_array(index.index.id_map)}
    assert {c.chunk_id for c in removed_batches[-1]} == old_ids  # their chunk caches are dropped
    # The new text is what retrieval finds now.
    query = resources.embedder.embed([docstore.chunks_of(doc0)[0].text])[0]
    assert index.search(query, 1)[0][0] in new_ids

    paths[1].unlink()
    gone = ingest([tmp_path / "docs"], s, resources=resources, progress=False, delete_missing=True)
    assert gone.deleted == 1 and gone.chunks_removed > 0
    docstore, _ = consistent(s)
    assert doc_id_for(paths[1]) not in docstore.document_ids()

    removed = delete_documents([doc_id_for(paths[2])], s, resources=resources)
    assert removed[doc_id_for(paths[2])] > 0
    assert consistent(s)[0].document_ids() == [doc0]
    with pytest.raises(KeyError):
        delete_documents(["no/such/doc.md"], s, resources=resources)


def minimal_pdf(text: str) -> bytes:
    """A one-page PDF showing `text` (Helvetica), with a correct xref table."""
    stream = f"BT /F1 12 Tf 72 720 Td ({text}) Tj ET".encode()
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R "
        b"/Resources << /Font << /F1 5 0 R >> >> >>",
        b"<< /Length %d >>\nstream\n" % len(stream) + stream + b"\nendstream",
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
    ]
    out, offsets = b"%PDF-1.4\n", []
    for i, body in enumerate(objects, 1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % i + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % o for o in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (
        len(objects) + 1,
        xref,
    )
    return out


def test_loaders_html_and_pdf(tmp_path):
    html = tmp_path / "page.html"
    html.write_text(
        "<html><head><title>t</title><script>var x=1;</script></head><body><h1>Title</h1>"
        "<p>First <b>para</b>.</p><style>p{}</style><p>Second.</p></body></html>"
    )
    got = load_text(html)
    assert "var x" not in got and "p{}" not in got
    assert got.startswith("Title") and "para" in got and got.endswith("Second.")
    pdf = tmp_path / "doc.pdf"
    pdf.write_bytes(minimal_pdf("Malaria parasites infect red blood cells."))
    assert "Malaria parasites infect red blood cells." in load_text(pdf)


def test_broken_files_are_reported_and_skipped(tmp_path, model_dir, resources):
    s = settings_for(tmp_path, model_dir)
    docs = tmp_path / "docs"
    write_docs(docs, 2)
    (docs / "empty.txt").write_text("  \n")
    (docs / "binary.txt").write_bytes(b"\x00\x01\x02ELF" * 100)
    (docs / "latin1.md").write_bytes("caf\xe9 cr\xe8me".encode("latin-1"))
    (docs / "broken.pdf").write_bytes(b"%PDF-1.4\nthis is not really a pdf")
    (docs / "page.html").write_text("<p>" + (CORPORA / "chatlogs.md").read_text()[:1500] + "</p>")
    summary = ingest([docs], s, resources=resources, progress=False)
    reasons = {Path(p).name: r for p, r in summary.failed}
    assert set(reasons) == {"empty.txt", "binary.txt", "latin1.md", "broken.pdf"}
    assert "empty" in reasons["empty.txt"] and "binary" in reasons["binary.txt"]
    assert "UTF-8" in reasons["latin1.md"] and "PDF" in reasons["broken.pdf"]
    assert summary.added == 3
    assert len(consistent(s)[0].document_ids()) == 3
    with pytest.raises(LoadError):
        load_text(docs / "binary.txt")


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT], ids=["SIGKILL", "SIGINT"])
def test_interrupted_ingestion_keeps_the_previous_index(tmp_path, model_dir, resources, sig):
    s = settings_for(tmp_path, model_dir)
    docs = tmp_path / "docs"
    write_docs(docs, 2)
    ingest([docs], s, resources=resources, progress=False)
    current = (s.index_dir / "CURRENT").read_text()
    before = sorted(c.chunk_id for c in consistent(s)[0].all_chunks())

    # Enough work that the job is still running when the signal lands (40 documents could
    # finish inside half a second on a fast host, and the run then exits 0).
    write_docs(tmp_path / "more", 100, chars=1200, corpus="pubmed")
    env = {
        **os.environ,
        "KVRAG_DATA_DIR": str(s.data_dir),
        "KVRAG_MODEL": str(model_dir),
        "KVRAG_CHUNKER": "token",
        "KVRAG_CHUNK_SIZE": "120",
        "PYTHONPATH": str(REPO),
    }
    # A shell without job control starts background commands with SIGINT ignored, and the job
    # inherits that from pytest (it then ignores the signal and commits): give it a terminal's
    # Ctrl-C, whatever started the tests.
    sigint = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "rag.cli",
                "ingest",
                str(docs),
                str(tmp_path / "more"),
                "--no-progress",
            ],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
    finally:
        signal.signal(signal.SIGINT, sigint)
    try:
        deadline = time.time() + 120
        while not any(p.name != current for p in s.index_dir.glob("gen-*")):
            assert proc.poll() is None, proc.stdout.read().decode()
            assert time.time() < deadline, "the job never started a generation"
            time.sleep(0.05)
        time.sleep(
            0.1
        )  # inside the run: the docstore is being copied, documents chunked and embedded
        assert proc.poll() is None, "the job finished before it could be interrupted"
        proc.send_signal(sig)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0, proc.stdout.read().decode()[-3000:]
    assert (s.index_dir / "CURRENT").read_text() == current
    assert sorted(c.chunk_id for c in consistent(s)[0].all_chunks()) == before

    rerun = ingest([docs, tmp_path / "more"], s, resources=resources, progress=False)
    assert (rerun.added, rerun.unchanged) == (100, 2)
    docstore, _ = consistent(s)
    assert len(docstore.document_ids()) == 102
    assert len(list(s.index_dir.glob("gen-*"))) == 1
