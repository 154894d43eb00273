"""Lookahead drafting: an n-gram trie over this request's text, draft trees, tree masks,
verification.

After "Lookahead: An Inference Acceleration Framework for Large Language Model
with Lossless Generation Accuracy" (Zhao et al., 2023). RAG answers copy from
their context, so the n-grams of the retrieved chunks (and of the question and
the answer so far) predict the next tokens well; the service's recent answers
add the model's own phrasing (AnswerMemory), as the paper's global trie does.
Each step looks up the last few tokens in a trie, takes the most frequent
continuations as a draft tree, and the model checks the whole tree in one
forward pass: each node sees the committed context plus its own ancestors (tree
mask), at position committed length + depth. Walking the tree with the model's
own choice at every node (argmax, or a sample from the model's distribution)
accepts exactly the tokens plain decoding would have produced, so the output
does not change (for sampling the draws come from the model's distribution at
each node, so the distribution is the same too).
"""

from __future__ import annotations

import contextlib
import heapq
import threading
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from rag.model.kv_cache import KVCache


class _Node:
    __slots__ = ("count", "kids")

    def __init__(self) -> None:
        self.count = 0
        self.kids: dict[int, _Node] = {}


class NgramTrie:
    """Counts of every token n-gram (n <= depth) in the streams pushed into it."""

    def __init__(self, depth: int):
        self.depth = depth
        self.root = _Node()

    def insert(self, tokens: Sequence[int]) -> None:
        stream = self.stream()
        for t in tokens:
            stream.push(t)

    def remove(self, tokens: Sequence[int]) -> None:
        """Undo `insert(tokens)`: an n-gram's node goes when its count reaches 0 (its longer
        n-grams, counted no more often than it, have gone with it)."""
        for i in range(len(tokens)):
            node = self.root
            for t in tokens[i : i + self.depth]:
                kid = node.kids[t]
                kid.count -= 1
                if kid.count == 0:
                    del node.kids[t]
                    break
                node = kid

    def stream(self) -> TrieStream:
        return TrieStream(self)

    def find(self, prefix: Sequence[int]) -> _Node | None:
        node = self.root
        for t in prefix:
            node = node.kids.get(t)
            if node is None:
                return None
        return node


class TrieStream:
    """Appends tokens one by one, adding each new n-gram that ends at the new token."""

    def __init__(self, trie: NgramTrie):
        self.trie = trie
        self.open: list[_Node] = []  # nodes of the windows still shorter than depth

    def push(self, token: int) -> None:
        # Windows that start at this token and at each of the last depth-1 tokens.
        nodes = [self.trie.root, *self.open]
        grown = []
        for node in nodes:
            kid = node.kids.get(token)
            if kid is None:
                kid = node.kids[token] = _Node()
            kid.count += 1
            grown.append(kid)
        self.open = grown[: self.trie.depth - 1]


class AnswerMemory:
    """The n-grams of the last `size` answers, shared by the requests that follow: a model phrases
    its answers alike ("According to the text, ..."), where the retrieved chunks do not help.
    Drafts only decide speed, never the output, so what one request leaves here changes no
    other request's answer."""

    def __init__(
        self, size: int = 64, depth: int = 8
    ):  # depth: Lookahead's longest suffix + largest budget
        self.trie = NgramTrie(depth)
        self.answers: deque[list[int]] = deque()
        self.size = size
        self.lock = threading.Lock()  # drafts read the trie while another request may add to it

    def add(self, answer: Sequence[int]) -> None:
        with self.lock:
            self.answers.append(list(answer))
            self.trie.insert(answer)
            if len(self.answers) > self.size:
                self.trie.remove(self.answers.popleft())


