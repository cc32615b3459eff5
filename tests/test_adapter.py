"""The diffusion adapter: initialisation, what it shares with the base, persistence and refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import TINY_FP, random_prompts, run_decoder, tiny_adapter, tiny_base
from orthrus.adapter import CONFIG, WEIGHTS, DiffusionAdapter
from orthrus.config import GenerationConfig
from orthrus.errors import OrthrusError

VOCAB = 97


@pytest.fixture(scope="module")
def base():
    return tiny_base("qwen3", seed=2)[1]  # q/k norms: the most parts to get right


def trained_like(adapter: DiffusionAdapter, seed: int = 0) -> DiffusionAdapter:
    """Move every weight away from its initial value, as training would."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapter.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return adapter


def draft_logits(base, adapter: DiffusionAdapter, prompt_len: int = 9, k: int = 6) -> torch.Tensor:
    """Logits ``[2, K, V]`` of one draft pass after a real prefill (the decoder's exact call)."""
    tokens = torch.tensor(random_prompts([prompt_len, prompt_len], VOCAB, seed=3))
    with torch.inference_mode():
        cache = base.new_cache(2, prompt_len + k)
        base(tokens, torch.arange(prompt_len).expand(2, -1), cache, kv_len=prompt_len)
        before = [t.clone() for t in cache.k + cache.v]
        anchors = torch.tensor([4, 17])
        embeds = adapter.block_embeds(base, anchors, k)
        pos = prompt_len + torch.arange(k).expand(2, k)
        kv_len = prompt_len + k
        ctx = (torch.arange(kv_len) < prompt_len)[None, None, None, :].expand(2, 1, 1, kv_len)
        hidden = adapter(base, embeds, pos, cache, kv_len, ctx, k)
        assert all(torch.equal(a, b) for a, b in zip(before, cache.k + cache.v))  # cache read only
        return base.logits(hidden)


def test_fresh_full_adapter_copies_the_base_attention(base):
    ad = tiny_adapter(base, "full")
    for layer, attn in zip(base.model.layers, ad.layers):
        for name, p in layer.self_attn.named_parameters():
            q = dict(attn.named_parameters())[name]
            assert torch.equal(p, q) and p.data_ptr() != q.data_ptr()  # equal values, own storage
    names = {n.split(".", 2)[-1] for n, _ in ad.named_parameters()}
    assert names >= {"q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight",
                     "q_norm.weight", "k_norm.weight", "mask_embedding"}
    torch.testing.assert_close(ad.mask_embedding, base.model.embed_tokens.weight.mean(0))


def test_fresh_lora_adapter(base):
    ad = tiny_adapter(base, "lora")
    for layer, attn in zip(base.model.layers, ad.layers):
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            lora = getattr(attn, name)
            assert torch.count_nonzero(lora.lora_B) == 0  # B = 0: no change at init
            assert lora.lora_A.abs().sum() > 0
            assert lora.base[0] is getattr(layer.self_attn, name)  # the frozen projection, shared
    assert not any("base" in n for n in ad.state_dict())
    assert {n.rsplit(".", 1)[-1] for n, _ in ad.named_parameters()} == {
        "lora_A", "lora_B", "weight", "mask_embedding"}  # weight: the q/k norms


def test_fresh_lora_and_full_draft_alike(base):
    full = draft_logits(base, tiny_adapter(base, "full"))
    lora = draft_logits(base, tiny_adapter(base, "lora"))
    torch.testing.assert_close(lora, full, atol=1e-5, rtol=0)
    assert not torch.equal(full, draft_logits(base, trained_like(tiny_adapter(base, "full"))))


@pytest.mark.parametrize("kind", ["full", "lora"])
def test_save_load_round_trip(base, kind, tmp_path):
    ad = trained_like(tiny_adapter(base, kind, block_size=5))
    base_before = {n: p.clone() for n, p in base.state_dict().items()}
    ad.save(tmp_path / "ad")
    assert {p.name for p in (tmp_path / "ad").iterdir()} == {WEIGHTS, CONFIG}  # no temp files left
    cfg = json.loads((tmp_path / "ad" / CONFIG).read_text())
    assert cfg["kind"] == kind and cfg["block_size"] == 5 and cfg["base_fingerprint"] == TINY_FP
    loaded = DiffusionAdapter.load(tmp_path / "ad", base, TINY_FP).eval()
    assert loaded.config == ad.config
    own = dict(ad.named_parameters())
    for n, p in loaded.named_parameters():
        assert torch.equal(p, own[n]), n
    assert torch.equal(draft_logits(base, loaded), draft_logits(base, ad))
    prompts = random_prompts([5, 8], VOCAB, seed=4)
    gens = [GenerationConfig(max_new_tokens=16, mode="parallel"),
            GenerationConfig(max_new_tokens=16, mode="parallel", temperature=1.0, seed=5)]
    a, _ = run_decoder(base, ad, prompts, gens)
    b, _ = run_decoder(base, loaded, prompts, gens)
    assert [r.tokens for r in a] == [r.tokens for r in b]
    assert [r.stats.accept_hist for r in a] == [r.stats.accept_hist for r in b]  # same drafts
    for n, p in base.state_dict().items():  # the base is never touched
        assert torch.equal(p, base_before[n]), n


