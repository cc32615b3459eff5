"""Our compact model computes what transformers computes.

Tiny random models of every family (llama with llama3 rope scaling, qwen2 with q/k/v biases, qwen3
with q/k norms, mistral), tied and untied embeddings, fp32: logits agree to 1e-4 on a full forward,
through an incremental static cache, for a right-padded batch of uneven prompts, and after a
rollback (stale K/V overwritten); greedy tokens equal ``generate(do_sample=False)``. The real default
model: logits on a chat prompt and 32 greedy tokens on two prompts.
"""

from __future__ import annotations

from functools import lru_cache

import pytest
import torch
from transformers import AutoConfig

from conftest import random_prompts, run_decoder, tiny_adapter, tiny_base
from orthrus.config import ModelConfig
from orthrus.errors import OrthrusError
from tiny import FAMILIES

TOL = 1e-4
VOCAB = 97


@lru_cache(maxsize=None)
def pair(arch: str, tied: bool):
    return tiny_base(arch, seed=3, tie_word_embeddings=tied)


def hf_logits(hf, tokens: list[int] | torch.Tensor) -> torch.Tensor:
    t = torch.as_tensor(tokens)
    with torch.no_grad():
        return hf(t.view(1, -1) if t.dim() == 1 else t).logits.float()


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return float((a - b).abs().max())


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("arch", FAMILIES)
def test_full_forward_and_incremental_cache(arch, tied):
    hf, ours = pair(arch, tied)
    assert (ours.lm_head.weight is ours.model.embed_tokens.weight) == tied
    if arch == "llama":
        assert ours.config.rope.kind == "llama3"
    tokens = torch.tensor(random_prompts([16, 16], VOCAB, seed=1))  # [2, 16]
    pos = torch.arange(16).expand(2, 16)
    ref = hf_logits(hf, tokens)  # [2, 16, V]
    assert ref.abs().max() > 1.0  # logits of a real size, so that 1e-4 means something
    with torch.inference_mode():
        full = ours.logits(ours(tokens, pos, ours.new_cache(2, 16)))
        assert max_diff(full, ref) <= TOL
        # prefill 6 tokens, then one at a time, attending over a tight bound and over the whole cache
        for bound in (True, False):
            cache = ours.new_cache(2, 24)
            steps = [ours.logits(ours(tokens[:, :6], pos[:, :6], cache, kv_len=6 if bound else None))]
            for i in range(6, 16):
                kv_len = i + 1 if bound else None
                steps.append(ours.logits(ours(tokens[:, i:i + 1], pos[:, i:i + 1], cache, kv_len)))
            assert max_diff(torch.cat(steps, 1), ref) <= TOL


@pytest.mark.parametrize("arch", FAMILIES)
def test_uneven_batch_right_padded_then_per_row_steps(arch):
    """Right-padded prefill of uneven prompts into one cache, then single steps at each row's own
    position (pad K/V is overwritten or masked), compared with transformers on each row alone."""
    hf, ours = pair(arch, False)
    lengths = [3, 9, 6]
    prompts = random_prompts(lengths, VOCAB, seed=2)
    extra = random_prompts([4, 4, 4], VOCAB, seed=3)  # tokens fed one per step
    t_max = max(lengths)
    padded = torch.zeros(3, t_max, dtype=torch.long)
    for i, p in enumerate(prompts):
        padded[i, : len(p)] = torch.tensor(p)
        padded[i, len(p):] = 5  # a real token id, so the pad K/V is not zero
    n = torch.tensor(lengths)
    with torch.inference_mode():
        cache = ours.new_cache(3, 16)
        pre = ours.logits(ours(padded, torch.arange(t_max).expand(3, t_max), cache, kv_len=t_max))
        for i, p in enumerate(prompts):
            assert max_diff(pre[i, : len(p)], hf_logits(hf, p)[0]) <= TOL
        for s in range(4):
            tok = torch.tensor([e[s] for e in extra])[:, None]
            pos = (n + s)[:, None]
            step = ours.logits(ours(tok, pos, cache, kv_len=int(pos.max()) + 1))  # [3, 1, V]
            for i, p in enumerate(prompts):
                ref = hf_logits(hf, p + extra[i][: s + 1])[0, -1]
                assert max_diff(step[i, 0], ref) <= TOL


@pytest.mark.parametrize("arch", ["qwen3", "mistral"])
def test_rollback_overwrites_rejected_positions(arch):
    """A verify pass writes K positions; only some are committed and the next pass writes over
    the rest: the result is as if the rejected tokens had never been there."""
    hf, ours = pair(arch, False)
    prompt, block, fix = random_prompts([7, 4, 3], VOCAB, seed=4)
    with torch.inference_mode():
        cache = ours.new_cache(1, 32)
        ours(torch.tensor([prompt]), torch.arange(7)[None], cache, kv_len=7)
        ours(torch.tensor([block]), torch.arange(7, 11)[None], cache, kv_len=11)  # 4 slots written
        # keep block[0] only; write 3 other tokens at 8..10 (the stale K/V at 8..10 is replaced)
        out = ours.logits(ours(torch.tensor([fix]), torch.arange(8, 11)[None], cache, kv_len=16))
    ref = hf_logits(hf, prompt + block[:1] + fix)[0, -3:]
    assert max_diff(out[0], ref) <= TOL


