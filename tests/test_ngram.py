"""n-gram drafting (prompt lookup, ``draft='ngram'``): no adapter, same verify, same output.

* The host index proposes what followed the longest earlier suffix (checked against a brute-force
  scan), and extending it token by token or in blocks equals building it from scratch.
* Greedy n-gram decoding == AR token for token on tiny random models (batch 3, uneven prompts,
  several K, continuous batching), and repetitive prompts are actually accepted.
* Sampling with one-hot n-gram drafts has the exact AR distribution (chi-square).
* ``orthrus generate --draft ngram`` works without any adapter.
"""

from __future__ import annotations

import random

import pytest
import torch

from conftest import random_prompts, tiny_adapter, tiny_base, token_text
from orthrus.config import GenerationConfig
from orthrus.decoding.generator import Decoder, Row, cache_room
from orthrus.decoding.ngram import NgramIndex, brute_force_propose, ngram_drafts
from orthrus.errors import OrthrusError
from orthrus.models.llama import Transformer
from tiny import FAMILIES

VOCAB = 97


# ---------------------------------------------------------------- the index


def test_propose_longest_most_recent_match():
    #         0  1  2  3  4  5  6  7  8  9
    seq = [5, 6, 7, 8, 1, 6, 7, 9, 5, 6, 7]
    ix = NgramIndex(seq, n_max=4)
    # suffix [5, 6, 7] occurred at 0..2 (followed by 8); the shorter [6, 7] more recently (-> 9),
    # but the longest match wins
    assert ix.match() == (3, 3)
    assert ix.propose(3) == [8, 1, 6]
    # n_max 2: [6, 7] -> its latest earlier occurrence is 5..6, followed by 9
    assert NgramIndex(seq, n_max=2).propose(2) == [9, 5]
    assert NgramIndex([1, 2, 3], n_max=4).propose(3) is None  # nothing repeats
    assert NgramIndex([], n_max=4).propose(3) is None


def test_periodic_continuation_fills_the_draft():
    # the suffix [1, 2] matched one period back: the draft runs on periodically past the end
    assert NgramIndex([1, 2, 1, 2], n_max=4).propose(5) == [1, 2, 1, 2, 1]
    assert NgramIndex([3, 3], n_max=4).propose(4) == [3, 3, 3, 3]


@pytest.mark.parametrize("vocab", [2, 4, 16])
def test_incremental_equals_rebuild_and_brute_force(vocab):
    rnd = random.Random(vocab)
    for trial in range(20):
        n_max = rnd.randint(1, 5)
        seq = [rnd.randrange(vocab) for _ in range(rnd.randint(0, 12))]
        ix = NgramIndex(seq, n_max)
        for _ in range(15):
            new = [rnd.randrange(vocab) for _ in range(rnd.randint(0, 5))]
            ix.extend(new)
            seq += new
            ref = NgramIndex(seq, n_max)
            assert ix.tokens == seq and ix.last == ref.last, (trial, seq)
            for count in (1, 3, 7):
                assert ix.propose(count) == brute_force_propose(seq, count, n_max), (seq, n_max)


def test_ngram_drafts_one_tensor_with_padding():
    a, b = NgramIndex([4, 5, 6, 4, 5], 3), NgramIndex([7, 8, 9], 3)  # a matches, b does not
    d = ngram_drafts([a, None, b], 3)
    assert d.dtype == torch.long and d.shape == (3, 3)
    assert d.tolist() == [[6, 4, 5], [0, 0, 0], [9, 9, 9]]
    assert ngram_drafts([a], 0).shape == (1, 0)


def test_bad_configs():
    with pytest.raises(OrthrusError, match="one-pass"):
        GenerationConfig(draft="hybrid", schedule="one-pass")
    with pytest.raises(OrthrusError, match="draft must be"):
        GenerationConfig(draft="lookup")
    with pytest.raises(OrthrusError, match="ngram_max"):
        GenerationConfig(draft="ngram", ngram_max=0)
    with pytest.raises(ValueError):
        NgramIndex([], n_max=0)


# ---------------------------------------------------------------- decoding


