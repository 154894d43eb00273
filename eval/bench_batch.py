"""`kvrag bench batch`: decode tokens/s of B requests batched in one step vs each drafting alone.

What Lookahead's rule in the batching scheduler rests on (rag.engine.scheduler:
DRAFT_MAX_BATCH). For each batch size B, B sample questions are prefilled over ~`--context`
tokens of the sample documents, then decoded `--max-tokens` greedy tokens two ways, in
alternating order:

- batched: the engine's batched step, one pass over the weights for the B rows a step;
- drafting: each request alone with its Lookahead draft trees (the engine's one-request
  loop), one after the other: what drafting in a batch gives at best when the tree rows of
  different requests share nothing.

tokens/s is all B requests' tokens over the wall time. Outputs are checked equal (greedy).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from tqdm import tqdm

from eval.bench_decode import split_chunks
from eval.samples import SAMPLE_QUESTIONS, SAMPLES
from rag.config import Settings
from rag.engine.batch_row import BatchRow
from rag.engine.decode import decode, new_drafter
from rag.engine.engine import Engine
from rag.model.loader import load_model


def _prompts(engine: Engine, n: int, context: int) -> list:
    text = "\n\n".join(p.read_text(encoding="utf-8") for p in sorted(SAMPLES.glob("*.md")))
    count = lambda s: len(engine.prompts.chunk_ids(s))  # noqa: E731
    chunks = split_chunks(text, count, 200)
    out = []
    for i in range(n):
        q = SAMPLE_QUESTIONS[i % len(SAMPLE_QUESTIONS)]
        words = set(q.lower().split())
        ranked = sorted(chunks, key=lambda c: -len(words & set(c.lower().split())))
        picked, used = [], 0
        for c in ranked:
            if used + count(c) > context:
                break
            picked.append(c)
            used += count(c)
        out.append(engine.prompts.build(picked, q))
    return out


def _batched(engine: Engine, prompts: list, max_tokens: int) -> tuple[float, list[list[int]]]:
    pres = [engine.prefill(p, extra_slots=max_tokens) for p in prompts]
    toks = [int(pre.logits[-1].argmax()) for pre in pres]
    pos = [len(p) for p in prompts]
    out = [[t] for t in toks]
    t0 = time.perf_counter()
    for _ in range(max_tokens - 1):
        rows = [
            BatchRow(t, pre.cache, q, len(p))
            for t, pre, q, p in zip(toks, pres, pos, prompts, strict=True)
        ]
        toks = [int(x) for x in engine.step.batch(rows).argmax(-1)]
        pos = [q + 1 for q in pos]
        for o, t in zip(out, toks, strict=True):
            o.append(t)
    dt = time.perf_counter() - t0
    for pre in pres:
        engine.release(pre.cache)
    return dt, out


def _drafting(engine: Engine, prompts: list, max_tokens: int) -> tuple[float, list[list[int]]]:
    dt, out = 0.0, []
    for p in prompts:
        pre = engine.prefill(p, extra_slots=max_tokens)
        drafter = new_drafter(p.ids()[len(p.header) :], 0.0, True, engine.step, "cpu")
        t0 = time.perf_counter()
        r = decode(
            engine.model,
            engine.step,
            engine.tokenizer,
            pre.cache,
            pre.logits[-1],
            len(p),
            max_tokens,
            drafter=drafter,
        )
        dt += time.perf_counter() - t0
        engine.release(pre.cache)
        out.append(r.ids)
    return dt, out


def run_batch_bench(
    settings: Settings, sizes: list[int], max_tokens: int, context: int, repeats: int
) -> dict:
    lm = load_model(settings.model, settings.models_dir, settings.torch_dtype, "cpu")
    engine = Engine(lm, settings.system_prompt, max_batch=max(sizes))
    rows = []
    for b in tqdm(sizes, desc="batch size"):
        prompts = _prompts(engine, b, context)
        times: dict[str, list[float]] = {"batched": [], "drafting": []}
        made = {}
        same = True
        for rep in range(repeats):
            order = ("batched", "drafting") if rep % 2 == 0 else ("drafting", "batched")
            got = {}
            for name in order:
                fn = _batched if name == "batched" else _drafting
                dt, got[name] = fn(engine, prompts, max_tokens)
                times[name].append(dt)
                made[name] = sum(len(ids) - 1 for ids in got[name])  # past the prefill's
            # the batched loop stops at max_tokens; Lookahead may stop early on a stop token
            same &= all(
                a[: len(d)] == d[: len(a)]
                for a, d in zip(got["batched"], got["drafting"], strict=True)
            )
        best = {k: min(v) for k, v in times.items()}
        rows.append(
            {
                "batch": b,
                "batched_tok_s": round(made["batched"] / best["batched"], 1),
                "drafting_tok_s": round(made["drafting"] / best["drafting"], 1),
                "batched_step_ms": round(1000 * best["batched"] / (max_tokens - 1), 2),
                "same_tokens": same,
            }
        )
    return {
        "dtype": str(lm.model.dtype).removeprefix("torch."),
        "threads": torch.get_num_threads(),
        "context_tokens": context,
        "max_tokens": max_tokens,
        "native": type(engine.step).__name__ == "NativeDecodeStep",
        "rows": rows,
    }


def add_bench_batch_args(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The flags of `kvrag bench batch [--sizes 1,2,4,8] [--max-tokens 64] [--json OUT]`."""
    p.add_argument("--sizes", default="1,2,4,8", help="batch sizes")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--context", type=int, default=1800, help="context tokens per prompt")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--json", type=Path, default=None, metavar="OUT.json")
    return p


def cmd_bench_batch(args: argparse.Namespace, settings: Settings | None = None) -> int:
    sizes = [int(x) for x in args.sizes.split(",")]
    result = run_batch_bench(
        settings or Settings(), sizes, args.max_tokens, args.context, args.repeats
    )
    text = json.dumps(result, indent=2)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")
    print(text)
    return 0
