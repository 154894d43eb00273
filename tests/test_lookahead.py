"""Lookahead: the n-gram trie, draft trees, the tree mask, and one tree verified against
plain steps."""

from __future__ import annotations

import pytest
import torch

from rag.engine import native_step
from rag.engine.decode_step import DecodeStep
from rag.engine.lookahead import AnswerMemory, DraftTree, Lookahead, NgramTrie, compact

pytestmark = pytest.mark.usefixtures("one_thread")


def test_trie_counts_every_ngram_and_streams_match_bulk_insert():
    trie = NgramTrie(depth=3)
    trie.insert([1, 2, 3, 1, 2, 4])
    assert trie.find([1]).count == 2
    node = trie.find([1, 2])
    assert node.count == 2 and set(node.kids) == {3, 4}
    assert trie.find([2, 3, 1]).count == 1
    assert trie.find([1, 2, 3, 1]) is None  # longer than depth
    assert trie.find([4, 1]) is None

    streamed = NgramTrie(depth=3)
    s = streamed.stream()
    for t in [1, 2, 3, 1, 2, 4]:
        s.push(t)
    for prefix in ([1], [1, 2], [2, 3, 1], [3, 1, 2], [2, 4]):
        assert streamed.find(prefix).count == trie.find(prefix).count


def test_draft_follows_the_context_and_respects_budget_and_depth():
    context = [5, 6, 7, 8, 9, 10, 11, 5, 6, 7, 20, 21]
    la = Lookahead(context, budget=6, max_depth=4, max_prefix=2, decay=1.0, min_p=0.0)
    la.commit(5)
    la.commit(6)
    tree = la.draft(root=6, room=100)
    assert len(tree) - 1 <= 6 and max(tree.depths) <= 4
    # Both continuations of "5 6" start with 7 (count 2); after it the branch splits.
    assert tree.tokens[1] == 7 and tree.parents[1] == 0
    branches = {tuple(_path_tokens(tree, i)) for i in range(len(tree)) if not tree.kids[i]}
    assert (7, 8, 9, 10) in branches and (7, 20, 21) in branches
    # Depth-first layout: the first branch sits in consecutive slots after the root.
    first = [0]
    while tree.kids[first[-1]]:
        first.append(first[-1] + 1)
        assert tree.parents[first[-1]] == first[-2]
    # Room limits the tree (room counts the root).
    assert len(la.draft(root=6, room=3)) <= 3
    assert len(la.draft(root=6, room=1)) == 1
    # Unlikely branches are left out: after "7" each has a chance of 0.5 * 0.5 (decay) * 1/2 < 0.3.
    picky = Lookahead(context, budget=6, max_depth=4, max_prefix=2, decay=0.5, min_p=0.3)
    picky.commit(5)
    picky.commit(6)
    assert picky.draft(root=6, room=100).tokens == [6, 7]
    # Nothing known after an unseen token: no draft.
    la.commit(999)
    assert len(la.draft(root=999, room=100)) == 1


def _counts(trie: NgramTrie) -> dict[tuple[int, ...], int]:
    out, todo = {}, [((), trie.root)]
    while todo:
        prefix, node = todo.pop()
        for tok, kid in node.kids.items():
            out[prefix + (tok,)] = kid.count
            todo.append((prefix + (tok,), kid))
    return out


def test_answer_memory_keeps_exactly_the_ngrams_of_its_last_answers():
    answers = [[1, 2, 3, 1, 2], [2, 3, 4], [7, 1, 2, 3, 9, 9, 9], [3, 1, 2]]
    memory = AnswerMemory(size=2, depth=3)
    for i, a in enumerate(answers):
        memory.add(a)
        fresh = NgramTrie(depth=3)
        for kept in answers[max(0, i - 1) : i + 1]:
            fresh.insert(kept)
        assert _counts(memory.trie) == _counts(fresh)  # no zero-count node is left behind either
    assert list(memory.answers) == answers[-2:]


def test_draft_counts_the_answer_memory_with_the_context():
    context = [5, 6, 5, 6, 5, 7]  # after 5: 6 twice, 7 once
    memory = AnswerMemory(depth=4)
    for _ in range(3):
        memory.add([5, 7, 8])  # after 5: 7 three more times
    alone = Lookahead(context, budget=1, max_prefix=1, decay=1.0, min_p=0.0)
    both = Lookahead(context, memory=memory, budget=1, max_prefix=1, decay=1.0, min_p=0.0)
    for la in (alone, both):
        la.commit(5)
    assert alone.draft(root=5, room=10).tokens == [5, 6]
    assert both.draft(root=5, room=10).tokens == [5, 7]  # 4 of 6 against 2 of 6
    # A suffix that only an earlier answer holds is drafted from it, to the budget's depth.
    chain = Lookahead(context, memory=memory, budget=2, max_prefix=1, decay=1.0, min_p=0.0)
    chain.commit(7)
    assert chain.draft(root=7, room=10).tokens == [7, 8]
    chain.commit(8)
    assert len(chain.draft(root=8, room=10)) == 1  # nothing ever followed 8


def _path_tokens(tree: DraftTree, i: int) -> list[int]:
    out = []
    while i > 0:
        out.append(tree.tokens[i])
        i = tree.parents[i]
    return out[::-1]


