"""The decoder is exact: parallel decoding gives the frozen model's own output.

Greedy (fp32): parallel == AR token for token on tiny random models of every family, for both
adapter kinds, any block size, uneven batches, EOS inside a block, max tokens ending mid-block,
stop strings and continuous batching; with a garbage drafter and with a perfect one (forced
acceptance, which also checks the acceptance bookkeeping). Sampling: the distribution of the
generated sequence equals the exact AR distribution (chi-square), seeds are reproducible and
independent of the batch. Memory: one static cache, never reallocated.
"""

from __future__ import annotations

import itertools
import math
from functools import lru_cache

import pytest
import torch
from torch import Tensor

from conftest import TINY_FP, random_prompts, run_decoder, tiny_adapter, tiny_base, token_text
from orthrus.cache import KVCache
from orthrus.config import GenerationConfig
from orthrus.decoding.generator import Decoder
from orthrus.models.llama import Transformer
from orthrus.models.quant import fp16_available, int8_available
from tiny import FAMILIES
from chi2 import assert_sequence_distribution  # tests/chi2.py: alpha = 1e-4 per test

VOCAB = 97


@lru_cache(maxsize=None)
def tiny(arch: str) -> Transformer:
    return tiny_base(arch)[1]


def greedy(n: int, mode: str = "ar", **kw) -> GenerationConfig:
    return GenerationConfig(max_new_tokens=n, mode=mode, **kw)


def toks(rows) -> list[list[int]]:
    return [r.tokens for r in rows]


def perturb(adapter, scale: float = 0.5, seed: int = 0):
    """Add noise to every adapter weight so that it drafts garbage."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapter.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale * (p.std() if p.numel() > 1 and p.std() > 0 else 1))
    return adapter


def oracle_decoder(table: Tensor) -> type[Decoder]:
    """A Decoder whose drafter is always right: ``table[slot, p]`` is the AR token at position p."""

    class Oracle(Decoder):
        starts: list[list[int]] = []  # per cycle: every slot's block start t (the cache length)

        def _draft(self, hi, k, kv_len, positions, sampled, filters):
            self.starts.append(positions[:, 0].tolist())
            return table[:hi].gather(1, positions[:, 1:]), None

    return Oracle


def ar_table(prompts: list[list[int]], ar_tokens: list[list[int]], width: int) -> Tensor:
    """``[B, width]``: prompt + AR continuation per row (zeros past its end)."""
    t = torch.zeros(len(prompts), width, dtype=torch.long)
    for i, (p, a) in enumerate(zip(prompts, ar_tokens)):
        seq = (p + a)[:width]
        t[i, : len(seq)] = torch.tensor(seq)
    return t


def check_stats(row, n_prompt_token: int = 1) -> None:
    """Invariants of one row's DecodeStats (the prefill token is reported apart)."""
    s = row.stats
    assert s.tokens == len(row.tokens) - n_prompt_token
    assert s.prefill_passes == 1
    assert sum(s.accept_hist) == s.verify_passes
    if s.slot_accepts:
        assert s.slot_accepts == sorted(s.slot_accepts, reverse=True)  # slot i accepted => slot i-1 was
        assert sum(s.slot_accepts) == sum(a * c for a, c in enumerate(s.accept_hist))


# ---------------------------------------------------------------- greedy exactness


@pytest.mark.parametrize("kind", ["full", "lora"])
@pytest.mark.parametrize("arch", FAMILIES)
def test_greedy_parallel_equals_ar(arch, kind):
    model = tiny(arch)
    adapter = tiny_adapter(model, kind, block_size=7)
    prompts = random_prompts([5, 13, 2], VOCAB, seed=1)  # uneven lengths, batch 3
    ar, _ = run_decoder(model, None, prompts, greedy(40))
    assert all(len(r.tokens) == 40 and r.finish_reason == "length" for r in ar)
    for k in (1, 2, 7, 32):  # 40 - 1 is a multiple of none of 2, 7, 32
        par, dec = run_decoder(model, adapter, prompts, greedy(40, "parallel"), block_size=k)
        assert toks(par) == toks(ar), f"block size {k}"
        for r in par:
            assert r.finish_reason == "length"
            check_stats(r)
            assert r.stats.draft_passes == (r.stats.verify_passes if k > 1 else 0)
            assert len(r.stats.slot_accepts) == k - 1
        # the device's committed lengths agree with the host's (prompt + tokens before truncation - 1)
        assert dec.lengths.tolist() == dec.lengths_host


