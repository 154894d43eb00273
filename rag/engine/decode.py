"""The decode loop: one token per forward pass, or a Lookahead draft tree verified in one pass.

Both run on the engine's decode step over the request's preallocated KV buffer; nothing
grows. After a blend, a repair job (rag.engine.repair) may recompute a slice of the stale K/V
before each step until the cache is exact; Lookahead drafts only once it is. The loop stops
on a stop token or string, at max_new_tokens, when the client goes away (`on_text` returns
False), or when the buffer is full ("context").
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from rag.engine.decode_step import DecodeStep
from rag.engine.lookahead import AnswerMemory, Lookahead, compact
from rag.engine.native_step import NativeDecodeStep
from rag.engine.repair import RepairJob
from rag.engine.sampling import sample
from rag.engine.stream_text import StopStream
from rag.model.kv_cache import KVCache
from rag.model.tokenizer import ChatTokenizer
from rag.model.transformer import Transformer


@dataclass
class DecodeResult:
    ids: list[int]
    text: str
    finish: str  # "stop", "length", "cancelled" or "context"
    first_token_at: float  # time.perf_counter() when the first token was chosen
    steps: int = 0  # forward passes
    accepted: int = 0  # draft tokens accepted
    repaired: int = 0  # stale slots recomputed while decoding


class Output:
    """Collects tokens and applies the stop rules, one token at a time."""

    def __init__(
        self,
        tokenizer: ChatTokenizer,
        max_new_tokens: int,
        stop: list[str] | None,
        on_text: Callable[[str], bool | None] | None,
        ignore_eos: bool = False,
    ):
        self.tok = tokenizer
        self.stop_ids = frozenset() if ignore_eos else tokenizer.stop_ids
        self.max_new = max_new_tokens
        self.stream = StopStream(stop)
        self.on_text = on_text
        # Without a listener or stop strings the text is decoded once, at the end.
        self.live = bool(self.stream.stops) or on_text is not None
        self.ids: list[int] = []
        self.finish = "length"

    def push(self, token: int) -> bool:
        """Add a token; False when generation must end (finish says why)."""
        if token in self.stop_ids:
            self.finish = "stop"
            return False
        self.ids.append(token)
        if self.live:
            delta = self.stream.update(self.tok.decode(self.ids))
            if self.stream.stopped:
                self.finish = "stop"
            if delta and self.on_text is not None and self.on_text(delta) is False:
                self.finish = "cancelled"
                return False
            if self.finish == "stop":
                return False
        return len(self.ids) < self.max_new

    def close(self) -> None:
        """Send the text held back for a stop string that never came."""
        delta = self.stream.flush()
        if delta and self.on_text is not None and self.finish != "cancelled":
            self.on_text(delta)

    def final_text(self) -> str:
        return self.stream.text if self.live else self.tok.decode(self.ids)


@torch.inference_mode()
def decode(
    model: Transformer,
    step: DecodeStep | NativeDecodeStep,
    tokenizer: ChatTokenizer,
    cache: KVCache,
    logits: torch.Tensor,
    start: int,
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_p: float = 1.0,
    stop: list[str] | None = None,
    on_text: Callable[[str], bool | None] | None = None,
    seed: int | None = None,
    drafter: Lookahead | None = None,
    ignore_eos: bool = False,
    repair: RepairJob | None = None,
    repair_tokens: int = 0,
) -> DecodeResult:
    """Generate from next-token `logits` [V] with slots [0, start) of `cache` filled.

    With `repair`, `repair_tokens` stale slots are recomputed before each step until the job
    is done; meanwhile every step is a plain one, so the schedule (and a greedy answer) does not
    depend on what Lookahead would have accepted."""
    gen = torch.Generator(model.device).manual_seed(seed) if seed is not None else None
    out = Output(tokenizer, max_new_tokens, stop, on_text, ignore_eos)
    res = DecodeResult([], "", "length", 0.0)
    if max_new_tokens <= 0:
        return res
    tok = sample(logits, temperature, top_p, gen)
    res.first_token_at = time.perf_counter()
    pending: list[int] = []  # tokens chosen but not yet emitted (accepted drafts)
    pos = start
    ids = torch.empty(1, dtype=torch.long, device=model.device)
    while True:
        if not out.push(tok):
            break
        if drafter is not None:
            drafter.commit(tok)
        if pending:
            tok = pending.pop(0)
            continue
        if pos >= cache.max_len:
            out.finish = "context"
            break
        if repair is not None and repair.step(repair_tokens):
            res.repaired, repair = repair.repaired, None
        # Drafts past the tokens still wanted would be wasted rows.
        room = min(cache.max_len - pos, max_new_tokens - len(out.ids))
        drafting = drafter is not None and repair is None
        tree = drafter.draft(tok, room) if drafting else None
        res.steps += 1
        if tree is None or len(tree) == 1:
            ids[0] = tok
            if repair is not None:
                repair.append(tok)
            tok = sample(step(ids, cache, pos, base=start)[0], temperature, top_p, gen)
            pos += 1
            continue
        tree_ids = torch.tensor(tree.tokens, device=model.device)
        positions = torch.tensor(tree.depths, device=model.device) + pos
        rows = step(
            tree_ids,
            cache,
            pos,
            positions=positions,
            mask=tree.mask(pos).to(model.device),
            base=start,
            all_logits=True,
        )
        if temperature <= 0:
            greedy = rows.argmax(-1).tolist()
            path, new = tree.walk(greedy.__getitem__)
        else:
            path, new = tree.walk(lambda i, rows=rows: sample(rows[i], temperature, top_p, gen))
        compact(cache, pos, path)
        pos += len(path)
        cache.length = pos
        res.accepted += len(path) - 1
        tok, pending = new[0], new[1:]
    cache.length = min(cache.length, pos)
    if repair is not None:  # stopped before the cache was exact
        res.repaired = repair.repaired
    out.close()
    res.ids, res.text, res.finish = out.ids, out.final_text(), out.finish
    return res


def new_drafter(
    context: Sequence[int],
    temperature: float,
    lookahead: bool | None,
    step: DecodeStep | NativeDecodeStep,
    device: torch.device,
    memory: AnswerMemory | None = None,
) -> Lookahead | None:
    """Lookahead is on by default for greedy decoding where it is lossless: on CPU, where the
    decode step makes a draft row bitwise equal to a plain step. On CUDA the matmul kernels
    change with the row count, so a bf16 draft row can differ in the last bit and flip a
    near-tie: there, and for sampling, only when asked. The tree's size is the step's own
    (`draft_budget`): what a row costs differs."""
    on = (temperature <= 0 and device.type == "cpu") if lookahead is None else lookahead
    return Lookahead(context, memory=memory, budget=step.draft_budget) if on else None
