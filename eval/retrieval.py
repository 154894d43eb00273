"""`kvrag eval retrieval`: chunkers on Chroma's retrieval benchmark (all corpora in one index).

Each chunker cuts every corpus; the chunks are embedded (identical texts once)
into one in-memory FAISS index with ids in corpus-then-position order, so exact
ties (finance.md repeats whole sections) go to the earlier copy. Each question
retrieves its top k as the service does (rag.index.retriever: dense, or hybrid with BM25),
scored at the character level (eval.metrics_retrieval).
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import time
import typing
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from eval.boundary import boundary_clarity, sample_pairs
from eval.metrics_retrieval import ChunkLocator, Located, mean_scores, score_question
from eval.report import markdown_table, num, pct, scatter_plot, text
from rag.config import Settings

log = logging.getLogger(__name__)

RETRIEVALS = typing.get_args(Settings.model_fields["retrieval"].annotation)

# Chroma's published all-MiniLM-L6-v2, k=5 results (recall, IoU), for the plot.
CHROMA_REFS = (
    ("Chroma recursive 250/125", 0.787, 0.049),
    ("Chroma token 250/125", 0.824, 0.035),
    ("Chroma recursive 200", 0.757, 0.065),
    ("Chroma token 200", 0.766, 0.041),
    ("Chroma cluster 250", 0.773, 0.060),
    ("Chroma cluster 200", 0.752, 0.072),
)


@dataclass
class Question:
    text: str
    excerpts: list[Located]


def load_questions(path: Path | str) -> list[Question]:
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    out = []
    for r in rows:
        refs = json.loads(r["references"])
        out.append(
            Question(
                r["question"],
                [Located(r["corpus_id"], int(x["start_index"]), int(x["end_index"])) for x in refs],
            )
        )
    return out


def load_corpora(folder: Path | str, only: list[str] | None = None) -> dict[str, str]:
    """Corpus texts by file stem; `only`: just these stems (each must exist)."""
    files = sorted(p for p in Path(folder).iterdir() if p.suffix in {".md", ".txt"})
    if not files:
        raise FileNotFoundError(f"no .md or .txt corpora in {folder}")
    if only:
        unknown = sorted(set(only) - {p.stem for p in files})
        if unknown:
            raise FileNotFoundError(f"no corpus {', '.join(unknown)} in {folder}")
        files = [p for p in files if p.stem in set(only)]
    return {p.stem: p.read_text(encoding="utf-8") for p in files}


class EmbeddingCache:
    """Vectors by text, shared by all chunkers of a run: identical chunks are embedded once."""

    def __init__(self, embedder):
        self.embedder = embedder
        self.vectors: dict[str, np.ndarray] = {}

    def embed(self, texts: list[str], progress: bool = False) -> np.ndarray:
        todo = list(dict.fromkeys(t for t in texts if t not in self.vectors))
        if todo:
            for t, v in zip(
                todo, self.embedder.embed(todo, batch_size=32, progress=progress), strict=True
            ):
                self.vectors[t] = v
        return (
            np.stack([self.vectors[t] for t in texts])
            if texts
            else np.zeros((0, self.embedder.dim), np.float32)
        )


def evaluate_chunks(
    chunks: list[Located],
    corpora: dict[str, str],
    questions: list[Question],
    q_vecs: np.ndarray,
    cache: EmbeddingCache,
    k: int,
    retrieval: str = "dense",
    progress: bool = False,
) -> dict:
    """Mean scores of the questions' top k, retrieved as the service does (rag.index.retriever)."""
    from rag.index.lexical_index import LexicalIndex
    from rag.index.retriever import Retriever
    from rag.index.vector_index import VectorIndex

    texts = [corpora[c.corpus][c.start : c.end] for c in chunks]
    vecs = cache.embed(texts, progress=progress)
    index = VectorIndex(vecs.shape[1])
    ids = list(range(len(chunks)))  # corpus/position order: ties go to the earlier chunk
    index.add(ids, vecs)
    retriever = Retriever(index, LexicalIndex(ids, texts) if retrieval == "hybrid" else None)
    locator = ChunkLocator(chunks)
    scores = []
    for q, v in zip(questions, q_vecs, strict=True):
        hits = [chunks[i] for i, _ in retriever.search(v, q.text, k)]
        touching = {c for x in q.excerpts for c in locator.touching(x)}
        scores.append(
            score_question(q.excerpts, hits, sorted(touching, key=lambda c: (c.start, c.end)))
        )
    return mean_scores(scores)