@pytest.mark.parametrize("kind", ["full", "lora"])
def test_perturbed_adapter_is_still_exact(kind):
    for arch in FAMILIES:
        model = tiny(arch)
        adapter = perturb(tiny_adapter(model, kind, block_size=6), scale=2.0, seed=3)
        prompts = random_prompts([4, 9, 6], VOCAB, seed=2)
        ar, _ = run_decoder(model, None, prompts, greedy(30))
        par, _ = run_decoder(model, adapter, prompts, greedy(30, "parallel"))
        assert toks(par) == toks(ar), arch
        for r in par:
            check_stats(r)


@pytest.mark.parametrize("arch", ["qwen3", "llama"])
def test_forced_acceptance_reaches_half_the_block(arch):
    """A drafter that is always right: every cycle accepts K - 1 drafts, TPF = K / 2."""
    model = tiny(arch)
    adapter = tiny_adapter(model, "full", block_size=8)
    k = 8
    prompts = random_prompts([6, 3, 11], VOCAB, seed=4)
    news = [33, 10, 20]  # 33 - 1 = 4 K; 10 - 1 and 20 - 1 end inside a block
    gens = [greedy(n, "parallel") for n in news]
    ar_long, _ = run_decoder(model, None, prompts, greedy(max(news) + 2 * k))
    table = ar_table(prompts, toks(ar_long), max(len(p) for p in prompts) + max(news) + 3 * k)
    par, dec = run_decoder(model, adapter, prompts, gens, block_size=k, decoder_cls=oracle_decoder(table))
    for i, (r, n) in enumerate(zip(par, news)):
        assert r.tokens == ar_long[i].tokens[:n]
        assert r.finish_reason == "length"
        cycles = math.ceil((n - 1) / k)
        s = r.stats
        assert (s.verify_passes, s.draft_passes) == (cycles, cycles)
        assert s.accept_hist == [0] * (k - 1) + [cycles]
        assert s.slot_accepts == [cycles] * (k - 1)
        assert s.tokens == n - 1
        assert s.tpf == pytest.approx((n - 1) / (2 * cycles))
        assert s.acceptance_length == pytest.approx((n - 1) / cycles)
        # the committed cache length moved by K every cycle
        assert [c[i] for c in dec.starts[:cycles]] == [len(prompts[i]) + c * k for c in range(cycles)]
    assert par[0].stats.tpf == k / 2


def test_one_fast_row_beside_slow_rows():
    """A row that finishes early (all drafts accepted) while the others continue: its slot stays
    in the batch window, released, and must not disturb them or write outside the cache."""
    model = tiny("qwen2")
    adapter = tiny_adapter(model, "full", block_size=8)
    prompts = random_prompts([9, 9, 9], VOCAB, seed=5)
    ar, _ = run_decoder(model, None, prompts, greedy(10 + 16))
    table = ar_table(prompts, toks(ar), 64)
    table[1:] = 0  # rows 1 and 2 get garbage drafts, row 0 perfect ones
    par, _ = run_decoder(model, adapter, prompts, greedy(10, "parallel"), block_size=8,
                         decoder_cls=oracle_decoder(table))
    assert toks(par) == [r.tokens[:10] for r in ar]
    assert par[0].stats.verify_passes == 2 and par[1].stats.verify_passes > 2


