"""`kvrag bench load`: requests/s and TTFT of full prefill vs blend through the
HTTP API, under load.

Both modes run in the same server and the same run, interleaved in rounds
(full, blend, blend, full, ...), so a noisy shared CPU weighs on both alike.
Each round sends `round_size` streaming requests of one mode from
`concurrency` clients; a mode's requests/s is its completed requests over the
wall time of its rounds, and TTFT is measured by the client (send to first
content token, queueing included: that is what load does to users).

Without --url it starts its own server (`kvrag serve --warm`) on a
free loopback port over a data dir where the documents (default samples/) are
ingested, so every chunk's K/V is cached before the clock starts.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

from eval.samples import SAMPLE_QUESTIONS, SAMPLES
from rag.config import Settings

MODES = ("full", "blend")


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile (q in 0..100) of a non-empty list."""
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


async def _one(
    client: httpx.AsyncClient,
    question: str,
    mode: str,
    k: int,
    max_tokens: int,
    ratio: float | None,
) -> dict:
    """One streamed chat completion; the client-side TTFT and the server's kvrag report."""
    opts = {"k": k, "mode": mode, **({"ratio": ratio} if ratio is not None else {})}
    body = {
        "model": "kvrag",
        "messages": [{"role": "user", "content": question}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "kvrag": opts,
    }
    t0 = time.perf_counter()
    ttft, info = None, None
    async with client.stream("POST", "/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            return {"error": f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"}
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                return {"error": chunk["error"]["message"]}
            if ttft is None and chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                ttft = time.perf_counter() - t0
            info = chunk.get("kvrag", info)
    total = time.perf_counter() - t0
    return {"ttft_s": ttft if ttft is not None else total, "total_s": total, "kvrag": info}


async def _round(
    client: httpx.AsyncClient,
    jobs: list[str],
    mode: str,
    concurrency: int,
    k: int,
    max_tokens: int,
    ratio: float | None,
) -> tuple[float, list[dict]]:
    queue = list(jobs)
    results: list[dict] = []

    async def worker() -> None:
        while queue:
            results.append(await _one(client, queue.pop(0), mode, k, max_tokens, ratio))

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return time.perf_counter() - t0, results


def _summary(seconds: float, results: list[dict]) -> dict:
    ok = [r for r in results if "error" not in r]
    out: dict = {
        "requests": len(ok),
        "errors": len(results) - len(ok),
        "seconds": round(seconds, 2),
        "rps": round(len(ok) / seconds, 4) if seconds else 0.0,
    }
    if ok:
        ttft = [1000 * r["ttft_s"] for r in ok]
        out.update(
            {
                "ttft_ms_p50": round(percentile(ttft, 50), 1),
                "ttft_ms_p95": round(percentile(ttft, 95), 1),
                "latency_ms_p50": round(percentile([1000 * r["total_s"] for r in ok], 50), 1),
            }
        )
        infos = [r["kvrag"] for r in ok if r.get("kvrag")]
        if infos:  # what the server measured, queueing excluded
            for key in ("ttft", "prefill"):
                out[f"server_{key}_ms_mean"] = round(
                    sum(i["timings_ms"][key] for i in infos) / len(infos), 1
                )
    if len(ok) < len(results):
        out["first_error"] = next(r["error"] for r in results if "error" in r)
    return out


async def _bench(
    url: str,
    concurrency: int,
    requests: int,
    k: int,
    max_tokens: int,
    ratio: float | None,
    questions: list[str],
    api_key: str | None,
    warmup: bool,
    round_size: int,
) -> dict:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=concurrency + 2)
    async with httpx.AsyncClient(
        base_url=url, headers=headers, timeout=3600, limits=limits
    ) as client:
        if warmup:  # first calls pay one-time costs (allocations, lazy init, cold caches)
            for mode in MODES:
                await _one(client, questions[0], mode, k, max_tokens, ratio)
        seconds = dict.fromkeys(MODES, 0.0)
        results: dict[str, list[dict]] = {m: [] for m in MODES}
        sent = 0
        rnd = 0
        while sent < requests:
            n = min(round_size, requests - sent)
            jobs = [questions[(sent + i) % len(questions)] for i in range(n)]
            order = MODES if rnd % 2 == 0 else MODES[::-1]  # ABBA: neither mode always goes first
            for mode in order:
                dt, res = await _round(client, jobs, mode, concurrency, k, max_tokens, ratio)
                seconds[mode] += dt
                results[mode] += res
            sent += n
            rnd += 1
    modes = {m: _summary(seconds[m], results[m]) for m in MODES}
    full, blend = modes["full"], modes["blend"]
    return {
        "concurrency": concurrency,
        "requests": requests,
        "k": k,
        "max_tokens": max_tokens,
        "round_size": round_size,
        "modes": modes,
        "ratio": round(blend["rps"] / full["rps"], 3) if full["rps"] else None,
        "ttft_p95_ratio": (
            round(full["ttft_ms_p95"] / blend["ttft_ms_p95"], 3)
            if full.get("ttft_ms_p95") and blend.get("ttft_ms_p95")
            else None
        ),
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def own_server(
    settings: Settings, docs: list[Path], startup_timeout_s: float = 1800
) -> Iterator[str]:
    """Ingest `docs` into settings.data_dir if its index is empty, then serve it on a free port."""
    from ingest.job import ingest

    if not (settings.index_dir / "CURRENT").exists():
        ingest(docs, settings, progress=False)
    port = free_port()
    env = {
        **os.environ,
        "KVRAG_DATA_DIR": str(settings.data_dir.resolve()),
        "KVRAG_MODEL_CACHE_DIR": str(settings.models_dir.resolve()),
        "KVRAG_API_KEYS": "",
    }
    cmd = [
        sys.executable,
        "-m",
        "rag.cli",
        "serve",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--warm",
        "--log-level",
        "warning",
    ]
    proc = subprocess.Popen(cmd, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + startup_timeout_s
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"the benchmark server exited with {proc.returncode}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise TimeoutError("the benchmark server did not become healthy")
            time.sleep(1)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


def run_load_bench(
    url: str | None = None,
    *,
    settings: Settings | None = None,
    docs: list[Path] | None = None,
    concurrency: int = 4,
    requests: int = 24,
    k: int = 4,
    max_tokens: int = 8,
    ratio: float | None = None,
    questions: list[str] | None = None,
    api_key: str | None = None,
    warmup: bool = True,
    round_size: int | None = None,
) -> dict:
    """Run the benchmark against `url`, or against a server of its own when url is None.

    `requests` is per mode. Returns the result dict (see the module doc).
    """
    questions = questions or list(SAMPLE_QUESTIONS)  # any question works: the context size counts
    round_size = round_size or 2 * concurrency
    args = (concurrency, requests, k, max_tokens, ratio, questions, api_key, warmup, round_size)
    if url:
        result = asyncio.run(_bench(url.rstrip("/"), *args))
        result["server"] = url
        return result
    with contextlib.ExitStack() as stack:
        if settings is None:
            tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="kvrag-bench-"))
            base = Settings()  # keep its converted-model cache: only the index and KV are fresh
            settings = base.model_copy(
                update={
                    "data_dir": Path(tmp) / "data",
                    "model_cache_dir": base.models_dir.resolve(),
                }
            )
        served = stack.enter_context(own_server(settings, docs or [SAMPLES]))
        result = asyncio.run(_bench(served, *args))
    result["server"] = "own"
    return result


