"""Continuous batching: the running requests decode together, new ones prefill in between.

A request moves waiting -> prefilling -> decoding -> done. The engine's step loop (one thread)
repeats nano-vllm's step: schedule (admit prefilled requests, at most `max_batch` running),
run (one decode step for every running request: one pass over the weights, each row over its
own request's K/V), postprocess (sample, stop rules, finish and free). Between steps it lends
the prefill turn to the oldest prefilling request for a slice of time: what the target gap
between two tokens leaves after the step.

A request's own thread (the caller of `run`) does everything that is not the batch's compute:
retrieval before it, its chunk K/V loads, waiting for a buffer within the K/V budget. Its
prefill runs on that thread too, but only while it holds the turn: the forward calls back
before every layer (`between_layers`), and there the request gives the turn back once its
slice is spent and waits for the next. So the model only ever computes one thing at a time,
and a running stream waits at most a slice (plus a layer) for its next token.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import torch

from rag.engine.batch_row import BatchRow
from rag.engine.decode import DecodeResult, Output, new_drafter
from rag.engine.engine import Engine, Prefill
from rag.engine.lookahead import Lookahead, compact
from rag.engine.prompt import Prompt
from rag.engine.repair import RepairJob, blend_repair
from rag.engine.request import Request
from rag.engine.sampling import sample
from rag.model.kv_cache import KVCache
from rag.model.transformer import between_layers

# The gap a running stream should see between two tokens. A prefill's slice between two decode
# steps is what the step leaves of it (rounded up to a layer), so the slice shrinks as the
# batch, and its step, grows.
TOKEN_GAP_MS = 120.0
MIN_SLICE_MS = 20.0  # below this a prefill would crawl behind a large batch
# Lookahead drafts only while the batch is this small: above it, the rows a draft tree adds
# cost more than the tokens it saves (eval/RESULTS_load.md).
DRAFT_MAX_BATCH = 1
REPAIR_SLICE_TOKENS = 256  # a repair's forward at a time (its layers are where turns change)


@dataclass
class Sequence:
    """A request in the decode batch."""

    request: Request
    cache: KVCache
    base: int  # the prompt's length: slots past it are the answer's
    room: int  # tokens it may generate
    out: Output
    generator: torch.Generator | None
    drafter: Lookahead | None
    pos: int = 0  # the slot of the next input token
    token: int = 0  # the next input token
    result: DecodeResult = field(default_factory=lambda: DecodeResult([], "", "length", 0.0))
    error: BaseException | None = None
    finished: threading.Event = field(default_factory=threading.Event)


class Scheduler:
    def __init__(
        self,
        engine: Engine,
        max_batch: int = 8,
        token_gap_ms: float = TOKEN_GAP_MS,
        draft_max_batch: int = DRAFT_MAX_BATCH,
    ):
        self.engine = engine
        self.max_batch = max_batch
        self.token_gap_s = token_gap_ms / 1000
        self.slice_s = self.token_gap_s  # set per turn from the last steps' time
        self._step_s = 0.0  # a decode step's time, smoothed over the last steps
        self.draft_max_batch = draft_max_batch
        self.running: list[Sequence] = []
        self._ready: deque[Sequence] = deque()  # prefilled, waiting for a row in the batch
        self._cond = threading.Condition()
        self._tickets = itertools.count()
        self._want: set[int] = set()  # prefilling requests waiting for the turn
        self._holder: int | None = None  # the request that holds it
        self._lent_at = 0.0
        self._bounded = False  # the turn ends after a slice (others are decoding)
        self._memory = threading.Lock()  # the engine's answer memory (Lookahead's drafts)
        self._closed = False
        self.steps = 0  # decode steps run (batched or not)
        self.peak_batch = 0  # the most requests one step decoded
        self._thread = threading.Thread(target=self._loop, name="kvrag-step", daemon=True)
        self._thread.start()

    # -- a request's thread -------------------------------------------------------
    def run(self, request: Request, prompt: Prompt) -> Request:
        """Prefill `request` (in slices between decode steps), decode it in the batch; fills it
        with the answer as Engine.generate does."""
        eng, p = self.engine, request.params
        ticket = next(self._tickets)
        room = eng.room(request, prompt)
        t0 = time.perf_counter()
        pre: Prefill | None = None
        try:
            with between_layers(lambda: self._pace(ticket)):
                blended = request.mode != "full" and prompt.chunks
                # Loads (and any missing chunk, computed in turns) before the buffer is held.
                kvs = list(eng.chunk_kvs(prompt, request)) if blended else None
                self._give_turn_back(ticket)
                eng.check_fits(prompt)
                cache = eng.new_cache(len(prompt) + room, wait=True)
                try:
                    self._pace(ticket)  # take the turn: stitching is compute too
                    # Only the last position's logits: the first token is all that uses them.
                    args = (prompt, request.mode, request.ratio, kvs, room, request.gradual, cache)
                    pre = eng.prefill(*args, logit_rows=1)
                except BaseException:
                    eng.release(cache)
                    raise
            with self._memory:
                drafter = new_drafter(
                    prompt.ids()[len(prompt.header) :],
                    p.temperature,
                    p.lookahead,
                    eng.step,
                    eng.model.device,
                    eng.answers,
                )
        finally:
            self._give_turn_back(ticket)
        t_decode = request.mark("prefill", t0)
        eng.record_prefill(request, prompt, pre)
        seq = Sequence(
            request,
            pre.cache,
            len(prompt),
            room,
            Output(eng.tokenizer, room, p.stop, request.on_text, p.ignore_eos),
            torch.Generator(eng.model.device).manual_seed(p.seed) if p.seed is not None else None,
            drafter,
            pos=len(prompt),
        )
        if room > 0:
            first = sample(pre.logits[-1], p.temperature, p.top_p, seq.generator)
            seq.result.first_token_at = time.perf_counter()
            if self._emit(seq, [first]):
                if blended and request.repair:
                    self._repair(ticket, blend_repair(eng.model, seq.cache, prompt), request)
                with self._cond:
                    self._ready.append(seq)
                    self._cond.notify_all()
                seq.finished.wait()
        eng.release(seq.cache)
        if seq.error is not None:
            raise seq.error
        seq.out.close()  # the text held back for a stop string that never came
        r = seq.result
        r.ids, r.text, r.finish = seq.out.ids, seq.out.final_text(), seq.out.finish
        with self._memory:
            return eng.record_decode(request, r, room, t_decode, drafter is not None)

    def _repair(self, me: int, job: RepairJob | None, request: Request) -> None:
        """Make a blended request's K/V exact before its second token, in turns like a
        prefill: every step it decodes in the batch then reads exact K/V (rag.engine.repair)."""
        if job is None:
            return
        try:
            with between_layers(lambda: self._pace(me)):
                self._pace(me)
                while not job.step(REPAIR_SLICE_TOKENS):
                    pass
        finally:
            self._give_turn_back(me)
        request.repaired_tokens = job.repaired

    def _pace(self, me: int) -> None:
        """Before each prefill layer: hold the turn, giving it back once the slice is spent."""
        with self._cond:
            if self._holder == me:
                if not self._bounded or time.perf_counter() - self._lent_at < self.slice_s:
                    return
                self._holder = None
                self._cond.notify_all()
            self._want.add(me)
            self._cond.notify_all()
            self._cond.wait_for(lambda: self._holder == me)
            self._want.discard(me)

    def _give_turn_back(self, me: int) -> None:
        with self._cond:
            self._want.discard(me)
            if self._holder == me:
                self._holder = None
                self._cond.notify_all()

    # -- the step loop --------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(
                    lambda: self._closed or self._ready or self.running or self._want
                )
                if self._closed:
                    return
                while self._ready and len(self.running) < self.max_batch:  # schedule
                    self.running.append(self._ready.popleft())
                batch = list(self.running)
            if batch:
                self._step(batch)
            self._lend_turn()

    def _lend_turn(self) -> None:
        """Let the oldest prefilling request compute until it gives the turn back: a slice when
        others are decoding, else its whole prefill."""
        with self._cond:
            if not self._want:
                return
            self._holder = min(self._want)
            self._bounded = bool(self.running or self._ready)
            self.slice_s = max(MIN_SLICE_MS / 1000, self.token_gap_s - self._step_s)
            self._lent_at = time.perf_counter()
            self._cond.notify_all()
            self._cond.wait_for(lambda: self._holder is None)

    def _step(self, batch: list[Sequence]) -> None:
        """run + postprocess: one decode step for every running request."""
        t0 = time.perf_counter()
        try:
            self.steps += 1
            self.peak_batch = max(self.peak_batch, len(batch))
            if len(batch) <= self.draft_max_batch:
                for seq in batch:
                    self._single_step(seq)
                return
            rows = [BatchRow(s.token, s.cache, s.pos, s.base) for s in batch]
            logits = self.engine.step.batch(rows)
            for seq, row in zip(batch, logits, strict=True):
                seq.pos += 1
                seq.result.steps += 1
                p = seq.request.params
                self._advance(seq, [sample(row, p.temperature, p.top_p, seq.generator)])
        except Exception as e:  # the step itself failed: every row of it does
            for seq in batch:
                if not seq.finished.is_set():
                    seq.error = e
                    self._finish(seq)
        finally:
            dt = time.perf_counter() - t0
            self._step_s = dt if self._step_s == 0 else 0.7 * self._step_s + 0.3 * dt

    def _single_step(self, seq: Sequence) -> None:
        """A request decoding alone: a plain step, or a Lookahead draft tree (rag.engine.decode)."""
        step, device, p = self.engine.step, self.engine.model.device, seq.request.params
        room = min(seq.cache.max_len - seq.pos, seq.room - len(seq.out.ids))
        tree = seq.drafter.draft(seq.token, room) if seq.drafter is not None else None
        seq.result.steps += 1
        if tree is None or len(tree) == 1:
            row = step(torch.tensor([seq.token], device=device), seq.cache, seq.pos, base=seq.base)
            seq.pos += 1
            self._advance(seq, [sample(row[0], p.temperature, p.top_p, seq.generator)])
            return
        rows = step(
            torch.tensor(tree.tokens, device=device),
            seq.cache,
            seq.pos,
            positions=torch.tensor(tree.depths, device=device) + seq.pos,
            mask=tree.mask(seq.pos).to(device),
            base=seq.base,
            all_logits=True,
        )
        if p.temperature <= 0:
            path, new = tree.walk(rows.argmax(-1).tolist().__getitem__)
        else:
            path, new = tree.walk(lambda i: sample(rows[i], p.temperature, p.top_p, seq.generator))
        compact(seq.cache, seq.pos, path)
        seq.pos += len(path)
        seq.cache.length = seq.pos
        seq.result.accepted += len(path) - 1
        self._advance(seq, new)

    def _advance(self, seq: Sequence, tokens: list[int]) -> None:
        if not self._emit(seq, tokens):
            self._finish(seq)

    @staticmethod
    def _emit(seq: Sequence, tokens: list[int]) -> bool:
        """Push chosen tokens through the stop rules; False when the request is done."""
        for tok in tokens:
            if not seq.out.push(tok):
                return False
            if seq.drafter is not None:
                seq.drafter.commit(tok)
        seq.token = tokens[-1]
        if seq.pos >= seq.cache.max_len:
            seq.out.finish = "context"
            return False
        return True

    def _finish(self, seq: Sequence) -> None:
        """Out of the batch at once: its rows are free for the next step."""
        with self._cond:
            if seq in self.running:
                self.running.remove(seq)
        seq.finished.set()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
