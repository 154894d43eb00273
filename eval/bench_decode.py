"""`kvrag bench decode`: decoding speed on real RAG prompts, three ways, in one run.

For each question the top chunks of its document(s) (all-MiniLM-L6-v2, up to a
context budget) form the prompt, which is prefilled once. Then, interleaved
per question so machine load hits all three alike:

- hf: transformers' own `generate(do_sample=False)` on the same model directory,
  dtype and prompt ids;
- lean: kvrag's decode loop, one token per forward pass;
- lookahead: the same loop with Lookahead drafting from the prompt's n-grams and the
  earlier questions' answers (rag.engine.lookahead.AnswerMemory, as the engine keeps them).

Speed is decode tokens per second after the first token (prefill excluded):
(tokens - 1) / (time of the last token - time of the first), summed over
questions. `identical_outputs` says whether lookahead's greedy tokens equal the
lean loop's for every question.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from eval.samples import SAMPLE_QUESTIONS, SAMPLES
from rag.config import Settings
from rag.engine.lookahead import NgramTrie

log = logging.getLogger(__name__)


@dataclass
class Case:
    question: str
    docs: list[str]  # the texts its chunks are retrieved from


def load_cases(dataset: Path | str | None, n: int) -> list[Case]:
    """Sample documents (a folder of .md/.txt) with their questions, or a SQuAD-format JSON file.

    SQuAD questions retrieve from their own article; questions are taken
    round-robin across articles so a few of them cover several documents.
    """
    path = Path(dataset) if dataset else SAMPLES
    if path.is_dir():
        docs = [
            p.read_text(encoding="utf-8")
            for p in sorted(path.iterdir())
            if p.suffix in {".md", ".txt"}
        ]
        if not docs:
            raise FileNotFoundError(f"no .md or .txt documents in {path}")
        return [Case(q, docs) for q in SAMPLE_QUESTIONS[:n]]
    data = json.loads(path.read_text(encoding="utf-8"))["data"]
    per_doc = [
        [(q["question"], p["context"]) for p in art["paragraphs"] for q in p["qas"]] for art in data
    ]
    cases: list[Case] = []
    for i in range(max(len(x) for x in per_doc)):
        for qs in per_doc:
            if i < len(qs) and len(cases) < n:
                cases.append(Case(qs[i][0], [qs[i][1]]))
    return cases


def split_chunks(text: str, count_tokens, max_tokens: int) -> list[str]:
    """Paragraphs, split at sentence ends when too long, packed up to max_tokens."""
    pieces: list[str] = []
    for para in re.split(r"\n\s*\n", text):
        para = para.strip()
        if not para:
            continue
        pieces += [para] if count_tokens(para) <= max_tokens else re.split(r"(?<=[.!?])\s+", para)
    chunks, cur, cur_n = [], [], 0
    for p in pieces:
        n = count_tokens(p)
        if cur and cur_n + n > max_tokens:
            chunks.append(" ".join(cur))
            cur, cur_n = [], 0
        cur.append(p)
        cur_n += n
    if cur:
        chunks.append(" ".join(cur))
    return chunks


def retrieve(
    embedder, case: Case, count_tokens, context_tokens: int, chunk_tokens: int
) -> list[str]:
    """Top chunks by cosine similarity until the context budget is spent (best first)."""
    chunks = [c for d in case.docs for c in split_chunks(d, count_tokens, chunk_tokens)]
    sims = embedder.embed(chunks) @ embedder.embed([case.question])[0]
    out, used = [], 0
    for i in np.argsort(-sims, kind="stable"):
        n = count_tokens(chunks[i])
        if used + n > context_tokens:
            break
        out.append(chunks[i])
        used += n
    return out


class _Clock:
    """A logits processor that only notes when each step's logits arrive."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def __call__(self, input_ids, scores):
        self.times.append(time.perf_counter())
        return scores


def hf_generate(
    hf, ids: list[int], max_tokens: int, stop_ids, pad_id: int
) -> tuple[list[int], int, float]:
    """transformers' greedy generate(); returns (new ids, tokens after the first, their seconds)."""
    from transformers import LogitsProcessorList

    clock = _Clock()
    x = torch.tensor([ids], device=hf.device)
    with torch.inference_mode():
        out = hf.generate(
            x,
            attention_mask=torch.ones_like(x),
            max_new_tokens=max_tokens,
            do_sample=False,
            temperature=None,
            top_p=None,
            top_k=None,
            eos_token_id=sorted(stop_ids),
            pad_token_id=pad_id,
            logits_processor=LogitsProcessorList([clock]),
        )
    new = out[0, len(ids) :].tolist()
    while new and new[-1] in stop_ids:
        new.pop()
    return new, len(clock.times) - 1, clock.times[-1] - clock.times[0]