@pytest.mark.parametrize("arch", ["llama", "mistral"])
def test_eos_inside_a_block(arch):
    model = tiny(arch)
    adapter = tiny_adapter(model, "lora", block_size=8)
    prompts = random_prompts([7, 4, 10], VOCAB, seed=6)
    ar, _ = run_decoder(model, None, prompts, greedy(40))
    seq = ar[0].tokens
    # an EOS id that row 0 first produces at index j, strictly inside a block of the oracle run
    j = next(j for j in range(3, 40) if seq[j] not in seq[:j] and (j - 1) % 8 not in (0, 7))
    eos = seq[j]
    table = ar_table(prompts, toks(ar), 80)
    ar_eos, _ = run_decoder(model, None, prompts, greedy(40), eos_ids=(eos,))
    assert ar_eos[0].tokens == seq[: j + 1] and ar_eos[0].finish_reason == "stop"
    for r, full in zip(ar_eos, ar):
        if eos in full.tokens:
            assert r.tokens == full.tokens[: full.tokens.index(eos) + 1] and r.finish_reason == "stop"
        else:
            assert r.tokens == full.tokens and r.finish_reason == "length"
    for cls in (Decoder, oracle_decoder(table)):
        par, _ = run_decoder(model, adapter, prompts, greedy(40, "parallel"), eos_ids=(eos,),
                             decoder_cls=cls)
        assert toks(par) == toks(ar_eos)
        assert [r.finish_reason for r in par] == [r.finish_reason for r in ar_eos]
        assert par[0].tokens[-1] == eos
        for r in par:
            check_stats(r)
    # ignore_eos: the EOS is an ordinary token
    par, _ = run_decoder(model, adapter, prompts, greedy(40, "parallel", ignore_eos=True), eos_ids=(eos,))
    assert toks(par) == toks(ar) and all(r.finish_reason == "length" for r in par)


def test_first_token_ends_the_row():
    """max_new_tokens = 1, or an EOS as the very first token: the prefill alone finishes the row."""
    model = tiny("qwen3")
    adapter = tiny_adapter(model, "full", block_size=4)
    prompts = random_prompts([5, 8], VOCAB, seed=7)
    ar, _ = run_decoder(model, None, prompts, greedy(12))
    for mode in ("ar", "parallel"):
        one, _ = run_decoder(model, adapter, prompts, greedy(1, mode))
        assert toks(one) == [r.tokens[:1] for r in ar] and all(r.finish_reason == "length" for r in one)
        first = ar[0].tokens[0]
        stop, _ = run_decoder(model, adapter, prompts, greedy(12, mode), eos_ids=(first,))
        assert stop[0].tokens == [first] and stop[0].finish_reason == "stop"
        assert stop[0].stats.verify_passes == 0


def test_stop_strings_same_in_both_modes():
    model = tiny("qwen2")
    adapter = tiny_adapter(model, "full", block_size=8)
    prompts = random_prompts([6, 3, 8], VOCAB, seed=8)
    ar, _ = run_decoder(model, None, prompts, greedy(40))
    seq = ar[1].tokens
    j = next(j for j in range(4, 38) if (seq[j], seq[j + 1]) not in zip(seq[:j], seq[1 : j + 1]))
    stop = f"<{seq[j]}><{seq[j + 1]}>"  # spans two tokens
    partial = f"<{seq[j + 2]}"  # ends inside a token's text
    table = ar_table(prompts, toks(ar), 80)
    ar_stop, _ = run_decoder(model, None, prompts, greedy(40, stop=(stop, partial)))
    r = ar_stop[1]
    assert r.finish_reason == "stop"
    cut = token_text(seq).find(stop)
    cut2 = token_text(seq).find(partial)
    first = min(c for c in (cut, cut2) if c >= 0)
    assert r.text == token_text(seq)[:first]
    assert stop not in r.text and partial not in r.text
    for cls in (Decoder, oracle_decoder(table)):
        par, _ = run_decoder(model, adapter, prompts, greedy(40, "parallel", stop=(stop, partial)),
                             decoder_cls=cls)
        assert toks(par) == toks(ar_stop)
        assert [x.text for x in par] == [x.text for x in ar_stop]
        assert [x.finish_reason for x in par] == [x.finish_reason for x in ar_stop]


