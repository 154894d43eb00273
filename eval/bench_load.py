"""`kvrag bench load`: requests/s, completion tokens/s, TTFT and inter-token latency through
the HTTP API under load, per prefill mode (full, blend), scheduler (fifo, batch) and
concurrency.

Everything compared runs in the same run, interleaved in rounds (A B B A ...), so a noisy
shared CPU weighs on all alike. Each round sends `round_size` streaming requests of one
(scheduler, mode) from `concurrency` clients; requests/s and completion tokens/s are over the
wall time of its rounds; TTFT (send to first content token, queueing included: that is what
load does to users) and ITL (the gaps between content chunks of a stream) are measured by the
client.

Without --url it starts its own server per scheduler (`kvrag serve --warm`, KVRAG_SCHEDULER
set) on free loopback ports over one data dir where the documents (default samples/) are
ingested, so every chunk's K/V is cached before the clock starts. JSON: `{"max_tokens",
"runs": [{"scheduler", "mode", "concurrency", "requests", "rps", "completion_tok_s",
"ttft_ms_p50", "ttft_ms_p95", "itl_ms_p50", "itl_ms_p95", "failed"}, ...]}`, and with one
scheduler and one concurrency also the per-mode summary (`modes`, `ratio`) as before; a PNG
of completion tokens/s and TTFT p95 against concurrency beside it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
from tqdm import tqdm

from eval.samples import SAMPLE_QUESTIONS, SAMPLES
from rag.config import Settings
from rag.server.run import free_port

MODES = ("full", "blend")


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile (q in 0..100) of a non-empty list."""
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


@dataclass(frozen=True)
class Shape:
    """What every request of a run asks for, whatever its question."""

    k: int = 4
    max_tokens: int = 8
    ratio: float | None = None
    ignore_eos: bool = False  # every answer max_tokens long: a fixed decode share

    def body(self, question: str, mode: str) -> dict:
        opts = {"k": self.k, "mode": mode}
        if self.ratio is not None:
            opts["ratio"] = self.ratio
        return {
            "model": "kvrag",
            "messages": [{"role": "user", "content": question}],
            "max_tokens": self.max_tokens,
            "temperature": 0,
            "stream": True,
            "stream_options": {"include_usage": True},  # completion tokens in a last chunk
            "ignore_eos": self.ignore_eos,
            "kvrag": opts,
        }


async def _one(client: httpx.AsyncClient, question: str, mode: str, shape: Shape) -> dict:
    """One streamed chat completion; the client-side TTFT and the server's kvrag report."""
    body = shape.body(question, mode)
    t0 = time.perf_counter()
    ttft, info, usage, last = None, None, None, None
    gaps: list[float] = []
    async with client.stream("POST", "/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            return {"error": f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"}
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                return {"error": chunk["error"]["message"]}
            if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                now = time.perf_counter()
                if ttft is None:
                    ttft = now - t0
                else:
                    gaps.append(now - last)
                last = now
            info = chunk.get("kvrag", info)
            usage = chunk.get("usage", usage)
    total = time.perf_counter() - t0
    return {
        "ttft_s": ttft if ttft is not None else total,
        "total_s": total,
        "kvrag": info,
        "itl_s": gaps,
        "completion_tokens": (usage or {}).get("completion_tokens", 0),
    }