def test_save_in_bf16_loads_rounded(base, tmp_path):
    ad = trained_like(tiny_adapter(base, "full"))
    ad.save(tmp_path, dtype=torch.bfloat16)
    loaded = DiffusionAdapter.load(tmp_path, base, TINY_FP)
    own = dict(ad.named_parameters())
    for n, p in loaded.named_parameters():
        assert torch.equal(p, own[n].to(torch.bfloat16).float()), n


def test_load_onto_another_base_is_refused(base, tmp_path):
    tiny_adapter(base, "full").save(tmp_path)
    with pytest.raises(OrthrusError, match="fingerprint"):
        DiffusionAdapter.load(tmp_path, base, "some-other-fingerprint")
    # same fingerprint claimed, different shape (2 layers, not 3): refused, not half-loaded
    other = tiny_base("qwen3", seed=2, num_hidden_layers=2)[1]
    with pytest.raises(OrthrusError, match="layers"):
        DiffusionAdapter.load(tmp_path, other, TINY_FP)


def test_missing_folder_is_refused(base, tmp_path):
    with pytest.raises(OrthrusError, match="no adapter at"):
        DiffusionAdapter.load(tmp_path / "nope", base, TINY_FP)
    with pytest.raises(OrthrusError, match="no adapter at"):
        DiffusionAdapter.load(tmp_path, base, TINY_FP)  # exists, but empty


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty", "no_metadata", "missing_tensor"])
def test_corrupt_file_is_refused(base, tmp_path, damage):
    ad = tiny_adapter(base, "lora")
    ad.save(tmp_path)
    path = tmp_path / WEIGHTS
    data = path.read_bytes()
    if damage == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "garbage":
        path.write_bytes(b"\x00\x01not a safetensors file" * 10)
    elif damage == "empty":
        path.write_bytes(b"")
    elif damage == "no_metadata":  # a valid safetensors file that is not an orthrus adapter
        from safetensors.torch import save_file
        save_file({k: v.contiguous() for k, v in ad.trainable_state_dict().items()}, path)
    else:
        from safetensors.torch import save_file
        sd = dict(ad.trainable_state_dict())
        sd.pop("mask_embedding")
        save_file({k: v.contiguous() for k, v in sd.items()}, path,
                  metadata={"orthrus_adapter": json.dumps(ad.config.to_dict())})
    with pytest.raises(OrthrusError, match="corrupt|not an orthrus adapter|does not have the tensors"):
        DiffusionAdapter.load(tmp_path, base, TINY_FP)


SHIPPED = Path(__file__).resolve().parents[1] / "orthrus" / "adapters" / "smollm2-135m"


@pytest.mark.skipif(not (SHIPPED / "adapter.safetensors").is_file(),
                    reason="no default adapter shipped (orthrus/adapters/smollm2-135m)")
def test_shipped_adapter_is_small_used_by_default_and_exact():
    """The default adapter: at most 16 MiB, loaded without --adapter, greedy parallel == AR in fp32
    on prompts it was not trained on, and it drafts usefully (more than one token per verify pass)."""
    from orthrus.engine import Orthrus

    assert (SHIPPED / "adapter.safetensors").stat().st_size <= 16 * 2**20
    assert (SHIPPED / "TRAINING.md").is_file(), "how it was trained must be recorded beside it"
    engine = Orthrus.from_pretrained("smollm2-135m")
    assert engine.adapter is not None
    prompts = ["Write a Python function that checks whether a string is a palindrome.",
               "Give me three tips for staying focused while studying."]
    ar = engine.generate(prompts, mode="ar", max_new_tokens=64)
    par = engine.generate(prompts, mode="parallel", max_new_tokens=64)
    assert [c.token_ids for c in par] == [c.token_ids for c in ar]
    assert all(c.stats.acceptance_length > 1.2 for c in par)
