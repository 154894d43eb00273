"""The API against a live uvicorn server and the real model, through the official openai client.

One server for the module over the sample documents (Redis as a KV tier when
one answers on 127.0.0.1:6379); small k and max_tokens keep it quick on CPU.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import time

import httpx
import openai
import pytest

from ingest.job import ingest
from rag.config import Settings
from rag.server.app import create_app
from rag.server.run import ThreadServer
from rag.service import RAGService
from tests.conftest import SAMPLES
from tests.faults import upload

KEY = "sk-live-test"
FAST = {"k": 2, "mode": "blend"}


def _redis_up() -> bool:
    try:
        with socket.create_connection(("127.0.0.1", 6379), timeout=0.3):
            return True
    except OSError:
        return False


@pytest.fixture(scope="module")
def live(tmp_path_factory, models_dir):
    root = tmp_path_factory.mktemp("api_live")
    shutil.copytree(SAMPLES, root / "docs")
    redis_url = "redis://127.0.0.1:6379/0" if _redis_up() else ""
    settings = Settings(
        data_dir=root / "data",
        model_cache_dir=models_dir,
        cache_disk_mb=256,
        cache_memory_mb=256,
        redis_url=redis_url,
        cache_redis_ttl_s=600,
    )
    cwd = os.getcwd()
    os.chdir(root)  # doc ids relative to it: docs/<file>.md
    try:
        ingest(["docs"], settings, progress=False)
        rag = RAGService(settings)
        with ThreadServer(create_app(settings, rag)) as server:
            yield server, rag, settings
    finally:
        os.chdir(cwd)


@pytest.fixture(scope="module")
def client(live):
    server, *_ = live
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=300)


def test_openai_client_completion(client):
    r = client.chat.completions.create(
        model="SmolLM2-135M-Instruct",
        max_tokens=8,
        temperature=0,
        messages=[
            {"role": "system", "content": "ignored"},
            {"role": "user", "content": "How tall is the Greywater Point lighthouse?"},
        ],
        extra_body={"kvrag": FAST},
    )
    assert r.choices[0].message.content and r.choices[0].finish_reason in ("stop", "length")
    assert 0 < r.usage.completion_tokens <= 8 and r.usage.prompt_tokens > 100
    info = r.model_extra["kvrag"]
    assert info["mode"] == "blend" and len(info["citations"]) == 2
    assert any(c["doc_id"] == "docs/saltmere_lighthouses.md" for c in info["citations"])
    assert set(info["timings_ms"]) >= {"retrieve", "kv_load", "blend", "ttft", "total"}
    assert info["cache"]["kv_hits"] + info["cache"]["kv_misses"] == 2
    assert "memory" in info["cache"]["tiers"] and "recomputed_tokens" in info["cache"]


def test_ignore_eos_answers_max_tokens(client):
    """vLLM's ignore_eos (top level, as benchmark clients send it): past the end token."""
    ask = dict(
        model="any",
        temperature=0,
        messages=[
            {"role": "user", "content": "Answer yes or no: is Greywater Point a lighthouse?"}
        ],
    )
    short = client.chat.completions.create(max_tokens=64, extra_body={"kvrag": FAST}, **ask)
    assert short.choices[0].finish_reason == "stop" and short.usage.completion_tokens < 64
    full = client.chat.completions.create(
        max_tokens=64, extra_body={"kvrag": FAST, "ignore_eos": True}, **ask
    )
    assert full.choices[0].finish_reason == "length" and full.usage.completion_tokens == 64


