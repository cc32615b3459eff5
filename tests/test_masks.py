"""Training masks: packed teacher pass == each document alone; all blocks in one forward == the
per-block drafts that decoding runs; flex attention == the dense masks."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

from orthrus.adapter import DiffusionAdapter
from orthrus.models.llama import block_attention
from orthrus.train.data import Document, make_batch, pack
from orthrus.train.masks import (block_context_mask, block_mask_mod, document_causal_mask,
                                 document_positions, flex_block_attention)
from orthrus.train.blocks import (BlockDrafter, draft_blocks, eval_anchor_chunks, masked_blocks, teacher_forward,
                                  train_anchors)
from tiny import hf_model, ours_from_hf

K = 4


def _docs(seed: int, n: int = 7) -> list[Document]:
    g = torch.Generator().manual_seed(seed)
    docs = []
    for _ in range(n):
        length = int(torch.randint(6, 22, (1,), generator=g))
        n_prompt = int(torch.randint(1, 5, (1,), generator=g))
        docs.append(Document(tuple(torch.randint(3, 97, (length,), generator=g).tolist()), n_prompt))
    return docs


def _perturbed_adapter(base, seed: int = 1) -> DiffusionAdapter:
    """An adapter that differs from the base's attention (a fresh one would hide view mix-ups)."""
    ad = DiffusionAdapter.init(base, "test", block_size=K)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in ad.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return ad.eval().requires_grad_(False)


@pytest.fixture(scope="module", params=["llama", "qwen3"])
def setup(request):
    base = ours_from_hf(hf_model(request.param))
    packed = pack(_docs(3), seq_len=40)
    assert len(packed) < 7, "several documents share a row"
    batch = make_batch(packed, list(range(len(packed))), "cpu")
    return base, _perturbed_adapter(base), packed, batch


def test_document_positions_restart_per_document():
    doc = torch.tensor([[0, 0, 0, 1, 1, 2, -1, -1], [0, 0, 0, 0, 0, 0, 0, 0]])
    assert document_positions(doc).tolist() == [[0, 1, 2, 0, 1, 0, 0, 1], list(range(8))]
    mask = document_causal_mask(doc)[0, 0]
    assert mask[4].tolist() == [False, False, False, True, True, False, False, False]
    assert mask.diagonal().all()  # padding rows see themselves: no empty softmax rows


def test_packed_teacher_equals_each_document_alone(setup):
    base, _, packed, batch = setup
    b, s = batch.tokens.shape
    cache = base.new_cache(b, s)
    hidden = teacher_forward(base, batch, cache)
    checked = 0
    for r in range(b):
        for d in range(int(batch.doc[r].max()) + 1):
            slots = (batch.doc[r] == d).nonzero()[:, 0]
            toks = batch.tokens[r, slots][None]
            own = base.new_cache(1, len(slots))
            ref = base(toks, torch.arange(len(slots))[None], own)
            torch.testing.assert_close(hidden[r, slots], ref[0], atol=2e-5, rtol=1e-5)
            for layer in range(base.config.num_layers):  # the cache holds the same K/V at its slots
                torch.testing.assert_close(cache.k[layer][r, :, slots], own.k[layer][0], atol=2e-5, rtol=1e-5)
                torch.testing.assert_close(cache.v[layer][r, :, slots], own.v[layer][0], atol=2e-5, rtol=1e-5)
            checked += 1
    assert checked == 7


@pytest.mark.parametrize("kind", ["anchor", "mix"])
def test_all_blocks_in_one_forward_equal_per_block_decoding(setup, kind):
    """Each block of the batched training forward == one decoding draft: the document alone, its
    cache truncated to positions < s, the block [x_s, MASK...] (or, a masked block, [MASK...])
    at s..s+K-1 attending all of it."""
    base, adapter, packed, batch = setup
    b, s = batch.tokens.shape
    cache = base.new_cache(b, s)
    th = teacher_forward(base, batch, cache)
    anchors, valid = train_anchors(batch, 24, torch.Generator().manual_seed(0))
    assert not valid.all(), "padding anchors are exercised too"
    masked = masked_blocks(kind, anchors)
    assert (masked is None) == (kind == "anchor")
    out = draft_blocks(BlockDrafter(adapter), base, batch, cache, th, anchors, valid, K, masked=masked)
    got = base.logits(out.student)  # [B, N, K-1, V]
    checked = 0
    for r in range(b):
        for n in range(anchors.shape[1]):
            if not valid[r, n]:
                continue
            a = int(anchors[r, n])
            slots = (batch.doc[r] == batch.doc[r, a]).nonzero()[:, 0]
            start = int(slots[0])
            p = a - start  # the anchor's position in its document
            own = base.new_cache(1, p + K)
            if p > 0:
                base(batch.tokens[r, start:a][None], torch.arange(p)[None], own)
            is_masked = masked is not None and bool(masked[r, n])
            embeds = adapter.block_embeds(base, batch.tokens[r, a][None], K, torch.tensor([is_masked]))
            if is_masked:  # the anchor token is not an input at all
                assert torch.equal(embeds[0, 0], adapter.mask_embedding)
            ctx = torch.ones(1, 1, 1, p, dtype=torch.bool)
            ref = adapter(base, embeds, torch.arange(p, p + K)[None], own, p, ctx, K)
            ref_logits = base.logits(ref[0, : K - 1])
            n_valid = int(out.valid[r, n].sum())
            assert n_valid == min(K - 1, int(slots[-1]) - a)  # slots past the document are masked out
            torch.testing.assert_close(got[r, n], ref_logits, atol=1e-4, rtol=1e-4)
            # the teacher for slot i is the AR distribution at s+i; the target the token at s+i+1
            torch.testing.assert_close(base.logits(out.teacher[r, n, :n_valid]), base.logits(th[r, a: a + n_valid]))
            assert out.target[r, n, :n_valid].tolist() == batch.tokens[r, a + 1: a + 1 + n_valid].tolist()
            checked += 1
    assert checked >= 8