def decode_all(model: Transformer, prompts: list[list[int]], gen: GenerationConfig | list[GenerationConfig],
               k: int, batch_size: int | None = None, adapter=None,
               eos_ids: tuple[int, ...] = ()) -> tuple[list[Row], Decoder]:
    """Decode token-id prompts as ``Orthrus.stream`` does (continuous batching), block size ``k``
    for parallel rows; rows come back in prompt order."""
    gens = gen if isinstance(gen, list) else [gen] * len(prompts)
    ks = [1 if g.mode == "ar" else k for g in gens]
    cap = max(len(p) + g.max_new_tokens + cache_room(g, k) for p, g in zip(prompts, gens))
    dec = Decoder(model, adapter, eos_ids, token_text, batch_size or len(prompts), cap)
    pending, done = list(enumerate(prompts)), {}

    def finish(events):
        for ev in events:
            if ev.finish_reason is not None:
                done[ev.request_id] = ev.row
                dec.release(ev.row.slot)

    while pending or dec.busy():
        free = dec.free_slots()
        if free and pending:
            batch, pending = pending[: len(free)], pending[len(free):]
            finish(dec.add([(i, p, gens[i], ks[i]) for i, p in batch]))
        finish(dec.step())
    return [done[i] for i in range(len(prompts))], dec


def repetitive_prompts(seed: int = 0) -> list[list[int]]:
    """Uneven prompts built of repeated random phrases (there is something to look up)."""
    g = random.Random(seed)
    out = []
    for n_phrase, reps in ((3, 2), (5, 4), (2, 7)):
        phrase = [g.randrange(3, VOCAB) for _ in range(n_phrase)]
        out.append([g.randrange(3, VOCAB)] + phrase * reps)
    return out


def ngram(n: int, **kw) -> GenerationConfig:
    return GenerationConfig(max_new_tokens=n, mode="parallel", draft="ngram", **kw)


def check_stats(r: Row, k: int) -> None:
    s = r.stats
    assert s.tokens == len(r.tokens) - 1 and s.prefill_passes == 1
    assert s.draft_passes == 0 and s.forward_passes == s.verify_passes  # no draft pass, ever
    assert sum(s.accept_hist) == s.verify_passes
    assert len(s.slot_accepts) == k - 1
    assert sum(s.slot_accepts) == sum(a * c for a, c in enumerate(s.accept_hist))


@pytest.mark.parametrize("arch", FAMILIES)
def test_greedy_ngram_equals_ar(arch):
    model = tiny_base(arch)[1]
    prompts = random_prompts([5, 13, 2], VOCAB, seed=1) + repetitive_prompts()  # uneven, batch 3 + 3
    n = 40
    ar, _ = decode_all(model, prompts, GenerationConfig(max_new_tokens=n), 1, batch_size=3)
    assert all(len(r.tokens) == n for r in ar)
    for k in (2, 5, 8, 32):
        par, dec = decode_all(model, prompts, ngram(n), k, batch_size=3)  # continuous batching
        assert [r.tokens for r in par] == [r.tokens for r in ar], f"block size {k}"
        for r in par:
            check_stats(r, k)


def test_repetitive_output_is_accepted():
    # a near-uniform random model (std 0.02) falls into a short loop at once: the lookup must hit
    model = tiny_base("llama", initializer_range=0.02)[1]
    prompts = repetitive_prompts(1)
    ar, _ = decode_all(model, prompts, GenerationConfig(max_new_tokens=48), 1)
    par, dec = decode_all(model, prompts, ngram(48), 8)
    assert [r.tokens for r in par] == [r.tokens for r in ar]
    for r in par:
        check_stats(r, 8)
        assert r.stats.acceptance_length > 2.0, r.stats.to_dict()
    assert dec.lengths.tolist() == dec.lengths_host
    # the index of a live row holds exactly its prompt and tokens (incremental updates kept up)


def test_index_follows_the_row():
    model = tiny_base("qwen3")[1]
    prompts = repetitive_prompts(2)
    dec = Decoder(model, None, (), token_text, 3, 200)
    dec.add([(i, p, ngram(60), 6) for i, p in enumerate(prompts)])
    for _ in range(4):
        dec.step()
        for i, r in enumerate(dec.rows):
            if r is not None and r.finish_reason is None:
                assert dec.ngram[i].tokens == r.prompt_ids + r.tokens
                assert dec.ngram[i].last == NgramIndex(r.prompt_ids + r.tokens, 4).last


def test_ngram_rows_beside_diffusion_and_ar_rows():
    """One batch mixing sources (diffusion, n-gram, AR): every row exact, n-gram rows no draft pass."""
    model = tiny_base("mistral")[1]
    adapter = tiny_adapter(model, "full", block_size=6)
    prompts = random_prompts([4, 9, 3], VOCAB, seed=3) + repetitive_prompts(3)
    ar, _ = decode_all(model, prompts, GenerationConfig(max_new_tokens=30), 1)
    gens = [GenerationConfig(max_new_tokens=30, mode=m, draft=d) for m, d in
            [("parallel", "ngram"), ("parallel", "diffusion"), ("ar", "diffusion")] * 2]
    par, _ = decode_all(model, prompts, gens, 6, adapter=adapter)
    assert [r.tokens for r in par] == [r.tokens for r in ar]
    for r, g in zip(par, gens):
        if g.draft == "ngram":
            assert r.stats.draft_passes == 0
        else:
            assert r.stats.draft_passes == r.stats.verify_passes