def _memo_hits(resources, needs_lm: bool) -> int:
    """How often the chunkers' model signals were answered from memory so far."""
    from ingest.chunkers.semantic import sentence_distances

    return (resources.scorer.memo_hits if needs_lm else 0) + sentence_distances.cache_info().hits


def run_retrieval_eval(
    corpora_dir: Path | str,
    questions_csv: Path | str,
    chunkers: list[str],
    chunk_sizes: int | list[int],
    k: int,
    out_json: Path | str,
    settings,
    progress: bool = True,
    boundary_pairs: int = 32,
    chunker_options: dict | None = None,
    retrievals: list[str] | None = None,
    only: list[str] | None = None,
) -> list[dict]:
    """Evaluate each chunker at each size with each retrieval (default: the service's); writes
    OUT.json (an object for one row, else a list, plus OUT.md and OUT.png).

    A chunker's model signal (the LLM's for Meta-Chunking, sentence embeddings for semantic)
    does not depend on the size, so it is computed at the first size and reused (the scorer's
    memo, the semantic chunker's cache) at the others: rows whose signal came from memory time
    only the merging in `chunking_seconds` and leave `tokens_per_s` empty. The
    retrievals of one chunker and size share its chunks (and their timing and boundary clarity).
    """
    import torch

    from ingest.chunkers import Resources

    if settings.threads > 0:
        torch.set_num_threads(settings.threads)
    sizes = [chunk_sizes] if isinstance(chunk_sizes, int) else list(chunk_sizes)
    retrievals = retrievals or [settings.retrieval]
    corpora = load_corpora(corpora_dir, only)
    questions = load_questions(questions_csv)
    if only:  # a subset of the corpora: their questions only
        questions = [q for q in questions if q.excerpts[0].corpus in corpora]
    missing = {x.corpus for q in questions for x in q.excerpts} - set(corpora)
    if missing:
        raise FileNotFoundError(
            f"questions refer to corpora not in {corpora_dir}: {sorted(missing)}"
        )
    # The benchmark: the questions file's folder (chroma_eval, covidqa), and the subset if any.
    benchmark = Path(questions_csv).resolve().parent.name + (
        f" ({len(corpora)} corpora)" if only else ""
    )
    resources = Resources(settings)
    cache = EmbeddingCache(resources.embedder)
    q_vecs = resources.embedder.embed([q.text for q in questions])
    needs_lm = boundary_pairs > 0 or any(c.startswith("meta-") for c in chunkers)
    llm_tokens = (
        sum(len(resources.scorer.tokenizer.encode_text(t)) for t in corpora.values())
        if needs_lm
        else None
    )
    results = []
    for name in chunkers:
        for size in sizes:
            hits_before = _memo_hits(resources, needs_lm)
            chunking, spans = _chunk(
                name,
                size,
                corpora,
                resources,
                settings.chunk_overlap,
                (chunker_options or {}).get(name, {}),
                progress,
            )
            reused = _memo_hits(resources, needs_lm) > hits_before  # the signal came from memory
            chunking["tokens_per_s"] = (
                round(llm_tokens / chunking["chunking_seconds"], 1)
                if llm_tokens and chunking["chunking_seconds"] > 0 and not reused
                else None
            )
            if boundary_pairs > 0:
                t2 = time.perf_counter()
                pairs = sample_pairs(spans, boundary_pairs)
                bc = boundary_clarity(corpora, pairs, resources.scorer)
                chunking.update(
                    boundary_clarity=None if bc is None else round(bc, 4),
                    boundary_pairs=len(pairs),
                    boundary_seconds=round(time.perf_counter() - t2, 2),
                )
            chunks = [Located(cid, s, e) for cid, ss in spans.items() for s, e in ss]
            for retrieval in retrievals:
                t1 = time.perf_counter()
                scores = evaluate_chunks(chunks, corpora, questions, q_vecs, cache, k, retrieval)
                row = {
                    "benchmark": benchmark,
                    "chunker": name,
                    "chunk_size": size,
                    "retrieval": retrieval,
                    "k": k,
                    "n_questions": len(questions),
                    **chunking,
                    **{m: round(v, 4) for m, v in scores.items()},
                    "retrieval_seconds": round(time.perf_counter() - t1, 2),
                }
                if progress:  # one line per row, also when the output is a log file
                    tqdm.write(
                        f"{name} {size} {retrieval}: {row['n_chunks']} chunks in "
                        f"{row['chunking_seconds']:.0f} s, recall {row['recall']:.3f}, "
                        f"IoU {row['iou']:.3f}"
                    )
                log.info("%s", row)
                results.append(row)
    full_benchmark = set(corpora) == {
        "chatlogs",
        "finance",
        "pubmed",
        "state_of_the_union",
        "wikitexts",
    }
    write_outputs(results, Path(out_json), chroma_refs=full_benchmark, title=benchmark)
    return results


