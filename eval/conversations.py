"""`kvrag eval conversations`: does retrieval follow the conversation, and what does a follow-up
turn cost?

The set is eval/conversations.json: two-turn conversations over samples/ and the COVID-QA dev
slice, each follow-up naming its subject only through the first turn. Both sources are
ingested into a work directory (doc ids samples/<file> and covidqa/<document_id>.txt) and
every turn is retrieved for with each method of rag.conversation (last message alone, the
latest user messages joined, a query the model rewrites). A turn hits at k when one of its
top-k chunks comes from a gold document (doc hit) and, stricter, also holds the answer text.

With `--ttft N`, the first turn and its follow-up are answered in blend at the same k (the
follow-up carrying the first turn and the model's own answer), N rounds after a warm-up round,
and the follow-up / first-turn TTFT ratio is reported.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tqdm import tqdm

from rag.config import Settings
from rag.conversation import QUERY_METHODS, Conversation, Turn
from rag.service import RAGService

REPO = Path(__file__).resolve().parents[1]
CONVERSATIONS = REPO / "eval" / "conversations.json"
KS = (1, 2, 4)


def _norm(text: str) -> str:
    return re.sub(r"\s+", " ", text).lower()


def load_set(path: Path = CONVERSATIONS) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def write_corpus(spec: dict, root: Path, base: Path = REPO) -> list[str]:
    """The set's documents as files under root (samples/<file>, covidqa/<id>.txt)."""
    src = spec["sources"]
    samples = root / "samples"
    samples.mkdir(parents=True, exist_ok=True)
    for f in sorted((base / src["samples"]).glob("*.md")):
        shutil.copyfile(f, samples / f.name)
    covid = root / "covidqa"
    covid.mkdir(exist_ok=True)
    data = json.loads((base / src["covidqa"]).read_text(encoding="utf-8"))["data"]
    for article in data:
        para = article["paragraphs"][0]
        target = covid / f"{para['document_id']}.txt"
        if not target.exists() or target.read_text(encoding="utf-8") != para["context"]:
            target.write_text(para["context"], encoding="utf-8")
    return ["samples", "covidqa"]


@contextmanager
def _cwd(path: Path) -> Iterator[None]:
    old = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


def prepare(settings: Settings, work: Path, chunker: str | None, spec: dict) -> Settings:
    """Ingest the set's documents into work/ (unchanged files are skipped on a rerun)."""
    from ingest.job import ingest

    work = work.resolve()
    settings = settings.model_copy(update={"data_dir": work / "data"})
    roots = write_corpus(spec, work / "docs")
    with _cwd(work / "docs"):
        summary = ingest(roots, settings, chunker=chunker, progress=True)
    print(summary.describe())
    return settings


def conversation_at(turns: list[dict], i: int, answers: list[str] | None = None) -> Conversation:
    """Turn i of a conversation as the chat API would see it (earlier turns with answers)."""
    earlier: list[Turn] = []
    for j, t in enumerate(turns[:i]):
        earlier.append(Turn("user", t["user"]))
        earlier.append(Turn("assistant", answers[j] if answers else t.get("assistant", "")))
    return Conversation(turns[i]["user"], [t for t in earlier if t.text])


def hits_of(rag: RAGService, query: str, turn: dict, k: int) -> tuple[list[bool], list[bool]]:
    """For each k in KS (up to k): doc hit and answer hit."""
    found = rag.retrieve(query, k)
    docs, answer = set(turn["docs"]), _norm(turn["answer"])
    doc_hit = [h.chunk.doc_id in docs for h in found]
    ans_hit = [d and answer in _norm(h.chunk.text) for d, h in zip(doc_hit, found, strict=True)]
    return (
        [any(doc_hit[:n]) for n in KS if n <= k],
        [any(ans_hit[:n]) for n in KS if n <= k],
    )


def eval_retrieval(rag: RAGService, spec: dict, methods: list[str], k: int) -> dict:
    ks = [n for n in KS if n <= k]
    rows: list[dict] = []
    convs = spec["conversations"]
    for conv in tqdm(convs, desc="conversations", unit="conv"):
        for i, turn in enumerate(conv["turns"]):
            c = conversation_at(conv["turns"], i)
            for method in methods:
                query = rag.retrieval_query(c, method)
                doc, ans = hits_of(rag, query, turn, k)
                rows.append(
                    {
                        "conversation": conv["id"],
                        "turn": "first" if i == 0 else "follow_up",
                        "method": method,
                        "query": query,
                        "doc_hit": doc,
                        "answer_hit": ans,
                    }
                )
    summary: dict = {}
    for method in methods:
        summary[method] = {}
        for turn in ("first", "follow_up"):
            mine = [r for r in rows if r["method"] == method and r["turn"] == turn]
            summary[method][turn] = {
                f"{kind}@{n}": round(100 * sum(r[kind][j] for r in mine) / len(mine), 1)
                for kind in ("doc_hit", "answer_hit")
                for j, n in enumerate(ks)
            }
            summary[method][turn]["n"] = len(mine)
    return {"summary": summary, "rows": rows}


