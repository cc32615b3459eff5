"""Tree verification (``orthrus.decoding.tree``): the tree, its mask and acceptance, the K/V moves,
and decoding through it: exact (== AR) on tiny random models, with a drafter whose right token
sits at chosen ranks (so trees catch what chains miss), with log-probs, beside sampled rows, and
the options that choose it."""

from __future__ import annotations

import itertools
from functools import lru_cache

import pytest
import torch

from conftest import random_prompts, run_decoder, tiny_adapter, tiny_base
from orthrus.cache import KVCache
from orthrus.config import AdapterConfig, GenerationConfig
from orthrus.decoding.generator import Decoder
from orthrus.decoding.tree import DEFAULT_DRAFT_RANKS, DraftTree, build_tree
from orthrus.errors import OrthrusError
from test_logprobs import check_row
from tiny import FAMILIES

VOCAB = 97


@lru_cache(maxsize=None)
def tiny(arch: str):
    return tiny_base(arch)


def greedy(n: int, mode: str = "ar", **kw) -> GenerationConfig:
    return GenerationConfig(max_new_tokens=n, mode=mode, **kw)


def path_probability(node: tuple[int, ...], rates) -> float:
    p = 1.0
    for d, r in enumerate(node):
        p *= rates[d][r]
    return p


# ---------------------------------------------------------------- the tree


def test_build_tree_is_the_best_prefix_closed_tree():
    """Under independent slot rates the expected accepted drafts of a tree is the sum of its
    nodes' path probabilities; build_tree's must equal the best over every prefix-closed set."""
    g = torch.Generator().manual_seed(0)
    for trial in range(20):
        depth, width, n = 3, 3, int(torch.randint(1, 7, (1,), generator=g))
        raw = torch.rand(depth, width, generator=g)
        rates = (raw / raw.sum(1, keepdim=True) * 0.95).tolist()
        tree = build_tree(rates, n)
        assert len(tree) == n and len(set(tree)) == n
        assert all(len(x) == 1 or x[:-1] in tree for x in tree)  # prefix-closed
        assert list(tree) == sorted(tree, key=lambda x: (len(x), x))  # breadth-first
        every = [x for d in range(1, depth + 1) for x in itertools.product(range(width), repeat=d)]
        best = max(sum(path_probability(x, rates) for x in s) for s in itertools.combinations(every, n)
                   if all(len(x) == 1 or x[:-1] in s for x in s))
        assert sum(path_probability(x, rates) for x in tree) == pytest.approx(best), trial


def test_build_tree_shapes():
    assert build_tree([[1.0, 0.0]] * 5, 5) == tuple((0,) * d for d in range(1, 6))  # sure drafts: a chain
    assert build_tree([[0.5, 0.4]] * 3, 3) == ((0,), (1,), (0, 0))
    # the shipped rates at K = 8: a spine four deep with second guesses at slots 1-3
    assert build_tree(DEFAULT_DRAFT_RANKS, 7) == ((0,), (1,), (0, 0), (0, 1), (0, 0, 0), (0, 0, 1), (0, 0, 0, 0))
    assert build_tree(DEFAULT_DRAFT_RANKS, 0) == ()


def test_tree_checks_its_nodes():
    with pytest.raises(ValueError, match="parent"):
        DraftTree(((0, 0), (0,)))  # child before parent
    with pytest.raises(ValueError, match="distinct"):
        DraftTree(((0,), (0,)))


def test_tree_mask_positions_and_tokens():
    tree = DraftTree(((0,), (1,), (0, 0), (0, 1)))  # rows: 0 anchor, 1 (0), 2 (1), 3 (0,0), 4 (0,1)
    lengths = torch.tensor([3, 0])
    pos, slots = tree.positions(lengths)
    assert pos.tolist() == [[3, 4, 4, 5, 5], [0, 1, 1, 2, 2]]
    assert slots.tolist() == [[3, 4, 5, 6, 7], [0, 1, 2, 3, 4]]
    m = tree.mask(lengths, 9)[:, 0]  # [B, R, S]
    anc = [[0], [0, 1], [0, 2], [0, 1, 3], [0, 1, 4]]
    for b, t in enumerate(lengths.tolist()):
        for r in range(5):
            want = [j < t or (j - t in anc[r]) for j in range(9)]
            assert m[b, r].tolist() == want, (b, r)
    # tokens: the anchor, then each node's rank-r token of its slot
    q = torch.zeros(1, 2, 10)
    q[0, 0, 7], q[0, 0, 2] = 5.0, 4.0   # slot 1: 7 then 2
    q[0, 1, 9], q[0, 1, 1] = 3.0, 2.0   # slot 2: 9 then 1
    assert tree.tokens(torch.tensor([5]), q).tolist() == [[5, 7, 2, 9, 1]]


