"""Folder ingestion over hostile trees (real links), a killed ingestion, a second writer."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import httpx
import pytest

from ingest.job import index_lock, ingest
from ingest.loaders import discover
from rag.index.embedder import Embedder
from rag.index.generations import IndexGenerations
from tests.faults import LiveServer, env, ingested, kvrag_cmd, settings_for, wait_job


@pytest.fixture
def tree(tmp_path):
    """docs/ with a real file, a link out of it, a dangling link, a loop, an inner link."""
    outside = tmp_path / "secret"
    outside.mkdir()
    (outside / "passwd.txt").write_text("root:x:0:0:the secret outside the ingested folder\n")
    docs = tmp_path / "docs"
    (docs / "sub").mkdir(parents=True)
    (docs / "a.md").write_text("# A\n\nThe harbour opens at dawn.\n")
    (docs / "sub" / "b.md").write_text("# B\n\nThe ferry leaves at noon.\n")
    (docs / "passwd.txt").symlink_to(outside / "passwd.txt")
    (docs / "outside").symlink_to(outside, target_is_directory=True)
    (docs / "gone.md").symlink_to(tmp_path / "nowhere.md")
    (docs / "sub" / "up").symlink_to(docs, target_is_directory=True)  # a loop
    (docs / "self.md").symlink_to(docs / "self.md")  # a link to itself
    (docs / "b-again.md").symlink_to(docs / "sub" / "b.md")  # inside: the same file once
    return tmp_path


def test_links_leaving_the_folder_are_refused_and_reported(tree):
    found = discover([tree / "docs"])
    assert [p.relative_to(tree).as_posix() for p in found.files] == ["docs/a.md", "docs/sub/b.md"]
    refused = {os.path.basename(p): why for p, why in found.refused}
    assert "leaves the folders" in refused["passwd.txt"]
    assert "leaves the folders" in refused["outside"]
    assert "dangling" in refused["gone.md"]
    assert "loop" in refused["up"] and "loop" in refused["self.md"]


def test_follow_links_ingests_them_under_the_link_path(tree, monkeypatch):
    monkeypatch.chdir(tree)
    found = discover([tree / "docs"], follow_links=True)
    names = {p.name for p in found.files}
    assert {"passwd.txt", "a.md"} <= names
    refused = {os.path.basename(p) for p, _ in found.refused}
    assert {"gone.md", "up", "self.md"} <= refused and "passwd.txt" not in refused


def test_cli_ingest_refuses_a_link_to_etc_passwd_and_says_so(tree):
    data = tree / "data"
    run = subprocess.run(
        kvrag_cmd("--data-dir", str(data), "ingest", "docs", "--no-progress", "--json"),
        cwd=tree,
        env=env(),
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr
    summary = json.loads(run.stdout)
    reasons = {os.path.basename(f["path"]): f["reason"] for f in summary["failed"]}
    assert "leaves the folders" in reasons["passwd.txt"] and "dangling" in reasons["gone.md"]
    settings = settings_for(data)
    docstore, _, _ = IndexGenerations(settings.index_dir, Embedder(settings.embedder).dim).open()
    ids = docstore.document_ids()
    assert set(ids) == {"docs/a.md", "docs/sub/b.md"}
    assert not any("secret" in c.text for c in docstore.all_chunks())


def test_cli_lock_conflict_is_one_line_not_a_traceback(tmp_path):
    settings = settings_for(tmp_path / "data")
    (tmp_path / "a.md").write_text("# A\n\nSome text.\n")
    with index_lock(settings.index_dir):
        run = subprocess.run(
            kvrag_cmd("--data-dir", str(settings.data_dir), "ingest", str(tmp_path / "a.md")),
            env=env(),
            capture_output=True,
            text=True,
        )
    assert run.returncode == 75
    assert "Traceback" not in run.stderr and "another ingestion job holds" in run.stderr


def test_killed_ingestion_leaves_the_previous_index(tmp_path):
    settings = settings_for(tmp_path / "data")
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "a.md").write_text("# A\n\nThe harbour opens at dawn.\n")
    os.chdir(tmp_path)
    ingest(["docs"], settings, progress=False)
    for i in range(20):
        (docs / f"more{i}.md").write_text(f"# More {i}\n\n" + "Words of filler text. " * 30)
    proc = subprocess.Popen(
        kvrag_cmd("--data-dir", str(settings.data_dir), "ingest", "docs", "--no-progress"),
        cwd=tmp_path,
        env=env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    gens = IndexGenerations(settings.index_dir, Embedder(settings.embedder).dim)
    before = gens.current_dir()
    deadline = time.monotonic() + 60
    while len(list(settings.index_dir.glob("gen-*"))) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)  # the new generation is being written
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert gens.current_dir() == before
    docstore, index, _ = gens.open()
    assert docstore.document_ids() == ["docs/a.md"] and len(index) == 1
    ingest(["docs"], settings, progress=False)  # the next run starts cleanly from it
    assert len(gens.open()[0].document_ids()) == 21


def test_server_killed_mid_upload_resumes_it_at_restart(tmp_path):
    settings = ingested(tmp_path, {"a.md": "# A\n\nThe harbour opens at dawn.\n"})
    text = "# Tides\n\n" + "The spring tide at Kellhaven rises six metres. " * 600
    with LiveServer(settings.data_dir, tmp_path / "serve1.log") as server:
        r = httpx.post(f"{server.url}/v1/documents", json={"text": text, "name": "tides.md"})
        assert r.status_code == 202, r.text
        location, job_id = r.headers["Location"], r.json()["id"]
        deadline = time.monotonic() + 120
        while httpx.get(server.url + location).json()["status"] == "queued":
            assert time.monotonic() < deadline
            time.sleep(0.05)
        server.proc.kill()  # SIGKILL mid-job: no shutdown hook runs
        server.proc.wait()
    pending = settings.data_dir / "uploads" / ".pending" / job_id / "tides.md"
    assert pending.is_file()  # what the client was told was accepted is still there
    with LiveServer(settings.data_dir, tmp_path / "serve2.log") as server:
        job = wait_job(server.url, location)
        assert job["status"] == "done" and job["id"] == job_id, job
        listed = {d["id"] for d in httpx.get(f"{server.url}/v1/documents").json()["data"]}
        assert {"uploads/tides.md", "docs/a.md"} <= listed
    assert not pending.parent.exists() and (settings.data_dir / "uploads" / "tides.md").is_file()