def tree_tails(mask: torch.Tensor, base: int, start: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each tree row's keys past `base`, in the order a plain step would read them: the committed
    slots [base, start), then the row's own path (ancestors, itself) by depth. `mask` [T, start+T]
    as from DraftTree.mask. Returns (slots [T, start - base + T], padded with `start`; lengths [T]).
    Summed in this order a draft row's attention is bitwise a plain step's (the decode steps)."""
    t, mask = mask.shape[0], mask.cpu()
    n = start - base
    idx = torch.full((t, n + t), start, dtype=torch.long)
    lengths = torch.zeros(t, dtype=torch.long)
    idx[:, :n] = torch.arange(base, start)
    for j in range(t):
        own = (
            torch.nonzero(mask[j, start : start + t]).squeeze(1) + start
        )  # slot order = depth order
        idx[j, n : n + len(own)] = own
        lengths[j] = n + len(own)
    return idx, lengths


@dataclass
class DraftTree:
    """Node 0 is the root (the token being fed now); nodes in depth-first order, likeliest first."""

    tokens: list[int]
    parents: list[int]
    depths: list[int]
    kids: list[dict[int, int]]  # per node: token -> child node index

    def __len__(self) -> int:
        return len(self.tokens)

    def ancestors(self) -> torch.Tensor:
        """[T, T] bool: row i is True at i and at each of its ancestors."""
        t = len(self.tokens)
        rows = [[False] * t for _ in range(t)]
        for i in range(t):
            p = self.parents[i]
            if p >= 0:
                rows[i][:] = rows[p]
            rows[i][i] = True
        return torch.tensor(rows, dtype=torch.bool)

    def mask(self, committed: int) -> torch.Tensor:
        """[T, committed + T] bool: every node sees all committed slots, itself and its
        ancestors."""
        t = len(self.tokens)
        m = torch.ones(t, committed + t, dtype=torch.bool)
        m[:, committed:] = self.ancestors()
        return m

    def walk(self, choose: Callable[[int], int]) -> tuple[list[int], list[int]]:
        """Follow the model's choices from the root.

        `choose(i)` is the model's next token after node i (argmax or a sample of
        its row of logits). Returns (path: node indices from the root along the
        accepted tokens, new tokens: the accepted drafts plus the model's token
        after the last of them).
        """
        path, new = [0], []
        while True:
            tok = choose(path[-1])
            new.append(tok)
            nxt = self.kids[path[-1]].get(tok)
            if nxt is None:
                return path, new
            path.append(nxt)


def compact(cache: KVCache, committed: int, path: list[int]) -> None:
    """Move the K/V of the accepted path (tree slots committed+i) to slots committed,
    committed+1, ...

    Their K/V were computed at positions committed + depth, which are exactly
    the positions of the slots they move to, so the copy is exact.
    """
    if path == list(range(len(path))):
        return  # the first (depth-first) branch was accepted: already contiguous
    src = torch.tensor(path, device=cache.k.device) + committed
    dst = slice(committed, committed + len(path))
    cache.k[:, :, :, dst] = cache.k[:, :, :, src]
    cache.v[:, :, :, dst] = cache.v[:, :, :, src]


class Lookahead:
    """Drafts trees from an n-gram trie over the request's context and its answer so far.

    The last `max_prefix` .. `min_prefix` tokens are looked up in the trie and
    in the answer memory, if any (the longest suffix found in either wins; the
    two count together). Each continuation gets an estimated chance of
    being right: its share of its parent's n-gram count times its parent's
    chance, times `decay` per level (counts from a handful of occurrences are
    overconfident). The likeliest nodes are taken best-first while their chance
    is at least `min_p`, up to `budget` nodes besides the root and `max_depth`
    levels: every node costs a row of the verification pass, so unlikely ones
    are left out.
    """

    # Small trees of likely nodes: each node costs a verification row, and a row pays only when
    # it is likely to be accepted (the tuning is in eval/RESULTS_decode.md).
    def __init__(
        self,
        context: Sequence[int] = (),
        *,
        memory: AnswerMemory | None = None,
        budget: int = 4,
        max_depth: int = 8,
        max_prefix: int = 4,
        min_prefix: int = 1,
        decay: float = 0.9,
        min_p: float = 0.2,
    ):
        self.budget = budget
        self.max_depth = max_depth
        self.max_prefix = max_prefix
        self.min_prefix = min_prefix
        self.decay = decay
        self.min_p = min_p
        # No draft is deeper than the budget: deeper n-grams would only slow the build (~25 us a
        # token of context a level, in Python).
        self.trie = NgramTrie(max_prefix + min(max_depth, budget))
        self.trie.insert(context)
        self.tries = [self.trie] if memory is None else [self.trie, memory.trie]
        self.memory_lock = memory.lock if memory is not None else contextlib.nullcontext()
        self.answer = self.trie.stream()
        self.recent: list[int] = list(context[-max_prefix:])

    def commit(self, token: int) -> None:
        """A token of the answer: it extends the text looked up next, and the trie."""
        self.answer.push(token)
        self.recent.append(token)
        if len(self.recent) > 2 * self.max_prefix:
            del self.recent[: -self.max_prefix]

    def draft(self, root: int, room: int) -> DraftTree:
        """A draft tree after `root` (the last committed token) of at most `room` nodes, root
        included."""
        budget = min(self.budget, room - 1)
        tree = DraftTree([root], [-1], [0], [{}])
        if budget <= 0:
            return tree
        with self.memory_lock:
            chosen = self._choose(budget)
        return _depth_first(tree, chosen)

    def _choose(self, budget: int) -> list[tuple[int, int, float]]:
        """The likeliest continuations, best first: (token, parent choice index, chance)."""
        start: list[_Node] = []  # the suffix's node in each trie that has one
        for p in range(min(self.max_prefix, len(self.recent)), self.min_prefix - 1, -1):
            suffix = self.recent[-p:]
            start = [n for trie in self.tries if (n := trie.find(suffix)) is not None and n.kids]
            if start:
                break
        if not start:
            return []
        # Best-first by estimated chance: a child is never likelier than its parent, so parents
        # come first.
        heap: list[
            tuple[float, int, list[_Node], int, int, int]
        ] = []  # (-p, tiebreak, nodes, token, parent, depth)
        order = 0

        def push_kids(nodes: list[_Node], p: float, parent: int, depth: int) -> None:
            nonlocal order
            kids: dict[int, list[_Node]] = {}
            for node in nodes:
                for tok, kid in node.kids.items():
                    kids.setdefault(tok, []).append(kid)
            total = sum(k.count for same in kids.values() for k in same)
            for tok, same in kids.items():
                q = p * self.decay * sum(k.count for k in same) / total
                if q >= self.min_p:
                    heapq.heappush(heap, (-q, order, same, tok, parent, depth))
                    order += 1

        push_kids(start, 1.0, -1, 1)
        chosen: list[tuple[int, int, float]] = []  # (token, parent choice index, chance)
        while heap and len(chosen) < budget:
            neg, _, nodes, tok, parent, depth = heapq.heappop(heap)
            chosen.append((tok, parent, -neg))
            if depth < self.max_depth:
                push_kids(nodes, -neg, len(chosen) - 1, depth + 1)
        return chosen


def _depth_first(tree: DraftTree, chosen: list[tuple[int, int, float]]) -> DraftTree:
    """Lay the chosen nodes out depth-first, likeliest child first, under the root."""
    children: dict[int, list[int]] = {}
    for i, (_, parent, _) in enumerate(chosen):
        children.setdefault(parent, []).append(i)
    stack = [(c, 0) for c in sorted(children.get(-1, []), key=lambda c: chosen[c][2])]
    while stack:
        c, parent = stack.pop()
        idx = len(tree.tokens)
        tok = chosen[c][0]
        tree.tokens.append(tok)
        tree.parents.append(parent)
        tree.depths.append(tree.depths[parent] + 1)
        tree.kids.append({})
        tree.kids[parent][tok] = idx
        stack.extend((k, idx) for k in sorted(children.get(c, []), key=lambda k: chosen[k][2]))
    return tree