def trie_ceiling(
    context: list[int],
    answer: list[int],
    budget: int,
    max_prefix: int = 4,
    earlier: Iterable[list[int]] = (),
) -> tuple[int, int]:
    """(forward passes, tokens after the first) of an oracle drafter: at each step it drafts, from
    the same n-grams as Lookahead (the context, the earlier answers and the answer so far,
    matched on its last 1..max_prefix tokens), the longest run of up to `budget` tokens that the
    model will produce. No choice among the trie's branches does better, so this bounds
    Lookahead's tokens a step."""
    trie = NgramTrie(max_prefix + budget)
    trie.insert(context)
    for past in earlier:
        trie.insert(past)
    stream, text = trie.stream(), list(context)
    steps = i = 0
    for t in answer[:1]:
        stream.push(t)
        text.append(t)
    while i < len(answer) - 1:
        best = 0
        for p in range(1, max_prefix + 1):
            node, n = trie.find(text[-p:]), 0
            if node is None:
                break
            while n < budget and i + 1 + n < len(answer) and answer[i + 1 + n] in node.kids:
                node = node.kids[answer[i + 1 + n]]
                n += 1
            best = max(best, n)
        for t in answer[i + 1 : i + 2 + best]:
            stream.push(t)
            text.append(t)
        i += best + 1
        steps += 1
    return steps, max(0, len(answer) - 1)


def _after_first(r) -> int:
    """Tokens produced after the first one, counting a final stop token as HF does."""
    return len(r.ids) if r.finish == "stop" else max(0, len(r.ids) - 1)


