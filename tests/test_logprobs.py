"""Log probabilities (``GenerationConfig.logprobs``): each generated token's log-prob and its top-N
alternatives are the frozen model's own log-softmax at that position, whatever the schedule (AR,
two-pass, one-pass, n-gram drafts) and the sampling settings, and they follow the tokens kept
(EOS, max tokens and stop strings cut both alike).

The reference is transformers' model, run once over prompt + generated tokens.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import pytest
import torch

from conftest import random_prompts, run_decoder, tiny_adapter, tiny_base
from orthrus.config import GenerationConfig
from orthrus.decoding.generator import Decoder, Row, pack_logprobs, unpack_logprobs
from orthrus.errors import OrthrusError

VOCAB = 97
ATOL = 1e-4


@lru_cache(maxsize=None)
def models(arch: str = "llama") -> tuple[Any, Any, Any]:
    """(transformers model, ours, a fresh adapter with block size 4)."""
    hf, ours = tiny_base(arch)
    return hf, ours, tiny_adapter(ours, block_size=4)


def reference(hf: Any, prompt: list[int], tokens: list[int]) -> torch.Tensor:
    """``[len(tokens), V]``: the model's log-softmax at each generated token's position."""
    with torch.no_grad():
        logits = hf(torch.tensor([prompt + tokens])).logits[0].float()
    return torch.log_softmax(logits, -1)[len(prompt) - 1: len(prompt) - 1 + len(tokens)]


def check_row(hf: Any, prompt: list[int], row: Row, n_top: int) -> None:
    lp = row.logprobs
    assert lp is not None and len(lp) == len(row.tokens) > 0
    ref = reference(hf, prompt, row.tokens)  # [n, V]
    want = ref.gather(1, torch.tensor(row.tokens)[:, None])[:, 0]
    torch.testing.assert_close(torch.tensor(lp.logprobs), want, atol=ATOL, rtol=0)
    assert all(len(ids) == n_top and len(v) == n_top for ids, v in zip(lp.top_ids, lp.top_logprobs))
    if n_top:
        top_vals, top_ids = ref.topk(n_top, dim=-1)
        torch.testing.assert_close(torch.tensor(lp.top_logprobs), top_vals, atol=ATOL, rtol=0)
        assert lp.top_ids == top_ids.tolist()
        for vals in lp.top_logprobs:
            assert vals == sorted(vals, reverse=True)


SCHEDULES = [  # (mode, extra config)
    ("ar", {}),
    ("parallel", {}),                                   # two-pass: diffusion draft, then verify
    ("parallel", {"schedule": "one-pass"}),
    ("parallel", {"draft": "ngram"}),
    ("parallel", {"verify": "tree"}),                   # two-pass, drafts verified as a tree
]


@pytest.mark.parametrize("mode,extra", SCHEDULES, ids=["ar", "two-pass", "one-pass", "ngram", "tree"])
def test_greedy_logprobs_are_the_models_log_softmax(mode: str, extra: dict) -> None:
    hf, ours, adapter = models()
    prompts = random_prompts([5, 11, 7], VOCAB, seed=3)
    tops = [3, 0, 20]  # rows of one batch ask for different numbers of alternatives
    gens = [GenerationConfig(max_new_tokens=14, mode=mode, logprobs=t, **extra) for t in tops]
    rows, _ = run_decoder(ours, adapter, prompts, gens, block_size=4 if mode == "parallel" else None)
    ar_rows, _ = run_decoder(ours, None, prompts, GenerationConfig(max_new_tokens=14))
    assert [r.tokens for r in rows] == [r.tokens for r in ar_rows]  # still exact
    for p, row, t in zip(prompts, rows, tops):
        check_row(hf, p, row, t)
    if mode == "parallel" and extra.get("schedule") != "one-pass":  # (the fresh adapter's one-pass
        # drafts are rarely right on a random model: see the oracle test below)
        assert sum(r.stats.tokens for r in rows) > sum(r.stats.verify_passes for r in rows)


def oracle_decoder(table: torch.Tensor) -> type[Decoder]:
    """A Decoder whose drafts are always right (``table[slot, p]``: the AR token at position p), in
    both schedules: every cycle commits a whole block."""

    class Oracle(Decoder):
        def _draft(self, hi, k, kv_len, positions, sampled, filters):  # noqa: ANN001, ANN202
            return table[:hi].gather(1, positions[:, 1:]), None

        def _cycle_onepass(self, hi, k, *args):  # noqa: ANN001, ANN002, ANN202
            # the drafts the previous pass would have stored for this cycle: positions t+1..t+K-1
            self.op_drafts[k][:hi] = table[:hi].gather(1, self.lengths[:hi, None] + 1 + torch.arange(k - 1))
            return super()._cycle_onepass(hi, k, *args)

    return Oracle


@pytest.mark.parametrize("schedule", ["two-pass", "one-pass"])
def test_logprobs_of_whole_accepted_blocks(schedule: str) -> None:
    hf, ours, adapter = models()
    prompts = random_prompts([5, 8], VOCAB, seed=4)
    ar_rows, _ = run_decoder(ours, None, prompts, GenerationConfig(max_new_tokens=13))
    table = torch.zeros(len(prompts), 64, dtype=torch.long)
    for i, (p, r) in enumerate(zip(prompts, ar_rows)):
        table[i, : len(p) + len(r.tokens)] = torch.tensor(p + r.tokens)
    gen = GenerationConfig(max_new_tokens=13, mode="parallel", schedule=schedule, logprobs=3)
    rows, _ = run_decoder(ours, adapter, prompts, gen, block_size=4, decoder_cls=oracle_decoder(table))
    assert [r.tokens for r in rows] == [r.tokens for r in ar_rows]
    for r in rows:  # whole blocks (a = K - 1) were committed, with their log-probs
        assert len(r.stats.accept_hist) == 4 and r.stats.accept_hist[3] >= 2
    for p, row in zip(prompts, rows):
        check_row(hf, p, row, 3)


@pytest.mark.parametrize("mode", ["ar", "parallel"])
def test_sampled_logprobs_are_before_temperature_and_filters(mode: str) -> None:
    """With temperature 0.7 and top-p 0.9 the reported log-probs are still the model's own."""
    hf, ours, adapter = models()
    prompts = random_prompts([6, 9], VOCAB, seed=5)
    gen = GenerationConfig(max_new_tokens=12, mode=mode, temperature=0.7, top_p=0.9, seed=11, logprobs=2)
    rows, _ = run_decoder(ours, adapter, prompts, gen, block_size=4 if mode == "parallel" else None)
    for p, row in zip(prompts, rows):
        check_row(hf, p, row, 2)
    scaled = reference(hf, prompts[0], rows[0].tokens) / 0.7
    assert not torch.allclose(torch.log_softmax(scaled, -1).max(-1).values,
                              torch.tensor(rows[0].logprobs.top_logprobs)[:, 0], atol=1e-3)