def test_tree_accept_takes_the_deepest_right_path():
    tree = DraftTree(((0,), (1,), (0, 0), (0, 1)))
    tokens = torch.tensor([[5, 7, 2, 9, 1]] * 4)
    # after the anchor the model says: row 0 -> next token; row i -> the token after row i's path
    cases = [([7, 1, 0, 0, 8], 2, 8, 4),   # 7 right, then 1 (row 4) right; after row 4: 8
             ([2, 0, 3, 0, 0], 1, 3, 2),   # 7 wrong, 2 (row 2) right; after it: 3
             ([4, 0, 0, 0, 0], 0, 4, 0),   # both slot-1 guesses wrong: the correction 4
             ([7, 9, 0, 6, 0], 2, 6, 3)]   # 7, 9 right: bonus after row 3
    target = torch.tensor([c[0] for c in cases])
    n, nxt, best = tree.accept(tokens, target)
    assert n.tolist() == [c[1] for c in cases]
    assert nxt.tolist() == [c[2] for c in cases]
    assert best.tolist() == [c[3] for c in cases]
    assert tokens.gather(1, tree.path_rows(best)).tolist()[1][:1] == [2]


def test_commit_moves_puts_the_path_where_a_chain_writes_it():
    tree = DraftTree(((0,), (1,), (0, 0), (1, 0), (0, 0, 0)))  # rows 1..5; row 4 = (1, 0)
    cache = KVCache.empty(2, 2, 1, 12, 2, torch.float32, "cpu")
    for buf in cache.k + cache.v:
        buf.copy_(torch.arange(12.0)[None, None, :, None].expand_as(buf) + 100 * torch.arange(2.0)[:, None, None, None])
    lengths = torch.tensor([2, 5])
    best = torch.tensor([4, 5])  # row 0: path (1,) -> (1, 0) = rows 2, 4; row 1: rows 1, 3, 5
    tree.commit_moves(cache, lengths, best)
    k = cache.k[1][:, 0, :, 0]
    assert k[0, 2:6].tolist() == [2, 4, 6, 5]      # t=2: slot 3 <- slot 4 (row 2), slot 4 <- slot 6 (row 4)
    assert k[1, 5:9].tolist() == [105, 106, 108, 110]  # t=5: rows 1, 3, 5 -> slots 6, 7, 8
    assert k[0, :2].tolist() == [0, 1] and k[1, :5].tolist() == [100, 101, 102, 103, 104]  # committed: untouched


# ---------------------------------------------------------------- decoding through a tree


@pytest.mark.parametrize("kind", ["full", "lora"])
@pytest.mark.parametrize("arch", FAMILIES)
def test_tree_parallel_equals_ar(arch, kind):
    model = tiny(arch)[1]
    adapter = tiny_adapter(model, kind, block_size=8)
    prompts = random_prompts([5, 13, 2], VOCAB, seed=1)
    ar, _ = run_decoder(model, None, prompts, greedy(40))
    for k in (2, 5, 8):
        par, dec = run_decoder(model, adapter, prompts, greedy(40, "parallel", verify="tree"), block_size=k)
        assert [r.tokens for r in par] == [r.tokens for r in ar], k
        assert k in dec.trees and dec.lengths.tolist() == dec.lengths_host
        for r in par:
            assert r.stats.draft_passes == r.stats.verify_passes
            assert sum(r.stats.accept_hist) == r.stats.verify_passes


def ranked_decoder(table: torch.Tensor, ranks: list[int]) -> type[Decoder]:
    """A Decoder whose draft slot ``d`` ranks the AR token (``table[row, p]``) ``ranks[d]``-th:
    the tokens above it are decoys."""

    class Ranked(Decoder):
        def _draft_logits(self, hi, kv_len, positions):  # noqa: ANN001, ANN202
            truth = table[:hi].gather(1, positions[:, 1:])  # [B, K-1]
            q = torch.zeros(hi, truth.shape[1], VOCAB)
            q.scatter_(2, truth[..., None], 10.0)
            for d, r in enumerate(ranks[: truth.shape[1]]):
                for j in range(r):  # decoys above the right token
                    q[:, d].scatter_(1, (truth[:, d:d + 1] + 1 + j) % VOCAB, 20.0 - j)
            return q

    return Ranked


