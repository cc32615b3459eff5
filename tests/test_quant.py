"""Draft-only int8 weights (``orthrus.models.quant``): the draft pass reads int8 copies of the frozen
MLPs, LM head and the adapter's projections; the verify pass stays fp32, so outputs stay exact.

Checked here: the int8 GEMM's per-row quantization gives a row the same bits alone or in any batch
(fbgemm alone quantizes per tensor, which would couple rows), it is close to the fp32 product, the
draft pass really uses it, greedy parallel decoding equals AR, and a seeded sampled row is the same
alone or among other rows.
"""

from __future__ import annotations

import pytest
import torch

from conftest import random_prompts, run_decoder, tiny_adapter, tiny_base
from orthrus.config import GenerationConfig
from orthrus.models.quant import Int8Linear, int8_available
from test_decoding import perturb

needs_int8 = pytest.mark.skipif(not int8_available(), reason="this torch has no fbgemm int8 linear")


@needs_int8
def test_int8_linear_is_row_independent_and_close_to_fp32() -> None:
    torch.manual_seed(0)
    ws = [torch.randn(40, 24) * 0.1, torch.randn(16, 24) * 0.1]
    bs = [torch.randn(40), None]
    lin = Int8Linear(ws, bs)
    x = torch.randn(3, 7, 24)
    x[1] *= 50.0  # rows of very different ranges: a per-tensor scale would crush row 0's resolution
    x[2, :, 0] += 30.0  # and a one-sided outlier (a per-tensor zero point would move)
    full = lin(x)
    assert [t.shape for t in full] == [(3, 7, 40), (3, 7, 16)]
    for b, rows in ((0, slice(0, 1)), (0, slice(2, 7)), (1, slice(0, 7)), (2, slice(3, 4))):
        part = lin(x[b:b + 1, rows].contiguous())
        assert all(torch.equal(p, f[b:b + 1, rows]) for p, f in zip(part, full)), (b, rows)
    ref = (torch.nn.functional.linear(x, ws[0], bs[0]), torch.nn.functional.linear(x, ws[1]))
    for got, want in zip(full, ref):
        for b in range(3):  # per-row relative error: 7-bit activations, 8-bit weights
            err = (got[b] - want[b]).norm() / want[b].norm()
            assert err < 0.05, (b, float(err))


def prepared_int8(arch: str, block_size: int):
    model = tiny_base(arch, seed=3)[1]
    adapter = perturb(tiny_adapter(model, "lora", block_size=block_size), scale=0.2)
    model.prepare_inference()
    model.prepare_draft()
    adapter.prepare_inference(int8=True)
    return model, adapter


@needs_int8
@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_int8_draft_pass_is_used_and_greedy_stays_exact(arch: str) -> None:
    model, adapter = prepared_int8(arch, block_size=4)
    assert model.draft_mlps is not None and model.draft_head is not None
    # the draft pass reads the int8 copies: its logits differ from the fp32 draft's, a little
    cache = model.new_cache(1, 32)
    toks = torch.randint(0, model.config.vocab_size, (1, 10))
    with torch.no_grad():
        model(toks, torch.arange(10)[None], cache, kv_len=10)
        pos = (10 + torch.arange(4))[None]
        q8 = model.draft_logits(adapter.draft(model, toks[:, -1], pos, cache, 14))
        mlps, head = model.draft_mlps, model.draft_head
        model.draft_mlps = model.draft_head = None
        adapter.prepare_inference()  # fp32 projections
        q32 = model.draft_logits(adapter.draft(model, toks[:, -1], pos, cache, 14))
        model.draft_mlps, model.draft_head = mlps, head
        adapter.prepare_inference(int8=True)
    diff = (q8 - q32).abs().max()
    assert 0 < diff < 0.1 * q32.abs().max(), float(diff)
    prompts = random_prompts([5, 11, 3], model.config.vocab_size, seed=4)
    ar = run_decoder(model, adapter, prompts, GenerationConfig(max_new_tokens=24, mode="ar"))[0]
    for k in (2, 4):
        par = run_decoder(model, adapter, prompts, GenerationConfig(max_new_tokens=24, mode="parallel"),
                          block_size=k, batch_size=2)[0]
        assert [r.tokens for r in par] == [r.tokens for r in ar], f"K = {k}"


@needs_int8
def test_int8_drafts_seeded_sample_is_the_same_alone_or_batched() -> None:
    model, adapter = prepared_int8("mistral", block_size=4)
    prompts = random_prompts([6, 3, 9, 5], model.config.vocab_size, seed=12)
    g = GenerationConfig(max_new_tokens=20, mode="parallel", temperature=1.0, seed=7)
    alone = run_decoder(model, adapter, [prompts[0]], g)[0][0].tokens
    others = [g, GenerationConfig(max_new_tokens=25, mode="parallel", temperature=0.8, seed=8),
              GenerationConfig(max_new_tokens=14, mode="parallel"),
              GenerationConfig(max_new_tokens=9, mode="parallel", temperature=1.5, top_p=0.8, seed=9)]
    batched, _ = run_decoder(model, adapter, prompts, others)
    assert batched[0].tokens == alone
    assert sum(batched[0].stats.accept_hist[1:]) > 0  # drafts were accepted: the drafter mattered