@pytest.mark.parametrize("arch", FAMILIES)
def test_greedy_equals_hf_generate(arch):
    """20 greedy tokens (EOS id 2 honoured by both) per row of an uneven batch, AR and parallel."""
    hf, ours = pair(arch, arch == "qwen2")  # one tied family
    prompts = random_prompts([4, 11, 7], VOCAB, seed=5)
    refs = []
    for p in prompts:
        with torch.no_grad():
            out = hf.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                              max_new_tokens=20, do_sample=False, eos_token_id=2, pad_token_id=0)
        refs.append(out[0, len(p):].tolist())
    assert any(len(set(r)) > 3 for r in refs)  # not a model that repeats one token
    from orthrus.config import GenerationConfig
    ar, _ = run_decoder(ours, None, prompts, GenerationConfig(max_new_tokens=20), eos_ids=(2,))
    assert [r.tokens for r in ar] == refs
    adapter = tiny_adapter(ours, "full", block_size=4)
    par, _ = run_decoder(ours, adapter, prompts, GenerationConfig(max_new_tokens=20, mode="parallel"),
                         eos_ids=(2,))
    assert [r.tokens for r in par] == refs


@pytest.mark.parametrize("arch", FAMILIES)
def test_bf16_smoke(arch):
    """bf16 runs and stays close to the fp32 reference (loose: bf16 keeps 8 bits of mantissa)."""
    hf, ours32 = pair(arch, False)
    ours = tiny_base(arch, seed=3)[1].to(torch.bfloat16)
    assert ours.inv_freq.dtype == torch.float32  # rope frequencies are not rounded
    tokens = torch.tensor(random_prompts([12], VOCAB, seed=6))
    with torch.inference_mode():
        out = ours.logits(ours(tokens, torch.arange(12)[None], ours.new_cache(1, 12)))
    ref = hf_logits(hf, tokens)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    scale = float(ref.abs().max())
    assert max_diff(out, ref) <= 0.1 * scale
    assert (out.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.75


def test_unsupported_architecture():
    with pytest.raises(OrthrusError, match="supported are llama, qwen2, qwen3, mistral"):
        ModelConfig.from_hf(AutoConfig.for_model("gpt2", n_layer=2, n_embd=16, n_head=2))
    with pytest.raises(OrthrusError, match="silu"):
        ModelConfig.from_hf(AutoConfig.for_model("llama", hidden_act="gelu"))


# ---------------------------------------------------------------- the real default model


def test_real_model_logits_parity(real_engine, real_hf):
    """Our forward == transformers' (plain GEMMs: to the last bit in practice); with the decoding
    weights prepacked (the engine's default on CPU) the GEMMs round differently but stay close."""
    ids = real_engine.encode([{"role": "user", "content": "Name three rivers in Europe, briefly."}])
    assert len(ids) > 20
    model = real_engine.model
    assert model.prepared == (model.device.type == "cpu")  # the engine prepares its model
    tokens = torch.tensor([ids])

    def logits() -> torch.Tensor:
        with torch.inference_mode():
            return model.logits(model(tokens, torch.arange(len(ids))[None], model.new_cache(1, len(ids))))

    packed = logits()
    model.release_inference()
    try:
        plain = logits()
    finally:
        model.prepare_inference()
    ref = hf_logits(real_hf, tokens)
    assert max_diff(plain, ref) <= TOL  # (logits up to ~40 in size; the difference measured 0.0)
    assert torch.equal(plain.argmax(-1), ref.argmax(-1))
    assert max_diff(packed, ref) <= 1e-3  # (measured 1.4e-4)
    assert torch.equal(packed.argmax(-1), ref.argmax(-1))


@pytest.mark.slow  # ~15-35 s on 2 CPU cores: parallel mode does 8-token passes over a 49K vocabulary
def test_real_model_greedy_equals_hf_generate(real_engine, real_hf):
    """32 greedy tokens on two chat prompts: HF generate == our AR == our parallel (fresh adapter)."""
    prompts = ["Write one sentence about the sea.", "What is 12 times 7?"]
    refs = []
    for p in prompts:
        ids = real_engine.encode(p)
        with torch.no_grad():
            out = real_hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                   max_new_tokens=32, do_sample=False)
        refs.append(out[0, len(ids):].tolist())
    ar = real_engine.generate(prompts, max_new_tokens=32, mode="ar")
    assert [c.token_ids for c in ar] == refs
    par = real_engine.generate(prompts, max_new_tokens=32, mode="parallel")
    assert [c.token_ids for c in par] == refs
    assert [c.text for c in par] == [c.text for c in ar]
    for c in par:
        assert c.stats.verify_passes <= len(c.token_ids) - 1 and c.stats.draft_passes == c.stats.verify_passes


def test_float32_rms_norm_is_the_upcast_formula_bit_for_bit():
    """RMSNorm's float32 path (one fused op) gives the same bits as the reference formula that the
    other dtypes use (float32 upcast, x * rsqrt(mean(x^2) + eps), times the weight)."""
    from orthrus.models.llama import RMSNorm

    g = torch.Generator().manual_seed(0)
    norm = RMSNorm(576, 1e-5)
    norm.weight.data = torch.randn(576, generator=g)
    for shape in ((1, 1, 576), (3, 8, 576), (2, 37, 576)):
        x = torch.randn(shape, generator=g) * 3
        want = norm.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.eps))
        assert torch.equal(norm(x), want), shape