def test_overlapping_stop_strings_and_streamed_text():
    """Two stop strings, the one that starts first completes last: the row ends where AR ends it
    (at the first completed stop), and the streamed deltas add up to the final text in both modes,
    also when a stop string arrives split over two cycles (its start must not be streamed)."""
    model = tiny("mistral")
    adapter = tiny_adapter(model, "full", block_size=8)
    prompts = random_prompts([5, 9], VOCAB, seed=15)
    ar, _ = run_decoder(model, None, prompts, greedy(40))
    seq = ar[0].tokens
    # three tokens a b c inside one oracle block (indices 1 + 8m .. 8 + 8m), b's first occurrence
    j = next(j for j in range(9, 30) if (j - 1) % 8 <= 5 and seq[j + 1] not in seq[: j + 1]
             and seq[j] != seq[j + 1])
    a, b, c = seq[j: j + 3]
    stops = (f"<{a}><{b}><{c}>", f"<{b}>")  # the first starts earlier, the second completes first
    table = ar_table(prompts, toks(ar), 80)
    want = token_text(seq[: j + 1])  # AR: stops after b, text cut before "<b>"
    for mode, cls in (("ar", Decoder), ("parallel", Decoder), ("parallel", oracle_decoder(table))):
        rows, dec = run_decoder(model, adapter, prompts, greedy(40, mode, stop=stops), decoder_cls=cls)
        assert rows[0].tokens == seq[: j + 2] and rows[0].finish_reason == "stop"
        assert rows[0].text == want, (mode, cls.__name__)
        assert [dec.streamed[i] for i in range(2)] == [r.text for r in rows]
    # a stop string split over two cycles: "<x><y>" with x the last token of an oracle block
    i = next(i for i in range(8, 39, 8) if (seq[i], seq[i + 1]) not in zip(seq[:i], seq[1:i]))
    stop = f"<{seq[i]}><{seq[i + 1]}>"
    for mode, cls in (("ar", Decoder), ("parallel", oracle_decoder(table))):
        rows, dec = run_decoder(model, adapter, prompts, greedy(40, mode, stop=(stop,)), decoder_cls=cls)
        assert rows[0].text == token_text(seq[:i]) and rows[0].tokens == seq[: i + 2]
        assert [dec.streamed[i] for i in range(2)] == [r.text for r in rows], (mode, cls.__name__)


@pytest.mark.parametrize("mode", ["ar", "parallel"])
def test_continuous_batching_equals_batch_one(mode):
    model = tiny("llama")
    adapter = tiny_adapter(model, "full", block_size=5)
    prompts = random_prompts([3, 12, 7, 1, 9], VOCAB, seed=9)
    gens = [greedy(n, mode) for n in (17, 9, 25, 12, 6)]
    gens[2] = GenerationConfig(max_new_tokens=25, mode=mode, temperature=0.9, seed=11)
    gens[4] = GenerationConfig(max_new_tokens=6, mode=mode, temperature=1.1, top_k=5, seed=12)
    alone = [run_decoder(model, adapter, [p], [g])[0][0].tokens for p, g in zip(prompts, gens)]
    for bs in (2, 3, 5):
        rows, dec = run_decoder(model, adapter, prompts, gens, batch_size=bs)
        assert toks(rows) == alone, f"batch size {bs}"
        assert dec.max_batch == bs


def test_engine_stream_with_token_prompts():
    """Orthrus.generate on token-id prompts (a stub tokenizer) agrees with the bare decoder."""
    from orthrus.engine import Orthrus
    from orthrus.models.loading import LoadedModel

    class StubTokenizer:
        chat_template = None

        def decode(self, ids, skip_special_tokens=True):
            return token_text(list(ids))

    model = tiny("qwen3")
    adapter = tiny_adapter(model, "full", block_size=4)
    engine = Orthrus(LoadedModel(model, StubTokenizer(), (), TINY_FP, "tiny", None), adapter)
    prompts = random_prompts([4, 10, 6], VOCAB, seed=10)
    ref, _ = run_decoder(model, None, prompts, greedy(15))
    for mode in ("ar", "parallel"):
        out = engine.generate(prompts, batch_size=2, max_new_tokens=15, mode=mode)
        assert [c.token_ids for c in out] == toks(ref)
        assert [c.text for c in out] == [token_text(t) for t in toks(ref)]
        assert [c.prompt_tokens for c in out] == [len(p) for p in prompts]