def _chunk(
    name: str,
    size: int,
    corpora: dict[str, str],
    resources,
    overlap: int,
    options: dict,
    progress: bool,
) -> tuple[dict, dict[str, list]]:
    """One chunker at one size over every corpus: its chunk statistics and the spans it cut, by
    corpus."""
    from ingest.chunkers import make_chunker

    chunker = make_chunker(name, resources, size, overlap, **options)
    t0 = time.perf_counter()
    spans = {}
    for cid, body in tqdm(corpora.items(), desc=f"chunk {name} {size}", disable=not progress):
        spans[cid] = chunker.split(body)
    seconds = time.perf_counter() - t0
    texts = [corpora[cid][s:e] for cid, ss in spans.items() for s, e in ss]
    for cid, ss in spans.items():  # every chunk is an exact span of its corpus
        for s, e in ss:
            assert 0 <= s < e <= len(corpora[cid]), (cid, s, e)
    n_tokens = [resources.embedder.count_tokens(t) for t in texts]
    return {
        "n_chunks": len(texts),
        "mean_chunk_tokens": round(sum(n_tokens) / max(1, len(texts)), 1),
        "chunking_seconds": round(seconds, 2),
    }, spans


COLUMNS = [
    ("benchmark", "benchmark", text),
    ("chunker", "chunker", text),
    ("chunk_size", "size", text),
    ("retrieval", "retrieval", text),
    ("mean_chunk_tokens", "mean tokens", num(0)),
    ("n_chunks", "chunks", text),
    ("recall", "recall %", pct),
    ("precision", "precision %", pct),
    ("precision_omega", "precision Ω %", pct),
    ("iou", "IoU %", pct),
    ("boundary_clarity", "boundary clarity", num(3)),
    ("chunking_seconds", "chunking s", num(1)),
    ("tokens_per_s", "tokens/s", num(0)),
]