def _two_branch_tree(a: list[int], b: list[int], root: int) -> DraftTree:
    """root -> a[0] -> a[1] ..., and root -> b[0] -> b[1] ... (b[0] != a[0])."""
    tree = DraftTree([root], [-1], [0], [{}])
    for branch in (a, b):
        parent = 0
        for tok in branch:
            idx = len(tree.tokens)
            tree.tokens.append(tok)
            tree.parents.append(parent)
            tree.depths.append(tree.depths[parent] + 1)
            tree.kids.append({})
            tree.kids[parent][tok] = idx
            parent = idx
    return tree


def test_tree_mask_lets_each_node_see_only_committed_slots_and_its_ancestors():
    tree = _two_branch_tree([11, 12, 13], [21, 22], root=1)
    m = tree.mask(committed=4)
    assert m.shape == (6, 10) and m[:, :4].all()
    expected_tree_part = torch.tensor(
        [
            [1, 0, 0, 0, 0, 0],  # root
            [1, 1, 0, 0, 0, 0],  # 11
            [1, 1, 1, 0, 0, 0],  # 12
            [1, 1, 1, 1, 0, 0],  # 13
            [1, 0, 0, 0, 1, 0],  # 21: not 11, 12, 13
            [1, 0, 0, 0, 1, 1],  # 22
        ],
        dtype=torch.bool,
    )
    assert torch.equal(m[:, 4:], expected_tree_part)
    # Walking: the model picks 21 after the root, then 22, then 7 (not in the tree).
    choice = {0: 21, 4: 22, 5: 7}
    path, new = tree.walk(choice.__getitem__)
    assert path == [0, 4, 5] and new == [21, 22, 7]


def _default_step(model):
    """The engine's choice: the native step where it builds."""
    return native_step.for_model(model) or DecodeStep(model)


@pytest.mark.parametrize("make_step", [_default_step, DecodeStep], ids=["default", "pytorch"])
def test_tree_verification_equals_plain_steps_on_each_branch(lm32, make_step):
    """One masked pass over a two-branch tree gives each node the logits (and K/V) of plain
    decoding,
    with the default step (native where it builds) and the PyTorch one (CUDA, no compiler)."""
    model, tok = lm32.model, lm32.tokenizer
    ids = tok.encode_text(
        "The Saltmere lighthouse stands on a granite cliff above the harbour. Its first keeper"
    )
    n = len(ids)
    a = tok.encode_text(" was Josiah")
    b = tok.encode_text(", a sailor")
    assert a[0] != b[0]
    step = make_step(model)

    def plain(branch: list[int]) -> tuple[torch.Tensor, object]:
        cache = model.new_cache(n + 8)
        model(torch.tensor([ids[:-1]]), cache, 0, logits_for=None)
        rows = [
            step(torch.tensor([t]), cache, n - 1 + i)[0] for i, t in enumerate([ids[-1], *branch])
        ]
        return torch.stack(rows), cache

    cache = model.new_cache(n + 8)
    model(torch.tensor([ids[:-1]]), cache, 0, logits_for=None)
    tree = _two_branch_tree(a, b, root=ids[-1])
    committed = n - 1
    positions = torch.tensor(tree.depths) + committed
    rows = step(
        torch.tensor(tree.tokens),
        cache,
        committed,
        positions=positions,
        mask=tree.mask(committed),
        all_logits=True,
    )
    ref_a, _ = plain(a)
    ref_b, cache_b = plain(b)
    got_a = rows[[0, *range(1, 1 + len(a))]]
    got_b = rows[[0, *range(1 + len(a), 1 + len(a) + len(b))]]
    assert (got_a - ref_a).abs().max() < 1e-3
    assert (got_b - ref_b).abs().max() < 1e-3
    assert torch.equal(got_a.argmax(-1), ref_a.argmax(-1)) and torch.equal(
        got_b.argmax(-1), ref_b.argmax(-1)
    )

    # Accepting branch b moves its K/V into the contiguous slots plain decoding would have filled.
    path = [0, *range(1 + len(a), 1 + len(a) + len(b))]
    compact(cache, committed, path)
    end = committed + len(path)
    assert (cache.k[:, :, :, :end] - cache_b.k[:, :, :, :end]).abs().max() < 1e-4
    assert (cache.v[:, :, :, :end] - cache_b.v[:, :, :, :end]).abs().max() < 1e-4


def test_trie_ceiling_counts_the_steps_of_a_drafter_that_always_guesses_right():
    from eval.bench_decode import trie_ceiling

    context = list(range(100))
    copied = list(range(10, 40))  # every next token continues the context: budget + 1 tokens a step
    assert trie_ceiling(context, copied, budget=2) == (10, 29)
    novel = list(range(1000, 1030))  # nothing to draft: one token a step
    assert trie_ceiling(context, novel, budget=2) == (29, 29)
    # The answer so far is in the trie too: a repeated phrase is drafted the second time.
    looped = [500, 501, 502, 503] * 3
    steps, tokens = trie_ceiling(context, looped, budget=3)
    assert (
        tokens == 11 and steps == 4 + 2
    )  # one plain step a token until 500 comes again, then 4 + 3