def test_anchors_are_response_tokens_with_a_next_token(setup):
    _, _, _, batch = setup
    anchors, valid = train_anchors(batch, 64, torch.Generator().manual_seed(1))
    a = anchors[valid]
    rows = torch.arange(batch.tokens.shape[0])[:, None].expand_as(anchors)[valid]
    assert batch.response[rows, a].all()
    assert (batch.doc[rows, a + 1] == batch.doc[rows, a]).all()
    expected = int((batch.response[:, :-1] & (batch.doc[:, 1:] == batch.doc[:, :-1])).sum())
    assert int(valid.sum()) == expected  # with N large, every candidate is drawn exactly once
    for anchors, valid in eval_anchor_chunks(batch, 3, K):  # eval: whole blocks inside the response
        for r, s in zip(*valid.nonzero(as_tuple=True)):
            blk = anchors[r, s] + torch.arange(K)
            assert batch.response[r, blk].all() and (batch.doc[r, blk] == batch.doc[r, anchors[r, s]]).all()


def test_context_mask_keeps_documents_apart(setup):
    _, _, _, batch = setup
    anchors, valid = train_anchors(batch, 5, torch.Generator().manual_seed(2))
    ctx = block_context_mask(batch.doc, anchors, valid)[:, 0]  # [B, N, S]: one row per block
    for r in range(anchors.shape[0]):
        for n in range(anchors.shape[1]):
            seen = ctx[r, n].nonzero()[:, 0]
            if not valid[r, n]:
                assert seen.numel() == 0
                continue
            a = int(anchors[r, n])
            same = (batch.doc[r] == batch.doc[r, a]).nonzero()[:, 0]
            assert seen.tolist() == [int(j) for j in same if j < a]


def dense_block_mask(ctx: torch.Tensor, k: int) -> torch.Tensor:
    """The full ``[B, 1, N*K, S + N*K]`` mask of a block forward over ``[cache | all block keys]``:
    a block's queries see its context row and the block-diagonal part (its own K keys only)."""
    b, _, n, s = ctx.shape
    blk = torch.arange(n * k) // k
    return torch.cat((ctx.repeat_interleave(k, dim=2), (blk[:, None] == blk).expand(b, 1, n * k, n * k)), dim=-1)


@pytest.mark.parametrize("heads", [(6, 2), (4, 4)])
def test_block_attention_equals_dense_attention_over_all_keys(setup, heads):
    """The [N, K, K] block scores == one dense SDPA over [cache | every block's keys] with the
    block-diagonal mask (what training computed before), GQA and not, padding anchors included."""
    _, _, _, batch = setup
    b, s = batch.tokens.shape
    anchors, valid = train_anchors(batch, 5, torch.Generator().manual_seed(6))
    valid[0, -1] = False  # a padding anchor: sees no cache slot, only its own block
    h, hkv = heads
    q_len = anchors.shape[1] * K
    g = torch.Generator().manual_seed(7)
    q = torch.randn(b, h, q_len, 8, generator=g)
    k1, v1 = torch.randn(b, hkv, s, 8, generator=g), torch.randn(b, hkv, s, 8, generator=g)
    k2, v2 = torch.randn(b, hkv, q_len, 8, generator=g), torch.randn(b, hkv, q_len, 8, generator=g)
    ctx = block_context_mask(batch.doc, anchors, valid)
    rep = h // hkv
    ref = torch.nn.functional.scaled_dot_product_attention(
        q, torch.cat((k1, k2), 2).repeat_interleave(rep, 1), torch.cat((v1, v2), 2).repeat_interleave(rep, 1),
        attn_mask=dense_block_mask(ctx, K))
    torch.testing.assert_close(block_attention(q, k1, v1, ctx, k2, v2, K), ref, atol=1e-5, rtol=1e-5)