def test_bf16_parallel_runs():
    """bf16 is not exact (METHOD.md), but it runs and mostly agrees at the start."""
    model = tiny_base("qwen3")[1].to(torch.bfloat16)
    adapter = tiny_adapter(model, "full", block_size=4).to(torch.bfloat16)
    prompts = random_prompts([5, 9], VOCAB, seed=11)
    ar, _ = run_decoder(model, None, prompts, greedy(12))
    par, dec = run_decoder(model, adapter, prompts, greedy(12, "parallel"))
    assert dec.cache.k[0].dtype == torch.bfloat16
    assert all(len(r.tokens) == 12 for r in par)
    assert all(a.tokens[0] == b.tokens[0] for a, b in zip(ar, par))  # the same prefill


# ---------------------------------------------------------------- sampling




def filtered_probs(logits: Tensor, temperature: float, top_k: int, top_p: float) -> Tensor:
    """Reference sampling distribution ``[..., V]`` in float64, written independently of
    ``process_logits``: softmax(logits / T) restricted to the top-k, then to the minimal nucleus."""
    probs = torch.softmax(logits.double() / temperature, -1)
    order = probs.argsort(-1, descending=True)
    ranked = probs.gather(-1, order)
    keep = torch.ones_like(ranked, dtype=torch.bool)
    if top_k:
        keep[..., top_k:] = False
    ranked = ranked * keep
    ranked = ranked / ranked.sum(-1, keepdim=True)
    if top_p < 1:
        before = ranked.cumsum(-1) - ranked
        keep &= before < top_p
        ranked = ranked * keep
        ranked = ranked / ranked.sum(-1, keepdim=True)
    return torch.zeros_like(probs).scatter(-1, order, ranked)


def sampling_model() -> Transformer:
    """A tiny model with a vocabulary of 8 whose next-token distributions are neither flat nor
    peaked and depend on the context (a flat one would make the test toothless)."""
    # (chosen for: largest first-token probability 0.24, 368 of the 512 three-token sequences
    # expected >= 5 times in 12000 samples, p(x2 | x1) differing by up to 0.65 in total variation)
    return tiny_base("qwen3", seed=1, vocab_size=8, num_hidden_layers=2, hidden_size=16,
                     num_attention_heads=2, num_key_value_heads=1, head_dim=8, intermediate_size=32,
                     initializer_range=0.2)[1]


def exact_sequence_probs(model: Transformer, prompt: list[int], n: int, temperature: float, top_k: int,
                         top_p: float) -> Tensor:
    """Exact AR probabilities ``[V] * n`` of every n-token continuation (enumerated)."""
    v = model.config.vocab_size
    joint = torch.ones(1, dtype=torch.float64)
    for step in range(n):
        conts = list(itertools.product(range(v), repeat=step))
        seqs = torch.tensor([prompt + list(c) for c in conts])  # [V^step, P + step]
        pos = torch.arange(seqs.shape[1]).expand_as(seqs)
        with torch.inference_mode():
            logits = model.logits(model(seqs, pos, model.new_cache(len(conts), seqs.shape[1])))[:, -1]
        p = filtered_probs(logits, temperature, top_k, top_p)  # [V^step, V]
        joint = (joint[:, None] * p).reshape(-1)
    return joint.view([v] * n)