def test_tree_catches_second_guesses_a_chain_misses():
    model = tiny("llama")[1]
    adapter = tiny_adapter(model, "full", block_size=6)
    prompts = random_prompts([6, 3, 9], VOCAB, seed=4)
    n = 31
    ar, _ = run_decoder(model, None, prompts, greedy(n + 12))
    table = torch.zeros(3, 80, dtype=torch.long)
    for i, (p, r) in enumerate(zip(prompts, ar)):
        table[i, : len(p) + len(r.tokens)] = torch.tensor(p + r.tokens)
    ranked = ranked_decoder(table, [1, 0, 0, 2, 0])  # slot 1: second guess; slot 4: third
    chain, _ = run_decoder(model, adapter, prompts, greedy(n, "parallel", verify="chain"), decoder_cls=ranked)
    assert all(r.stats.accept_hist[0] == r.stats.verify_passes for r in chain)  # a chain keeps nothing

    class Custom(ranked):  # a tree that follows those ranks: (1,), (1, 0), (1, 0, 0), (1, 0, 0, 2), ...
        def tree(self, k):  # noqa: ANN001, ANN202
            return DraftTree(((0,), (1,), (1, 0), (1, 0, 0), (1, 0, 0, 2)))

    out, dec = run_decoder(model, adapter, prompts, greedy(n, "parallel", verify="tree", logprobs=2),
                           decoder_cls=Custom)
    assert [r.tokens for r in out] == [r.tokens[:n] for r in ar]
    for r in out:  # every cycle but the last accepts the whole path (4 drafts + the bonus token)
        s = r.stats
        assert s.accept_hist[4] >= s.verify_passes - 1 and s.verify_passes == -(-(n - 1) // 5)
    hf = tiny("llama")[0]
    for p, r in zip(prompts, out):  # log-probs of path tokens: from their parent rows
        check_row(hf, p, r, 2)
    assert dec.lengths.tolist() == dec.lengths_host


def spy_decoder(seen: list[str]) -> type[Decoder]:
    """A Decoder that appends each cycle's draft source (``tree``, ``diffusion``, ...) to ``seen``."""

    class Spy(Decoder):
        def run_cycle(self, rows, k, kv_len, greedy, filters, source="diffusion", *a):  # noqa: ANN001, ANN002, ANN202
            seen.append(source)
            return super().run_cycle(rows, k, kv_len, greedy, filters, source, *a)

    return Spy


def test_sampled_tree_rows_give_ar_samples_of_the_same_seed():
    """A sampled row verified as a tree emits, at each position, the model's sample with the uniform
    AR decoding draws there: the same tokens as AR with the same seed, alone or beside greedy rows."""
    model = tiny("qwen3")[1]
    adapter = tiny_adapter(model, "full", block_size=6)
    prompts = random_prompts([4, 8, 6], VOCAB, seed=13)
    sampled = dict(temperature=0.9, top_p=0.95, seed=5)
    ar, _ = run_decoder(model, None, prompts, [greedy(30), greedy(30, **sampled), greedy(30)])
    gens = [greedy(30, "parallel", verify="tree"), greedy(30, "parallel", verify="tree", **sampled),
            greedy(30, "parallel", verify="tree")]
    seen: list[str] = []

    Spy = spy_decoder(seen)
    out, dec = run_decoder(model, adapter, prompts, gens, decoder_cls=Spy)
    assert set(seen) == {"tree"}
    assert [r.tokens for r in out] == [r.tokens for r in ar]
    assert sum(r.stats.tokens for r in out) > sum(r.stats.verify_passes for r in out)  # drafts were kept
    alone, _ = run_decoder(model, adapter, [prompts[1]], gens[1])
    assert alone[0].tokens == ar[1].tokens
    # verify='auto' keeps trees for greedy rows: a sampled row in the cycle makes it a chain
    seen.clear()
    measured = tiny_adapter(model, "full", block_size=6)
    object.__setattr__(measured, "config", AdapterConfig(**{**adapter.config.to_dict(), "draft_ranks": [[0.5, 0.3]] * 5}))
    run_decoder(model, measured, prompts[:2], [greedy(8, "parallel"), greedy(8, "parallel", **sampled)],
                decoder_cls=Spy)
    assert set(seen) == {"diffusion"}


def test_auto_uses_a_tree_only_with_measured_rank_rates():
    model = tiny("llama")[1]
    adapter = tiny_adapter(model, "full", block_size=4)
    prompts = random_prompts([5], VOCAB, seed=2)
    seen: list[str] = []

    Spy = spy_decoder(seen)
    run_decoder(model, adapter, prompts, greedy(8, "parallel"), decoder_cls=Spy)
    assert set(seen) == {"diffusion"}
    seen.clear()
    measured = tiny_adapter(model, "full", block_size=4)
    object.__setattr__(measured, "config", AdapterConfig(**{**adapter.config.to_dict(),
                                                            "draft_ranks": [[0.5, 0.3], [0.4, 0.2], [0.3, 0.3]]}))
    _, dec = run_decoder(model, measured, prompts, greedy(8, "parallel"), decoder_cls=Spy)
    assert set(seen) == {"tree"} and dec.tree(4).nodes == build_tree([[0.5, 0.3], [0.4, 0.2]], 3)
    seen.clear()
    run_decoder(model, measured, prompts, greedy(8, "parallel", verify="chain"), decoder_cls=Spy)
    assert set(seen) == {"diffusion"}


def test_verify_option_checks():
    with pytest.raises(OrthrusError, match="verify must be one of"):
        GenerationConfig(verify="forest")
    with pytest.raises(OrthrusError, match="verify 'tree' checks the adapter's drafts"):
        GenerationConfig(mode="parallel", draft="ngram", verify="tree")
    with pytest.raises(OrthrusError, match="verify 'tree'"):
        GenerationConfig(mode="parallel", schedule="one-pass", verify="tree")
    with pytest.raises(OrthrusError, match="draft_ranks are rates"):
        AdapterConfig(draft_ranks=[[1.5]])
    assert AdapterConfig.from_dict(AdapterConfig(draft_ranks=[[0.9, 0.1]]).to_dict()).draft_ranks == ((0.9, 0.1),)
