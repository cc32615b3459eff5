"""Graph-ready decoding: static shapes, no host sync inside a cycle, CUDA graph replay.

On the CPU (CI) we check what a CUDA graph capture relies on: the static-shape mode (rows and kv_len
rounded to powers of two) gives the same tokens as the tight eager mode, with few distinct shapes;
and the whole cycle -- draft, verify, consensus, commit -- traces as one graph with no break (no
``.item()``, no data-dependent shape, no host sync). With a GPU, replayed graphs give the same
tokens as eager cycles and capturing leaves the decoder's state untouched.
"""

from __future__ import annotations

import functools

import pytest
import torch

from conftest import TINY_FP, random_prompts, run_decoder, tiny_adapter, tiny_base, token_text
from orthrus.config import GenerationConfig
from orthrus.decoding.generator import STATIC_MIN_KV, Decoder

VOCAB = 97
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def recording(**opts):
    """A Decoder class with fixed options that records the shape key of every cycle it runs."""

    class Recording(Decoder):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw, **opts)
            self.keys = []

        def _cycle(self, *key):
            self.keys.append(key)
            return super()._cycle(*key)

    return Recording


def mixed_gens(mode: str) -> list[GenerationConfig]:
    return [GenerationConfig(max_new_tokens=n, mode=mode) for n in (30, 11, 40, 7, 22)][:3] + [
        GenerationConfig(max_new_tokens=25, mode=mode, temperature=0.9, seed=4),
        GenerationConfig(max_new_tokens=18, mode=mode, temperature=1.2, top_k=6, top_p=0.9, seed=5)]


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
@pytest.mark.parametrize("mode", ["ar", "parallel"])
def test_static_shapes_give_the_same_tokens(arch, mode):
    """Rounding rows and kv_len up (graph mode's shapes) changes no token, greedy or sampled, with
    continuous batching refilling slots; the shapes are powers of two (or the full capacity)."""
    model = tiny_base(arch)[1]
    adapter = tiny_adapter(model, "lora", block_size=5)
    prompts = random_prompts([3, 12, 7, 1, 9], VOCAB, seed=21)
    gens = mixed_gens(mode)
    eager, d0 = run_decoder(model, adapter, prompts, gens, batch_size=3, decoder_cls=recording())
    static, d1 = run_decoder(model, adapter, prompts, gens, batch_size=3, capacity=300,
                             decoder_cls=recording(static_shapes=True))
    assert [r.tokens for r in static] == [r.tokens for r in eager]
    assert [r.stats.accept_hist for r in static] == [r.stats.accept_hist for r in eager]
    assert d0.static_shapes is False and d1.static_shapes is True and d1.graphs is None
    # rows: a power of two or all 3 slots; kv_len: a power of two >= STATIC_MIN_KV or the capacity
    assert {rows for rows, *_ in d1.keys} <= {1, 2, 3} and {kv for _, _, kv, *_ in d1.keys} <= {STATIC_MIN_KV, 300}
    assert all(kv % 64 == 0 or kv == d0.capacity for _, _, kv, *_ in d0.keys)  # eager: tight


def test_static_kv_len_grows_in_powers_of_two():
    model = tiny_base("mistral")[1]
    dec = Decoder(model, None, (), token_text, 4, 5000, static_shapes=True)
    assert dec.cycle_shape(1, 10) == (1, STATIC_MIN_KV)
    assert dec.cycle_shape(3, STATIC_MIN_KV + 1) == (4, 2 * STATIC_MIN_KV)
    assert dec.cycle_shape(4, 4097) == (4, 5000)  # never past the capacity
    eager = Decoder(model, None, (), token_text, 4, 5000)
    assert eager.cycle_shape(3, 65) == (3, 128)


def _trace(dec: Decoder, key: tuple) -> torch.Tensor:
    import torch._dynamo

    torch._dynamo.reset()
    with torch.no_grad():
        return torch.compile(dec._cycle, fullgraph=True, backend="eager")(*key)


@pytest.mark.parametrize("greedy,filters,k", [(True, False, 4), (False, True, 4), (False, False, 1)])
def test_cycle_is_one_graph_without_host_syncs(greedy, filters, k):
    """torch.compile(fullgraph=True) refuses any graph break: a .item()/.tolist(), a Python branch
    on a tensor value or a data-dependent shape inside the cycle would fail here (CUDA graph capture
    fails on the same things)."""
    model = tiny_base("qwen3")[1]
    adapter = tiny_adapter(model, "full", block_size=4)
    dec = Decoder(model, adapter, (), token_text, 2, 64, static_shapes=True)
    g = GenerationConfig(max_new_tokens=20, mode="parallel", temperature=0.0 if greedy else 0.8,
                         top_k=5 if filters else 0, seed=1)
    dec.add([(i, p, g, k) for i, p in enumerate(random_prompts([5, 9], VOCAB, seed=1))])
    before = dec.lengths.clone()
    out = _trace(dec, (2, k, 64, greedy, filters))
    assert out.shape == (2, k + 2) and not out[:, k + 1].any()  # last column: no numerical fault
    assert torch.equal(dec.lengths, before + out[:, k] + 1)  # the commit ran inside the graph
    if k > 1:  # the one-pass cycle too (its state buffers allocated first, as Decoder.step does)
        dec._onepass_buffers(k, not greedy)
        before = dec.lengths.clone()
        out = _trace(dec, (2, k, 64, greedy, filters, "onepass", 2))
        assert out.shape == (2, k + 2) and torch.equal(dec.lengths, before + out[:, k] + 1)


