"""The one-pass schedule: the verify segment and the candidate draft blocks in one forward.

The fused forward must equal, row for row, what the two separate computations give: the verify
segment a plain AR verify pass, and each candidate block a ``masked`` training block over the cache
as the verify pass leaves it (slots ``<= t + j``), computed by the training code's joint attention.
"""

from __future__ import annotations

import pytest
import torch

from orthrus.adapter import DiffusionAdapter
from orthrus.cache import KVCache
from orthrus.models.llama import packing_available
from tiny import hf_model, ours_from_hf


def _perturbed_adapter(base, kind: str, k: int) -> DiffusionAdapter:
    ad = DiffusionAdapter.init(base, "fp", kind=kind, block_size=k, lora_rank=4 if kind == "lora" else 0)
    with torch.no_grad():
        for p in ad.parameters():
            p.add_(0.05 * torch.randn_like(p))  # lora B = 0 at init: make the delta matter
    return ad.eval().requires_grad_(False)


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
@pytest.mark.parametrize("kind", ["full", "lora"])
@pytest.mark.parametrize("prepared", [False, True])
def test_fused_pass_equals_verify_plus_masked_blocks(arch: str, kind: str, prepared: bool) -> None:
    if prepared and not packing_available():
        pytest.skip("this torch has no oneDNN packed linear")
    torch.manual_seed(0)
    base = ours_from_hf(hf_model(arch, 0, initializer_range=0.5))
    k, b = 4, 2
    ad = _perturbed_adapter(base, kind, k)
    if prepared:
        base.prepare_inference()
        ad.prepare_inference()
    lengths = torch.tensor([9, 13])  # rows at different t
    prompt = torch.randint(0, base.config.vocab_size, (b, 13))
    verify = torch.randint(0, base.config.vocab_size, (b, k))
    offsets = torch.tensor([0, 2, 3])
    kv_len, cap = 24, 24 + len(offsets) * k
    cache = base.new_cache(b, cap)
    with torch.no_grad():
        base(prompt, torch.arange(13).expand(b, 13), cache, kv_len)  # row 0's slots >= 9 are stale junk
        ref_cache = KVCache([x.clone() for x in cache.k], [x.clone() for x in cache.v])
        positions = lengths[:, None] + torch.arange(k)
        h_ver, h_cand = ad.verify_and_draft(base, verify, positions, offsets, cache, kv_len)
        ref_ver = base(verify, positions, ref_cache, kv_len)
        torch.testing.assert_close(h_ver, ref_ver, atol=1e-4, rtol=1e-4)
        for layer in range(base.config.num_layers):  # the verify K/V landed where a verify pass puts them
            torch.testing.assert_close(cache.k[layer][:, :, :kv_len], ref_cache.k[layer][:, :, :kv_len],
                                       atol=1e-4, rtol=1e-4)
        masks = torch.ones(b, dtype=torch.bool)
        for c, j in enumerate(offsets.tolist()):
            for r in range(b):
                t = int(lengths[r])
                one = ref_cache.rows(r, r + 1)
                embeds = ad.block_embeds(base, verify[r, :1], k, masks[:1])  # [MASK x K]
                ctx = torch.ones(1, 1, 1, t + j + 1, dtype=torch.bool)
                ref = ad(base, embeds, torch.arange(t + j + 1, t + j + 1 + k)[None], one, t + j + 1, ctx, k)
                torch.testing.assert_close(h_cand[r, c], ref[0], atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------- decoding

from conftest import random_prompts, run_decoder, tiny_adapter, tiny_base  # noqa: E402
from orthrus.config import GenerationConfig  # noqa: E402


def onepass(n: int, candidates: int | None = None, **kw) -> GenerationConfig:
    return GenerationConfig(max_new_tokens=n, mode="parallel", schedule="one-pass", candidates=candidates, **kw)


def _hist(rows, k: int) -> list[int]:
    return [sum(x) for x in zip(*(r.stats.accept_hist + [0] * k for r in rows))]


@pytest.mark.parametrize("arch,kind", [("llama", "lora"), ("qwen3", "full"), ("mistral", "lora")])
@pytest.mark.parametrize("k,candidates", [(2, 1), (4, 1), (4, 2), (8, 3), (4, 4)])
def test_greedy_one_pass_equals_ar(arch: str, kind: str, k: int, candidates: int) -> None:
    """Token-identical to AR, with continuous batching (5 prompts through 2 slots), EOS and length
    ends inside a block; drafts are accepted, including past the last candidate (the shifted path)."""
    model = tiny_base(arch, initializer_range=0.02)[1]  # a peaked model: drafts are often right
    adapter = tiny_adapter(model, kind, block_size=k)
    prompts = random_prompts([5, 9, 3, 12, 7], model.config.vocab_size, seed=2)
    ar, _ = run_decoder(model, adapter, prompts, GenerationConfig(max_new_tokens=23), batch_size=2)
    eos = ar[1].tokens[9]
    ar, _ = run_decoder(model, adapter, prompts, GenerationConfig(max_new_tokens=23), batch_size=2, eos_ids=(eos,))
    op, _ = run_decoder(model, adapter, prompts, onepass(23, candidates), block_size=k, batch_size=2,
                        eos_ids=(eos,))
    assert [r.tokens for r in op] == [r.tokens for r in ar]
    assert [r.finish_reason for r in op] == [r.finish_reason for r in ar]
    for r in op:  # one forward per cycle
        assert r.stats.draft_passes == 0 and r.stats.forward_passes == r.stats.verify_passes
    hist = _hist(op, k)
    assert sum(hist[1:]) > 0, "no draft was ever accepted"


def test_one_pass_beside_two_pass_rows_stays_exact() -> None:
    """Rows of both schedules in one batch (the cycle then runs two-pass for all, and one-pass
    drafts go stale): still token-identical, and one-pass rows alone use one forward per cycle."""
    model = tiny_base("llama", initializer_range=0.02)[1]
    adapter = tiny_adapter(model, "lora", block_size=4)
    prompts = random_prompts([5, 9, 3, 12], model.config.vocab_size, seed=3)
    gens = [onepass(19), GenerationConfig(max_new_tokens=7, mode="parallel"), onepass(19), onepass(19)]
    ar, _ = run_decoder(model, adapter, prompts, GenerationConfig(max_new_tokens=19), batch_size=4)
    mixed, _ = run_decoder(model, adapter, prompts, gens, block_size=4, batch_size=4)
    for a, m, g in zip(ar, mixed, gens):
        assert m.tokens == a.tokens[: g.max_new_tokens]
    # once the two-pass row is done, the others run one-pass cycles (no draft pass)
    assert all(r.stats.draft_passes < r.stats.verify_passes for r in (mixed[0], mixed[2], mixed[3]))


@pytest.mark.parametrize("k,candidates,temperature,top_k,top_p", [
    (2, 1, 1.0, 0, 1.0),     # one draft
    (3, 2, 0.8, 5, 1.0),     # top-k; a > j* happens (the shifted drafts and one-hot junk)
    (4, 1, 1.3, 0, 0.9),     # top-p, one candidate: mostly shifted drafts
])
def test_sampling_one_pass_matches_exact_ar_distribution(k, candidates, temperature, top_k, top_p):
    from chi2 import assert_sequence_distribution
    from test_decoding import exact_sequence_probs, perturb, sampling_model

    model = sampling_model()
    adapter = perturb(tiny_adapter(model, "full", block_size=k), scale=0.3, seed=1)  # q differs from p
    prompt, n, rows = [3, 1, 4, 1, 5], 4, 16000
    probs = exact_sequence_probs(model, prompt, n, temperature, top_k, top_p)
    gens = [onepass(n, candidates, temperature=temperature, top_k=top_k, top_p=top_p, seed=1000 + s)
            for s in range(rows)]
    out, _ = run_decoder(model, adapter, [prompt] * rows, gens, block_size=k, decode=lambda ids: "")
    assert_sequence_distribution(torch.tensor([r.tokens for r in out]), probs, model.config.vocab_size)
    hist = _hist(out, k)
    assert hist[0] > 0 and sum(hist[1:]) > 0  # drafts were used, with both outcomes