def write_outputs(
    results: list[dict], out_json: Path, chroma_refs: bool = True, title: str = "Chroma benchmark"
) -> None:
    """OUT.json; for several results also OUT.md (table) and OUT.png (recall vs IoU, Chroma's
    points if comparable)."""
    out_json.parent.mkdir(parents=True, exist_ok=True)
    payload = results[0] if len(results) == 1 else results
    out_json.write_text(json.dumps(payload, indent=2) + "\n")
    if len(results) > 1:
        out_json.with_suffix(".md").write_text(markdown_table(results, COLUMNS))
        k = results[0]["k"]
        several_sizes = len({r["chunk_size"] for r in results}) > 1
        several_retrievals = len({r["retrieval"] for r in results}) > 1
        points = [
            {
                **r,
                "series": f"{r['chunker']}, {r['retrieval']}"
                if several_retrievals
                else r["chunker"],
            }
            for r in results
        ]
        grouped = several_sizes or several_retrievals
        scatter_plot(
            points,
            "iou",
            "recall",
            "chunk_size" if grouped else "chunker",
            out_json.with_suffix(".png"),
            series="series" if grouped else None,
            title=f"{title}, all-MiniLM-L6-v2, k={k}",
            xlabel="IoU (%)",
            ylabel=f"recall@{k} (%)",
            refs=[(n, iou, r) for n, r, iou in CHROMA_REFS] if chroma_refs and k == 5 else [],
        )


def _sizes(value: str) -> list[int]:
    try:
        sizes = [int(x) for x in value.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"chunk sizes must be integers, got {value!r}") from None
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"chunk sizes must be positive, got {value!r}")
    return sizes


def _retrievals(value: str) -> list[str]:
    names = [x.strip() for x in value.split(",") if x.strip()]
    if not names or any(n not in RETRIEVALS for n in names):
        raise argparse.ArgumentTypeError(
            f"retrieval must be {' or '.join(RETRIEVALS)} (comma-separated), got {value!r}"
        )
    return names


def add_eval_retrieval_args(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    from ingest.chunkers import CHUNKERS

    p.add_argument("--corpora", required=True, type=Path, help="folder of corpus files (.md/.txt)")
    p.add_argument(
        "--questions",
        required=True,
        type=Path,
        help="questions_df.csv (question, references, corpus_id)",
    )
    p.add_argument(
        "--chunker",
        default="all",
        help=f"one of {', '.join(CHUNKERS)}, a comma-separated list, or all",
    )
    p.add_argument(
        "--chunk-size",
        type=_sizes,
        default=None,
        help="target chunk size in embedder wordpieces, or a comma-separated list to sweep",
    )
    p.add_argument("--k", type=int, default=5, help="chunks retrieved per question")
    p.add_argument(
        "--retrieval",
        type=_retrievals,
        default=None,
        help="dense, hybrid (dense fused with BM25), or both comma-separated; "
        "default: KVRAG_RETRIEVAL",
    )
    p.add_argument(
        "--json",
        dest="out_json",
        required=True,
        type=Path,
        help="output JSON (OUT.md, OUT.png beside it)",
    )
    p.add_argument(
        "--boundary-pairs",
        type=int,
        default=32,
        help="adjacent chunk pairs sampled for boundary clarity (0: skip)",
    )
    p.add_argument(
        "--only",
        type=lambda v: [x.strip() for x in v.split(",") if x.strip()],
        default=None,
        help="comma-separated corpus file stems: only these corpora and their questions",
    )
    p.add_argument("--no-progress", action="store_true")
    return p


def cmd_eval_retrieval(args: argparse.Namespace, settings=None) -> int:
    from ingest.chunkers import CHUNKERS

    settings = settings or Settings()
    names = (
        list(CHUNKERS)
        if args.chunker == "all"
        else [c.strip() for c in args.chunker.split(",") if c.strip()]
    )
    for n in names:
        if n not in CHUNKERS:
            raise SystemExit(f"unknown chunker {n!r}; choose from {', '.join(CHUNKERS)} or all")
    results = run_retrieval_eval(
        args.corpora,
        args.questions,
        names,
        args.chunk_size or [settings.chunk_size],
        args.k,
        args.out_json,
        settings,
        progress=not args.no_progress,
        boundary_pairs=args.boundary_pairs,
        retrievals=args.retrieval,
        only=args.only,
    )
    print(markdown_table(results, COLUMNS))
    return 0
