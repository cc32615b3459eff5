"""The CPU fast path (prepacked oneDNN weights, fused q/k/v and gate/up, the draft through the same
cached attention as AR): same results as the plain kernels, measured on the real model.

Different kernels round differently, so "exact" is checked, not assumed: greedy decoding of real
prompts with the shipped adapter, K = 1 (AR), 4, 8, 16 in a batch of 3 and K = 8 alone, prepacked
and plain, must give token-identical outputs.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from orthrus.adapter import DiffusionAdapter
from orthrus.cache import KVCache
from orthrus.models.llama import (NEVER_PACKED, InferenceLinear, mkl_packing_available, packed_crossover,
                                  packing_available)
from tiny import hf_model, ours_from_hf

SHIPPED = Path(__file__).resolve().parents[1] / "orthrus" / "adapters" / "smollm2-135m"
needs_packing = pytest.mark.skipif(not packing_available(), reason="this torch has no oneDNN packed linear")
needs_mkl = pytest.mark.skipif(not (packing_available() and mkl_packing_available()),
                               reason="this torch has no oneDNN or no MKL packed linear")


@needs_packing
def test_packed_linear_rows_do_not_depend_on_the_row_count() -> None:
    """A packed GEMM gives each row the same bits whatever the number of rows (>= the packed
    threshold), close to the plain kernel, for fused weights with and without bias."""
    torch.manual_seed(0)
    ws = [torch.randn(48, 32), torch.randn(16, 32)]
    bs = [torch.randn(48), None]
    lin = InferenceLinear(ws, bs, pack=True)
    x = torch.randn(2, 16, 32)
    full = lin(x)
    for rows in (1, 2, 3, 8, 16):
        part = lin(x[:1, :rows].contiguous())
        assert all(torch.equal(p, f[:1, :rows]) for p, f in zip(part, full))
    ref = (torch.nn.functional.linear(x, ws[0], bs[0]), torch.nn.functional.linear(x, ws[1]))
    assert all((a - b).abs().max() < 1e-4 for a, b in zip(full, ref))


@needs_mkl
def test_an_mkl_pack_serves_its_row_count_alone() -> None:
    """With an MKL pack for 8 rows, passes of 8 rows (in any [B, T] shape) go through it, close to
    the plain kernel, fused weights with and without bias; every other row count gives the bits it
    gave without the pack; a pack for 0 rows drops it."""
    torch.manual_seed(0)
    ws, bs = [torch.randn(40, 24), torch.randn(8, 24)], [torch.randn(40), None]
    lin = InferenceLinear(ws, bs, pack=True, min_rows=4)
    before = InferenceLinear(ws, bs, pack=True, min_rows=4)
    lin.pack_mkl(8)
    assert lin.mkl_rows == 8
    for shape in ((1, 8, 24), (2, 4, 24), (8, 24)):
        x = torch.randn(*shape)
        ref = (torch.nn.functional.linear(x, ws[0], bs[0]), torch.nn.functional.linear(x, ws[1]))
        got = lin(x)
        assert [g.shape for g in got] == [r.shape for r in ref]
        assert all((a - b).abs().max() < 1e-4 for a, b in zip(got, ref))
        assert torch.equal(lin.fused(x), torch.cat(got, -1))
    for rows in (1, 3, 4, 7, 16):
        x = torch.randn(1, rows, 24)
        assert all(torch.equal(a, b) for a, b in zip(lin(x), before(x))), rows
    lin.pack_mkl(0)
    assert lin.mkl is None and lin.mkl_rows == 0
    x = torch.randn(1, 8, 24)
    assert all(torch.equal(a, b) for a, b in zip(lin(x), before(x)))


def test_packed_crossover_is_the_smallest_row_count_from_which_packing_wins() -> None:
    # (packed, plain) seconds per row count
    assert packed_crossover({1: (1.0, 2.0), 2: (1.0, 2.0), 4: (1.0, 2.0), 8: (1.0, 2.0)}) == 1
    assert packed_crossover({1: (38.3, 29.0), 2: (38.9, 29.2), 4: (40.5, 43.6), 8: (45.4, 55.5)}) == 4  # an AMX Xeon
    assert packed_crossover({1: (1.0, 2.0), 2: (3.0, 2.0), 4: (1.0, 2.0), 8: (1.0, 2.0)}) == 4
    assert packed_crossover({1: (1.0, 2.0), 2: (1.0, 2.0), 4: (1.0, 2.0), 8: (3.0, 2.0)}) == NEVER_PACKED


@needs_packing
def test_passes_below_min_rows_take_the_plain_kernel() -> None:
    torch.manual_seed(0)
    ws, bs = [torch.randn(40, 24), torch.randn(8, 24)], [torch.randn(40), torch.randn(8)]
    lin = InferenceLinear(ws, bs, pack=True, min_rows=4)
    plain = InferenceLinear(ws, bs, pack=False)
    packed = InferenceLinear(ws, bs, pack=True, min_rows=1)
    for rows in (1, 3, 4, 7):
        x = torch.randn(1, rows, 24)
        want = plain(x) if rows < 4 else packed(x)
        assert all(torch.equal(a, b) for a, b in zip(lin(x), want)), rows
        assert torch.equal(lin.fused(x), torch.cat(want, -1))


@needs_packing
def test_auto_prepare_measures_the_crossover_and_explicit_packing_keeps_the_default(tmp_path, monkeypatch) -> None:
    from orthrus.models.llama import CROSSOVER_ROWS, MKL_ROWS, PACKED_MIN_ROWS

    monkeypatch.setenv("ORTHRUS_CACHE", str(tmp_path))  # measured here, not read from a cache
    base = ours_from_hf(hf_model("llama", 0))
    base.prepare_inference()
    if base.tiled_rows:  # our tiled kernel won here: no oneDNN copy beside it (tests/test_tiled.py)
        assert base.packed_min_rows is None and base.mkl_rows == 0
    else:
        assert base.packed_min_rows in CROSSOVER_ROWS + (NEVER_PACKED,)
        assert {lin.min_rows for lin in base._inference_linears()} == {base.packed_min_rows}
        assert base.mkl_rows in ((0, MKL_ROWS) if mkl_packing_available() else (0,))
    assert base.head.mkl is None  # the LM head is never MKL-packed
    base.prepare_inference(pack=True)
    assert base.packed_min_rows == PACKED_MIN_ROWS and base.mkl_rows == 0
    if mkl_packing_available():
        base.prepare_inference(pack=True, mkl_rows=4)
        assert base.mkl_rows == 4
    base.prepare_inference(pack=True, min_rows=8)
    assert base.packed_min_rows == 8
    base.prepare_inference(pack=False)
    assert base.packed_min_rows is None


@needs_packing
def test_the_measured_crossover_is_kept_per_cpu_threads_and_model(tmp_path, monkeypatch) -> None:
    """A start reads the crossover an earlier one measured on the same CPU, thread count and model
    shape, and measures again for another thread count, or when the cache file is unreadable."""
    from orthrus.models.llama import CROSSOVER_CACHE

    monkeypatch.setenv("ORTHRUS_CACHE", str(tmp_path))
    monkeypatch.setattr("orthrus.models.llama.busy_cores", lambda threads: 0.0)  # an idle CPU
    calls: list[int] = []

    def fake_measure(rounds: int = 3) -> int:
        calls.append(torch.get_num_threads())
        return 4

    def prepared() -> int | None:
        base = ours_from_hf(hf_model("llama", 0))
        monkeypatch.setattr(base, "measure_packed_min_rows", fake_measure)
        monkeypatch.setattr(base, "measure_mkl", lambda rows, rounds=3: False)
        monkeypatch.setattr(base, "measure_tiled", lambda rows, rounds=3: False)
        base.prepare_inference()
        assert base.mkl_rows == 0
        return base.packed_min_rows

    assert prepared() == 4 and len(calls) == 1
    assert prepared() == 4 and len(calls) == 1  # a new process (a new model object) reads the cache
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(threads + 1)
        assert prepared() == 4 and len(calls) == 2
    finally:
        torch.set_num_threads(threads)
    (tmp_path / CROSSOVER_CACHE).write_text("{not json")
    assert prepared() == 4 and len(calls) == 3
    assert prepared() == 4 and len(calls) == 3  # rewritten whole


@needs_packing
def test_a_crossover_timed_on_a_busy_cpu_is_used_but_not_kept(tmp_path, monkeypatch) -> None:
    """Timed while other work held the cores, the crossover serves the process that measured it,
    but the next start measures again (on an idle CPU), and only that answer is kept."""
    from orthrus.models.llama import BUSY_CORES, CROSSOVER_CACHE

    monkeypatch.setenv("ORTHRUS_CACHE", str(tmp_path))
    load = [BUSY_CORES + 0.5]
    monkeypatch.setattr("orthrus.models.llama.busy_cores", lambda threads: load[0])
    answers = iter([1, 4, 8])

    def prepared() -> int | None:
        base = ours_from_hf(hf_model("llama", 0))
        monkeypatch.setattr(base, "measure_packed_min_rows", lambda rounds=3: next(answers))
        monkeypatch.setattr(base, "measure_mkl", lambda rows, rounds=3: False)
        monkeypatch.setattr(base, "measure_tiled", lambda rows, rounds=3: False)
        base.prepare_inference()
        return base.packed_min_rows

    assert prepared() == 1  # busy: measured, used
    assert not (tmp_path / CROSSOVER_CACHE).exists()
    load[0] = 0.0
    assert prepared() == 4  # idle: measured again, kept
    assert prepared() == 4  # read back, not measured a third time
    entries = json.loads((tmp_path / CROSSOVER_CACHE).read_text())
    assert [(e["min_rows"], e["mkl_rows"]) for e in entries.values()] == [(4, 0)]


def test_busy_cores_counts_the_load_beyond_the_cores_left_free(monkeypatch) -> None:
    import os

    from orthrus.models.quant import busy_cores

    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    monkeypatch.setattr(os, "getloadavg", lambda: (7.0, 0.0, 0.0))
    assert busy_cores(2) == pytest.approx(1.0)  # 6 cores free for the load, 1 more busy
    assert busy_cores(8) == pytest.approx(7.0)
    monkeypatch.setattr(os, "getloadavg", lambda: (3.0, 0.0, 0.0))
    assert busy_cores(2) == 0.0

    def no_load() -> tuple[float, float, float]:
        raise OSError("no load average here")

    monkeypatch.setattr(os, "getloadavg", no_load)
    assert busy_cores(2) == 0.0


@needs_packing
@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
@pytest.mark.parametrize("kind", ["full", "lora"])
def test_prepared_forward_and_draft_match_the_plain_ones(arch: str, kind: str) -> None:
    """Tiny models: the prepared AR forward and draft pass (LoRA merged) equal the plain forward and
    the training-time joint attention (the draft block's K/V written into the slots the verify pass
    overwrites, nothing below ``t`` touched)."""
    torch.manual_seed(0)
    base = ours_from_hf(hf_model(arch, 0, initializer_range=0.5))
    ad = DiffusionAdapter.init(base, "fp", kind=kind, block_size=4, lora_rank=4 if kind == "lora" else 0)
    if kind == "lora":
        with torch.no_grad():
            for p in ad.parameters():
                p.add_(0.05 * torch.randn_like(p))  # B = 0 at init: make the delta matter
    tokens = torch.randint(0, base.config.vocab_size, (2, 12))
    pos = torch.arange(12).expand(2, 12)
    k, t = 4, 12
    block_pos = (t + torch.arange(k)).expand(2, k)
    anchors = tokens[:, -1]
    results = {}
    with torch.no_grad():
        for prepared in (False, True):
            if prepared:
                base.prepare_inference(pack=True)
                ad.prepare_inference(pack=True)
            cache = base.new_cache(2, 32)
            h = base(tokens, pos, cache, kv_len=t)
            before = [x.clone() for x in cache.k]
            d = ad.draft(base, anchors, block_pos, cache, t + k)
            assert all(torch.equal(a[:, :, :t], b[:, :, :t]) for a, b in zip(cache.k, before))
            results[prepared] = (base.logits(h), base.logits(d))
        # the draft as training computes it: joint attention over the cache (< t) and the block
        base.release_inference()
        for attn in ad.layers:
            attn.qkv = attn.o = None
        ctx_mask = torch.ones(2, 1, 1, t, dtype=torch.bool)
        ref = base.logits(ad(base, ad.block_embeds(base, anchors, k), block_pos, KVCache(cache.k, cache.v), t,
                             ctx_mask, k))
    for a, b in zip(results[False], results[True]):
        assert (a - b).abs().max() < 1e-3
    assert (results[False][1] - ref).abs().max() < 1e-3


@pytest.mark.slow
@pytest.mark.skipif(not (SHIPPED / "adapter.safetensors").is_file(), reason="no shipped adapter")
def test_real_model_fast_path_is_exact() -> None:
    """Greedy, fp32, the shipped adapter: prepared AR == plain AR, and parallel at K = 4, 8, 16 in
    a batch of 3 (and K = 8 alone; verify trees, and chains at K = 8) == AR, token for token, on prompts of uneven length (~100 new tokens each); the
    drafts come from the draft-only int8 weights (the default on a CPU). K = 8 alone runs through
    MKL's packs too, where this CPU's kernel choice did not already take them."""
    from orthrus.engine import Orthrus

    from orthrus.models.quant import int8_available

    engine = Orthrus.from_pretrained("smollm2-135m")
    assert engine.model.prepared
    assert engine.draft_int8 == int8_available()  # drafts from int8 weights, where fbgemm exists
    prompts = ["Write a Python function that merges two sorted lists.",
               "Explain in a few sentences why the sky is blue.",
               "List five ideas for a birthday party for a ten-year-old, with one sentence each.",
               "def fib(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\""]
    n = 96
    ar = [c.token_ids for c in engine.generate(prompts, mode="ar", max_new_tokens=n, batch_size=3)]
    # each K in a batch of 3 (rows of uneven length side by side), K = 8 alone too: six runs took
    # ~6 of CI's minutes on a memory-bound CPU. The shipped adapter records its rank rates, so greedy
    # rows verify trees by default (the accepted path's K/V moved in the cache); K = 8 in a batch
    # verifies chains too
    assert engine.adapter.config.draft_ranks
    for k, batch, verify in ((4, 3, "auto"), (8, 1, "auto"), (8, 3, "auto"), (8, 3, "chain"), (16, 3, "auto")):
        par = engine.generate(prompts, mode="parallel", block_size=k, max_new_tokens=n, batch_size=batch,
                              verify=verify)
        assert [c.token_ids for c in par] == ar, f"K = {k}, batch {batch}, verify {verify}"
    if mkl_packing_available() and engine.model.mkl_rows != 8:  # the MKL kernel, where this CPU did not pick it
        engine.model.pack_mkl(8)
        try:
            par = engine.generate(prompts, mode="parallel", block_size=8, max_new_tokens=n, batch_size=1)
        finally:
            engine.model.pack_mkl(0)
        assert [c.token_ids for c in par] == ar, "K = 8, MKL packs"
    from orthrus.models import tiled
    from orthrus.models.llama import TILED_ROWS
    if tiled.available() and engine.model.tiled_rows == 0:  # the tiled kernel, where this CPU did not pick it
        engine.model.pack_tiled(TILED_ROWS)
        try:
            par = engine.generate(prompts, mode="parallel", block_size=8, max_new_tokens=n, batch_size=3)
            tar = [c.token_ids for c in engine.generate(prompts, mode="ar", max_new_tokens=n, batch_size=1)]
        finally:
            engine.model.pack_tiled(0)
        assert [c.token_ids for c in par] == ar and tar == ar, "K = 8, tiled kernel"
    engine.model.release_inference()
    try:
        plain = [c.token_ids for c in engine.generate(prompts, mode="ar", max_new_tokens=n, batch_size=1)]
    finally:
        engine.model.prepare_inference()
    assert plain == ar


@pytest.mark.slow
@pytest.mark.skipif(not (SHIPPED / "adapter.safetensors").is_file(), reason="no shipped adapter")
def test_real_model_compiled_decoding_is_exact() -> None:
    """--compile on the real model (Inductor around the prepacked GEMMs, int8 drafts): compiled AR
    (batch 1) == eager AR, and compiled parallel decoding (verify trees at K = 8, batches 1 and 3)
    == AR, token for token, on prompts of uneven length (~100 new tokens each). On an empty compile
    cache this compiles four graphs, 2-3 minutes on a 2-core CPU."""
    from orthrus.engine import Orthrus

    prompts = ["Write a Python function that merges two sorted lists.",
               "Explain in a few sentences why the sky is blue.",
               "def fib(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\""]
    n = 96
    eager = Orthrus.from_pretrained("smollm2-135m")
    ar = [c.token_ids for c in eager.generate(prompts, mode="ar", max_new_tokens=n, batch_size=1)]
    del eager
    engine = Orthrus.from_pretrained("smollm2-135m", compile=True)
    assert engine.compile and engine.model.prepared
    got = [c.token_ids for c in engine.generate(prompts, mode="ar", max_new_tokens=n, batch_size=1)]
    assert got == ar, "compiled AR"
    for batch in (1, 3):
        par = engine.generate(prompts, mode="parallel", block_size=8, max_new_tokens=n, batch_size=batch)
        assert [c.token_ids for c in par] == ar, f"compiled parallel, batch {batch}"
        assert sum(c.stats.tokens for c in par) > sum(c.stats.verify_passes for c in par)  # drafts were kept