@pytest.mark.parametrize("arch,k", [("llama", 3), ("qwen3", 4), ("mistral", 8)])
def test_greedy_hybrid_equals_ar_and_switches_source(arch, k):
    """Hybrid rows (beside diffusion, n-gram and AR rows) are token-identical to AR; on repetitive
    prompts they take n-gram cycles (no draft pass, block size max(K, 8)), elsewhere diffusion ones."""
    model = tiny_base(arch, initializer_range=0.02)[1]  # falls into loops: the lookup hits
    adapter = tiny_adapter(model, "lora", block_size=k)
    prompts = random_prompts([4, 9, 3], VOCAB, seed=5) + repetitive_prompts(5)
    ar, _ = decode_all(model, prompts, GenerationConfig(max_new_tokens=30), 1)
    hyb = GenerationConfig(max_new_tokens=30, mode="parallel", draft="hybrid")
    gens = [hyb] * 6
    par, _ = decode_all(model, prompts, gens, k, batch_size=2, adapter=adapter)
    assert [r.tokens for r in par] == [r.tokens for r in ar]
    mixed = [hyb, GenerationConfig(max_new_tokens=30, mode="parallel"), ngram(30),
             GenerationConfig(max_new_tokens=30)] + [hyb] * 2
    par2, _ = decode_all(model, prompts, mixed, k, adapter=adapter)
    assert [r.tokens for r in par2] == [r.tokens for r in ar]
    assert any(r.stats.draft_passes < r.stats.verify_passes for r in par)  # some n-gram cycles
    assert any(r.stats.draft_passes > 0 for r in par)
    if k < 8:  # n-gram cycles ran at block size 8: their slots past K - 1 were reached
        assert any(len(r.stats.slot_accepts) == 7 for r in par)


def test_hybrid_needs_an_adapter_and_room():
    from orthrus.decoding.generator import hybrid_ngram_block

    hyb = GenerationConfig(max_new_tokens=5, mode="parallel", draft="hybrid")
    assert hybrid_ngram_block(hyb, 4) == 8 and hybrid_ngram_block(hyb, 16) == 16
    assert hybrid_ngram_block(GenerationConfig(mode="parallel"), 4) == 0
    model = tiny_base("llama")[1]
    dec = Decoder(model, tiny_adapter(model, "lora", block_size=4), (), token_text, 1, 3 + 5 + 4)
    with pytest.raises(ValueError, match="cache positions"):  # the n-gram block does not fit
        dec.add([(0, [5, 6, 7], hyb, 4)])


@pytest.mark.parametrize("k,temperature,top_k", [(3, 1.0, 0), (4, 0.8, 5)])
def test_sampling_hybrid_matches_exact_ar_distribution(k, temperature, top_k):
    from chi2 import assert_sequence_distribution
    from test_decoding import exact_sequence_probs, perturb, sampling_model

    model = sampling_model()
    adapter = perturb(tiny_adapter(model, "full", block_size=k), scale=0.3, seed=1)
    prompt, n, rows = [3, 1, 4, 1, 5, 3, 1], 4, 16000
    probs = exact_sequence_probs(model, prompt, n, temperature, top_k, 1.0)
    gens = [GenerationConfig(max_new_tokens=n, mode="parallel", draft="hybrid", temperature=temperature,
                             top_k=top_k, seed=1000 + s) for s in range(rows)]
    out, _ = decode_all(model, [prompt] * rows, gens, k, adapter=adapter)
    assert_sequence_distribution(torch.tensor([r.tokens for r in out]), probs, model.config.vocab_size)
    # both sources were used across rows (the repeat [3, 1] matches at once; later cycles vary)
    assert any(r.stats.draft_passes < r.stats.verify_passes for r in out)
    assert any(r.stats.draft_passes > 0 for r in out)


def test_eos_and_length_inside_an_ngram_block():
    model = tiny_base("qwen2", initializer_range=0.02)[1]
    prompts = repetitive_prompts(4)
    ar, _ = decode_all(model, prompts, GenerationConfig(max_new_tokens=21), 1)
    eos = ar[1].tokens[7]  # a token the AR output emits: rows end there (or at 21 tokens)
    ar, _ = decode_all(model, prompts, GenerationConfig(max_new_tokens=21), 1, eos_ids=(eos,))
    par, _ = decode_all(model, prompts, ngram(21), 8, eos_ids=(eos,))
    assert [r.tokens for r in par] == [r.tokens for r in ar]
    assert [r.finish_reason for r in par] == [r.finish_reason for r in ar]