def eval_ttft(rag: RAGService, spec: dict, k: int, rounds: int, max_tokens: int) -> dict:
    """First turn vs follow-up TTFT in blend at the same k (warm-up round not counted)."""
    from rag.engine.request import GenerationParams

    params = GenerationParams(max_new_tokens=max_tokens)
    first_ms: list[float] = []
    follow_ms: list[float] = []
    history_tokens: list[int] = []
    computed: dict[str, list[int]] = {"first": [], "follow_up": []}
    convs = spec["conversations"]
    bar = tqdm(total=(rounds + 1) * len(convs), desc="ttft", unit="conv")
    for r in range(rounds + 1):
        for conv in convs:
            turns = conv["turns"]
            a1 = rag.answer(turns[0]["user"], k=k, mode="blend", params=params)
            c2 = conversation_at(turns, 1, [a1.text])
            a2 = rag.answer(c2.question, k=k, mode="blend", params=params, conversation=c2)
            if r:  # round 0 computes and stores the chunks both turns use
                first_ms.append(a1.request.timings_ms["ttft"])
                follow_ms.append(a2.request.timings_ms["ttft"])
                history_tokens.append(a2.request.prompt_tokens - a1.request.prompt_tokens)
                computed["first"].append(a1.request.computed_tokens)
                computed["follow_up"].append(a2.request.computed_tokens)
            bar.update()
    bar.close()
    ratios = [f / s for f, s in zip(follow_ms, first_ms, strict=True)]
    return {
        "k": k,
        "rounds": rounds,
        "pairs": len(ratios),
        "first_ttft_ms_p50": round(statistics.median(first_ms), 1),
        "follow_up_ttft_ms_p50": round(statistics.median(follow_ms), 1),
        "ratio_p50": round(statistics.median(ratios), 3),
        "ratio_of_means": round(statistics.fmean(follow_ms) / statistics.fmean(first_ms), 3),
        "extra_prompt_tokens_p50": statistics.median(history_tokens),
        "computed_tokens_p50": {t: statistics.median(v) for t, v in computed.items()},
    }


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = result["retrieval"]["summary"]
    methods = list(summary)
    k = result["k"]
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.38
    for j, turn in enumerate(("first", "follow_up")):
        vals = [summary[m][turn][f"doc_hit@{k}"] for m in methods]
        xs = [i + (j - 0.5) * width for i in range(len(methods))]
        bars = ax.bar(xs, vals, width, label=turn.replace("_", "-") + " turn")
        ax.bar_label(bars, fmt="%.0f", fontsize=8)
    ax.set_xticks(range(len(methods)), methods)
    ax.set_ylabel(f"doc hit@{k} (%)")
    ax.set_ylim(0, 120)
    n = summary[methods[0]]["follow_up"]["n"]
    ax.set_title(f"Retrieval per query method, {n} two-turn conversations")
    ax.legend(loc="upper center", ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def add_eval_conversations_args(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--set", type=Path, default=CONVERSATIONS, help="conversations JSON")
    p.add_argument(
        "--work-dir",
        type=Path,
        default=Path("kvrag_data/eval_conversations"),
        help="where the set's documents are written and indexed (reused across runs)",
    )
    p.add_argument("--chunker", default=None, help="ingestion chunker (default: KVRAG_CHUNKER)")
    p.add_argument("--k", type=int, default=4, help="chunks retrieved per turn")
    p.add_argument(
        "--methods", default=",".join(QUERY_METHODS), help="comma-separated query methods"
    )
    p.add_argument("--ttft", type=int, default=0, help="rounds of first vs follow-up TTFT")
    p.add_argument("--max-tokens", type=int, default=24, help="answer length in the TTFT part")
    p.add_argument("--json", dest="out_json", type=Path, default=None)
    p.add_argument("--plot", type=Path, default=None, help="PNG of hit@k per method")
    return p


def cmd_eval_conversations(args: argparse.Namespace, settings: Settings) -> int:
    spec = load_set(args.set)
    settings = prepare(settings, args.work_dir, args.chunker, spec)
    rag = RAGService(settings)
    methods = [m for m in args.methods.split(",") if m]
    result = {
        "set": str(args.set),
        "conversations": len(spec["conversations"]),
        "k": args.k,
        "retrieval_mode": settings.retrieval,
        "default_method": settings.conversation_query,
        "retrieval": eval_retrieval(rag, spec, methods, args.k),
    }
    if args.ttft:
        result["ttft"] = eval_ttft(rag, spec, args.k, args.ttft, args.max_tokens)
    summary = {"summary": result["retrieval"]["summary"], "ttft": result.get("ttft")}
    print(json.dumps(summary, indent=2))
    if args.out_json:
        args.out_json.write_text(json.dumps(result, indent=2, ensure_ascii=False))
    if args.plot:
        plot(result, args.plot)
    return 0
