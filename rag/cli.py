"""The `kvrag` command line: ingest, delete, ask, stats, cache, serve, bench, eval."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from functools import cache
from pathlib import Path

from ingest.chunkers import CHUNKERS
from rag.config import Settings


def _settings(args: argparse.Namespace) -> Settings:
    overrides = {"data_dir": args.data_dir} if args.data_dir else {}
    if getattr(args, "gradual", None) is not None:  # `kvrag ask --gradual`
        overrides["blend_gradual"] = args.gradual
    return Settings(**overrides)


def _print_json(obj) -> None:
    print(json.dumps(obj, indent=2, ensure_ascii=False))


def _kv_evictor(settings: Settings):
    """Deletes the chunk caches of removed chunks (the model loads only if some were removed)."""

    @cache
    def service():
        from rag.service import RAGService

        return RAGService(settings)

    def on_removed(chunks) -> None:
        service().forget_chunks(chunks)

    return on_removed


def cmd_ingest(args: argparse.Namespace) -> int:
    from ingest.job import ingest

    s = _settings(args)
    summary = ingest(
        args.paths,
        s,
        chunker=args.chunker,
        chunk_size=args.chunk_size,
        chunk_overlap=args.chunk_overlap,
        delete_missing=args.delete_missing,
        follow_links=args.follow_links,
        on_removed=_kv_evictor(s),
        progress=not (args.json or args.no_progress),
    )
    if args.json:
        _print_json(summary.as_dict())
    else:
        print(summary.describe())
    # Exit 0 with skipped files: the run committed the rest (and a one-shot ingest in a compose
    # file must not keep the API from starting over one broken file). They are in the summary.
    return 0


def cmd_delete(args: argparse.Namespace) -> int:
    from ingest.job import delete_documents

    s = _settings(args)
    try:
        removed = delete_documents(args.doc_ids, s, on_removed=_kv_evictor(s))
    except KeyError as e:
        print(f"no such document: {e.args[0]}", file=sys.stderr)
        return 1
    for doc_id, n in removed.items():
        print(f"deleted {doc_id} ({n} chunks)")
    return 0


def cmd_ask(args: argparse.Namespace) -> int:
    from rag.engine.request import GenerationParams
    from rag.service import RAGService

    settings = _settings(args)
    rag = RAGService(settings)
    if len(rag.index) == 0:
        print("the index is empty: run `kvrag ingest PATH` first", file=sys.stderr)
        return 1
    stream = None if args.json else (lambda t: print(t, end="", flush=True))
    params = GenerationParams(
        max_new_tokens=args.max_tokens or settings.max_new_tokens, temperature=args.temperature
    )
    ans = rag.answer(
        args.question, k=args.k, mode=args.mode, ratio=args.ratio, params=params, on_text=stream
    )
    if args.json:
        _print_json(ans.as_dict())
        return 0
    print("\n\nSources:")
    for i, h in enumerate(ans.hits, 1):
        c = h.chunk
        excerpt = " ".join(c.text.split())[:160]
        print(f"  [{i}] {c.doc_id} chars {c.start}-{c.end} (score {h.score:.3f}): {excerpt}...")
    t = ans.request.timings_ms
    print(
        f"\nmode {ans.request.mode}; retrieve {t['retrieve']:.0f} ms, "
        f"kv load {t['kv_load']:.0f} ms, prefill {t['prefill']:.0f} ms, ttft {t['ttft']:.0f} ms, "
        f"total {t['total']:.0f} ms"
    )
    return 0


def cmd_stats(args: argparse.Namespace) -> int:
    from cache.stats import load_totals, summarize
    from rag.index.docstore import Docstore
    from rag.index.embedder import Embedder
    from rag.index.generations import IndexGenerations

    s = _settings(args)
    store = IndexGenerations(s.index_dir, Embedder(s.embedder).dim)
    docstore, index, _ = store.open()
    gen = store.current_dir()
    out = {
        **docstore.counts(),
        "index_vectors": len(index),
        "generation": gen.name if gen else None,
        "data_dir": str(s.data_dir),
    }
    if isinstance(docstore, Docstore):
        out["documents_list"] = [d["doc_id"] for d in docstore.list_documents()]
    kv_dir = s.kv_dir
    kv_files = list(kv_dir.rglob("*")) if kv_dir.exists() else []
    out["kv_disk"] = {
        "entries": sum(1 for f in kv_files if f.is_file()),
        "bytes": sum(f.stat().st_size for f in kv_files if f.is_file()),
    }
    # Store traffic of every process on this data dir (ask, serve, cache warm), per tier.
    out["kv_cache"] = summarize(load_totals(s.cache_stats_path))
    if args.json:
        _print_json(out)
        return 0
    kv = out.pop("kv_cache")
    for key, val in out.items():
        print(f"{key}: {val}")
    print(
        f"kv_cache loads: {kv['load_ms']['count']} requests, {kv['load_ms']['keys']} chunks, "
        f"mean {kv['load_ms']['mean_ms']:.1f} ms, max {kv['load_ms']['max_ms']:.1f} ms"
    )
    for tier, c in kv["tiers"].items():
        print(
            f"kv_cache {tier}: hits {c['hits']}, misses {c['misses']}, "
            f"read {c['bytes_read'] / 2**20:.1f} MiB, "
            f"written {c['bytes_written'] / 2**20:.1f} MiB, evictions {c['evictions']}, "
            f"corrupt {c['corrupt']}, "
            f"errors {c['errors']}"
        )
    return 0


def cmd_cache(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from rag.service import RAGService

    rag = RAGService(_settings(args))
    if args.action == "clear":
        print("cleared:", ", ".join(rag.clear_cache()))
        return 0
    with tqdm(total=len(rag.index), desc="warm", unit="chunk") as bar:
        computed = rag.warm(progress=bar.update)
    print(f"{computed} chunk caches computed, {len(rag.index) - computed} already present")
    _print_json(rag.cache_stats())
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kvrag", description=__doc__)
    p.add_argument(
        "--data-dir", type=Path, default=None, help="default ./kvrag_data or $KVRAG_DATA_DIR"
    )
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("ingest", help="add or update documents (files or folders)")
    s.add_argument("paths", nargs="+", type=Path, help="files or folders (.txt .md .html .pdf)")
    s.add_argument("--chunker", choices=CHUNKERS, default=None, help="default: KVRAG_CHUNKER")
    s.add_argument(
        "--chunk-size", type=int, default=None, help="target chunk size in embedder wordpieces"
    )
    s.add_argument(
        "--chunk-overlap", type=int, default=None, help="overlap (token and recursive chunkers)"
    )
    s.add_argument(
        "--delete-missing", action="store_true", help="remove documents under PATHs that are gone"
    )
    s.add_argument(
        "--follow-links",
        action="store_true",
        help="follow symbolic links that lead outside the folders named (refused by default)",
    )
    s.add_argument("--no-progress", action="store_true")
    s.add_argument("--json", action="store_true", help="print the summary as JSON")
    s.set_defaults(func=cmd_ingest)

    s = sub.add_parser("delete", help="remove documents by id")
    s.add_argument("doc_ids", nargs="+")
    s.set_defaults(func=cmd_delete)

    s = sub.add_parser("ask", help="answer a question from the indexed documents")
    s.add_argument("question")
    s.add_argument("--k", type=int, default=None)
    s.add_argument("--mode", choices=["full", "reuse", "blend"], default=None)
    s.add_argument("--ratio", type=float, default=None, help="blend recompute ratio (default 0.15)")
    s.add_argument(
        "--gradual", type=int, default=None, help="check layers for gradual filtering (default 1)"
    )
    s.add_argument("--max-tokens", type=int, default=None)
    s.add_argument("--temperature", type=float, default=0.0)
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_ask)

    s = sub.add_parser("stats", help="documents, chunks, index size, chunk caches")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_stats)

    s = sub.add_parser("cache", help="precompute (warm) or empty (clear) the chunk-KV store")
    s.add_argument("action", choices=["warm", "clear"])
    s.set_defaults(func=cmd_cache)

    s = sub.add_parser("serve", help="the OpenAI-compatible chat API (FastAPI + uvicorn)")
    s.add_argument("--host", default="127.0.0.1", help="0.0.0.0 to listen on every interface")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--warm", action="store_true", help="precompute all chunk caches before serving")
    s.add_argument(
        "--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"]
    )
    s.set_defaults(func=cmd_serve)

    # Benchmarks and evaluations parse their own arguments: their modules (and what they import)
    # load only when one of them runs.
    for kind, table in (("bench", BENCHES), ("eval", EVALS)):
        names = ", ".join(table)
        s = sub.add_parser(
            kind,
            help=f"{kind}: {names}",
            description="\n".join(f"{name}: {help_text}" for name, (_, help_text) in table.items()),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        s.add_argument("name", choices=list(table), metavar="NAME", help=names)
        s.add_argument(
            "args", nargs=argparse.REMAINDER, help=f"the {kind}'s own arguments (NAME --help)"
        )
        s.set_defaults(func=cmd_lab, kind=kind)
    return p


def cmd_serve(args: argparse.Namespace) -> int:
    from rag.server.run import serve

    serve(_settings(args), args.host, args.port, warm=args.warm, log_level=args.log_level)
    return 0


# name -> (module in eval/, help); each module has add_<kind>_<name>_args(parser) and
# cmd_<kind>_<name>(args, settings).
BENCHES = {
    "cache": (
        "eval.bench_cache",
        "tier load speed and TTFT by tier (memory, Redis, disk, miss, full)",
    ),
    "load": (
        "eval.bench_load",
        "tok/s, TTFT and ITL under concurrent load: full vs blend, fifo vs batch scheduler",
    ),
    "ttft": (
        "eval.bench_ttft",
        "TTFT, speedup and fidelity (KL, top-1) of full / reuse / blend ratios",
    ),
    "decode": (
        "eval.bench_decode",
        "decode tokens/s: transformers generate() vs lean loop vs Lookahead",
    ),
    "replicas": ("eval.bench_replicas", "API replicas sharing a Redis Cluster KV tier"),
    "batch": ("eval.bench_batch", "decode tok/s: B requests batched vs each drafting alone"),
    "upload": (
        "eval.bench_upload",
        "a large upload as a job: time to answer, server memory, other document calls meanwhile",
    ),
}
EVALS = {
    "conversations": (
        "eval.conversations",
        "follow-up retrieval per query method (hit@k) and follow-up vs first-turn TTFT",
    ),
    "retrieval": (
        "eval.retrieval",
        "chunkers on Chroma's token-level retrieval benchmark (IoU family)",
    ),
    "retrieval-table": (
        "eval.retrieval_table",
        "several `eval retrieval` runs (e.g. two benchmarks) in one table and plot",
    ),
    "covidqa": (
        "eval.covidqa_corpus",
        "a SQuAD-format data set (COVID-QA) as corpora + questions for `eval retrieval`",
    ),
    "qa": (
        "eval.qa",
        "answers on a SQuAD-format dataset: EM/F1, and fidelity to full prefill per mode/ratio",
    ),
}


def cmd_lab(args: argparse.Namespace) -> int:
    """`kvrag bench NAME ...` / `kvrag eval NAME ...`: import the module, parse its arguments,
    run it."""
    import importlib

    module, help_text = (BENCHES if args.kind == "bench" else EVALS)[args.name]
    mod = importlib.import_module(module)
    parser = argparse.ArgumentParser(prog=f"kvrag {args.kind} {args.name}", description=help_text)
    fn = args.name.replace("-", "_")  # `retrieval-table` -> add_eval_retrieval_table_args
    getattr(mod, f"add_{args.kind}_{fn}_args")(parser)
    own = parser.parse_args(args.args)
    own.data_dir = args.data_dir
    return getattr(mod, f"cmd_{args.kind}_{fn}")(own, _settings(args))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    from ingest.job import IndexBusy

    try:
        return args.func(args)
    except IndexBusy as e:  # an expected conflict, not a crash: one line, no traceback
        print(f"kvrag {args.command}: {e}; try again when it finishes", file=sys.stderr)
        return 75  # EX_TEMPFAIL


if __name__ == "__main__":
    sys.exit(main())
