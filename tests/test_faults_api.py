"""The API under hostile and awkward requests: a live server over the sample documents.

Stop strings in streams, errors before a stream starts, null and malformed bodies, hostile
upload names, and uploads as jobs (202, polling, a second writer's 409, no name collisions).
"""

from __future__ import annotations

import httpx
import pytest

from rag.engine.stream_text import StopStream, held_back
from tests.faults import (
    chat,
    ingested,
    settings_for,
    sse_events,
    thread_server,
    upload,
    wait_job,
)


@pytest.fixture(scope="module")
def api(tmp_path_factory):
    root = tmp_path_factory.mktemp("api_faults")
    ingested(root)
    with thread_server(settings_for(root / "data")) as (url, rag):
        yield url, rag


def streamed_text(r: httpx.Response) -> str:
    events = sse_events(r)
    assert events[-1] == "[DONE]", events
    assert not any("error" in e for e in events[:-1]), events
    return "".join(e["choices"][0]["delta"].get("content") or "" for e in events[:-1])


# -- stop strings ---------------------------------------------------------------------------


def test_held_back_is_the_longest_stop_prefix_at_the_end():
    assert held_back("The lighthouse is 3", ["is 34"]) == 4
    assert held_back("The lighthouse i", ["is 34", "house"]) == 1
    assert held_back("The lighthouse", ["is 34"]) == 0
    s = StopStream(["is 34"])
    assert s.update("The lighthouse is") == "The lighthouse "
    assert s.update("The lighthouse is 3") == ""
    assert s.update("The lighthouse is 34 metres") == "" and s.stopped
    assert s.text == "The lighthouse " and s.flush() == ""
    s = StopStream(["is 34"])
    assert s.update("It is 3") == "It " and s.update("It is 35") == "is 35"


def test_stream_never_sends_the_start_of_a_stop_string(api):
    url, _ = api
    body = {"max_tokens": 16, "kvrag": {"k": 1, "mode": "reuse"}}
    full = chat(url, **body).json()["choices"][0]["message"]["content"]
    words = full.split()
    assert len(words) >= 4, full
    stop = " ".join(words[2:4])  # spans tokens: its start arrives before its end
    plain = chat(url, stop=[stop], **body).json()["choices"][0]["message"]["content"]
    assert stop not in plain and full.startswith(plain)
    streamed = streamed_text(chat(url, stop=[stop], stream=True, **body))
    assert streamed.rstrip() == plain  # no "... is 3" leaking ahead of the cut


def test_stream_without_a_stop_sends_everything(api):
    url, _ = api
    body = {"max_tokens": 12, "kvrag": {"k": 1, "mode": "reuse"}}
    full = chat(url, **body).json()["choices"][0]["message"]["content"]
    assert streamed_text(chat(url, stream=True, stop=["zzqx"], **body)).strip() == full


# -- errors before a stream starts, bodies ------------------------------------------------------


def test_context_overflow_in_a_stream_is_a_real_400(api):
    url, _ = api
    question = "1234567890" * 3000  # one token a digit: past the 8192-token context
    for stream in (False, True):
        r = chat(url, question=question, stream=stream)
        assert r.status_code == 400, r.text
        assert r.json()["error"]["code"] == "context_length_exceeded"


def test_null_means_default_for_openai_optional_fields(api):
    url, _ = api
    r = chat(url, temperature=None, top_p=None, n=None, stream=None)
    assert r.status_code == 200, r.text


def test_malformed_json_names_the_body(api):
    url, _ = api
    r = httpx.post(
        f"{url}/v1/chat/completions",
        content=b'{"messages": [{"role": "user", "content": "hi"}',
        headers={"content-type": "application/json"},
    )
    assert r.status_code == 400 and r.json()["error"]["param"] == "body", r.text
    assert "JSON" in r.json()["error"]["message"]


