"""Shared helpers of the fault suite (tests/test_faults_*.py): real servers, real filesystems.

A server is `kvrag serve` in a subprocess (or uvicorn on a thread for in-process checks); a
read-only or full data dir is a real mount in a private mount namespace (`unshare -m`, needs
root), so the server under test sees EROFS / ENOSPC from the kernel, not from a patched call.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from rag.config import Settings
from rag.server.run import free_port
from tests.conftest import MODELS_DIR, REPO, SAMPLES

QUESTION = "How tall is the Greywater Point lighthouse?"
FAST_CHAT = {"max_tokens": 4, "temperature": 0, "kvrag": {"k": 1, "mode": "blend"}}

# Bind the first argument read-only onto itself, then run the rest.
_RO = 'mount --bind "$0" "$0" && mount -o remount,ro,bind "$0" "$0" && exec "$@"'
# A small tmpfs over the first argument holding a copy of its files, filled to the last byte.
_FULL = (
    'cp -a "$0" "$0.copy" && mount -t tmpfs -o size=16m tmpfs "$0" && cp -a "$0.copy/." "$0" '
    '&& rm -rf "$0.copy" && (dd if=/dev/zero of="$0/.fill" bs=64k 2>/dev/null; true) '
    '&& exec "$@"'
)


def env(**extra: str) -> dict[str, str]:
    """The environment of a kvrag subprocess: this checkout, offline, the shared model cache."""
    out = dict(os.environ)
    out.update(
        PYTHONPATH=str(REPO),
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        KVRAG_MODEL_CACHE_DIR=str(MODELS_DIR),
        KVRAG_CHUNKER="token",
        KVRAG_THREADS="1",
    )
    out.update(extra)
    return out


def kvrag_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "rag.cli", *args]


def can_unshare() -> bool:
    """True where this process may mount in a private namespace (root, unshare present)."""
    if shutil.which("unshare") is None or os.geteuid() != 0:
        return False
    probe = ["unshare", "-m", "sh", "-c", "mount -t tmpfs -o size=1m tmpfs /mnt"]
    return subprocess.run(probe, capture_output=True).returncode == 0


needs_unshare = pytest.mark.skipif(
    not can_unshare(), reason="needs root and `unshare -m` for a real read-only / full mount"
)


def readonly(path: Path, cmd: list[str]) -> list[str]:
    """`cmd` run with `path` mounted read-only (only that process tree sees it)."""
    return ["unshare", "-m", "sh", "-c", _RO, str(path), *cmd]


def full(path: Path, cmd: list[str]) -> list[str]:
    """`cmd` run with `path` on a 16 MiB tmpfs holding a copy of it, filled up (ENOSPC)."""
    return ["unshare", "-m", "sh", "-c", _FULL, str(path), *cmd]


def ingested(root: Path, docs: dict[str, str] | None = None) -> Settings:
    """A data dir under root with the sample documents (or `docs`: name -> text) ingested with
    the token chunker (the fastest); doc ids are docs/<name>. Returns its settings."""
    from ingest.job import ingest

    folder = root / "docs"
    if docs is None:
        shutil.copytree(SAMPLES, folder)
    else:
        folder.mkdir(parents=True)
        for name, text in docs.items():
            (folder / name).write_text(text, encoding="utf-8")
    settings = settings_for(root / "data")
    cwd = os.getcwd()
    os.chdir(root)
    try:
        ingest(["docs"], settings, progress=False)
    finally:
        os.chdir(cwd)
    return settings


def settings_for(data_dir: Path, **overrides) -> Settings:
    base = {
        "data_dir": data_dir,
        "model_cache_dir": MODELS_DIR,
        "chunker": "token",
        "cache_memory_mb": 256,
        "cache_disk_mb": 256,
    }
    return Settings(**{**base, **overrides})


class LiveServer:
    """`kvrag serve` in a subprocess (optionally wrapped, e.g. by `readonly`); its log in a file."""

    def __init__(self, data_dir: Path, log_path: Path, wrap=None, **env_extra: str):  # noqa: ANN001
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = kvrag_cmd("--data-dir", str(data_dir), "serve", "--port", str(self.port))
        cmd += ["--log-level", "warning"]
        self.cmd = wrap(data_dir, cmd) if wrap else cmd
        self.log_path = log_path
        self.env = env(**env_extra)
        self.proc: subprocess.Popen | None = None

    def start(self, timeout_s: float = 120) -> LiveServer:
        log = open(self.log_path, "wb")  # noqa: SIM115 - the child writes to it until stop()
        self.proc = subprocess.Popen(self.cmd, env=self.env, stdout=log, stderr=log, cwd=REPO)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"kvrag serve exited: {self.log()[-3000:]}")
            try:
                if httpx.get(self.url + "/healthz", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"kvrag serve did not come up: {self.log()[-3000:]}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def __enter__(self) -> LiveServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@contextmanager
def thread_server(settings: Settings, rag=None) -> Iterator[tuple[str, object]]:  # noqa: ANN001
    """The app on uvicorn in this process (a free port); yields (url, the RAG service)."""
    from rag.server.app import create_app
    from rag.server.run import ThreadServer
    from rag.service import RAGService

    rag = rag or RAGService(settings)
    with ThreadServer(create_app(settings, rag)) as server:
        yield server.url, rag


def chat(url: str, question: str = QUESTION, **body) -> httpx.Response:  # noqa: ANN003
    payload = {"model": "m", "messages": [{"role": "user", "content": question}], **FAST_CHAT}
    payload.update(body)
    return httpx.post(f"{url}/v1/chat/completions", json=payload, timeout=300)


def sse_events(response: httpx.Response) -> list[dict | str]:
    """The data payloads of a server-sent event stream ("[DONE]" stays a string)."""
    import json

    out: list[dict | str] = []
    for line in response.text.splitlines():
        if line.startswith("data: "):
            data = line[len("data: ") :]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


def upload(url: str, timeout_s: float = 300, **request) -> dict:  # noqa: ANN003
    """POST /v1/documents (httpx keyword arguments: json=..., files=...) and poll its job
    until it is done or failed; returns the finished job."""
    r = httpx.post(f"{url}/v1/documents", timeout=60, **request)
    assert r.status_code == 202, r.text
    return wait_job(url, r.headers["Location"], timeout_s)


def wait_job(url: str, location: str, timeout_s: float = 300) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        job = httpx.get(url + location, timeout=30).json()
        if job["status"] in ("done", "failed") or time.monotonic() > deadline:
            return job
        time.sleep(0.2)
