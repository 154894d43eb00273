"""Running the API: `serve` (what `kvrag serve` calls) and a server on a thread (tests, benchmarks).

One process, one event loop, one model: uvicorn runs a single worker process on
purpose (each extra process would load its own model copy and compete for the
same cores). Scale out with more containers sharing one Redis KV tier instead.
"""

from __future__ import annotations

import argparse
import logging
import socket
import threading
import time
from pathlib import Path

import uvicorn
from fastapi import FastAPI

from rag.config import Settings

log = logging.getLogger(__name__)


def build_app(settings: Settings, warm: bool = False) -> FastAPI:
    from rag.api import create_app
    from rag.pipeline import RAG

    rag = RAG(settings)
    if warm:  # precompute every chunk's K/V before the first request (a no-op when cached)
        log.info("warmed %d chunk caches", rag.warm())
    return create_app(settings, rag)


def serve(settings: Settings, host: str = "127.0.0.1", port: int = 8000, *, warm: bool = False,
          log_level: str = "info") -> None:
    """Load the model and serve the API until interrupted (Ctrl-C / SIGTERM)."""
    app = build_app(settings, warm)
    uvicorn.run(app, host=host, port=port, log_level=log_level, workers=1,
                timeout_graceful_shutdown=10)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class ThreadServer:
    """uvicorn on a background thread (its own event loop), stopped on exit."""

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int | None = None):
        self.host, self.port = host, port or free_port(host)
        config = uvicorn.Config(app, host=self.host, port=self.port, log_level="warning", lifespan="on")
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


def add_serve_args(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The flags of `kvrag serve [--host 127.0.0.1] [--port 8000] [--warm]`."""
    p.add_argument("--host", default="127.0.0.1", help="0.0.0.0 to listen on every interface")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--warm", action="store_true", help="precompute all chunk caches before serving")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    return p


def cmd_serve(args: argparse.Namespace, settings: Settings | None = None) -> int:
    overrides = {"data_dir": Path(args.data_dir)} if getattr(args, "data_dir", None) else {}
    serve(settings or Settings(**overrides), args.host, args.port, warm=args.warm, log_level=args.log_level)
    return 0


if __name__ == "__main__":
    parser = add_serve_args(argparse.ArgumentParser(prog="python -m rag.server", description=__doc__))
    parser.add_argument("--data-dir", default=None)
    cli_args = parser.parse_args()
    logging.basicConfig(level=cli_args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    raise SystemExit(cmd_serve(cli_args))