@pytest.mark.parametrize("mode,k,temperature,top_k,top_p,variant", [
    ("ar", 1, 1.0, 0, 1.0, ""),
    ("parallel", 2, 1.0, 0, 1.0, ""),     # K - 1 = 1 draft: the bonus token path is used
    ("parallel", 4, 0.7, 5, 1.0, ""),     # 3 drafts: mostly rejections and residual samples
    ("parallel", 3, 1.3, 0, 0.9, ""),
    ("parallel", 3, 1.0, 0, 1.0, "int8"),  # drafts from int8 weights (orthrus.models.quant)
    ("parallel", 3, 0.8, 0, 0.9, "self"),  # self-drafting: the model's fp16 copy drafts
    ("parallel", 4, 1.0, 0, 0.9, "tree"),  # the adapter's top tokens verified as a tree
])
def test_sampling_matches_exact_ar_distribution(mode, k, temperature, top_k, top_p, variant):
    model = sampling_model()
    adapter = perturb(tiny_adapter(model, "full", block_size=k), scale=0.3, seed=1)  # q differs from p
    if variant in ("int8", "self") and not (int8_available() and fp16_available()):
        pytest.skip("this torch has no fbgemm int8 / fp16 linear")
    if variant == "int8":
        model.prepare_inference()
        model.prepare_draft()
        adapter.prepare_inference(int8=True)
    prompt, n, rows = [3, 1, 4, 1, 5], 3, 12000
    probs = exact_sequence_probs(model, prompt, n, temperature, top_k, top_p)
    gens = [GenerationConfig(max_new_tokens=n, mode=mode, temperature=temperature, top_k=top_k,
                             top_p=top_p, seed=1000 + s, draft="self" if variant == "self" else "diffusion",
                             verify="tree" if variant == "tree" else "auto")
            for s in range(rows)]
    out, _ = run_decoder(model, adapter, [prompt] * rows, gens, block_size=k, decode=lambda ids: "")
    assert_sequence_distribution(torch.tensor(toks(out)), probs, model.config.vocab_size)
    if mode == "parallel":  # the drafter was actually used, with both outcomes
        hist = [sum(x) for x in zip(*(r.stats.accept_hist + [0] * k for r in out))]
        assert hist[0] > 0 and sum(hist[1:]) > 0


def test_same_seed_same_output_alone_or_batched():
    model = tiny("mistral")
    adapter = perturb(tiny_adapter(model, "lora", block_size=4), scale=0.2)
    prompts = random_prompts([6, 3, 9, 5], VOCAB, seed=12)
    for mode in ("ar", "parallel"):
        g = GenerationConfig(max_new_tokens=20, mode=mode, temperature=1.0, seed=7)
        alone = run_decoder(model, adapter, [prompts[0]], g)[0][0].tokens
        again = run_decoder(model, adapter, [prompts[0]], g)[0][0].tokens
        assert alone == again
        others = [g, GenerationConfig(max_new_tokens=25, mode=mode, temperature=0.8, seed=8),
                  greedy(14, mode), GenerationConfig(max_new_tokens=9, mode=mode, temperature=1.5,
                                                     top_p=0.8, seed=9)]
        batched, _ = run_decoder(model, adapter, prompts, others)
        assert batched[0].tokens == alone
        other_seed = run_decoder(model, adapter, [prompts[0]],
                                 GenerationConfig(max_new_tokens=20, mode=mode, temperature=1.0, seed=70))
        assert other_seed[0][0].tokens != alone


def test_greedy_rows_exact_beside_sampled_rows():
    model = tiny("llama")
    adapter = tiny_adapter(model, "full", block_size=6)
    prompts = random_prompts([4, 8, 6, 10], VOCAB, seed=13)
    ar, _ = run_decoder(model, None, prompts, greedy(24))
    gens = [greedy(24, "parallel"), GenerationConfig(max_new_tokens=24, mode="parallel", temperature=1.0, seed=1),
            greedy(24, "parallel"), GenerationConfig(max_new_tokens=24, mode="parallel", temperature=0.5,
                                                     top_k=10, top_p=0.9, seed=2)]
    out, _ = run_decoder(model, adapter, prompts, gens)
    assert out[0].tokens == ar[0].tokens and out[2].tokens == ar[2].tokens
    assert out[1].tokens != ar[1].tokens  # (a random model at T=1 does not follow its argmax)
    # top-k = 1 and a tiny top-p are greedy whatever the temperature
    for kw in ({"top_k": 1}, {"top_p": 1e-6}):
        g = GenerationConfig(max_new_tokens=24, mode="parallel", temperature=1.7, seed=3, **kw)
        out, _ = run_decoder(model, adapter, prompts, g)
        assert toks(out) == toks(ar)