# ---------------------------------------------------------------- sampling


@pytest.mark.parametrize("k,temperature,top_k,top_p", [
    (2, 1.0, 0, 1.0),     # one draft: the bonus path
    (4, 0.7, 5, 1.0),     # three drafts, top-k
    (3, 1.3, 0, 0.9),     # top-p
])
def test_sampling_with_ngram_drafts_matches_exact_ar_distribution(k, temperature, top_k, top_p):
    from chi2 import assert_sequence_distribution
    from test_decoding import exact_sequence_probs, sampling_model

    model = sampling_model()
    prompt, n, rows = [3, 1, 4, 1, 5, 3, 1], 3, 12000  # vocabulary 8: most suffixes match the prompt
    probs = exact_sequence_probs(model, prompt, n, temperature, top_k, top_p)
    gens = [ngram(n, temperature=temperature, top_k=top_k, top_p=top_p, seed=1000 + s) for s in range(rows)]
    out, _ = decode_all(model, [prompt] * rows, gens, k)
    assert_sequence_distribution(torch.tensor([r.tokens for r in out]), probs, model.config.vocab_size)
    # the drafts were used, with both outcomes (one-hot q: accepted with probability p(draft))
    hist = [sum(x) for x in zip(*(r.stats.accept_hist + [0] * k for r in out))]
    assert hist[0] > 0 and sum(hist[1:]) > 0


def test_sampled_ngram_seeded_same_alone_or_batched():
    model = tiny_base("llama")[1]
    prompts = repetitive_prompts(5)
    gens = [ngram(24, temperature=0.8, seed=s) for s in (11, 12, 13)]
    together, _ = decode_all(model, prompts, gens, 5)
    alone = [decode_all(model, [p], [g], 5)[0][0] for p, g in zip(prompts, gens)]
    assert [r.tokens for r in together] == [r.tokens for r in alone]


# ---------------------------------------------------------------- CLI


def _cli(argv: list[str], capsys) -> tuple[int, str, str]:
    from orthrus.cli import main

    try:
        rc = main(argv)
    except SystemExit as e:
        rc = int(e.code or 0)
    out, err = capsys.readouterr()
    return rc, out, err


def test_cli_draft_ngram_needs_no_adapter(tmp_path, capsys):
    import json

    from test_loading import save_tiny

    folder = tmp_path / "tiny"
    save_tiny(folder, "qwen3", initializer_range=0.02)  # a random HF folder: no adapter exists for it
    prompts = ["w3 w4 w5 w6 w3 w4 w5 w6 w3 w4", "w9 w8 w9 w8 w9", "w40"]
    base = ["generate", *prompts, "--model", str(folder), "--no-chat-template", "--json",
            "--max-new-tokens", "24", "--batch-size", "2"]
    rc, out_ar, _ = _cli([*base, "--mode", "ar"], capsys)
    assert rc == 0
    rc, out_ng, err = _cli([*base, "--draft", "ngram"], capsys)  # --mode parallel is implied
    assert rc == 0, err
    assert "[mode parallel, draft ngram]" in err
    ar = [json.loads(ln) for ln in out_ar.splitlines()]
    ng = [json.loads(ln) for ln in out_ng.splitlines()]
    assert [r["token_ids"] for r in ng] == [r["token_ids"] for r in ar]
    assert all(r["stats"]["draft_passes"] == 0 for r in ng)
    assert sum(r["stats"]["verify_passes"] for r in ng) < sum(r["stats"]["verify_passes"] for r in ar)


@pytest.mark.parametrize("argv,needle", [
    (["--draft", "fast"], "--draft"),
    (["--draft", "ngram", "--schedule", "one-pass"], "one-pass"),
    (["--draft", "ngram", "--mode", "ar"], "--mode ar"),
    (["--draft", "self", "--mode", "ar"], "--mode ar"),  # self-drafting (tests/test_selfdraft.py)
    (["--draft", "hybrid-self", "--dtype", "bfloat16"], "float32"),
])
def test_cli_bad_draft_one_line_exit_2(argv, needle, monkeypatch, capsys):
    from orthrus.commands import common

    from orthrus.commands import generate

    for mod in (common, generate):
        monkeypatch.setattr(mod, "load_engine", lambda *a, **k: pytest.fail("loaded the model"))
    rc, out, err = _cli(["generate", "hi", *argv], capsys)
    lines = [ln for ln in err.splitlines() if ln.strip() and not ln.startswith("INFO ")]
    assert rc == 2 and out == "" and len(lines) == 1 and lines[0].startswith("orthrus: error: "), err
    assert needle in lines[0]