def test_rows_without_logprobs_get_none_and_cuts_follow_the_tokens() -> None:
    """A row that does not ask gets None beside rows that do; EOS, max tokens mid-block and a stop
    string cut the log-probs with the tokens."""
    hf, ours, adapter = models()
    prompts = random_prompts([4, 8, 6], VOCAB, seed=7)
    plain, _ = run_decoder(ours, None, prompts, GenerationConfig(max_new_tokens=16))
    eos = plain[0].tokens[5]  # row 0 meets this token early on
    stop = f"<{plain[2].tokens[6]}>"
    gens = [GenerationConfig(max_new_tokens=16, mode="parallel", logprobs=1),
            GenerationConfig(max_new_tokens=7, mode="parallel"),
            GenerationConfig(max_new_tokens=16, mode="parallel", logprobs=4, stop=(stop,))]
    rows, _ = run_decoder(ours, adapter, prompts, gens, block_size=4, eos_ids=(eos,))
    assert rows[1].logprobs is None
    assert rows[0].finish_reason == "stop" and rows[0].tokens[-1] == eos and len(rows[0].tokens) <= 6
    assert rows[2].finish_reason == "stop" and len(rows[2].tokens) < 16
    check_row(hf, prompts[0], rows[0], 1)
    check_row(hf, prompts[2], rows[2], 4)