async def _round(
    client: httpx.AsyncClient,
    jobs: list[str],
    mode: str,
    concurrency: int,
    shape: Shape,
) -> tuple[float, list[dict]]:
    queue = list(jobs)
    results: list[dict] = []

    async def worker() -> None:
        while queue:
            results.append(await _one(client, queue.pop(0), mode, shape))

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
        itl = [1000 * g for r in ok for g in r.get("itl_s", [])] or [0.0]
        tokens = sum(r.get("completion_tokens", 0) for r in ok)
        out.update(
            {
                "completion_tokens": tokens,
                "completion_tok_s": round(tokens / seconds, 2) if seconds else 0.0,
                "ttft_ms_p50": round(percentile(ttft, 50), 1),
                "ttft_ms_p95": round(percentile(ttft, 95), 1),
                "itl_ms_p50": round(percentile(itl, 50), 1),
                "itl_ms_p95": round(percentile(itl, 95), 1),
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
    urls: dict[str, str],
    concurrency: int,
    requests: int,
    shape: Shape,
    questions: list[str],
    api_key: str | None,
    warmup: bool,
    round_size: int,
    modes: tuple[str, ...] = MODES,
) -> dict[tuple[str, str], dict]:
    """Every (scheduler, mode) over the same requests at one concurrency, in ABBA rounds."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=concurrency + 2)
    cases = [(sched, mode) for sched in urls for mode in modes]
    clients = {
        sched: httpx.AsyncClient(base_url=url, headers=headers, timeout=3600, limits=limits)
        for sched, url in urls.items()
    }
    try:
        if warmup:  # first calls pay one-time costs (allocations, lazy init, cold caches)
            for sched, mode in cases:
                await _one(clients[sched], questions[0], mode, shape)
        seconds = dict.fromkeys(cases, 0.0)
        results: dict[tuple[str, str], list[dict]] = {c: [] for c in cases}
        sent = rnd = 0
        while sent < requests:
            n = min(round_size, requests - sent)
            jobs = [questions[(sent + i) % len(questions)] for i in range(n)]
            order = cases if rnd % 2 == 0 else cases[::-1]  # ABBA: none always goes first
            for sched, mode in order:
                client = clients[sched]
                dt, res = await _round(client, jobs, mode, concurrency, shape)
                seconds[sched, mode] += dt
                results[sched, mode] += res
            sent += n
            rnd += 1
    finally:
        for client in clients.values():
            await client.aclose()
    return {c: _summary(seconds[c], results[c]) for c in cases}


RUN_FIELDS = (
    "requests",
    "rps",
    "completion_tok_s",
    "ttft_ms_p50",
    "ttft_ms_p95",
    "itl_ms_p50",
    "itl_ms_p95",
)


def _sweep(urls: dict[str, str], concurrencies: list[int], requests: int, **kw) -> dict:
    runs, by_case = [], {}
    round_size = kw.pop("round_size", None)
    for c in tqdm(concurrencies, desc="concurrency", unit="level"):
        summaries = asyncio.run(_bench(urls, c, requests, round_size=round_size or 2 * c, **kw))
        for (sched, mode), m in summaries.items():
            run = {"scheduler": sched, "mode": mode, "concurrency": c}
            run.update({f: m.get(f, 0.0) for f in RUN_FIELDS})
            run["failed"] = m["errors"]
            if "first_error" in m:
                run["first_error"] = m["first_error"]
            runs.append(run)
            by_case[sched, mode, c] = m
    shape = kw["shape"]
    out: dict = {
        "max_tokens": shape.max_tokens,
        "ignore_eos": shape.ignore_eos,
        "k": shape.k,
        "requests": requests,
        "runs": runs,
    }
    if len(urls) == 1 and len(concurrencies) == 1:  # the single-scheduler report, as before
        sched, c = next(iter(urls)), concurrencies[0]
        modes = {m: by_case[sched, m, c] for m in kw["modes"]}
        out.update({"concurrency": c, "modes": modes})
        if "full" in modes and "blend" in modes:
            full, blend = modes["full"], modes["blend"]
            out["ratio"] = round(blend["rps"] / full["rps"], 3) if full["rps"] else None
            out["ttft_p95_ratio"] = (
                round(full["ttft_ms_p95"] / blend["ttft_ms_p95"], 3)
                if full.get("ttft_ms_p95") and blend.get("ttft_ms_p95")
                else None
            )
    return out


@contextlib.contextmanager
def own_server(
    settings: Settings,
    docs: list[Path],
    startup_timeout_s: float = 1800,
    env: dict[str, str] | None = None,
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
        **(env or {}),
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
    concurrency: int | list[int] = 4,
    requests: int = 24,
    k: int = 4,
    max_tokens: int = 8,
    ratio: float | None = None,
    ignore_eos: bool = False,
    questions: list[str] | None = None,
    api_key: str | None = None,
    warmup: bool = True,
    round_size: int | None = None,
    schedulers: list[str] | None = None,
    modes: tuple[str, ...] = MODES,
) -> dict:
    """Run the benchmark against `url` (its own scheduler, whatever it is), or against a
    server of its own per scheduler when url is None.

    `requests` is per (scheduler, mode, concurrency). Returns the result dict (module doc).
    """
    questions = questions or list(SAMPLE_QUESTIONS)  # any question works: the context size counts
    levels = [concurrency] if isinstance(concurrency, int) else list(concurrency)
    kw = dict(
        shape=Shape(k, max_tokens, ratio, ignore_eos),
        questions=questions,
        api_key=api_key,
        warmup=warmup,
        round_size=round_size,
        modes=tuple(modes),
    )
    if url:
        result = _sweep({"server": url.rstrip("/")}, levels, requests, **kw)
        result["server"] = url
        return result
    schedulers = schedulers or ["batch"]
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
        urls = {
            sched: stack.enter_context(
                own_server(settings, docs or [SAMPLES], env={"KVRAG_SCHEDULER": sched})
            )
            for sched in schedulers
        }
        result = _sweep(urls, levels, requests, **kw)
    result["server"] = "own"
    return result


def plot(result: dict, path: Path) -> None:
    """Completion tokens/s and TTFT p95 against concurrency, a line per (scheduler, mode)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    cases = sorted({(r["scheduler"], r["mode"]) for r in result["runs"]})
    for sched, mode in cases:
        runs = sorted(
            (r for r in result["runs"] if (r["scheduler"], r["mode"]) == (sched, mode)),
            key=lambda r: r["concurrency"],
        )
        xs = [r["concurrency"] for r in runs]
        label = f"{sched} ({mode})"
        ax1.plot(xs, [r["completion_tok_s"] for r in runs], marker="o", label=label)
        ax2.plot(xs, [r["ttft_ms_p95"] / 1000 for r in runs], marker="o", label=label)
    ax1.set(xlabel="concurrency", ylabel="completion tokens/s", title="throughput")
    ax2.set(xlabel="concurrency", ylabel="TTFT p95 (s)", title="time to first token, p95")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend()
    fixed = ", every answer that long (ignore_eos)" if result.get("ignore_eos") else ""
    fig.suptitle(f"kvrag bench load: k={result['k']}, max_tokens {result['max_tokens']}{fixed}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _names(choices: tuple[str, ...]):
    def parse(text: str) -> list[str]:
        names = [x.strip() for x in text.split(",") if x.strip()]
        if not names or any(n not in choices for n in names):
            raise argparse.ArgumentTypeError(f"a comma-separated list of {', '.join(choices)}")
        return names

    return parse


def add_bench_load_args(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The flags of `kvrag bench load [--url URL] [--scheduler fifo,batch] [--concurrency 1,4,8]
    [--requests 24] [--max-tokens 128] [--json OUT]`."""
    p.add_argument(
        "--url", default=None, help="a running server (default: start one on a free loopback port)"
    )
    p.add_argument(
        "--scheduler",
        type=_names(("fifo", "batch")),
        default=["batch"],
        help="own servers' schedulers, compared in one run (e.g. fifo,batch; not with --url)",
    )
    p.add_argument(
        "--concurrency", type=_ints, default=[4], help="clients sending at once (e.g. 1,4,8)"
    )
    p.add_argument(
        "--modes", type=_names(MODES), default=list(MODES), help="prefill modes (e.g. blend)"
    )
    p.add_argument("--requests", type=int, default=24, help="requests per mode and level")
    p.add_argument("--k", type=int, default=4, help="chunks per prompt")
    p.add_argument("--max-tokens", type=int, default=8, help="completion tokens per request")
    p.add_argument(
        "--ratio", type=float, default=None, help="blend recompute ratio (default: the server's)"
    )
    p.add_argument(
        "--ignore-eos",
        action="store_true",
        help="every answer exactly --max-tokens long, past the end token (vLLM's ignore_eos)",
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
        schedulers=args.scheduler,
        modes=tuple(args.modes),
        requests=args.requests,
        k=args.k,
        max_tokens=args.max_tokens,
        ratio=args.ratio,
        ignore_eos=args.ignore_eos,
        api_key=args.api_key,
        warmup=not args.no_warmup,
    )
    text = json.dumps(result, indent=2)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")
        plot(result, args.json.with_suffix(".png"))
    print(text)
    return 1 if any(r["failed"] for r in result["runs"]) else 0
