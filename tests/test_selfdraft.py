"""Self-drafting (``draft='self'`` / ``'hybrid-self'``): an fp16-weight copy of the frozen model
drafts K-1 tokens one step at a time, the fp32 model verifies them. No adapter is needed.

Checked: greedy output equals AR for several families, block sizes and uneven batches, with and
without an adapter, and in one batch beside rows drafting by diffusion, by n-gram and AR rows;
the fp16 copy's drafts are accepted (they nearly always agree with the fp32 model) and each cycle
counts K-1 draft passes; a seeded sampled row is the same alone or batched; the sampling
distribution test (tests/test_decoding.py) covers self drafts.
"""

from __future__ import annotations

import pytest
import torch

from conftest import random_prompts, run_decoder, tiny_adapter, tiny_base
from orthrus.config import GenerationConfig
from orthrus.decoding.generator import Decoder
from orthrus.models.quant import fp16_available
from test_decoding import perturb

pytestmark = pytest.mark.skipif(not fp16_available(), reason="this torch has no fbgemm fp16 linear")


def gen(n: int, draft: str = "self", **kw) -> GenerationConfig:
    return GenerationConfig(max_new_tokens=n, mode="parallel", draft=draft, **kw)


def toks(rows) -> list[list[int]]:
    return [r.tokens for r in rows]


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_self_drafts_greedy_equals_ar_and_are_accepted(arch: str) -> None:
    model = tiny_base(arch, seed=5)[1]
    model.prepare_inference()
    prompts = random_prompts([7, 2, 12], model.config.vocab_size, seed=6)
    ar = toks(run_decoder(model, None, prompts, GenerationConfig(max_new_tokens=30))[0])
    for k in (2, 5):
        rows, _ = run_decoder(model, None, prompts, gen(30), block_size=k, batch_size=2)
        assert toks(rows) == ar, f"K = {k}"
        drafts = sum(r.stats.draft_passes for r in rows)
        cycles = sum(r.stats.verify_passes for r in rows)
        assert drafts == (k - 1) * cycles  # one draft pass per drafted token
        accepted = sum(sum(r.stats.accept_hist[1:]) for r in rows)
        assert accepted > 0.8 * cycles, (accepted, cycles)  # the fp16 copy agrees nearly always


def test_self_hybrid_diffusion_ngram_and_ar_rows_in_one_batch_equal_ar() -> None:
    model = tiny_base("mistral", seed=7)[1]
    adapter = perturb(tiny_adapter(model, "lora", block_size=4), scale=0.2)
    model.prepare_inference()
    adapter.prepare_inference()
    v = model.config.vocab_size
    prompts = random_prompts([6, 9, 4, 11, 5], v, seed=8)
    prompts[1] = prompts[1] + prompts[1][:6]  # something for the n-gram lookup to match
    ar = toks(run_decoder(model, adapter, prompts, GenerationConfig(max_new_tokens=28))[0])
    gens = [gen(28, "self"), gen(28, "hybrid-self"), gen(28, "diffusion"), gen(28, "ngram"),
            GenerationConfig(max_new_tokens=28)]
    rows, _ = run_decoder(model, adapter, prompts, gens, block_size=4, capacity=64)  # hybrid: K = 8
    assert toks(rows) == ar
    assert rows[0].stats.draft_passes > 0 and rows[3].stats.draft_passes == 0


def test_self_drafts_seeded_sample_is_the_same_alone_or_batched() -> None:
    model = tiny_base("qwen3", seed=9)[1]
    model.prepare_inference()
    prompts = random_prompts([6, 3, 9], model.config.vocab_size, seed=10)
    g = gen(20, temperature=1.0, seed=7)
    alone = run_decoder(model, None, [prompts[0]], g, block_size=4)[0][0].tokens
    batched = run_decoder(model, None, prompts, [g, gen(25, temperature=0.7, top_k=5, seed=8), gen(14)],
                          block_size=4)[0]
    assert batched[0].tokens == alone
    other = run_decoder(model, None, [prompts[0]], gen(20, temperature=1.0, seed=70), block_size=4)[0][0].tokens
    assert other != alone


def test_self_draft_refused_where_it_cannot_run() -> None:
    model = tiny_base("llama", seed=1)[1].to(torch.bfloat16)
    with pytest.raises(ValueError, match="float32 model on a CPU"):
        model.prepare_self_draft()