def test_openai_client_stream(client):
    stream = client.chat.completions.create(
        model="any",
        max_tokens=8,
        stream=True,
        messages=[
            {
                "role": "user",
                "content": "What is the highest wind gust ever recorded in the islands?",
            }
        ],
        stream_options={"include_usage": True},
        extra_body={"kvrag": FAST},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.strip()
    last, usage = chunks[-2], chunks[-1]
    assert last.choices[0].finish_reason in ("stop", "length")
    assert usage.choices == [] and usage.usage.completion_tokens > 0
    # the header and the chunks (from the store or computed just now) minus the recomputed ones
    cached = usage.usage.prompt_tokens_details.cached_tokens
    assert 0 < cached < usage.usage.prompt_tokens
    info = last.model_extra["kvrag"]
    assert info["citations"] and info["cache"]["kv_hits"] + info["cache"]["kv_misses"] == 2
    assert info["timings_ms"]["ttft"] > 0


def test_bad_bodies_get_4xx(client, live):
    server, *_ = live
    for kwargs in (
        {"max_tokens": -1},
        {"temperature": "hot"},
        {"messages": [{"role": "user", "content": "x" * 50_000}]},
        {"extra_body": {"kvrag": {"k": 500}}},
    ):
        body = {"model": "m", "messages": [{"role": "user", "content": "q"}], **kwargs}
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(**body)
        assert e.value.body["type"] == "invalid_request_error"
    r = httpx.post(
        f"{server.url}/v1/chat/completions", json={"messages": [{"role": "user", "content": 5}]}
    )
    assert r.status_code == 400 and "Traceback" not in r.text


def test_auth_on(live):
    _, rag, settings = live
    app = create_app(settings.model_copy(update={"api_keys": KEY}), rag)
    with ThreadServer(app) as server:
        bad = openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()
        good = openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0)
        assert [m.id for m in good.models.list()] == [rag.model_name]
        r = httpx.post(
            f"{server.url}/v1/retrieve",
            json={"query": "ferry", "k": 1},
            headers={"Authorization": f"Bearer {KEY}"},
        )
        assert r.status_code == 200 and r.json()["data"]
        assert httpx.post(f"{server.url}/v1/retrieve", json={"query": "ferry"}).status_code == 401


def test_uploaded_document_is_retrievable_at_once(live):
    server, rag, settings = live
    fact = (
        "The Storm Petrel, a fast catamaran, began service between Kellhaven and Port Ellery "
        "in 2024."
    )
    files = {"file": ("../../new ferry.md", f"# Ferry news\n\n{fact}\n".encode(), "text/markdown")}
    job = upload(server.url, files=files)
    assert job["status"] == "done" and job["document"] == "uploads/new ferry.md", job
    assert job["result"]["chunks"] == 1 and job["result"]["status"] == "added"
    assert (settings.data_dir / "uploads" / "new ferry.md").is_file()
    hits = httpx.post(
        f"{server.url}/v1/retrieve", json={"query": "Storm Petrel catamaran", "k": 1}
    ).json()
    assert (
        hits["data"][0]["doc_id"] == "uploads/new ferry.md"
        and "Storm Petrel" in hits["data"][0]["text"]
    )
    job = upload(server.url, json={"text": "Short note about puffins.", "name": "note.txt"})
    assert job["status"] == "done" and job["document"] == "uploads/note.txt"
    ids = [d["id"] for d in httpx.get(f"{server.url}/v1/documents").json()["data"]]
    assert {"uploads/new ferry.md", "uploads/note.txt", "docs/saltmere_weather.md"} <= set(ids)
    for doc_id in ("uploads/new ferry.md", "uploads/note.txt"):
        assert httpx.delete(f"{server.url}/v1/documents/{doc_id}", timeout=60).status_code == 200
    assert httpx.delete(f"{server.url}/v1/documents/uploads/note.txt").status_code == 404
    hits = httpx.post(
        f"{server.url}/v1/retrieve", json={"query": "Storm Petrel catamaran", "k": 3}
    ).json()
    assert all(h["doc_id"] != "uploads/new ferry.md" for h in hits["data"])


