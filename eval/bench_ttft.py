"""`kvrag bench ttft`: time to first token and answer quality of CacheBlend against full prefill.

One process, real text: each prompt is `chunks` windows of `chunk_tokens` tokens
(the sample documents by default) and a question of about `question_tokens`
tokens made from a sentence of a later chunk. Each chunk's K/V is computed up
front (as if loaded from the store), so TTFT starts with the ChunkKV objects in
memory and ends when the first token is chosen. Every repeat runs full prefill
and every blend mode back to back, in a rotating order, so machine load hits
them alike; speedups are ratios of medians.

Quality is judged against full prefill on the same prompt: the mean KL(full ||
blend) of the next-token distributions at every question position, and how
often their argmax agrees, averaged over the prompts (repeat r uses prompt
r mod n_prompts, so one chunk set does not decide). ms per token per layer
compares a full prefill with the blend's partial layers (those after the last
check layer, where only the selected and question tokens are computed; the last
layer, which only writes the selected tokens' K/V, is left out), and with a prefill
of as many tokens as the blend computes, at the prompt's end over the rest (the
same kind of late tokens, through the ordinary causal forward).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import statistics
import time
from pathlib import Path

import torch

from cache.entry import ChunkKV
from eval.report import markdown_table, num
from rag.config import Settings
from rag.engine.blend import BlendResult, blend_prefill
from rag.engine.engine import Engine
from rag.engine.prompt import Prompt
from rag.model.loader import load_model

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "samples"
FALLBACK_CORPUS = REPO.parent / "shared" / "data" / "chroma_eval" / "corpora"
DEFAULT_RATIOS = (0.0, 0.05, 0.15, 0.3, 1.0)


def _text_files(corpus: Path) -> list[Path]:
    if corpus.is_file():
        return [corpus]
    return sorted(p for p in corpus.rglob("*") if p.suffix in {".md", ".txt"})


def default_corpus() -> Path:
    return SAMPLES if SAMPLES.is_dir() and _text_files(SAMPLES) else FALLBACK_CORPUS


def _question(engine: Engine, chunk_text: str, n_tokens: int) -> str:
    """A question of about n_tokens tokens on a sentence from the middle of the chunk: a model
    that reads the chunk right predicts much of it, so it tests the reused K/V."""
    sentences = [s for s in re.split(r"(?<=[.!?])\s+", chunk_text) if len(s.split()) >= 8] or [
        chunk_text
    ]
    s = sentences[len(sentences) // 2].strip()
    ids = engine.tokenizer.encode_text("Is it true that " + s[0].lower() + s[1:])
    text = engine.tokenizer.decode(ids[: max(1, n_tokens - 1)])
    if len(ids) >= n_tokens and " " in text:
        text = text.rsplit(" ", 1)[0]  # no half words
    return text.rstrip(" .,;:!?") + "?"


def build_prompts(
    engine: Engine,
    corpus: Path,
    n_prompts: int,
    chunks: int,
    chunk_tokens: int,
    question_tokens: int,
) -> list[Prompt]:
    """n_prompts chunk sets at evenly spaced offsets of the corpus text (overlapping if it is
    short)."""
    files = _text_files(corpus)
    if not files:
        raise FileNotFoundError(f"no .md or .txt files in {corpus}")
    ids = engine.tokenizer.encode_text("\n\n".join(f.read_text(encoding="utf-8") for f in files))
    need = chunks * chunk_tokens
    if len(ids) < need:
        raise ValueError(f"{corpus} has {len(ids)} tokens, need {need}")
    prompts = []
    for i in range(n_prompts):
        off = i * (len(ids) - need) // max(1, n_prompts - 1)
        texts = [
            engine.tokenizer.decode(ids[off + j * chunk_tokens : off + (j + 1) * chunk_tokens])
            for j in range(chunks)
        ]
        # Ask about a reused chunk (never the first, which is exact) so recompute matters.
        about = texts[1 + i % (chunks - 1)] if chunks > 1 else texts[0]
        prompts.append(engine.prompts.build(texts, _question(engine, about, question_tokens)))
    return prompts


def kl_top1(ref: torch.Tensor, got: torch.Tensor) -> tuple[float, float, float]:
    """From logits [n, V]: mean KL(ref || got) over positions, argmax agreement, and
    agreement at the last position (the first answer token)."""
    lr, lg = ref.float().log_softmax(-1), got.float().log_softmax(-1)
    kl = max(0.0, (lr.exp() * (lr - lg)).sum(-1).mean().item())  # no -0.0 from rounding
    same = ref.argmax(-1) == got.argmax(-1)
    return kl, same.float().mean().item(), float(same[-1])


# Each run hands its buffer back, as Engine.generate does, so that runs reuse request buffers
# as a serving process does (the full prefill as much as the blend).
def _full(engine: Engine, prompt: Prompt) -> tuple[float, torch.Tensor]:
    t0 = time.perf_counter()
    pre = engine.prefill(prompt, "full")
    int(pre.logits[-1].argmax())
    ms = 1000 * (time.perf_counter() - t0)
    engine.release(pre.cache)
    return ms, pre.logits


def _blend(
    engine: Engine, prompt: Prompt, kvs: list[ChunkKV], ratio: float, gradual: int
) -> tuple[float, BlendResult]:
    # What Engine.prefill(mode="blend") does, called directly to keep the per-layer timings.
    t0 = time.perf_counter()
    cache = engine.new_cache(len(prompt))
    r = blend_prefill(engine.model, cache, prompt, kvs, ratio, gradual=gradual)
    int(r.logits[-1].argmax())
    ms = 1000 * (time.perf_counter() - t0)
    engine.release(cache)
    return ms, r


def _span(engine: Engine, prompt: Prompt, span: int) -> float:
    """ms to prefill the prompt's last `span` tokens over the rest (already prefilled, untimed): the
    ordinary causal forward on as many tokens as a blend computes, at the late positions theirs
    sit at."""
    h, n = len(prompt.header), len(prompt)
    ids = torch.tensor([prompt.ids()], device=engine.model.device)
    cache = engine.new_cache(n)
    engine.model(ids[:, h : n - span], cache, h, logits_for=None)
    t0 = time.perf_counter()
    int(engine.model(ids[:, n - span :], cache, n - span)[0, -1].argmax())
    ms = 1000 * (time.perf_counter() - t0)
    engine.release(cache)
    return ms


def _per_token_layer(r: BlendResult, layers: range | list[int]) -> float | None:
    ms = sum(r.layer_ms[i] for i in layers)
    tokens = sum(r.layer_tokens[i] for i in layers)
    return ms / tokens if tokens else None


def run_ttft_bench(
    settings: Settings,
    corpus: Path | None = None,
    chunks: int = 4,
    chunk_tokens: int = 512,
    question_tokens: int = 32,
    ratios: tuple[float, ...] = DEFAULT_RATIOS,
    repeats: int = 3,
    gradual: int = 1,
    gradual_row: int = 3,
    n_prompts: int = 3,
) -> dict:
    """Full prefill vs blend at each ratio (single check layer, or `gradual` check layers),
    plus, at the ratio in (0, 1) nearest 0.15, one gradual-filtering row (`gradual_row` check
    layers)."""
    if settings.threads:
        torch.set_num_threads(settings.threads)
    lm = load_model(
        settings.model, settings.models_dir, settings.torch_dtype, settings.torch_device
    )
    engine = Engine(lm, settings.system_prompt, settings.max_context_tokens)
    prompts = build_prompts(
        engine, corpus or default_corpus(), n_prompts, chunks, chunk_tokens, question_tokens
    )
    kvs = [[engine.chunk_kv(c) for c in p.chunks] for p in prompts]  # also warms the model up
    modes = [(float(r), gradual) for r in ratios]
    partial_ratios = [float(r) for r in ratios if 0 < r < 1]  # where there is something to filter
    near = min(partial_ratios, key=lambda r: abs(r - 0.15)) if partial_ratios else 0.15
    if partial_ratios and gradual_row and gradual_row != gradual:
        modes.append((near, gradual_row))

    # The per-token yardstick for the blend's partial layers: a prefill of as many tokens as the
    # blend nearest ratio 0.15 computes (its recomputed ones plus the question), over a past.
    span = math.ceil(near * sum(len(c) for c in prompts[0].chunks)) + len(prompts[0].footer)
    span_ms: list[float] = []
    full_ms: list[float] = []
    ms: dict[tuple, list[float]] = {m: [] for m in modes}
    partial: dict[tuple, list[float]] = {m: [] for m in modes}
    early: dict[tuple, list[float]] = {m: [] for m in modes}
    logits: dict[tuple | None, dict[int, torch.Tensor]] = {m: {} for m in [None, *modes]}
    counts: dict[tuple, tuple[int, int]] = {}
    keys: dict[tuple, float] = {}  # mean keys a token reads in the partial layers (prompt 0)

    def run(m: tuple | str | None, i: int, timed: bool) -> None:
        if m == "span":
            t = _span(engine, prompts[i], span)
            if timed:
                span_ms.append(t)
            return
        if m is None:
            t, logits[None][i] = _full(engine, prompts[i])
            if timed:
                full_ms.append(t)
            return
        t, r = _blend(engine, prompts[i], kvs[i], *m)
        logits[m][i] = r.logits
        if i == 0:
            counts[m] = (r.recomputed, r.computed)
            footer = torch.arange(prompts[0].context_end, len(prompts[0]))
            keys[m] = torch.cat([r.selected.cpu(), footer]).float().mean().item() + 1
        if timed:
            ms[m].append(t)
            # The last layer computes only K/V for the selected tokens: leave it out, to be fair.
            after_checks = range(max(r.checks, default=-1) + 1, len(r.layer_ms) - 1)
            before_checks = range(min(r.checks, default=0))
            if (v := _per_token_layer(r, after_checks)) is not None:
                partial[m].append(v)
            if (v := _per_token_layer(r, before_checks)) is not None:
                early[m].append(v)

    for rep in range(repeats):
        order = [None, *modes, "span"]
        k = rep % len(order)
        for m in order[k:] + order[:k]:  # rotate, so no mode always runs first
            run(m, rep % len(prompts), timed=True)
    for i in range(len(prompts)):  # prompts the repeats did not reach: quality only
        for m in [None, *modes]:
            if i not in logits[m]:
                run(m, i, timed=False)

    full = statistics.median(full_ms)
    n_layers = lm.model.args.n_layers
    computed = [len(p) - len(p.header) for p in prompts[: max(1, min(repeats, len(prompts)))]]
    h0 = len(prompts[0].header)
    out_modes = []
    for m in modes:
        t = statistics.median(ms[m])
        q = [kl_top1(logits[None][i], logits[m][i]) for i in range(len(prompts))]
        out_modes.append(
            {
                "ratio": m[0],
                "gradual": m[1],
                "ttft_ms": round(t, 1),
                "speedup": round(full / t, 2),
                "kl_mean": round(statistics.fmean(k for k, _, _ in q), 5),
                "top1": round(statistics.fmean(a for _, a, _ in q), 4),
                "first_token": round(statistics.fmean(f for _, _, f in q), 3),
                "recomputed_tokens": counts[m][0],
                "computed_tokens": counts[m][1],
                "ms_per_token_layer_partial": _round(partial[m], 5),
                "ms_per_token_layer_full_layers": _round(early[m], 5),
                "mean_keys_per_token": round(keys[m]),
            }
        )
    return {
        "model": lm.name,
        "dtype": str(lm.model.dtype).removeprefix("torch."),
        "kv_dtype": str(engine.kv_dtype).removeprefix("torch."),
        "device": str(lm.model.device),
        "threads": torch.get_num_threads(),
        "corpus": str(corpus or default_corpus()),
        "prompts": len(prompts),
        "repeats": repeats,
        "context_tokens": len(prompts[0]),
        "footer_tokens": len(prompts[0].footer),
        "reused_tokens": sum(len(c) for c in prompts[0].chunks),
        "full": {
            "ttft_ms": round(full, 1),
            "ms_per_token_layer": round(full / statistics.fmean(computed) / n_layers, 5),
            "mean_keys_per_token": round((h0 + len(prompts[0]) + 1) / 2),
        },
        "span": {
            "tokens": span,
            "ttft_ms": round(statistics.median(span_ms), 1),
            "ms_per_token_layer": round(statistics.median(span_ms) / span / n_layers, 5),
            "mean_keys_per_token": round(len(prompts[0]) - (span - 1) / 2),
        },
        "modes": out_modes,
    }


def _round(values: list[float], digits: int) -> float | None:
    return round(statistics.median(values), digits) if values else None


def markdown(result: dict) -> str:
    rows = [
        {
            "ratio": "full",
            "gradual": "",
            "ttft_ms": result["full"]["ttft_ms"],
            "speedup": 1.0,
            "kl_mean": 0.0,
            "top1": 1.0,
            "first_token": 1.0,
            "recomputed_tokens": result["reused_tokens"],
            "ms_per_token_layer_partial": result["full"]["ms_per_token_layer"],
            "mean_keys_per_token": result["full"]["mean_keys_per_token"],
        },
        *result["modes"],
    ]
    if span := result.get("span"):
        rows.append(
            {
                "ratio": f"span of {span['tokens']} over a past",
                "gradual": "",
                "recomputed_tokens": "",
                "ttft_ms": span["ttft_ms"],
                "ms_per_token_layer_partial": span["ms_per_token_layer"],
                "mean_keys_per_token": span["mean_keys_per_token"],
            }
        )
    cols = [
        ("ratio", "ratio", str),
        ("gradual", "check layers", str),
        ("ttft_ms", "TTFT ms", num(0)),
        ("speedup", "speedup", num(2)),
        ("kl_mean", "KL mean", num(4)),
        ("top1", "top-1", num(3)),
        ("first_token", "first token", num(2)),
        ("recomputed_tokens", "recomputed", str),
        ("ms_per_token_layer_partial", "ms/token/layer (partial layers)", num(4)),
        ("mean_keys_per_token", "keys/token", num(0)),
    ]
    return markdown_table(rows, cols)


def plot(result: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    main = result["modes"][0]
    rows = sorted(
        (m for m in result["modes"] if m["gradual"] == main["gradual"]), key=lambda m: m["ratio"]
    )
    x = [m["ratio"] for m in rows]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4), dpi=120)
    a1.plot(x, [m["speedup"] for m in rows], "o-")
    a1.axhline(1.0, color="grey", lw=0.8)
    a1.set(xlabel="recompute ratio", ylabel="TTFT speedup vs full prefill (x)", title="Speed")
    a2.plot(x, [m["kl_mean"] for m in rows], "o-", color="C1")
    a2.set(xlabel="recompute ratio", ylabel="mean KL(full || blend)", title="Quality")
    extra = [m for m in result["modes"] if m not in rows]
    for j, m in enumerate(extra):
        color = f"C{2 + j}"
        label = f"{m['gradual']} check layers"
        a1.plot(m["ratio"], m["speedup"], "s", color=color, label=label)
        a2.plot(m["ratio"], m["kl_mean"], "s", color=color, label=label)
    if extra:
        a1.legend()
        a2.legend()
    for a in (a1, a2):
        a.grid(alpha=0.3)
    fig.suptitle(
        f"{result['model']} ({result['dtype']}, KV {result['kv_dtype']}), "
        f"{result['context_tokens']} tokens"
    )
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def add_bench_ttft_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--corpus",
        type=Path,
        default=None,
        help="file or folder of .md/.txt "
        "(default: samples/, else ../shared/data/chroma_eval/corpora)",
    )
    p.add_argument("--chunks", type=int, default=4)
    p.add_argument("--chunk-tokens", type=int, default=512)
    p.add_argument("--question-tokens", type=int, default=32)
    p.add_argument(
        "--ratios",
        default=",".join(str(r) for r in DEFAULT_RATIOS),
        type=lambda s: tuple(float(x) for x in s.split(",") if x.strip()),
    )
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument(
        "--gradual",
        type=int,
        default=1,
        help="check layers for the ratio rows (1 = one check layer)",
    )
    p.add_argument(
        "--gradual-row",
        type=int,
        default=3,
        help="check layers of the extra gradual row (0 = none)",
    )
    p.add_argument("--prompts", type=int, default=3, help="chunk sets the quality is averaged over")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads (default: KVRAG_THREADS, else torch's)",
    )
    p.add_argument(
        "--json", type=Path, default=None, help="write the result here, and a PNG plot beside it"
    )


def cmd_bench_ttft(args: argparse.Namespace, settings: Settings | None = None) -> int:
    settings = settings or Settings()
    if args.threads is not None:
        settings = settings.model_copy(update={"threads": args.threads})
    result = run_ttft_bench(
        settings,
        args.corpus,
        args.chunks,
        args.chunk_tokens,
        args.question_tokens,
        args.ratios,
        args.repeats,
        args.gradual,
        args.gradual_row,
        args.prompts,
    )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
        plot(result, args.json.with_suffix(".png"))
    print(
        f"{result['model']} {result['dtype']} (KV {result['kv_dtype']}), {result['device']}, "
        f"{result['threads']} thread(s), {result['context_tokens']} tokens, "
        f"{result['prompts']} prompts\n"
    )
    print(markdown(result))
    return 0