# ---------------------------------------------------------------- memory


def test_one_static_cache(monkeypatch):
    """The decoder's cache keeps its buffers for a whole generation and parallel decoding never
    allocates a second one: every KVCache ever built is a view of the decoder's buffers."""
    made: list[KVCache] = []
    orig_init = KVCache.__init__

    def init(self, k, v):
        orig_init(self, k, v)
        made.append(self)

    monkeypatch.setattr(KVCache, "__init__", init)
    model = tiny("qwen3")
    adapter = perturb(tiny_adapter(model, "full", block_size=8), scale=0.5)
    seen: list[list[tuple[int, tuple[int, ...]]]] = []

    class Watched(Decoder):
        def step(self):
            seen.append([(t.data_ptr(), tuple(t.shape)) for t in self.cache.k + self.cache.v])
            return super().step()

    prompts = random_prompts([5, 9, 2, 7, 3], VOCAB, seed=14)
    gens = [GenerationConfig(max_new_tokens=30, mode="parallel", temperature=t, seed=i)
            for i, t in enumerate((0.0, 1.0, 0.0, 0.7, 0.0))]
    _, dec = run_decoder(model, adapter, prompts, gens, batch_size=3, decoder_cls=Watched)
    assert len(seen) > 10 and all(s == seen[0] for s in seen)
    storages = {t.untyped_storage().data_ptr() for t in dec.cache.k + dec.cache.v}
    assert made[0] is dec.cache
    for c in made:
        assert {t.untyped_storage().data_ptr() for t in c.k + c.v} <= storages
    layers = model.config.num_layers
    assert dec.cache.nbytes() == 2 * layers * 3 * model.config.num_kv_heads * (dec.capacity + dec.scratch) * \
        model.config.head_dim * 4


@pytest.mark.parametrize("arch", ["qwen3", "llama"])
def test_adapter_adds_only_its_parameters(arch):
    model = tiny(arch)
    cfg = model.config
    base_ptrs = {p.data_ptr() for p in model.parameters()}
    attn_params = sum(p.numel() for layer in model.model.layers for p in layer.self_attn.parameters())
    full = tiny_adapter(model, "full")
    assert list(full.buffers()) == []
    assert sum(p.numel() for p in full.parameters()) == attn_params + cfg.hidden_size
    assert not base_ptrs & {p.data_ptr() for p in full.parameters()}
    lora = tiny_adapter(model, "lora")  # rank 4
    r, c = 4, cfg.hidden_size
    qd, kvd = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    per_layer = r * ((c + qd) + 2 * (c + kvd) + (qd + c))
    if cfg.qk_norm:
        per_layer += 2 * cfg.head_dim
    assert sum(p.numel() for p in lora.parameters()) == cfg.num_layers * per_layer + c
    assert not base_ptrs & {p.data_ptr() for p in lora.parameters()}


def test_add_checks_capacity_at_the_largest_block_before_touching_slots():
    """Cycles run at the largest live block size, so a request with a bigger block must not be let in
    when a live row would then overflow the cache; a refused add leaves every slot as it was."""
    model = tiny("llama")
    adapter = tiny_adapter(model, "full", block_size=8)
    dec = Decoder(model, adapter, (), lambda ids: "", max_batch=3, capacity=24)
    prompt = random_prompts([6], VOCAB, seed=9)[0]
    dec.add([("a", prompt, greedy(14, "parallel"), 2)])  # 6 + 14 + 2 <= 24
    with pytest.raises(ValueError, match="block size 8"):
        dec.add([("b", prompt[:2], greedy(4, "parallel"), 8)])  # fits alone, but row "a" would not
    assert dec.free_slots() == [1, 2]
    dec.add([("c", prompt[:2], greedy(4, "parallel"), 4)])  # 6 + 14 + 4 <= 24: admitted
    while any(r is not None and r.finish_reason is None for r in dec.rows):
        dec.step()
    assert len(dec.rows[0].tokens) == 14 and len(dec.rows[1].tokens) == 4