def test_the_trace_check_catches_a_host_sync(monkeypatch):
    """The check above can fail: a cycle that reads a value on the host is refused."""
    import orthrus.decoding.generator as gen_mod

    real = gen_mod.greedy_accept

    def syncing(drafts, logits):
        n, nxt = real(drafts, logits)
        if int(n.max()) > 0:  # a host sync
            nxt = nxt + 0
        return n, nxt

    monkeypatch.setattr(gen_mod, "greedy_accept", syncing)
    model = tiny_base("llama")[1]
    dec = Decoder(model, tiny_adapter(model, "full", block_size=4), (), token_text, 1, 64, static_shapes=True)
    dec.add([(0, random_prompts([5], VOCAB, seed=2)[0], GenerationConfig(max_new_tokens=8, mode="parallel"), 4)])
    with pytest.raises(Exception):
        _trace(dec, (1, 4, 64, True, False))


def test_compiled_cycle_gives_the_same_tokens():
    """--compile: the cycle through torch.compile (Inductor), with the weights as the engine
    prepares them (prepacked, the GEMMs called as opaque ops: orthrus.models.opaque; int8 drafts
    where fbgemm exists): the same tokens as eager decoding, for chain and tree verification. The
    attended cache length grows from 64 to 192 slots under one graph (the length is symbolic)."""
    from orthrus.engine import Orthrus
    from orthrus.models.llama import packing_available
    from orthrus.models.loading import LoadedModel

    class CompiledRecording(Decoder):  # records outside the compiled cycle (a list append inside would recompile)
        mode = True

        def __init__(self, *a, **kw):
            super().__init__(*a, **kw, compile=self.mode)
            self.keys = []

        def run_cycle(self, *key):
            self.keys.append(key)
            return super().run_cycle(*key)

    model = tiny_base("llama")[1]
    adapter = tiny_adapter(model, "full", block_size=4)
    engine = Orthrus(LoadedModel(model, None, (), TINY_FP, "tiny", None), adapter, compile=True)
    assert model.prepared and (model.packed_min_rows is not None or model.tiled_rows > 0) == packing_available()
    assert all(a.qkv is not None for a in adapter.layers)
    prompts = random_prompts([6], VOCAB, seed=23)
    for verify in ("chain", "tree"):
        gens = [GenerationConfig(max_new_tokens=150, mode="parallel", verify=verify)]
        ref, _ = run_decoder(model, adapter, prompts, gens, capacity=200)
        out, dec = run_decoder(model, adapter, prompts, gens, capacity=200, decoder_cls=CompiledRecording)
        assert dec.compiled and [r.tokens for r in out] == [r.tokens for r in ref]
        assert {key[2] for key in dec.keys} >= {64, 128, 192}
        assert {key[5] for key in dec.keys} == {"diffusion" if verify == "chain" else "tree"}
        assert len(dec._cycle_fn.compiles) == 1  # one graph for every cache length
    assert engine.draft_int8 == (model.draft_head is not None)
    # compile="auto": the first cycle of a shape runs eager and compiled five times each from the
    # same state (put back after each run), and the faster one serves the shape: the same tokens
    CompiledRecording.mode = "auto"
    out, dec = run_decoder(model, adapter, prompts, gens, capacity=200, decoder_cls=CompiledRecording)
    assert [r.tokens for r in out] == [r.tokens for r in ref]
    assert list(dec._cycle_fn.choice) == [(1, 4, True, False, "tree", 0, -1)]


def test_cuda_graphs_need_a_cuda_device():
    model = tiny_base("llama")[1]
    with pytest.raises(ValueError, match="CUDA device"):
        Decoder(model, None, (), token_text, 1, 64, cuda_graphs=True)
    with pytest.raises(ValueError, match="static shapes"):
        Decoder(model, None, (), token_text, 1, 64, cuda_graphs=True, static_shapes=False)
    dec = Decoder(model, None, (), token_text, 1, 64)
    assert dec.cuda_graphs is False and dec.static_shapes is False and dec.graphs is None


