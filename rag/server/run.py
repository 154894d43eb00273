"""Running the API: `serve` (what `kvrag serve` calls) and a server on a thread (tests, benchmarks).

One process, one event loop, one model: uvicorn runs a single worker process on
purpose (each extra process would load its own model copy and compete for the
same cores). Scale out with more containers sharing one Redis KV tier instead.
"""

from __future__ import annotations

import logging
import socket
import threading
import time

import uvicorn
from fastapi import FastAPI

from rag.config import Settings

log = logging.getLogger(__name__)


def build_app(settings: Settings, warm: bool = False) -> FastAPI:
    from rag.server.app import create_app
    from rag.service import RAGService

    rag = RAGService(settings)
    if warm:  # precompute every chunk's K/V before the first request (a no-op when cached)
        log.info("warmed %d chunk caches", rag.warm())
    return create_app(settings, rag)


def serve(
    settings: Settings,
    host: str = "127.0.0.1",
    port: int = 8000,
    *,
    warm: bool = False,
    log_level: str = "info",
) -> None:
    """Load the model and serve the API until interrupted (Ctrl-C / SIGTERM)."""
    app = build_app(settings, warm)
    uvicorn.run(
        app, host=host, port=port, log_level=log_level, workers=1, timeout_graceful_shutdown=10
    )


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class ThreadServer:
    """uvicorn on a background thread (its own event loop), stopped on exit."""

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int | None = None):
        self.host, self.port = host, port or free_port(host)
        config = uvicorn.Config(
            app, host=self.host, port=self.port, log_level="warning", lifespan="on"
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="kvrag-uvicorn", daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def __enter__(self) -> ThreadServer:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the API server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