def test_flex_mask_mod_equals_dense_masks(setup):
    from torch.nn.attention.flex_attention import create_mask

    _, _, _, batch = setup
    b, s = batch.tokens.shape
    anchors, valid = train_anchors(batch, 5, torch.Generator().manual_seed(3))
    q = anchors.shape[1] * K
    dense = dense_block_mask(block_context_mask(batch.doc, anchors, valid), K)
    flex = create_mask(block_mask_mod(batch.doc, anchors, valid, K), b, 1, q, s + q, device="cpu")
    assert torch.equal(flex, dense)


def test_flex_attention_equals_dense_on_cpu(setup):
    """The flex kernel (eager reference on CPU) inside the adapter == the dense joint attention."""
    base, adapter, _, batch = setup
    b, s = batch.tokens.shape
    cache = base.new_cache(b, s)
    th = teacher_forward(base, batch, cache)
    anchors, valid = train_anchors(batch, 5, torch.Generator().manual_seed(4))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "flex_attention called without torch.compile()"
        try:
            fn = flex_block_attention(batch.doc, anchors, valid, K, compiled=False)
            flex = draft_blocks(BlockDrafter(adapter), base, batch, cache, th, anchors, valid, K, use_flex=True)
        except (RuntimeError, NotImplementedError) as e:  # pragma: no cover - depends on the torch build
            pytest.skip(f"flex attention does not run on this CPU build: {e}")
    dense = draft_blocks(BlockDrafter(adapter), base, batch, cache, th, anchors, valid, K)
    torch.testing.assert_close(flex.student[flex.valid], dense.student[dense.valid], atol=1e-5, rtol=1e-5)
    # the raw kernel against joint_attention on random inputs (GQA: 6 query heads, 2 kv heads)
    g = torch.Generator().manual_seed(5)
    q_len = anchors.shape[1] * K
    qh, k1, v1 = (torch.randn(b, 6, q_len, 8, generator=g), torch.randn(b, 2, s, 8, generator=g),
                  torch.randn(b, 2, s, 8, generator=g))
    k2, v2 = torch.randn(b, 2, q_len, 8, generator=g), torch.randn(b, 2, q_len, 8, generator=g)
    ref = block_attention(qh, k1, v1, block_context_mask(batch.doc, anchors, valid), k2, v2, K)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.testing.assert_close(fn(qh, k1, v1, k2, v2), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the compiled flex kernel needs CUDA")
def test_flex_compiled_on_cuda(setup):  # pragma: no cover - CPU-only CI
    base, adapter, _, batch = setup
    anchors, valid = train_anchors(batch, 5, torch.Generator().manual_seed(4))
    base, adapter = copy.deepcopy(base).cuda(), copy.deepcopy(adapter).cuda()  # the fixture stays on the CPU
    batch, anchors, valid = batch.to("cuda"), anchors.cuda(), valid.cuda()
    b, s = batch.tokens.shape
    cache = base.new_cache(b, s)
    th = teacher_forward(base, batch, cache)
    flex = draft_blocks(BlockDrafter(adapter), base, batch, cache, th, anchors, valid, K, use_flex=True)
    dense = draft_blocks(BlockDrafter(adapter), base, batch, cache, th, anchors, valid, K)
    torch.testing.assert_close(flex.student[flex.valid], dense.student[dense.valid], atol=1e-4, rtol=1e-4)


def test_a_sliding_window_caps_the_context(tmp_path):
    """No mask needs a sliding window because the window is never exceeded: a Mistral model's
    context is its window, decoding refuses more (the context error) and training refuses longer
    rows."""
    from orthrus.engine import Orthrus
    from orthrus.errors import ContextLengthError, OrthrusError
    from orthrus.models.loading import LoadedModel
    from orthrus.train.config import TrainConfig
    from orthrus.train.trainer import Trainer

    class Tokenizer:
        chat_template = None

        def decode(self, ids, skip_special_tokens=True):
            return " ".join(map(str, ids))

    base = ours_from_hf(hf_model("mistral", sliding_window=16, max_position_embeddings=256))
    assert base.config.sliding_window == 16 and base.config.max_context == 16
    engine = Orthrus(LoadedModel(base, Tokenizer(), (), "fp", "tiny", tmp_path), None, prepare=False)
    assert len(engine.generate([[5] * 10], max_new_tokens=6)[0].token_ids) == 6  # exactly the window
    with pytest.raises(ContextLengthError, match="exceeds the model's context of 16 tokens"):
        engine.generate([[5] * 10], max_new_tokens=7)
    with pytest.raises(OrthrusError, match=r"--seq-len \(32\) exceeds the model's context of 16 tokens"):
        Trainer(TrainConfig(data="-", out=str(tmp_path), seq_len=32, block_size=4), base, "fp", [], progress=False)