def test_engine_keeps_its_decoder_between_calls():
    """generate() reuses the last idle decoder (its cache, and on CUDA its graphs); a stream left
    half-read gives its rows back; two interleaved streams never share one decoder."""
    from orthrus.engine import Orthrus
    from orthrus.models.loading import LoadedModel

    class StubTokenizer:
        chat_template = None

        def decode(self, ids, skip_special_tokens=True):
            return token_text(list(ids))

    model = tiny_base("llama")[1]
    engine = Orthrus(LoadedModel(model, StubTokenizer(), (), TINY_FP, "tiny", None),
                     tiny_adapter(model, "full", block_size=4))
    prompts = random_prompts([6, 4], VOCAB, seed=3)
    first = engine.generate(prompts, batch_size=2, max_new_tokens=12, mode="parallel")
    dec = engine._spares["default"]
    assert dec is not None and not dec.busy()
    again = engine.generate(prompts[::-1], batch_size=2, max_new_tokens=10, mode="parallel")
    assert engine._spares.get("default") is dec  # the same cache served the second call
    assert [c.token_ids for c in again] == [c.token_ids[:10] for c in first[::-1]]
    s1 = engine.stream(prompts, batch_size=2, max_new_tokens=12, mode="ar")
    next(s1)
    s2 = engine.stream(prompts, batch_size=2, max_new_tokens=12, mode="ar")
    list(s2)
    assert engine._spares["default"] is not dec and dec.busy()  # s2 got a decoder of its own
    s1.close()  # closed half-read: its rows are released and its decoder kept
    assert engine._spares["default"] is dec and not dec.busy()
    bigger = engine.generate(prompts, batch_size=2, max_new_tokens=200, mode="ar")
    assert engine._spares["default"].capacity >= 6 + 200 + 1 and len(bigger[0].token_ids) == 200
    engine.generate(prompts, batch_size=2, max_new_tokens=5, mode="ar", decoder_key="other")
    assert set(engine._spares) == {"default", "other"}
    engine.release_decoders()
    assert engine._spares == {}


# ---------------------------------------------------------------- CUDA only


@cuda
@pytest.mark.parametrize("mode", ["ar", "parallel"])
def test_cuda_graph_replay_equals_eager(mode):
    model = tiny_base("qwen3")[1].cuda()
    adapter = tiny_adapter(model, "full", block_size=5).cuda()
    prompts = random_prompts([3, 12, 7, 1, 9], VOCAB, seed=22)
    gens = mixed_gens(mode)
    run = functools.partial(run_decoder, model, adapter, prompts, gens, batch_size=3, capacity=300)
    eager, _ = run(decoder_cls=recording(cuda_graphs=False, static_shapes=True))
    graphed, dec = run(decoder_cls=recording())
    assert dec.graphs is not None and 0 < len(dec.graphs) <= len(set(dec.keys))
    assert [r.tokens for r in graphed] == [r.tokens for r in eager]


@cuda
def test_capturing_a_new_shape_leaves_the_state_alone():
    model = tiny_base("llama")[1].cuda()
    dec = Decoder(model, tiny_adapter(model, "full", block_size=4).cuda(), (), token_text, 2, 300)
    dec.add([(i, p, GenerationConfig(max_new_tokens=20, mode="parallel"), 4)
             for i, p in enumerate(random_prompts([5, 9], VOCAB, seed=4))])
    lengths, x_t = dec.lengths.clone(), dec.x_t.clone()
    out = dec.graphs.run(2, 4, STATIC_MIN_KV, True, False).clone()
    assert torch.equal(dec.lengths, lengths + out[:, 4] + 1)  # exactly one commit, not 1 + warm-ups
    dec.lengths.copy_(lengths)
    dec.x_t.copy_(x_t)
    assert torch.equal(dec.graphs.run(2, 4, STATIC_MIN_KV, True, False), out)  # replay: same result


def test_inductor_vector_isa_probes_are_recorded_once(tmp_path, monkeypatch):
    """Compiled decoding's start-up: Inductor's per-process vector-ISA probes (child processes, ~1 s)
    run once per CPU, compiler and torch; their answer is kept under $ORTHRUS_CACHE and a later
    process with the same candidates skips them. A recorded answer that no longer matches the
    candidates is probed again."""
    import json

    from torch._inductor import config as ic
    from torch._inductor import cpu_vec_isa

    from orthrus.decoding.compiled import VEC_ISA_CACHE, _skip_known_vec_isa_probes

    monkeypatch.setenv("ORTHRUS_CACHE", str(tmp_path))
    monkeypatch.setattr(ic.cpp, "vec_isa_ok", None)
    probed = []
    real = cpu_vec_isa.valid_vec_isa_list
    monkeypatch.setattr(cpu_vec_isa, "valid_vec_isa_list", functools.wraps(real)(lambda: probed.append(1) or real()))
    _skip_known_vec_isa_probes()
    file = tmp_path / VEC_ISA_CACHE
    if len(real()) == 0:  # no vector ISA here (not x86): nothing to record
        return
    entries = json.loads(file.read_text())
    assert len(probed) == 1 and ic.cpp.vec_isa_ok is True
    assert list(entries.values()) == [[str(isa) for isa in real()]]
    ic.cpp.vec_isa_ok = None  # a new process
    _skip_known_vec_isa_probes()
    assert len(probed) == 1 and ic.cpp.vec_isa_ok is True  # read back, not probed
    file.write_text(json.dumps({k: ["something else"] for k in entries}))
    ic.cpp.vec_isa_ok = None
    _skip_known_vec_isa_probes()
    assert len(probed) == 2 and json.loads(file.read_text()) == entries