def test_cli_draft_self_needs_no_adapter(tmp_path, capsys):
    import json

    from test_loading import save_tiny
    from test_ngram import _cli

    folder = tmp_path / "tiny"
    save_tiny(folder, "llama", initializer_range=0.02)  # a random HF folder: no adapter exists for it
    base = ["generate", "w3 w4 w5", "w9 w8", "--model", str(folder), "--no-chat-template", "--json",
            "--max-new-tokens", "20", "--batch-size", "2"]
    rc, out_ar, _ = _cli([*base, "--mode", "ar"], capsys)
    assert rc == 0
    for draft in ("self", "hybrid-self"):
        rc, out, err = _cli([*base, "--draft", draft, "--block-size", "4"], capsys)  # parallel implied
        assert rc == 0, err
        assert f"draft {draft}]" in err
        rows = [json.loads(ln) for ln in out.splitlines()]
        assert [r["token_ids"] for r in rows] == [json.loads(ln)["token_ids"] for ln in out_ar.splitlines()]
        assert sum(r["stats"]["verify_passes"] for r in rows) < 2 * 20


def test_adapter_drafts_have_their_own_tighter_row_cap() -> None:
    """``max_diffusion_rows``: with more rows than it, a cycle with adapter drafts decodes one
    token a pass (exact either way), while self-drafted rows keep drafting up to ``max_draft_rows``."""
    model = tiny_base("llama", seed=13)[1]
    model.prepare_inference()
    adapter = tiny_adapter(model, "full", block_size=4)
    prompts = random_prompts([5, 8, 3], model.config.vocab_size, seed=14)
    lengths = [6, 8, 30]
    ar = toks(run_decoder(model, None, prompts, [GenerationConfig(max_new_tokens=n) for n in lengths])[0])
    capped = lambda *a, **k: Decoder(*a, **k, max_draft_rows=4, max_diffusion_rows=2)  # noqa: E731
    rows, dec = run_decoder(model, adapter, prompts, [gen(n, "diffusion") for n in lengths], block_size=4,
                            capacity=64, decoder_cls=capped)
    assert dec.max_diffusion_rows == 2 and toks(rows) == ar
    assert rows[0].stats.draft_passes == 0  # it only ever decoded beside two others
    assert rows[2].stats.draft_passes > 0  # fewer rows later: the adapter drafts again
    rows, _ = run_decoder(model, adapter, prompts, [gen(n, "self") for n in lengths], block_size=4,
                          capacity=64, decoder_cls=capped)
    assert toks(rows) == ar and all(r.stats.draft_passes > 0 for r in rows)  # 3 <= 4 rows: self drafts
    plain = Decoder(model, adapter, (), str, 3, 64, max_draft_rows=4)
    assert plain.max_diffusion_rows == 4  # unset: the general cap


def test_row_caps_leave_sampled_cycles_drafting_so_a_seed_reproduces_in_any_batch() -> None:
    model = tiny_base("llama", seed=15)[1]
    model.prepare_inference()
    adapter = tiny_adapter(model, "full", block_size=4)
    prompts = random_prompts([5, 8, 3], model.config.vocab_size, seed=16)
    gens = [gen(12, "diffusion", temperature=0.9, seed=40 + i) for i in range(3)]
    capped = lambda *a, **k: Decoder(*a, **k, max_draft_rows=1, max_diffusion_rows=1)  # noqa: E731
    rows, _ = run_decoder(model, adapter, prompts, gens, block_size=4, capacity=64, decoder_cls=capped)
    assert all(r.stats.draft_passes > 0 for r in rows)  # 3 rows > the caps, but sampled: drafted
    for i in range(3):
        alone, _ = run_decoder(model, adapter, prompts[i:i + 1], gens[i:i + 1], block_size=4, capacity=64,
                               decoder_cls=capped)
        assert alone[0].tokens == rows[i].tokens


def test_max_draft_rows_decodes_one_token_a_pass_beyond_it_and_stays_exact() -> None:
    """With more rows decoding than ``max_draft_rows``, cycles verify one token per row and draft
    nothing; once rows finish and few are left, drafting resumes. The output is AR's either way."""
    model = tiny_base("llama", seed=11)[1]
    model.prepare_inference()
    prompts = random_prompts([5, 8, 3], model.config.vocab_size, seed=12)
    lengths = [6, 8, 40]  # two short rows, then the long one decodes alone
    ar = toks(run_decoder(model, None, prompts, [GenerationConfig(max_new_tokens=n) for n in lengths])[0])
    gens = [gen(n, "hybrid-self") for n in lengths]
    rows, dec = run_decoder(model, None, prompts, gens, block_size=4, capacity=64,
                            decoder_cls=lambda *a, **k: Decoder(*a, **k, max_draft_rows=1))
    assert dec.max_draft_rows == 1
    assert toks(rows) == ar
    assert rows[0].stats.draft_passes == 0 and rows[1].stats.draft_passes == 0  # never alone
    assert rows[2].stats.draft_passes > 0  # alone at the end: drafts again
    assert rows[2].stats.verify_passes < 40
