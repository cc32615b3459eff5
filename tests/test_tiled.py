"""Our row-invariant GEMM kernel (orthrus/models/tiled_gemm.c): the bits of a row do not depend on
the rest of the pass, it serves the passes it was kept for, its choice is measured and cached per
CPU, decoding through it (eager and compiled) gives the tokens AR gives, and without it nothing
changes."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from conftest import random_prompts, run_decoder, tiny_adapter, tiny_base
from orthrus.config import GenerationConfig
from orthrus.decoding.generator import Decoder
from orthrus.models import tiled
from orthrus.models.llama import InferenceLinear, packing_available
from tiny import hf_model, ours_from_hf

needs_tiled = pytest.mark.skipif(not (packing_available() and tiled.available()),
                                 reason="no tiled kernel here (x86 AVX2/FMA and a C compiler) or no oneDNN packing")
VOCAB = 97


@needs_tiled
@pytest.mark.parametrize("n,k", [(40, 24), (64, 576), (100, 33)])
def test_tiled_rows_are_bitwise_independent_of_the_pass(n, k) -> None:
    """Outputs not a multiple of the panel width, odd feature counts, 21 rows (full row tiles and a
    remainder): every prefix of the rows, and every row alone, gets the same bits as in the full
    pass; close to F.linear; [B, T, K] inputs too."""
    torch.manual_seed(n + k)
    w, x = torch.randn(n, k), torch.randn(21, k)
    p = tiled.pack(w)
    full = tiled.gemm(x, p, n)
    assert full.shape == (21, n)
    assert (full - F.linear(x, w)).abs().max() < 1e-4 * k
    for m in (1, 2, 3, 5, 8, 9, 16):
        assert torch.equal(tiled.gemm(x[:m], p, n), full[:m]), m
    assert all(torch.equal(tiled.gemm(x[i:i + 1], p, n), full[i:i + 1]) for i in range(21))
    assert torch.equal(tiled.gemm(x.reshape(3, 7, k), p, n), full.reshape(3, 7, n))


@needs_tiled
def test_inference_linear_runs_the_tiled_kernel_for_passes_up_to_its_rows() -> None:
    """With panels for up to 8 rows: passes of 1-8 rows (any [B, T] shape) go through the tiled
    kernel (fused weights, bias added); larger ones give the bits they gave before; 0 drops them."""
    torch.manual_seed(0)
    ws, bs = [torch.randn(40, 24), torch.randn(8, 24)], [torch.randn(40), None]
    lin = InferenceLinear(ws, bs, pack=True, min_rows=4)
    before = InferenceLinear(ws, bs, pack=True, min_rows=4)
    lin.pack_tiled(8)
    assert lin.tiled is not None and lin.tiled_rows == 8
    bias = torch.cat([bs[0], torch.zeros(8)])
    for shape in ((1, 1, 24), (1, 8, 24), (2, 4, 24), (3, 24)):
        x = torch.randn(*shape)
        want = tiled.gemm(x, lin.tiled, 48) + bias
        assert torch.equal(lin.fused(x), want)
        assert all(torch.equal(a, b) for a, b in zip(lin(x), want.split([40, 8], -1)))
    for rows in (9, 16):
        x = torch.randn(1, rows, 24)
        assert all(torch.equal(a, b) for a, b in zip(lin(x), before(x))), rows
    lin.pack_tiled(0)
    assert lin.tiled is None and lin.tiled_rows == 0
    x = torch.randn(1, 4, 24)
    assert all(torch.equal(a, b) for a, b in zip(lin(x), before(x)))


@needs_tiled
def test_the_tiled_choice_is_measured_once_and_cached(tmp_path, monkeypatch) -> None:
    """prepare_inference() times the tiled kernel after the crossover and MKL (once per CPU,
    threads and model; kept ones replace the MKL packs and cover the LM head); a later start reads
    the answer; an entry written before the kernel existed (no tiled_rows) is measured again."""
    from orthrus.models.llama import CROSSOVER_CACHE, TILED_ROWS

    monkeypatch.setenv("ORTHRUS_CACHE", str(tmp_path))
    monkeypatch.setattr("orthrus.models.llama.busy_cores", lambda threads: 0.0)
    calls: list[int] = []

    def prepared(wins: bool):
        base = ours_from_hf(hf_model("llama", 0))
        monkeypatch.setattr(base, "measure_packed_min_rows", lambda rounds=3: 4)
        monkeypatch.setattr(base, "measure_mkl", lambda rows, rounds=3: True)

        def fake(rows, rounds=3):
            calls.append(rows)
            base.pack_tiled(rows if wins else 0)
            return wins
        monkeypatch.setattr(base, "measure_tiled", fake)
        base.prepare_inference()
        return base

    base = prepared(True)
    assert calls == [TILED_ROWS] and base.tiled_rows == TILED_ROWS and base.mkl_rows == 0
    assert base.head.tiled is not None and all(lin.tiled is not None for lin in base._inference_linears())
    # no oneDNN copy beside the panels: passes beyond TILED_ROWS take the plain kernel
    assert base.gemm_kernels() == {"tiled_rows": TILED_ROWS, "mkl_rows": 0, "packed_min_rows": None}
    x = torch.randn(1, TILED_ROWS + 1, base.config.hidden_size)
    lin = base.model.layers[0].mlp.gate_up
    assert torch.equal(lin.fused(x), torch.cat([F.linear(x, w) for w in lin.weights], -1))
    assert prepared(False).tiled_rows == TILED_ROWS and calls == [TILED_ROWS]  # read from the cache
    file = tmp_path / CROSSOVER_CACHE
    entries = json.loads(file.read_text())
    for e in entries.values():
        del e["tiled_rows"]
    file.write_text(json.dumps(entries))
    base = prepared(False)  # an old entry: measured again; not kept, the MKL packs stay
    assert len(calls) == 2 and base.tiled_rows == 0 and base.mkl_rows == 8 and base.head.tiled is None
    base.prepare_inference(pack=True)  # explicit packing: no tiled kernel unless asked
    assert base.tiled_rows == 0
    base.prepare_inference(pack=True, tiled_rows=16)
    assert base.tiled_rows == 16


def test_without_the_kernel_nothing_changes(tmp_path, monkeypatch) -> None:
    """ORTHRUS_TILED=off: the kernel is not available, prepare_inference keeps the vendor kernels
    (also where a cached choice, measured before, says tiled), and asking for panels says why not."""
    from orthrus.models.llama import CROSSOVER_CACHE

    monkeypatch.setenv("ORTHRUS_CACHE", str(tmp_path))
    monkeypatch.setattr("orthrus.models.llama.busy_cores", lambda threads: 0.0)
    base = ours_from_hf(hf_model("llama", 0))
    monkeypatch.setattr(base, "measure_packed_min_rows", lambda rounds=3: 4)
    monkeypatch.setattr(base, "measure_mkl", lambda rows, rounds=3: False)
    monkeypatch.setattr(base, "measure_tiled", lambda rows, rounds=3: True)
    if packing_available():
        base.cached_kernel_choice()  # a choice with the tiled kernel, on disk
        assert '"tiled_rows": 128' in (tmp_path / CROSSOVER_CACHE).read_text()
    monkeypatch.setenv("ORTHRUS_TILED", "off")
    monkeypatch.setattr(tiled, "_tried", False)
    monkeypatch.setattr(tiled, "_lib", None)
    assert not tiled.available()
    base = ours_from_hf(hf_model("llama", 0))
    base.prepare_inference()
    assert base.tiled_rows == 0
    with pytest.raises(ValueError, match="tiled GEMM kernel is not available"):
        base.pack_tiled(8)


@needs_tiled
def test_decoding_through_the_tiled_kernel_is_exact_eager_and_compiled() -> None:
    """A tiny model with every pass of up to 128 rows on the tiled kernel, and its passes of few
    rows on our attention kernel (heads of 16): parallel decoding (chain and tree verification,
    batch 2) gives AR's tokens, and so does the compiled cycle (both kernels called as opaque ops
    inside the graph)."""
    model = tiny_base("llama", hidden_size=96, head_dim=16)[1]
    model.prepare_inference(pack=True, tiled_rows=128)
    assert model.tiled_rows == 128 and model.own_attention(1) and model.own_attention(4)
    adapter = tiny_adapter(model, "full", block_size=4)
    prompts = random_prompts([6, 9], VOCAB, seed=5)
    ar, _ = run_decoder(model, adapter, prompts, GenerationConfig(max_new_tokens=40, mode="ar"))
    for verify in ("chain", "tree"):
        gen = GenerationConfig(max_new_tokens=40, mode="parallel", verify=verify)
        out, _ = run_decoder(model, adapter, prompts, gen)
        assert [r.tokens for r in out] == [r.tokens for r in ar], verify

    class Compiled(Decoder):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw, compile=True)

    out, dec = run_decoder(model, adapter, prompts[:1], gen, decoder_cls=Compiled)  # the tree config
    assert dec.compiled and len(dec._cycle_fn.compiles) >= 1
    assert out[0].tokens == ar[0].tokens


@needs_tiled
def test_half_panels_match_fp16_weights_in_fp32_arithmetic() -> None:
    """pack(w, half=True): float16 panels (half the bytes), float32 products and sums: each row
    bit for bit the same in any pass, and close to F.linear over the fp16-rounded weights."""
    torch.manual_seed(3)
    w, x = torch.randn(100, 40), torch.randn(11, 40)
    p = tiled.pack(w, half=True)
    assert p.dtype == torch.float16
    full = tiled.gemm(x, p, 100)
    assert (full - F.linear(x, w.half().float())).abs().max() < 1e-4 * 40
    assert all(torch.equal(tiled.gemm(x[i:i + 1], p, 100), full[i:i + 1]) for i in range(11))


@needs_tiled
def test_self_drafting_runs_the_tiled_half_kernel_where_the_model_kept_the_tiled_kernel() -> None:
    """A model that kept the tiled kernel self-drafts through float16 panels of it (TiledFp16Linear),
    one that did not through fbgemm's fp16 GEMM; a self-drafting row decodes AR's tokens either way."""
    from orthrus.models.quant import Fp16Linear, TiledFp16Linear, fp16_available

    model = tiny_base("llama")[1]
    prompts = random_prompts([7], VOCAB, seed=9)
    ar, _ = run_decoder(model, None, prompts, GenerationConfig(max_new_tokens=30, mode="ar"))
    for rows in (128,) + ((0,) if fp16_available() else ()):
        model.prepare_inference(pack=True, tiled_rows=rows)
        model.self_draft = None
        model.prepare_self_draft()
        assert isinstance(model.self_draft.head, TiledFp16Linear if rows else Fp16Linear)
        gen = GenerationConfig(max_new_tokens=30, mode="parallel", draft="self", block_size=4)
        out, _ = run_decoder(model, None, prompts, gen)
        assert out[0].tokens == ar[0].tokens, rows


@needs_tiled
def test_a_core_held_by_another_process_sends_the_kernel_to_one_thread() -> None:
    """Busy machine: with every core held by a spinning process, the helper thread arrives late to
    the regions, and after three late regions in a row the kernel runs a spell of calls on one
    thread (``single_spells`` counts them); the outputs are the same bits either way."""
    import os
    import subprocess
    import sys
    import time

    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    torch.manual_seed(0)
    w, x = torch.randn(2048, 576), torch.randn(8, 576)
    p = tiled.pack(w)
    want = tiled.gemm(x, p, 2048)
    before = tiled.single_spells()
    spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(os.cpu_count() or 2)]
    try:
        deadline = time.monotonic() + 30.0
        while tiled.single_spells() == before and time.monotonic() < deadline:
            assert torch.equal(tiled.gemm(x, p, 2048), want)
    finally:
        for s in spinners:
            s.kill()
            s.wait()
        torch.set_num_threads(threads)
    assert tiled.single_spells() > before, "no late regions seen in 30 s with every core held by a spinner"
    assert torch.equal(tiled.gemm(x, p, 2048), want)  # in the one-thread spell: the same bits



def _attention_case(b: int, t: int, s: int, seed: int):
    """Heads as the decoder has them: q a slice of a bigger tensor, k / v views of a longer cache."""
    torch.manual_seed(seed)
    qk = torch.randn(b, 9 + 3, t, 64)
    kc, vc = torch.randn(b, 3, s + 40, 64), torch.randn(b, 3, s + 40, 64)
    return qk[:, :9], kc, vc


@needs_tiled
@pytest.mark.parametrize("b,t,s", [(1, 1, 7), (1, 8, 320), (2, 5, 133), (3, 16, 64)])
def test_our_attention_matches_sdpa_and_each_row_reads_only_its_own_slots(b, t, s) -> None:
    """Our attention kernel against float64 SDPA (causal rows at different lengths per sequence, a
    tree-like mask with holes, a row that sees nothing); every row alone, over a cache length that
    ends at its last slot, gets the same bits as in the whole pass (so a 1-token step and a K-token
    pass agree on a query); stale slots past a row's last one are never read (NaN there changes
    nothing)."""
    q, kc, vc = _attention_case(b, t, s, seed=b * 100 + t)
    k, v = kc[:, :, :s], vc[:, :, :s]
    last = torch.tensor([s - 1 - 3 * i for i in range(b)])[:, None] - (t - 1 - torch.arange(t))  # [B, T]
    last = last.clamp_min(0)
    allowed = torch.arange(s) <= last[:, None, :, None]  # [B, 1, T, S]
    if t > 2:  # holes, as a verify tree has (each row sees its ancestors only)
        allowed[:, :, 2:, s - t:] &= torch.rand(b, 1, t - 2, t) < 0.5
        for i in range(b):  # each row still sees its own slot
            allowed[i, 0, torch.arange(t), last[i]] = True
    mask = torch.zeros(b, 1, t, s).masked_fill_(~allowed, float("-inf"))
    got = tiled.attention(q, k, v, mask)
    assert got.shape == (b, 9, t, 64) and got.transpose(1, 2).is_contiguous()  # heads merge as a view
    want = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=mask.double(), enable_gqa=True)
    assert (got - want).abs().max() < 2e-6
    for i in range(b):
        for j in range(t):
            n = int(last[i, j]) + 1
            one = tiled.attention(q[i:i + 1, :, j:j + 1], kc[i:i + 1, :, :n], vc[i:i + 1, :, :n],
                                  mask[i:i + 1, :, j:j + 1, :n].contiguous())
            assert torch.equal(one[0, :, 0], got[i, :, j]), (i, j)
    stale = kc.clone()
    stale[:, :, s:] = float("nan")
    assert torch.equal(tiled.attention(q, stale[:, :, :s + 40], vc[:, :, :s + 40],
                                       F.pad(mask, (0, 40), value=float("-inf"))), got)
    mask[0, 0, 0] = float("-inf")  # a row that sees nothing (padding) gives zeros, not NaN
    assert torch.equal(tiled.attention(q, k, v, mask)[0, :, 0], torch.zeros(9, 64))


@needs_tiled
def test_our_attention_serves_few_row_passes_where_the_tiled_kernel_serves() -> None:
    """own_attention: with the tiled GEMMs (up to attention_rows() rows, heads the kernel takes),
    not without them, not for longer passes; and a whole forward through it matches SDPA's."""
    model = tiny_base("llama", hidden_size=96, head_dim=16)[1]
    model.prepare_inference(pack=True, tiled_rows=0)
    assert not model.own_attention(1)
    model.prepare_inference(pack=True, tiled_rows=128)
    limit = tiled.attention_rows()
    assert model.own_attention(1) and model.own_attention(limit) and not model.own_attention(limit + 1)
    narrow = tiny_base("llama")[1]  # heads of 8: the AVX-512 build takes multiples of 16
    narrow.prepare_inference(pack=True, tiled_rows=128)
    assert narrow.own_attention(1) == (8 % tiled._attn_width == 0)
    tokens = torch.randint(3, VOCAB, (2, 24))
    with torch.inference_mode():
        cache = model.new_cache(2, 40)
        model(tokens[:, :20], torch.arange(20).expand(2, -1), cache, kv_len=20)
        pos = (20 + torch.arange(4)).expand(2, -1)
        ours = model.logits(model(tokens[:, 20:], pos, cache, kv_len=32))
        model.own_attention = lambda rows: False
        sdpa = model.logits(model(tokens[:, 20:], pos, cache, kv_len=32))
    assert (ours - sdpa).abs().max() < 1e-4
