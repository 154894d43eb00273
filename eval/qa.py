"""`kvrag eval qa`: answer quality and fidelity of full / blend / reuse on a SQuAD-format dataset.

The dataset's contexts are ingested into a fresh data dir of the evaluation's own (a temporary
directory: never the user's index or chunk caches), and every question is asked in every mode
through RAGService.answer, the code the API answers with. The same retrieved chunks go to every
mode (retrieval is deterministic; each row records that the chunk ids matched), and `full`
reuses the fixed header's K/V (exact prefix caching), as every mode does, so the differences
come from the mode alone.

TTFT is the service's own (request start, retrieval included, to the first token chosen) with
the question's chunk K/V already in the store: before a question's timed answers, its chunks
are stored (Engine.ensure_stored), so blend and reuse load them from the memory tier. One
untimed question in every mode first warms the model and the buffers; the modes then run in
an order that rotates per question, so machine load hits them alike.

Fidelity is judged against the full-prefill answer of the same question: token F1 between the
two greedy answers, whether they are identical, and the next-token distributions (KL(full ||
mode), argmax agreement) over the question positions and the first answer tokens, each mode
teacher-forced on full's answer after its own prefill. Blend runs repair their stale K/V while
decoding (`--repair` slots before each step, rag.engine.repair); the teacher-forced answer
tokens go through the same repair schedule, so they reflect what is served. Reuse is the
unrepaired baseline.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from eval.qa_dataset import DatasetError, QAItem, load_squad
from eval.qa_metrics import (
    best_em,
    best_f1,
    first_difference,
    hit_at_k,
    hit_rank,
    identical,
    kl_top1,
    mrr,
    token_f1,
)
from rag.config import Settings

DEFAULT_RATIO = 0.15
KL_ANSWER_TOKENS = 8  # answer tokens (after the question's) the distributions are compared over


@dataclass(frozen=True)
class Run:
    """One way of answering: a mode, and for blend its recompute ratio."""

    mode: str
    ratio: float = 0.0
    repair: int = 0  # stale slots recomputed before each decode step

    @property
    def label(self) -> str:
        return f"blend@{self.ratio:g}" if self.mode == "blend" else self.mode


def plan_runs(modes: list[str], ratios: list[float], repair: int = 0) -> list[Run]:
    """full first (the reference), then blend at each ratio (repaired while decoding), then
    reuse."""
    bad = sorted(set(modes) - {"full", "blend", "reuse"})
    if bad:
        raise ValueError(f"unknown modes {bad}; choose from full, blend, reuse")
    runs = [Run("full")]  # always: fidelity is measured against it
    if "blend" in modes:
        runs += [Run("blend", r, repair) for r in ratios]
    if "reuse" in modes:
        runs.append(Run("reuse"))
    return runs


def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo), else the architecture."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine()


def _percentile(xs: list[float], q: float) -> float | None:
    return round(float(np.percentile(xs, q)), 1) if xs else None


def _mean(xs: list[float]) -> float | None:
    return round(statistics.fmean(xs), 4) if xs else None


@torch.inference_mode()
def probe_logits(engine, prompt, run: Run, follow: list[int], gradual: int = 1) -> torch.Tensor:
    """Next-token logits [n_footer + len(follow), V] of `run`'s prefill of `prompt`, then
    teacher-forced on `follow` (the reference answer's first tokens): what the mode predicts at
    each question position and for the answer tokens after them. With repair, one token a step
    after each repair slice, as decoding serves them."""
    from rag.engine.repair import blend_repair
    from rag.engine.request import Request

    request = Request(mode=run.mode, ratio=run.ratio, gradual=gradual)
    kvs = engine.chunk_kvs(prompt, request) if run.mode != "full" else None
    pre = engine.prefill(
        prompt, run.mode, run.ratio, kvs, extra_slots=len(follow), gradual=request.gradual
    )
    parts = [pre.logits.float()]
    job = blend_repair(engine.model, pre.cache, prompt) if run.repair else None
    if follow and job is None:
        ids = torch.tensor([follow], device=engine.model.device)
        parts.append(engine.model(ids, pre.cache, len(prompt), logits_for=slice(None))[0].float())
    for i, token in enumerate(follow if job is not None else []):
        if job is not None and job.step(run.repair):
            job = None
        ids = torch.tensor([[token]], device=engine.model.device)
        parts.append(engine.model(ids, pre.cache, len(prompt) + i)[0].float())
        if job is not None:
            job.append(token)
    engine.release(pre.cache)
    return torch.cat(parts)


def _ask(service, item: QAItem, run: Run, k: int, params) -> dict:
    ans = service.answer(
        item.question, k=k, mode=run.mode, ratio=run.ratio, repair=run.repair, params=params
    )
    r = ans.request
    n = len(r.output_ids)
    return {
        "answer": ans.text,
        "ids": list(r.output_ids),
        "chunk_ids": [h.chunk.chunk_id for h in ans.hits],
        "ttft_ms": round(r.timings_ms["ttft"], 1),
        "total_ms": round(r.timings_ms["total"], 1),
        # Inter-token latency: the answer's decode time per token after the first.
        "itl_ms": round((r.timings_ms["total"] - r.timings_ms["ttft"]) / (n - 1), 1)
        if n > 1
        else None,
        "recomputed_tokens": r.recomputed_tokens,
        "repaired_tokens": r.repaired_tokens,
        "em": best_em(ans.text, item.answers),
        "f1": round(best_f1(ans.text, item.answers), 4),
    }


def run_qa_eval(
    settings: Settings,
    dataset: Path,
    *,
    chunker: str = "token",
    chunk_size: int = 200,
    k: int = 4,
    modes: list[str] | None = None,
    ratios: list[float] | float = DEFAULT_RATIO,
    limit: int | None = None,
    max_tokens: int = 48,
    seed: int = 0,
    kl_tokens: int = KL_ANSWER_TOKENS,
    repair: int | None = None,
    progress: bool = True,
) -> dict:
    from ingest.job import ingest
    from rag.engine.request import GenerationParams
    from rag.service import RAGService

    t_start = time.perf_counter()
    ds = load_squad(dataset)
    items = ds.sample(limit, seed)
    ratio_list = [ratios] if isinstance(ratios, float | int) else list(ratios)
    repair = settings.blend_repair if repair is None else repair
    runs = plan_runs(modes or ["full", "blend", "reuse"], ratio_list, repair)
    random.seed(seed)
    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory(prefix="kvrag-eval-qa-") as tmp:
        own = settings.model_copy(
            update={
                "data_dir": Path(tmp) / "data",
                "model_cache_dir": settings.models_dir,  # the converted model, shared
                "redis_url": "",  # memory and disk tiers of its own only
                "cache_stats_file": None,
            }
        )
        paths = ds.write_documents(Path(tmp) / "docs")
        summary = ingest(paths, own, chunker=chunker, chunk_size=chunk_size, progress=progress)
        if summary.failed:
            raise DatasetError(f"{dataset}: could not ingest {summary.failed}")
        service = RAGService(own)
        params = GenerationParams(max_new_tokens=max_tokens, temperature=0.0, seed=seed)
        for run in runs:  # untimed: model, buffers and native step warm
            _ask(service, items[0], run, k, params)
        rows = []
        bar = tqdm(items, desc="eval qa", unit="question", disable=not progress or None)
        for i, item in enumerate(bar):
            rows.append(_question_row(service, item, runs, i, k, params, kl_tokens))
        chunker_tag = summary.chunker
        chunks = len(service.index)
    result = _summarize(rows, runs, blend_list=not isinstance(ratios, float | int))
    result.update(n=len(rows), chunker=chunker_tag, k=k)
    result["config"] = {
        "dataset": str(dataset),
        "chunks": chunks,
        "max_tokens": max_tokens,
        "seed": seed,
        "kl_answer_tokens": kl_tokens,
        "repair": repair,
        "dtype": settings.torch_dtype,
        "threads": torch.get_num_threads(),
        "machine": cpu_name(),
        "date": time.strftime("%Y-%m-%d"),
        "seconds": round(time.perf_counter() - t_start, 1),
    }
    result["rows"] = rows
    return result


def _question_row(
    service, item: QAItem, runs: list[Run], i: int, k: int, params, kl_tokens: int
) -> dict:
    """One question in every run (in an order rotated by i), scored against full's answer."""
    hits = service.retrieve(item.question, k)
    # Documents are ingested as files named by their doc: the chunk's doc id is that path.
    spans = [(Path(h.chunk.doc_id).stem, h.chunk.start, h.chunk.end) for h in hits]
    rank = hit_rank(spans, item.doc, item.answer_starts)
    for h in hits:  # the chunk K/V already stored: TTFT is measured on loads, not misses
        service.engine.ensure_stored(h.chunk.text)
    order = runs[i % len(runs) :] + runs[: i % len(runs)]
    got = {run: _ask(service, item, run, k, params) for run in order}
    full = got[runs[0]]
    prompt = service.engine.prompt([h.chunk.text for h in hits], item.question)
    follow = full["ids"][: max(0, kl_tokens - 1)]
    engine, gradual = service.engine, service.settings.blend_gradual
    ref_logits = probe_logits(engine, prompt, runs[0], follow, gradual)
    answers = {}
    for run in runs:
        a = got[run]
        row = {key: a[key] for key in ("answer", "ttft_ms", "total_ms", "itl_ms", "em", "f1")}
        row["same_chunks"] = a["chunk_ids"] == [h.chunk.chunk_id for h in hits]
        if run.mode != "full":
            kl, top1 = kl_top1(ref_logits, probe_logits(engine, prompt, run, follow, gradual))
            row.update(
                fidelity_f1=round(token_f1(a["answer"], full["answer"]), 4),
                identical=identical(a["answer"], full["answer"]),
                first_diff=first_difference(a["ids"], full["ids"]),
                kl=round(kl, 5),
                top1=round(top1, 4),
                recomputed_tokens=a["recomputed_tokens"],
                repaired_tokens=a["repaired_tokens"],
            )
        answers[run.label] = row
    return {
        "id": item.qid,
        "question": item.question,
        "gold": item.answers,
        "doc": item.doc,
        "hit_rank": rank,
        "prompt_tokens": len(prompt),
        "answers": answers,
    }


def _summarize(rows: list[dict], runs: list[Run], blend_list: bool) -> dict:
    ranks = [r["hit_rank"] for r in rows]
    modes: dict = {}
    for run in runs:
        per = [r["answers"][run.label] for r in rows]
        ttft = [a["ttft_ms"] for a in per]
        entry: dict = {} if run.mode == "full" else {"ratio": run.ratio}
        if run.mode == "blend":
            entry["repair"] = run.repair
        itl = [a["itl_ms"] for a in per if a.get("itl_ms") is not None]
        entry.update(
            em=_mean([a["em"] for a in per]),
            f1=_mean([a["f1"] for a in per]),
            ttft_ms_p50=_percentile(ttft, 50),
            ttft_ms_p95=_percentile(ttft, 95),
            total_ms_p50=_percentile([a["total_ms"] for a in per if "total_ms" in a], 50),
            itl_ms_p50=_percentile(itl, 50),
        )
        if run.mode != "full":
            entry.update(
                fidelity_f1=_mean([a["fidelity_f1"] for a in per]),
                identical=_mean([float(a["identical"]) for a in per]),
                kl_mean=_mean([a["kl"] for a in per]),
                top1=_mean([a["top1"] for a in per]),
                first_token_same=_mean([float(a["first_diff"] != 0) for a in per]),
            )
        if run.mode == "blend" and blend_list:
            modes.setdefault("blend", []).append(entry)
        else:
            modes[run.mode] = entry
    return {
        "retrieval": {"hit_at_k": round(hit_at_k(ranks), 4), "mrr": round(mrr(ranks), 4)},
        "modes": modes,
    }


def _floats(text: str) -> list[float]:
    try:
        out = [float(x) for x in text.split(",") if x.strip()]
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of numbers: {text!r}") from e
    if not out or any(not 0.0 <= r <= 1.0 for r in out):
        raise argparse.ArgumentTypeError(f"ratios must lie in [0, 1]: {text!r}")
    return out


def add_eval_qa_args(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The flags of `kvrag eval qa --dataset PATH.json ... --json OUT.json [--report DIR]`."""
    from ingest.chunkers import CHUNKERS

    p.add_argument("--dataset", type=Path, required=True, help="SQuAD-format JSON file")
    p.add_argument(
        "--chunker", choices=CHUNKERS, default="token", help="how contexts are cut (default token)"
    )
    p.add_argument("--chunk-size", type=int, default=200, help="tokens per chunk (default 200)")
    p.add_argument("--k", type=int, default=4, help="chunks per prompt")
    p.add_argument(
        "--modes", default="full,blend,reuse", help="comma-separated; full is always run"
    )
    g = p.add_mutually_exclusive_group()
    g.add_argument("--ratio", type=float, default=None, help="blend recompute ratio (0.15)")
    g.add_argument("--ratios", type=_floats, default=None, help="several, e.g. 0,0.05,0.15,0.3")
    p.add_argument("--limit", type=int, default=None, help="questions (a seeded sample)")
    p.add_argument("--max-tokens", type=int, default=48, help="greedy answer length cap")
    p.add_argument(
        "--repair",
        type=int,
        default=None,
        help="blend: stale slots recomputed before each decode step (default: the setting's)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, required=True, metavar="OUT.json")
    p.add_argument("--report", type=Path, default=None, metavar="DIR", help="report.md + PNGs")
    p.add_argument("--no-progress", action="store_true")
    return p


def command_line(args: argparse.Namespace) -> str:
    """The `kvrag eval qa` command these arguments spell (for the report)."""
    ratios = (
        f"--ratios {','.join(f'{r:g}' for r in args.ratios)}"
        if args.ratios
        else f"--ratio {DEFAULT_RATIO if args.ratio is None else args.ratio:g}"
    )
    limit = f" --limit {args.limit}" if args.limit else ""
    limit += f" --repair {args.repair}" if args.repair is not None else ""
    return (
        f"kvrag eval qa --dataset {args.dataset} --chunker {args.chunker} --k {args.k} "
        f"--modes {args.modes} {ratios}{limit} --max-tokens {args.max_tokens} --json {args.json}"
        + (f" --report {args.report}" if args.report else "")
    )


def cmd_eval_qa(args: argparse.Namespace, settings: Settings | None = None) -> int:
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    ratios = args.ratios or (DEFAULT_RATIO if args.ratio is None else args.ratio)
    try:
        plan_runs(modes, [0.0])
    except ValueError as e:
        print(f"kvrag eval qa: {e}", file=sys.stderr)
        return 2
    try:
        result = run_qa_eval(
            settings or Settings(),
            args.dataset,
            chunker=args.chunker,
            chunk_size=args.chunk_size,
            k=args.k,
            modes=modes,
            ratios=ratios,
            limit=args.limit,
            max_tokens=args.max_tokens,
            seed=args.seed,
            repair=args.repair,
            progress=not args.no_progress,
        )
    except DatasetError as e:
        print(f"kvrag eval qa: {e}", file=sys.stderr)
        return 2
    result["config"]["command"] = command_line(args)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    if args.report:
        from eval.qa_report import write_report

        write_report(result, args.report)
    print(json.dumps({key: v for key, v in result.items() if key != "rows"}, indent=2))
    return 0