def test_events_carry_the_logprobs_of_their_tokens() -> None:
    """Streaming: each event's log-probs are those of its own tokens, and together the row's."""
    _, ours, adapter = models()
    prompt = random_prompts([9], VOCAB, seed=2)[0]
    dec = Decoder(ours, adapter, (), lambda ids: "".join(f"<{t}>" for t in ids), 1, 64)
    events = dec.add([(0, prompt, GenerationConfig(max_new_tokens=10, mode="parallel", logprobs=2), 4)])
    while dec.busy() and events[-1].finish_reason is None:
        events += dec.step()
    assert all(ev.logprobs is not None and len(ev.logprobs) == len(ev.token_ids) for ev in events)
    row = events[-1].row
    assert [lp for ev in events for lp in ev.logprobs.logprobs] == row.logprobs.logprobs
    assert [t for ev in events for t in ev.token_ids] == row.tokens


@pytest.mark.parametrize("greedy", [True, False])
def test_logprobs_cycle_is_one_graph_without_host_syncs(greedy: bool) -> None:
    """The log-probs add no host sync: the cycle still traces as one graph (as in test_graphs), in
    both schedules, and its extra columns are the packed log-probs."""
    import torch._dynamo

    from conftest import token_text

    _, ours, adapter = models()
    dec = Decoder(ours, adapter, (), token_text, 2, 64, static_shapes=True)
    g = GenerationConfig(max_new_tokens=20, mode="parallel", temperature=0.0 if greedy else 0.8, seed=1, logprobs=3)
    dec.add([(i, p, g, 4) for i, p in enumerate(random_prompts([5, 9], VOCAB, seed=1))])
    dec._onepass_buffers(4, not greedy)
    for key in [(2, 4, 64, greedy, False, "diffusion", 0, 3), (2, 4, 64, greedy, False, "onepass", 2, 3)]:
        torch._dynamo.reset()
        with torch.no_grad():
            out = torch.compile(dec._cycle, fullgraph=True, backend="eager")(*key)
        assert out.shape == (2, 4 + 2 + 4 * (1 + 2 * 3))
        lp, top_lp, _ = unpack_logprobs(out[:, 6:], 4, 3)
        assert (lp <= 0).all() and (top_lp[..., 0] >= lp).all()


def test_pack_unpack_round_trip() -> None:
    logits = torch.randn(3, 4, 50)
    tokens = torch.randint(0, 50, (3, 4))
    lp, top_lp, top_ids = unpack_logprobs(pack_logprobs(logits, tokens, 5), 4, 5)
    ref = torch.log_softmax(logits, -1)
    torch.testing.assert_close(lp, ref.gather(-1, tokens[..., None])[..., 0], atol=1e-5, rtol=0)
    torch.testing.assert_close(top_lp, ref.topk(5, -1).values, atol=1e-5, rtol=0)
    assert torch.equal(top_ids, ref.topk(5, -1).indices)
    lp0, top0, ids0 = unpack_logprobs(pack_logprobs(logits, tokens, 0), 4, 0)
    assert top0.shape == (3, 4, 0) and ids0.shape == (3, 4, 0) and torch.equal(lp0, lp)


@pytest.mark.parametrize("bad", [-1, 21, 2.0, True])
def test_bad_logprobs_config(bad: Any) -> None:
    with pytest.raises(OrthrusError, match=r"logprobs must be None or an integer in \[0, 20\]"):
        GenerationConfig(logprobs=bad)


# ---- over HTTP (the OpenAI API), on a tiny chat model ------------------------------------------------

SERVED = "tiny"
QUESTION = [{"role": "user", "content": "w5 w6 w7"}]