def test_text_only_at_the_end_when_not_streaming():
    """stream_text=False: same tokens and final text; unfinished events carry no text (rows with
    stop strings are still decoded every cycle, so their stops work)."""
    model = tiny("llama")
    adapter = tiny_adapter(model, "full", block_size=4)
    prompts = random_prompts([5, 8], VOCAB, seed=15)
    ref, _ = run_decoder(model, adapter, prompts, greedy(20, "parallel"))
    seq = ref[1].tokens
    stop = f"<{seq[6]}><{seq[7]}>"
    gens = [greedy(20, "parallel"), greedy(20, "parallel", stop=(stop,))]
    ref, _ = run_decoder(model, adapter, prompts, gens)

    class Quiet(Decoder):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            self.stream_text = False

    out, dec = run_decoder(model, adapter, prompts, gens, decoder_cls=Quiet)
    assert toks(out) == toks(ref) and [r.text for r in out] == [r.text for r in ref]
    assert out[1].finish_reason == "stop" and len(out[1].tokens) < 20
    assert dec.streamed[0] == out[0].text  # the one delta of row 0 is its whole text


# ---------------------------------------------------------------- incremental detokenisation


def _grow(decode, ids: list[int], seed: int) -> None:
    """Feed ``ids`` to a row in random chunks (1-9 tokens, as cycles do) and check that the
    incremental text equals decoding the whole row, every time."""
    import random

    from orthrus.decoding.generator import Row

    dec = Decoder.__new__(Decoder)  # only the detokeniser is exercised
    dec.decode = decode
    row = Row(0, 0, [1], greedy(1), 1)
    rng = random.Random(seed)
    i = 0
    while i < len(ids):
        i = min(len(ids), i + rng.randint(1, 9))
        row.tokens = ids[:i]
        assert dec._text(row) == decode(row.tokens), i
    assert row.dec_at > 0 or len(ids) < 40  # the boundary did move on long rows


def test_incremental_text_equals_full_decode_real_tokenizer(real_engine):
    """SmolLM2's byte-level BPE tokenizer, text with multi-byte characters split across tokens."""
    tok = real_engine.tokenizer
    text = ("Héllo wörld! 世界你好 🎉🎉🎉 naïve café — “quotes” and emoji 👩‍👩‍👧 done. " * 12)
    ids = tok(text)["input_ids"]
    decode = lambda x: tok.decode(x, skip_special_tokens=True)  # noqa: E731
    for seed in range(3):
        _grow(decode, ids, seed)
    random_ids = torch.randint(0, tok.vocab_size, (600,), generator=torch.Generator().manual_seed(0)).tolist()
    _grow(decode, random_ids, 3)


def test_incremental_text_with_tokenizers_that_strip_or_split_bytes():
    # SentencePiece-like: "▁" marks a space and decode strips the first one (splits there change text)
    pieces = ["▁the", "▁cat", "s", "▁sat", ".", "▁on", "ing", "▁mat"]
    sp = lambda x: "".join(pieces[t % len(pieces)] for t in x).replace("▁", " ").removeprefix(" ")  # noqa: E731
    _grow(sp, [i * 7 % 11 for i in range(300)], 0)
    # byte tokens: one UTF-8 byte per token, so characters are split across tokens
    raw = ("ab€中🎉" * 60).encode()
    by = lambda x: bytes(x).decode("utf-8", errors="replace")  # noqa: E731
    _grow(by, list(raw), 1)