# ---------------------------------------------------------------- bench


def test_bench_ngram_mode_without_adapter(tmp_path):
    from test_bench import CharTokenizer

    from orthrus.bench import BenchSettings, run_bench
    from orthrus.engine import Orthrus
    from orthrus.models.loading import LoadedModel
    from conftest import TINY_FP

    model = tiny_base("llama", seed=3, initializer_range=0.02)[1]
    engine = Orthrus(LoadedModel(model, CharTokenizer(), (2,), TINY_FP, "tiny", tmp_path), None)
    prompts = ["abcabcabcabc", "hello hello hello", "x = [1, 2, 3]"]
    settings = BenchSettings(modes=("ar", "ngram"), max_new_tokens=16, batch_size=2, warmup=1, block_size=6)
    res = run_bench(engine, prompts, settings, prompt_source="test", command="x")["results"]
    ng = res["ngram"]
    assert ng["exact_match_vs_ar"] == 1.0 and ng["block_size"] == 6
    assert ng["draft_passes"] == 0 and ng["forward_passes"] == ng["verify_passes"] == sum(ng["accept_hist"])
    assert ng["acceptance_length"] > 1.0 and len(ng["slot_accept_rates"]) == 5
    assert ng["memory"]["weights_bytes"] == res["ar"]["memory"]["weights_bytes"]  # no adapter


# ---------------------------------------------------------------- graph safety


@pytest.mark.parametrize("greedy,source", [(True, "ngram"), (False, "ngram"), (False, "diffusion+ngram"),
                                           (True, "diffusion+ngram")])
def test_ngram_cycle_is_one_graph_without_host_syncs(greedy, source):
    """torch.compile(fullgraph=True) refuses graph breaks (a host sync, a data-dependent branch):
    the n-gram cycle's device part is capturable as a CUDA graph, with the drafts a static input,
    also beside diffusion-drafted rows. (Self-drafting runs fbgemm's CPU-only fp16 GEMMs, which
    dynamo cannot trace: it is an eager CPU path, refused with --compile.)"""
    import torch._dynamo

    srcs = source.split("+")
    model = tiny_base("qwen3")[1]
    adapter = tiny_adapter(model, "full", block_size=4) if "diffusion" in srcs else None
    dec = Decoder(model, adapter, (), token_text, len(srcs), 64, static_shapes=True)
    gens = [GenerationConfig(max_new_tokens=20, mode="parallel", draft=d, temperature=0.0 if greedy else 0.8,
                             seed=1) for d in srcs]
    dec.add([(i, p, g, 4) for i, (p, g) in enumerate(zip(repetitive_prompts(6)[:len(srcs)], gens))])
    ng = srcs.index("ngram")
    dec._upload_ngram_drafts([ng], len(srcs), 4)  # what step() does first
    dec.ngram_rows[:len(srcs)] = torch.tensor([s == "ngram" for s in srcs])
    before = dec.lengths.clone()
    torch._dynamo.reset()
    with torch.no_grad():
        out = torch.compile(dec._cycle, fullgraph=True, backend="eager")(len(srcs), 4, 64, greedy, False, source)
    assert out.shape == (len(srcs), 6) and not out[:, 5].any()  # k + 2: tokens, a, fault
    assert torch.equal(dec.lengths, before + out[:, 4] + 1)


def test_static_shapes_ngram_equals_ar():
    model = tiny_base("llama")[1]
    prompts = random_prompts([6, 11], VOCAB, seed=7) + repetitive_prompts(7)
    ar, _ = decode_all(model, prompts, GenerationConfig(max_new_tokens=30), 1)
    cap = max(len(p) for p in prompts) + 30 + 8
    dec = Decoder(model, None, (), token_text, 3, cap, static_shapes=True)  # parked rows run too
    pending, done = list(enumerate(prompts)), {}
    while pending or dec.busy():
        free = dec.free_slots()
        if free and pending:
            batch, pending = pending[: len(free)], pending[len(free):]
            evs = dec.add([(i, p, ngram(30), 8) for i, p in batch])
        else:
            evs = []
        for ev in evs + dec.step():
            if ev.finish_reason is not None:
                done[ev.request_id] = ev.row
                dec.release(ev.row.slot)
    assert [done[i].tokens for i in range(len(prompts))] == [r.tokens for r in ar]