@pytest.fixture(scope="module")
def served(tiny_chat_engine: Any) -> Any:
    """(engine, transformers' model of the same folder, {mode: openai client}) for AR and parallel."""
    pytest.importorskip("fastapi")
    openai = pytest.importorskip("openai")
    from transformers import AutoModelForCausalLM

    from orthrus.serve.app import create_app
    from test_serve import LiveServer

    hf = AutoModelForCausalLM.from_pretrained(tiny_chat_engine.base.folder, dtype=torch.float32).eval()
    servers = {mode: LiveServer(create_app(tiny_chat_engine, model_name=SERVED, mode=mode, max_batch_size=3,
                                           max_seq_len=128))
               for mode in ("ar", "parallel")}
    clients = {mode: openai.OpenAI(base_url=s.url + "/v1", api_key="x", max_retries=0, timeout=60)
               for mode, s in servers.items()}
    yield tiny_chat_engine, hf, clients, servers
    for s in servers.values():
        s.close()


def _expected(engine: Any, hf: Any, prompt_ids: list[int], n: int) -> tuple[list[int], torch.Tensor]:
    """The greedy tokens (plain AR) and the model's log-softmax at each of them ``[n, V]``."""
    tokens = engine.generate([prompt_ids], GenerationConfig(max_new_tokens=n))[0].token_ids
    return tokens, reference(hf, prompt_ids, tokens)


@pytest.mark.parametrize("mode", ["ar", "parallel"])
def test_chat_logprobs_streamed_and_not(served: Any, mode: str) -> None:
    engine, hf, clients, _ = served
    client = clients[mode]
    n, top = 9, 3
    tokens, ref = _expected(engine, hf, engine.encode(QUESTION), n)
    r = client.chat.completions.create(model=SERVED, messages=QUESTION, max_tokens=n, temperature=0,
                                       logprobs=True, top_logprobs=top)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens == n
    for j, (entry, tok) in enumerate(zip(content, tokens)):
        assert entry.token == engine.tokenizer.decode([tok]) and entry.bytes == list(entry.token.encode())
        assert abs(entry.logprob - ref[j, tok].item()) < ATOL
        assert len(entry.top_logprobs) == top
        values = [t.logprob for t in entry.top_logprobs]
        assert values == sorted(values, reverse=True)
        want_vals, want_ids = ref[j].topk(top)
        assert [t.token for t in entry.top_logprobs] == [engine.tokenizer.decode([i]) for i in want_ids.tolist()]
        torch.testing.assert_close(torch.tensor(values), want_vals, atol=ATOL, rtol=0)
        assert entry.top_logprobs[0].token == entry.token  # greedy: the chosen token is the likeliest
    streamed = list(client.chat.completions.create(model=SERVED, messages=QUESTION, max_tokens=n, temperature=0,
                                                   logprobs=True, top_logprobs=top, stream=True))
    parts = [e for c in streamed for ch in c.choices if ch.logprobs for e in ch.logprobs.content]
    assert [e.model_dump() for e in parts] == [e.model_dump() for e in content]
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == r.choices[0].message.content
    # without logprobs: none in the reply; n > 1: each choice has its own
    plain = client.chat.completions.create(model=SERVED, messages=QUESTION, max_tokens=3, temperature=0)
    assert plain.choices[0].logprobs is None
    two = client.chat.completions.create(model=SERVED, messages=QUESTION, max_tokens=4, temperature=0, n=2,
                                         logprobs=True)
    assert [len(c.logprobs.content) for c in two.choices] == [4, 4]
    assert all(e.top_logprobs == [] for c in two.choices for e in c.logprobs.content)  # top_logprobs 0