def run_decode_bench(
    dataset: Path | str | None = None,
    questions: int = 8,
    max_tokens: int = 64,
    *,
    context_tokens: int = 2048,
    chunk_tokens: int = 256,
    settings=None,
    threads: int = 0,
    progress: bool = True,
) -> dict:
    from transformers import AutoModelForCausalLM

    from rag.engine.decode import decode
    from rag.engine.engine import Engine
    from rag.engine.lookahead import AnswerMemory, Lookahead
    from rag.engine.native_step import NativeDecodeStep
    from rag.index.embedder import Embedder
    from rag.model.loader import load_model

    s = settings or Settings()
    if threads:
        torch.set_num_threads(threads)
    lm = load_model(s.model, s.models_dir, s.torch_dtype, s.torch_device)
    engine = Engine(lm, s.system_prompt, max_context=s.max_context_tokens)
    tok = lm.tokenizer
    count = lambda text: len(tok.encode_text(text))  # noqa: E731
    embedder = Embedder(s.embedder)
    hf = (
        AutoModelForCausalLM.from_pretrained(lm.path, dtype=lm.model.dtype)
        .to(lm.model.device)
        .eval()
    )
    pad = tok.hf.pad_token_id if tok.hf.pad_token_id is not None else min(tok.stop_ids)
    step = engine.step
    cases = load_cases(dataset, questions)
    rows = []
    tot = {"hf": [0, 0.0], "lean": [0, 0.0], "lookahead": [0, 0.0]}
    steps = accepted = ceiling_steps = ceiling_tokens = 0
    memory = AnswerMemory()  # the earlier questions' answers, as the engine keeps them
    for qi, case in enumerate(cases):
        prompt = engine.prompts.build(
            retrieve(embedder, case, count, context_tokens, chunk_tokens), case.question
        )
        ids = prompt.ids()
        pre = engine.prefill(prompt, "full", extra_slots=max_tokens)
        if qi == 0:  # warm-up: first calls allocate and pick kernels
            decode(lm.model, step, tok, pre.cache, pre.logits[-1], len(ids), 4)
            hf_generate(hf, ids, 2, tok.stop_ids, pad)
        hf_ids, hf_n, hf_s = hf_generate(hf, ids, max_tokens, tok.stop_ids, pad)
        res = {}
        for name in ("lean", "lookahead"):
            pre.cache.length = len(ids)
            drafter = (
                Lookahead(ids[len(prompt.header) :], memory=memory, budget=step.draft_budget)
                if name == "lookahead"
                else None
            )
            r = decode(
                lm.model,
                step,
                tok,
                pre.cache,
                pre.logits[-1],
                len(ids),
                max_tokens,
                drafter=drafter,
            )
            res[name] = (r, time.perf_counter() - r.first_token_at)
        tot["hf"][0] += hf_n
        tot["hf"][1] += hf_s
        for name in ("lean", "lookahead"):
            tot[name][0] += _after_first(res[name][0])
            tot[name][1] += res[name][1]
        la = res["lookahead"][0]
        steps += la.steps
        accepted += la.accepted
        lean = res["lean"][0]
        c_steps, c_tokens = trie_ceiling(
            ids[len(prompt.header) :],
            lean.ids + [-1] * (lean.finish == "stop"),
            step.draft_budget,
            earlier=memory.answers,
        )
        memory.add(la.ids)
        ceiling_steps += c_steps
        ceiling_tokens += c_tokens
        row = {
            "question": case.question,
            "context_tokens": prompt.context_end - len(prompt.header),
            "prompt_tokens": len(ids),
            "hf_tokens": len(hf_ids),
            "lean_tokens": len(res["lean"][0].ids),
            "hf_s": round(hf_s, 3),
            "lean_s": round(res["lean"][1], 3),
            "lookahead_s": round(res["lookahead"][1], 3),
            "lookahead_steps": la.steps,
            "lookahead_accepted": la.accepted,
            "identical": la.ids == res["lean"][0].ids,
            "hf_identical": hf_ids == res["lean"][0].ids,
            "answer": res["lean"][0].text.strip(),
        }
        rows.append(row)
        if progress:
            log.warning(
                "[%d/%d] %s",
                qi + 1,
                len(cases),
                json.dumps({k: v for k, v in row.items() if k != "answer"}),
            )
    rate = {k: (n / sec if sec > 0 else 0.0) for k, (n, sec) in tot.items()}
    return {
        "context_tokens": round(sum(r["context_tokens"] for r in rows) / len(rows)),
        "hf_tok_s": round(rate["hf"], 2),
        "lean_tok_s": round(rate["lean"], 2),
        "lookahead_tok_s": round(rate["lookahead"], 2),
        "mean_accepted_per_step": round((steps + accepted) / steps, 3) if steps else 0.0,
        "ceiling_accepted_per_step": round(ceiling_tokens / ceiling_steps, 3)
        if ceiling_steps
        else 0.0,
        "identical_outputs": all(r["identical"] for r in rows),
        "lean_over_hf": round(rate["lean"] / rate["hf"], 2) if rate["hf"] else None,
        "lookahead_over_lean": round(rate["lookahead"] / rate["lean"], 2) if rate["lean"] else None,
        "hf_identical_outputs": sum(r["hf_identical"] for r in rows),
        "questions": len(rows),
        "max_tokens": max_tokens,
        "dataset": str(dataset or SAMPLES),
        "dtype": str(lm.model.dtype).removeprefix("torch."),
        "threads": torch.get_num_threads(),
        "decode_step": "native" if isinstance(step, NativeDecodeStep) else "pytorch",
        "draft_budget": step.draft_budget,
        "per_question": rows,
    }


def add_bench_decode_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--dataset",
        type=Path,
        default=None,
        help="a folder of documents (default: the samples) or a SQuAD-format JSON file",
    )
    parser.add_argument("--questions", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument(
        "--context-tokens", type=int, default=2048, help="retrieved context budget per prompt"
    )
    parser.add_argument(
        "--threads", type=int, default=0, help="torch threads (0 = torch's default)"
    )
    parser.add_argument("--json", type=Path, default=None, metavar="OUT.json")


def cmd_bench_decode(args: argparse.Namespace, settings: Settings) -> int:
    out = run_decode_bench(
        args.dataset,
        args.questions,
        args.max_tokens,
        context_tokens=args.context_tokens,
        settings=settings,
        threads=args.threads,
    )
    summary = {k: v for k, v in out.items() if k != "per_question"}
    print(json.dumps(summary, indent=2))
    if args.json:
        args.json.write_text(json.dumps(out, indent=2, ensure_ascii=False))
    return 0