def test_eight_concurrent_streams_finish_and_health_answers(live):
    server, *_ = live
    questions = [
        "How tall is the Greywater Point lighthouse?",
        "Who founded the weather service?",
        "How long is the ferry crossing?",
        "When was Greywater Point automated?",
    ] * 2

    async def run() -> tuple[list[str], list[float]]:
        client = openai.AsyncOpenAI(
            base_url=f"{server.url}/v1", api_key="x", max_retries=0, timeout=600
        )

        async def ask(q: str) -> str:
            stream = await client.chat.completions.create(
                model="m",
                max_tokens=4,
                stream=True,
                messages=[{"role": "user", "content": q}],
                extra_body={"kvrag": {"k": 1, "mode": "reuse"}},
            )
            finish = None
            async for chunk in stream:
                if chunk.choices and chunk.choices[0].finish_reason:
                    finish = chunk.choices[0].finish_reason
            return finish

        tasks = [asyncio.create_task(ask(q)) for q in questions]
        health: list[float] = []
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as h:
            while not all(t.done() for t in tasks):
                t0 = time.perf_counter()
                body = (await h.get("/healthz")).json()
                health.append(time.perf_counter() - t0)
                assert body["model_loaded"] and body["index_size"] > 20
                await asyncio.sleep(0.5)
        return await asyncio.gather(*tasks), health

    finishes, health = asyncio.run(run())
    assert all(f in ("stop", "length") for f in finishes), finishes
    assert len(health) >= 2 and sorted(health)[len(health) // 2] < 2.0


def test_health_and_metrics(live):
    server, rag, settings = live
    h = httpx.get(f"{server.url}/healthz").json()
    assert h["model_loaded"] and h["model"] == rag.model_name
    assert h["redis"] == ("up" if settings.redis_url else "disabled")
    text = httpx.get(f"{server.url}/metrics").text
    assert 'kvrag_requests_total{method="POST",route="/v1/chat/completions",status="200"}' in text
    assert 'kvrag_ttft_seconds_count{mode="reuse"} 8.0' in text
    assert 'kvrag_cache_hits_total{tier="memory"}' in text
    ratio = float(text.split("\nkvrag_recomputed_token_ratio ")[1].split()[0])
    assert 0 < ratio < 1


def test_follow_up_uses_the_earlier_turn(client):
    """The follow-up "When was it automated?" only makes sense with the first turn."""
    first = "How tall is the Greywater Point lighthouse?"
    r1 = client.chat.completions.create(
        model="m",
        max_tokens=16,
        messages=[{"role": "user", "content": first}],
        extra_body={"kvrag": FAST},
    )
    info1 = r1.model_extra["kvrag"]
    assert info1["conversation"]["turns_used"] == 0
    messages = [
        {"role": "system", "content": "Answer in a few words."},
        {"role": "user", "content": first},
        {"role": "assistant", "content": r1.choices[0].message.content},
        {"role": "user", "content": "When was it automated?"},
    ]
    r2 = client.chat.completions.create(
        model="m", max_tokens=16, messages=messages, extra_body={"kvrag": FAST}
    )
    info2 = r2.model_extra["kvrag"]
    assert info2["conversation"]["turns_used"] == 2
    assert info2["conversation"]["turns_dropped"] == 0
    assert "Greywater" in info2["conversation"]["retrieval_query"]
    assert "docs/saltmere_lighthouses.md" in {c["doc_id"] for c in info2["citations"]}
    # the history and instructions are in the prompt: it grew by more than the new question
    assert r2.usage.prompt_tokens > r1.usage.prompt_tokens + 20
    details = r2.usage.prompt_tokens_details
    assert 0 < details.cached_tokens < r2.usage.prompt_tokens


def test_sdk_completions_and_model_retrieve(client, live):
    _, rag, _ = live
    assert client.models.retrieve(rag.model_name).id == rag.model_name
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")
    r = client.completions.create(
        model="m",
        prompt="How long is the ferry crossing?",
        max_tokens=8,
        extra_body={"kvrag": FAST},
    )
    assert r.object == "text_completion" and r.choices[0].text.strip()
    stream = client.completions.create(
        model="m",
        prompt="How long is the ferry crossing?",
        max_tokens=8,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"kvrag": FAST},
    )
    events = list(stream)
    assert "".join(e.choices[0].text for e in events if e.choices).strip()
    assert events[-1].usage.completion_tokens > 0
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="m", n=2, messages=[{"role": "user", "content": "q"}])
    assert e.value.body["param"] == "n"


@pytest.mark.parametrize("is_chat_model", [True, False])
def test_llama_index_openai_like(live, is_chat_model):
    from llama_index.core.llms import ChatMessage
    from llama_index.llms.openai_like import OpenAILike

    server, *_ = live
    llm = OpenAILike(
        model="SmolLM2-135M-Instruct",
        api_base=f"{server.url}/v1",
        api_key="unused",
        is_chat_model=is_chat_model,
        max_tokens=8,
        temperature=0.0,
        timeout=300,
        max_retries=0,
        additional_kwargs={"extra_body": {"kvrag": FAST}},
    )
    question = "How tall is the Greywater Point lighthouse?"
    assert llm.complete(question).text.strip()
    messages = [ChatMessage(role="user", content=question)]
    assert llm.chat(messages).message.content.strip()
    pieces = [r.delta or "" for r in llm.stream_chat(messages)]
    assert len(pieces) >= 1 and "".join(pieces).strip()
