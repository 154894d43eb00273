"""`kvrag bench upload`: a large upload against a live `kvrag serve`, and the API meanwhile.

Ingests the samples into a temporary data dir, starts `kvrag serve` on it, and POSTs one
document of `--mb` MiB (the sample paragraphs, numbered, repeated). Measures how long the
client waits for its answer (202 + job), the server's resident memory (its whole process tree,
sampled every 0.25 s) from idle to the end of the job, and, while the job runs, the latency of
the other document calls: list, poll the job, a second upload and a delete (both must get
409). Stops waiting for the job after `--max-seconds` (the job's progress says how far it got).
Writes JSON and a PNG (memory and progress over time, call latencies) next to `--out`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psutil

from eval.samples import SAMPLES
from rag.config import Settings
from rag.server.run import free_port


def document(mb: float) -> str:
    """`mb` MiB of real prose: the sample paragraphs, numbered so no two are the same."""
    paragraphs = [
        p.strip()
        for f in sorted(SAMPLES.glob("*.md"))
        for p in f.read_text(encoding="utf-8").split("\n\n")
        if len(p.strip()) > 80
    ]
    out, size, i = [], 0, 0
    while size < mb * 2**20:
        p = f"{i}. {paragraphs[i % len(paragraphs)]}"
        out.append(p)
        size += len(p.encode()) + 2
        i += 1
    return "\n\n".join(out)


def rss_mb(proc: psutil.Process) -> float:
    try:
        procs = [proc, *proc.children(recursive=True)]
        return sum(p.memory_info().rss for p in procs) / 2**20
    except psutil.Error:
        return 0.0


def timed(fn) -> tuple[float, int]:  # noqa: ANN001
    t0 = time.perf_counter()
    status = fn().status_code
    return 1000 * (time.perf_counter() - t0), status


def add_bench_upload_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--mb", type=float, default=10.0, help="upload size in MiB")
    p.add_argument("--chunker", default="token", help="the server's chunker (KVRAG_CHUNKER)")
    p.add_argument("--max-seconds", type=float, default=300.0, help="stop waiting for the job")
    p.add_argument("--out", type=Path, default=Path("eval/RESULTS_faults.json"))


def cmd_bench_upload(args: argparse.Namespace, settings: Settings) -> int:
    env = dict(os.environ, KVRAG_CHUNKER=args.chunker)
    text = document(args.mb)
    with tempfile.TemporaryDirectory(prefix="kvrag-bench-upload-") as tmp:
        data = Path(tmp) / "data"
        env["KVRAG_DATA_DIR"] = str(data)
        cli = [sys.executable, "-m", "rag.cli"]
        subprocess.run([*cli, "ingest", str(SAMPLES), "--no-progress"], env=env, check=True)
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        log = open(Path(tmp) / "serve.log", "wb")  # noqa: SIM115
        server = subprocess.Popen(
            [*cli, "serve", "--port", str(port), "--log-level", "warning"],
            env=env,
            stdout=log,
            stderr=log,
        )
        try:
            result = _run(url, server, text, args)
        finally:
            server.terminate()
            server.wait(timeout=60)
    result.update(mb=args.mb, chunker=args.chunker, bytes=len(text.encode()))
    result["load_average_1m_at_end"] = round(os.getloadavg()[0], 1)  # a shared machine says so
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    _plot(result, args.out.with_suffix(".png"))
    summary = {k: v for k, v in result.items() if k not in ("samples", "calls")}
    print(json.dumps(summary, indent=1))
    return 0


def _run(url: str, server: subprocess.Popen, text: str, args: argparse.Namespace) -> dict:
    proc = psutil.Process(server.pid)
    deadline = time.monotonic() + 300
    while True:
        try:
            if httpx.get(url + "/healthz", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if server.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError("kvrag serve did not start")
        time.sleep(0.5)
    # Idle: after one list call (the embedder of the ingestion thread loads on the first job).
    httpx.get(url + "/v1/documents", timeout=30)
    idle = rss_mb(proc)
    load_at_start = os.getloadavg()[0]
    t0 = time.perf_counter()
    r = httpx.post(
        url + "/v1/documents", json={"text": text, "name": "large.md"}, timeout=args.max_seconds
    )
    answer_s = time.perf_counter() - t0
    if r.status_code != 202:
        raise RuntimeError(f"upload answered {r.status_code}: {r.text[:300]}")
    location = url + r.headers["Location"]
    samples, calls = [], {"list": [], "poll": [], "upload_409": [], "delete_409": []}
    statuses: dict[str, list[int]] = {k: [] for k in calls}
    job = r.json()
    next_calls = 0.0
    while job["status"] in ("queued", "running") and time.perf_counter() - t0 < args.max_seconds:
        now = time.perf_counter() - t0
        samples.append({"t": round(now, 2), "rss_mb": round(rss_mb(proc), 1), "p": job["progress"]})
        if now >= next_calls:
            for name, fn in (
                ("list", lambda: httpx.get(url + "/v1/documents", timeout=30)),
                (
                    "upload_409",
                    lambda: httpx.post(
                        url + "/v1/documents", json={"text": "x", "name": "x.md"}, timeout=30
                    ),
                ),
                (
                    "delete_409",
                    lambda: httpx.delete(url + "/v1/documents/uploads/none.md", timeout=30),
                ),
            ):
                ms, status = timed(fn)
                calls[name].append(round(ms, 1))
                statuses[name].append(status)
            next_calls = now + 1.0
        ms, _ = timed(lambda: httpx.get(location, timeout=30))
        calls["poll"].append(round(ms, 1))
        job = httpx.get(location, timeout=30).json()
        time.sleep(0.25)
    peak = max([s["rss_mb"] for s in samples] + [rss_mb(proc)])
    return {
        "answer_s": round(answer_s, 3),
        "status_at_answer": r.json()["status"],
        "job": job,
        "load_average_1m_at_start": round(load_at_start, 1),
        "idle_rss_mb": round(idle, 1),
        "peak_rss_mb": round(peak, 1),
        "calls_max_ms": {k: max(v) if v else None for k, v in calls.items()},
        "calls_p50_ms": {k: statistics.median(v) if v else None for k, v in calls.items()},
        "calls_statuses": {k: sorted(set(v)) for k, v in statuses.items()},
        "samples": samples,
        "calls": calls,
    }


def _plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    t = [s["t"] for s in result["samples"]]
    a.plot(t, [s["rss_mb"] for s in result["samples"]], label="server RSS (MiB)")
    a.axhline(1536, color="red", linestyle="--", label="target 1.5 GiB")
    a.set_xlabel("seconds since the upload")
    a.set_ylabel("MiB")
    a2 = a.twinx()
    a2.plot(t, [100 * s["p"] for s in result["samples"]], color="green", label="job progress %")
    a2.set_ylabel("% of the document ingested")
    a.legend(loc="upper left")
    a.set_title(f"{result['mb']:g} MiB upload ({result['chunker']} chunker)")
    names = list(result["calls"])
    b.boxplot([result["calls"][n] or [0] for n in names], tick_labels=names)
    b.axhline(1000, color="red", linestyle="--")
    b.set_yscale("log")
    b.set_ylabel("ms")
    b.set_title("document calls during the job")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