def add_bench_load_args(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The flags of
    `kvrag bench load [--url URL] [--concurrency 4] [--requests 24] [--json OUT]`."""
    p.add_argument(
        "--url", default=None, help="a running server (default: start one on a free loopback port)"
    )
    p.add_argument("--concurrency", type=int, default=4, help="clients sending at once")
    p.add_argument("--requests", type=int, default=24, help="requests per mode")
    p.add_argument("--k", type=int, default=4, help="chunks per prompt")
    p.add_argument("--max-tokens", type=int, default=8)
    p.add_argument(
        "--ratio", type=float, default=None, help="blend recompute ratio (default: the server's)"
    )
    p.add_argument(
        "--docs",
        type=Path,
        nargs="+",
        default=None,
        help="documents for the own server's data dir when its index is empty (default samples/)",
    )
    p.add_argument(
        "--fresh",
        action="store_true",
        help="own server over a temporary data dir instead of KVRAG_DATA_DIR / --data-dir",
    )
    p.add_argument(
        "--api-key", default=os.environ.get("KVRAG_API_KEY"), help="bearer key for --url"
    )
    p.add_argument("--no-warmup", action="store_true")
    p.add_argument(
        "--json", type=Path, default=None, metavar="OUT.json", help="write the result here"
    )
    return p


def cmd_bench_load(args: argparse.Namespace, settings: Settings | None = None) -> int:
    if not args.url and not args.fresh and settings is None:
        settings = Settings(
            **({"data_dir": args.data_dir} if getattr(args, "data_dir", None) else {})
        )
    result = run_load_bench(
        args.url,
        settings=None if args.fresh else settings,
        docs=args.docs,
        concurrency=args.concurrency,
        requests=args.requests,
        k=args.k,
        max_tokens=args.max_tokens,
        ratio=args.ratio,
        api_key=args.api_key,
        warmup=not args.no_warmup,
    )
    text = json.dumps(result, indent=2)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")
    print(text)
    full, blend = result["modes"]["full"], result["modes"]["blend"]
    return 1 if full["errors"] or blend["errors"] else 0