def test_blank_retrieve_query_is_400(api):
    url, _ = api
    r = httpx.post(f"{url}/v1/retrieve", json={"query": "   \n\t"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "query"


def test_no_page_loads_scripts_from_a_cdn(api):
    url, _ = api
    for page in ("/docs", "/redoc"):
        r = httpx.get(url + page)
        assert r.status_code == 404 or "cdn." not in r.text
    assert httpx.get(url + "/openapi.json").status_code == 200


# -- uploads -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "names",
    [("my notes.md", "my_notes.md"), ("日本.md", "中文.md"), ("a?b.md", "a_b.md")],
)
def test_different_upload_names_never_share_a_document(api, names):
    url, _ = api
    docs = []
    for i, name in enumerate(names):
        job = upload(
            url, json={"text": f"Note {i} about {name}: puffins nest in May.", "name": name}
        )
        assert job["status"] == "done" and job["result"]["status"] == "added", job
        docs.append(job["document"])
    assert len(set(docs)) == 2
    listed = {d["id"] for d in httpx.get(f"{url}/v1/documents").json()["data"]}
    assert set(docs) <= listed
    for doc in docs:
        assert httpx.delete(f"{url}/v1/documents/{doc}", timeout=60).status_code == 200


def test_upload_is_a_job_and_a_second_writer_gets_409_at_once(api):
    url, _ = api
    text = "# Tides\n\n" + "The spring tide at Kellhaven rises six metres. " * 1500
    r = httpx.post(f"{url}/v1/documents", json={"text": text, "name": "tides.md"}, timeout=60)
    assert r.status_code == 202, r.text
    job = r.json()
    assert job["object"] == "ingest.job" and job["status"] in ("queued", "running")
    assert job["document"] == "uploads/tides.md" and job["error"] is None
    location = r.headers["Location"]
    assert location == f"/v1/documents/jobs/{job['id']}"
    second = httpx.post(f"{url}/v1/documents", json={"text": "x", "name": "x.md"}, timeout=10)
    delete = httpx.delete(f"{url}/v1/documents/uploads/none.md", timeout=10)
    assert (second.status_code, delete.status_code) == (409, 409)
    assert httpx.get(f"{url}/v1/documents", timeout=10).status_code == 200
    done = wait_job(url, location)
    assert done["status"] == "done" and done["result"]["chunks"] > 1, done
    assert done["seconds"] > 0 and done["result"]["seconds"] > 0
    assert httpx.get(f"{url}/v1/documents/jobs/nope").status_code == 404
    assert httpx.delete(f"{url}/v1/documents/uploads/tides.md", timeout=60).status_code == 200


def test_unreadable_upload_fails_its_job_with_a_reason(api):
    url, _ = api
    files = {"file": ("bad.pdf", b"%PDF-1.4 not really a pdf", "application/pdf")}
    job = upload(url, files=files)
    assert job["status"] == "failed" and job["error"]["code"] == "unreadable_document", job
    listed = {d["id"] for d in httpx.get(f"{url}/v1/documents").json()["data"]}
    assert "uploads/bad.pdf" not in listed


def test_bad_bodies_and_hostile_names_never_5xx(api):
    url, _ = api
    chat_url = f"{url}/v1/chat/completions"
    bodies = [
        b"",
        b"null",
        b"[]",
        b'{"messages": []}',
        b'{"messages": [{"role": "user", "content": "\\ud800"}]}',
        b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1e309}',
        b'{"messages": [{"role": "user", "content": "hi"}], "stop": [null]}',
        b'{"messages": [{"role": "user", "content": "hi"}], "kvrag": {"k": 0}}',
        '{"messages": [{"role": "user", "content": "hi"}], "model": "\u202e"}'.encode()[:-3],
    ]
    for body in bodies:
        r = httpx.post(chat_url, content=body, headers={"content-type": "application/json"})
        assert 400 <= r.status_code < 500, (body, r.status_code, r.text)
        assert set(r.json()) == {"error"} and "Traceback" not in r.text
    for name in ("../../etc/passwd.md", "/abs/x.md", "..\\..\\win.txt", "a\x00b.md", "\u202e.md"):
        r = httpx.post(f"{url}/v1/documents", json={"text": "Hostile name.", "name": name})
        if r.status_code == 202:
            job = upload_done(url, r)
            doc = job["document"]
            assert doc.startswith("uploads/") and "/" not in doc[len("uploads/") :], doc
            assert httpx.delete(f"{url}/v1/documents/{doc}", timeout=60).status_code == 200
        else:
            assert r.status_code == 400, (name, r.text)


def upload_done(url: str, r: httpx.Response) -> dict:
    job = wait_job(url, r.headers["Location"])
    assert job["status"] == "done", job
    return job
