"""A read-only or full data dir never fails an answer; /healthz says what is wrong.

The filesystems are real (a read-only bind mount, a full tmpfs, in a private mount namespace):
the server and the CLI get EROFS / ENOSPC from the kernel at every write they attempt.
"""

from __future__ import annotations

import subprocess

import httpx
import pytest

from tests.faults import (
    QUESTION,
    LiveServer,
    chat,
    env,
    full,
    ingested,
    kvrag_cmd,
    needs_unshare,
    readonly,
    sse_events,
)

pytestmark = needs_unshare


@pytest.fixture(scope="module")
def ro_server(tmp_path_factory):
    root = tmp_path_factory.mktemp("ro")
    settings = ingested(root)
    with LiveServer(settings.data_dir, root / "serve.log", wrap=readonly) as server:
        yield server


def test_readonly_data_dir_answers_and_reports(ro_server):
    url = ro_server.url
    health = httpx.get(f"{url}/healthz").json()
    assert health["status"] == "degraded"
    assert health["data_dir"]["writable"] is False and "Read-only" in health["data_dir"]["error"]
    for _ in range(2):
        r = chat(url)
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["message"]["content"]
    r = chat(url, stream=True)
    events = sse_events(r)
    assert r.status_code == 200 and events[-1] == "[DONE]"
    assert not any(isinstance(e, dict) and "error" in e for e in events), events
    assert events[-2]["choices"][0]["finish_reason"] in ("stop", "length")
    # The disk tier could not store the computed chunk: degraded, reported.
    health = httpx.get(f"{url}/healthz").json()
    assert health["disk_tier"] == "failing" and health["status"] == "degraded"


def test_readonly_data_dir_writes_get_507_not_500(ro_server):
    url = ro_server.url
    r = httpx.post(f"{url}/v1/documents", json={"text": "A note.", "name": "note.txt"}, timeout=60)
    assert r.status_code == 507, r.text
    assert r.json()["error"]["code"] == "storage_unavailable"
    r = httpx.delete(f"{url}/v1/documents/docs/saltmere_weather.md", timeout=60)
    assert r.status_code == 507, r.text
    docs = httpx.get(f"{url}/v1/documents").json()["data"]
    assert "docs/saltmere_weather.md" in {d["id"] for d in docs}  # nothing lost
    log = ro_server.log()
    assert "Traceback" not in log
    assert log.count("cannot write cache stats") <= 1  # warned once, not per request


def test_cli_ask_on_a_full_data_dir_exits_0(tmp_path):
    settings = ingested(tmp_path)
    cmd = kvrag_cmd("--data-dir", str(settings.data_dir), "ask", QUESTION, "--k", "1")
    cmd += ["--max-tokens", "4"]
    run = subprocess.run(full(settings.data_dir, cmd), env=env(), capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert "Traceback" not in run.stderr and "Sources:" in run.stdout
    assert "No space left" in run.stderr  # warned (stats, disk tier), once each
    assert run.stderr.count("cannot write cache stats") <= 1