@pytest.mark.parametrize("mode", ["ar", "parallel"])
def test_completion_logprobs_streamed_and_not(served: Any, mode: str) -> None:
    engine, hf, clients, _ = served
    client = clients[mode]
    prompt = "w9 w10 w11 w12"
    n, top = 8, 2
    tokens, ref = _expected(engine, hf, engine.encode(prompt, chat_template=False), n)
    r = client.completions.create(model=SERVED, prompt=prompt, max_tokens=n, temperature=0, logprobs=top)
    lp = r.choices[0].logprobs
    texts = [engine.tokenizer.decode([t]) for t in tokens]
    assert lp.tokens == texts
    torch.testing.assert_close(torch.tensor(lp.token_logprobs), ref.gather(1, torch.tensor(tokens)[:, None])[:, 0],
                               atol=ATOL, rtol=0)
    for j, d in enumerate(lp.top_logprobs):  # the top N, and the chosen token (as OpenAI: up to N + 1)
        want_vals, want_ids = ref[j].topk(top)
        assert list(d) == [engine.tokenizer.decode([i]) for i in want_ids.tolist()] and texts[j] in d
        torch.testing.assert_close(torch.tensor(list(d.values())), want_vals, atol=ATOL, rtol=0)
    assert lp.text_offset == [sum(len(t) for t in texts[:j]) for j in range(n)]
    streamed = list(client.completions.create(model=SERVED, prompt=prompt, max_tokens=n, temperature=0,
                                              logprobs=top, stream=True))
    got: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for c in streamed:
        if c.choices[0].logprobs is not None:
            for key in got:
                got[key] += getattr(c.choices[0].logprobs, key)
    assert got == {key: getattr(lp, key) for key in got}
    assert "".join(c.choices[0].text for c in streamed) == r.choices[0].text


def test_sampled_logprobs_over_http_are_the_models(served: Any) -> None:
    """Parallel mode, temperature 1.3, seeded: the log-probs are the model's own (not the sampling
    distribution's), at each sampled token."""
    engine, hf, clients, _ = served
    r = clients["parallel"].chat.completions.create(model=SERVED, messages=QUESTION, max_tokens=10,
                                                    temperature=1.3, seed=3, logprobs=True, top_logprobs=1)
    ids = engine.encode(QUESTION)
    vocab = {engine.tokenizer.decode([i], skip_special_tokens=False): i for i in range(VOCAB)}  # (EOS too)
    tokens = [vocab[e.token] for e in r.choices[0].logprobs.content]
    ref = reference(hf, ids, tokens)
    for j, (e, tok) in enumerate(zip(r.choices[0].logprobs.content, tokens)):
        assert abs(e.logprob - ref[j, tok].item()) < ATOL
        assert abs(e.top_logprobs[0].logprob - ref[j].max().item()) < ATOL


BAD_LOGPROBS = [  # (path, extra fields, param, text in the message)
    ("/v1/chat/completions", {"logprobs": True, "top_logprobs": 50}, "top_logprobs", "[0, 20]"),
    ("/v1/chat/completions", {"logprobs": True, "top_logprobs": -1}, "top_logprobs", "[0, 20]"),
    ("/v1/chat/completions", {"logprobs": True, "top_logprobs": 2.5}, "top_logprobs", "[0, 20]"),
    ("/v1/chat/completions", {"top_logprobs": 2}, "top_logprobs", '"logprobs": true'),
    ("/v1/chat/completions", {"logprobs": 1}, "logprobs", "boolean"),
    ("/v1/completions", {"logprobs": 6}, "logprobs", "[0, 5]"),
    ("/v1/completions", {"logprobs": True}, "logprobs", "[0, 5]"),
    ("/v1/completions", {"logprobs": 2, "echo": True}, "logprobs", "echo"),
]


@pytest.mark.parametrize("path,extra,param,needle", BAD_LOGPROBS)
def test_bad_logprobs_values_are_400_naming_the_field(served: Any, path: str, extra: dict, param: str,
                                                      needle: str) -> None:
    import httpx

    _, _, _, servers = served
    body = {"model": SERVED, "max_tokens": 2, **extra}
    body.update({"messages": QUESTION} if "chat" in path else {"prompt": "w5 w6"})
    r = httpx.post(servers["ar"].url + path, json=body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and needle in err["message"] and param in err["message"], err
