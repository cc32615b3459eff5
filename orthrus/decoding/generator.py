"""The decoding loop: a fixed set of batch *slots* over one static KV cache.

One code path for every case: AR decoding is a cycle with block size 1 and no draft; batch 1 is
B = 1; offline ``generate`` and the server both add requests into free slots (continuous batching)
and call :meth:`Decoder.step` until the slots drain.

One cycle (METHOD.md), for all active rows at once, in the two-pass schedule:

1. draft: the diffusion view reads ``[x_t, MASK x (K-1)]`` at ``t..t+K-1`` -> drafts ``d_1..d_{K-1}``;
2. verify: the frozen model reads ``[x_t, d_1..d_{K-1}]``, writing K/V at ``t..t+K-1``;
3. consensus: greedy prefix match, or speculative rejection sampling (same code for both);
4. commit: each row's length moves by ``a + 1`` on the device; the correction token is the new x_t.

The one-pass schedule (:meth:`Decoder._cycle_onepass`) folds step 1 of the *next* cycle into step
2: the drafts come from the previous pass, and one forward verifies them while the diffusion view
drafts the next block for each of ``C`` candidate acceptances ``j`` (a ``masked`` block at
``t+j+1..``, seeing the cache up to ``t+j``). Consensus picks ``a``; block ``a``'s drafts (or, when
``a`` was not a candidate, the largest candidate below it, shifted) are the next cycle's drafts.

The device part has no Python loop over rows or tokens and no host sync; the single sync per cycle
is the copy of the emitted tokens to the host (marked below), after which the host does the per-row
bookkeeping (EOS, max tokens, stop strings, streaming text).

Log probabilities (``GenerationConfig.logprobs``) come from the verify pass's own logits, i.e. the
frozen model's exact distribution at each committed position (before temperature, top-k and top-p):
when a row of the cycle asks for them, the cycle gathers each emitted token's logit and the top-N
logits, subtracts the logsumexp, and packs them (float bits) into the same output tensor, so the one
copy to the host brings them too (:func:`pack_logprobs`).

Shapes: a cycle runs over slots ``[0, rows)`` attending over cache slots ``[0, kv_len)``. Eager mode
(CPU) keeps both tight (``kv_len`` a multiple of :data:`KV_BUCKET`). Static mode rounds both up to
powers of two, so few distinct shapes occur; on CUDA it is the default and each shape's cycle is
captured once as a CUDA graph and replayed (``orthrus.decoding.graphs``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import Tensor

from orthrus.adapter import DiffusionAdapter
from orthrus.config import HYBRID_DRAFTS, SELF_DRAFTS, GenerationConfig
from orthrus.decoding.compiled import CompiledCycle
from orthrus.decoding.graphs import CycleGraphs
from orthrus.decoding.ngram import NGRAM_BLOCK_SIZE, NgramIndex, ngram_drafts
from orthrus.decoding.sampling import (STREAM_ACCEPT, STREAM_BONUS, STREAM_DRAFT, STREAM_RESIDUAL,
                                       process_logits, sample, uniform)
from orthrus.decoding.stats import DecodeStats
from orthrus.decoding.tree import DEFAULT_DRAFT_RANKS, DraftTree, build_tree, verifies_by_tree
from orthrus.decoding.verify import greedy_accept, rejection_accept
from orthrus.models.llama import Transformer

DETOK_WINDOW = 16  # incremental detokenisation re-decodes at most ~2x this many tokens per row and cycle
KV_BUCKET = 64  # eager mode: attend over the cache in multiples of this many slots
STATIC_MIN_KV = 256  # static mode: kv_len is a power of two, at least this (or the capacity)
# on a CPU, cycles draft only while at most this many rows decode (Orthrus's default there; any
# draft is exact, so this is speed only). Measured on 16 HumanEval prompts, 2 threads:
# self-drafting was 1.58x / 1.09x / 0.88x our AR at batch 2 / 4 / 8, hybrid-self 1.65x / 1.08x, and
# adapter hybrid drafts 1.25x / 0.75x at batch 2 / 4 (bench/results/cpu_*_humaneval16_batch*)
DEFAULT_MAX_DRAFT_ROWS = 4
# and adapter drafts (a draft pass of K tokens per row, not a 1-token step) only while at most this
# many rows decode: hybrid with the adapter was 1.25x our AR at batch 2 and 0.75x at batch 4
DEFAULT_MAX_DIFFUSION_ROWS = 2
ONEPASS_SCRATCH = 64  # cache slots above the live ones for the one-pass candidate blocks' K/V
DEFAULT_CANDIDATES = 2  # one-pass candidate blocks per cycle when a request does not say
# hybrid drafts: a row drafts by n-gram in a cycle when its latest tokens match an earlier n-gram of
# at least this many tokens, else by the diffusion view. Measured on 6 HumanEval prompts (2 threads,
# 128 tokens, K = 4): 1 / 2 / 3 gave 1.96x / 1.82x / 1.73x our AR (n-gram alone at K = 8: 1.75x)
HYBRID_MIN_MATCH = 1


@dataclass(eq=False)
class Row:
    """Host-side state of one request in a slot."""

    request_id: Any
    slot: int
    prompt_ids: list[int]
    gen: GenerationConfig
    block_size: int
    # hybrid drafts: the block size of the row's n-gram cycles (0: the row never switches source)
    ngram_block: int = 0
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    stats: DecodeStats = field(default_factory=DecodeStats)
    started: float = field(default_factory=time.perf_counter)
    # incremental detokenisation: tokens[:dec_at] decode to dec_text, and decoding never merges
    # across dec_at (checked), so the full text is dec_text + decode(tokens[dec_at:])
    dec_at: int = 0
    dec_text: str = ""
    error: str | None = None  # why the row ended with finish_reason 'error' (a numerical fault)
    logprobs: TokenLogprobs | None = None  # of ``tokens``, when gen.logprobs asks for them


@dataclass
class Event:
    """What one row produced in one step: new final tokens and text, and whether it finished.
    ``logprobs``: those of ``token_ids`` when the row asks for them (``GenerationConfig.logprobs``)."""

    request_id: Any
    token_ids: list[int]
    text: str
    finish_reason: str | None
    row: Row
    logprobs: TokenLogprobs | None = None


@dataclass
class TokenLogprobs:
    """Log probabilities of generated tokens under the frozen model's distribution, one entry per
    token: its own, and the ``N`` most likely tokens at its position (most likely first)."""

    logprobs: list[float] = field(default_factory=list)          # [n]
    top_ids: list[list[int]] = field(default_factory=list)       # [n][N]
    top_logprobs: list[list[float]] = field(default_factory=list)  # [n][N]

    def __len__(self) -> int:
        return len(self.logprobs)

    def head(self, n: int) -> "TokenLogprobs":
        """The first ``n`` entries."""
        return TokenLogprobs(self.logprobs[:n], self.top_ids[:n], self.top_logprobs[:n])

    def extend(self, other: "TokenLogprobs") -> None:
        self.logprobs += other.logprobs
        self.top_ids += other.top_ids
        self.top_logprobs += other.top_logprobs


def pack_logprobs(logits: Tensor, tokens: Tensor, top: int) -> Tensor:
    """Log probabilities of ``tokens`` and the ``top`` most likely tokens, packed as int64 so that
    they travel to the host with a cycle's integer output (one copy, one sync).

    Args:
        logits: ``[B, K, V]`` the model's logits; tokens: ``[B, K]`` int64, the token at each
            position; top: alternatives per position (0..MAX_LOGPROBS).
    Returns:
        ``[B, K * (1 + 2 * top)]`` int64: per position, the token's log-prob and the top ``top``
        log-probs as float32 bits, then the top ids (:func:`unpack_logprobs` reads it back).
    """
    logits = logits.float()
    lse = torch.logsumexp(logits, dim=-1, keepdim=True)  # [B, K, 1]
    chosen = logits.gather(-1, tokens[..., None]) - lse  # [B, K, 1]: the one gather
    vals, ids = logits.topk(top, dim=-1)  # [B, K, top], sorted, most likely first
    bits = torch.cat((chosen, vals - lse), dim=-1).view(torch.int32).long()  # [B, K, 1 + top]
    return torch.cat((bits, ids), dim=-1).flatten(1)


def unpack_logprobs(packed: Tensor, k: int, top: int) -> tuple[Tensor, Tensor, Tensor]:
    """Host side of :func:`pack_logprobs`: ``[B, K * (1 + 2 * top)]`` -> (token log-probs ``[B, K]``
    float32, top log-probs ``[B, K, top]`` float32, top ids ``[B, K, top]`` int64)."""
    x = packed.reshape(packed.shape[0], k, 1 + 2 * top)
    lp = x[..., : 1 + top].to(torch.int32).view(torch.float32)
    return lp[..., 0], lp[..., 1:], x[..., 1 + top:]


def _row_logprobs(lp: Tensor, top_lp: Tensor, top_ids: Tensor, row: int, n: int, want: int) -> TokenLogprobs:
    """Row ``row``'s first ``n`` positions of unpacked host tensors, with ``want`` alternatives."""
    return TokenLogprobs(lp[row, :n].tolist(), top_ids[row, :n, :want].tolist(), top_lp[row, :n, :want].tolist())


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def pow2(n: int) -> int:
    """The smallest power of two >= n (n >= 1)."""
    return 1 << (n - 1).bit_length()


def hybrid_ngram_block(gen: GenerationConfig, k: int) -> int:
    """A hybrid row's n-gram block size (the larger of its own ``k`` and ``NGRAM_BLOCK_SIZE``: an
    n-gram match is often long, and an n-gram cycle has no draft pass to pay for); else 0."""
    return max(k, NGRAM_BLOCK_SIZE) if gen.draft in HYBRID_DRAFTS and gen.mode == "parallel" and k > 1 else 0


def cache_room(gen: GenerationConfig, k: int) -> int:
    """Cache positions a row needs past its prompt and new tokens: its largest block."""
    return max(k, hybrid_ngram_block(gen, k))


def uses_cuda_graphs(device: torch.device, cuda_graphs: bool | None) -> bool:
    """Whether a decoder on ``device`` replays CUDA graphs: as asked, or by default on CUDA."""
    return device.type == "cuda" if cuda_graphs is None else cuda_graphs


class Decoder:
    """Batched AR / parallel decoding over ``max_batch`` slots of a static cache.

    Args:
        model: the frozen base (AR view).
        adapter: the diffusion view, or None (then only ``mode='ar'`` is possible).
        eos_ids: token ids that end a row.
        decode: ``list[int] -> str`` (the tokenizer's decode, special tokens skipped), for stop
            strings and streamed text.
        max_batch: number of slots.
        capacity: cache positions per slot (prompt + new tokens + one block must fit).
        cuda_graphs: capture each cycle shape as a CUDA graph and replay it (None: on CUDA devices).
        compile: ``torch.compile`` the cycle (fused code around the prepacked GEMMs; compiling
            takes a while per shape, :mod:`orthrus.decoding.compiled`); ``"auto"``: compile each
            shape and keep the compiled graph where a timing trial finds it faster.
        static_shapes: round rows and kv_len up to powers of two (None: when ``cuda_graphs``).
            Graphs need it; on its own (CPU) it exercises the graph-mode shapes eagerly.
        max_draft_rows: greedy cycles draft only while at most this many rows are decoding; with
            more, every row decodes one token a pass (None: always draft). Cycles with a sampled
            row always draft: a drafted cycle samples other tokens than a 1-token one (from the
            same distribution), and a seeded row must give the same tokens alone or in any batch.
            Any draft is exact, so this changes the speed only: on a CPU a pass over many rows is
            bound by arithmetic, and drafting loses to plain decoding past a few rows
            (``DEFAULT_MAX_DRAFT_ROWS``).
        max_diffusion_rows: a tighter cap for cycles in which some row drafts with the adapter
            (its draft pass costs more than n-gram or self drafts; ``DEFAULT_MAX_DIFFUSION_ROWS``
            on a CPU); None: ``max_draft_rows``.
    """

    def __init__(self, model: Transformer, adapter: DiffusionAdapter | None, eos_ids: tuple[int, ...],
                 decode: Callable[[list[int]], str], max_batch: int, capacity: int,
                 cuda_graphs: bool | None = None, static_shapes: bool | None = None,
                 compile: bool | str = False, max_draft_rows: int | None = None,
                 max_diffusion_rows: int | None = None) -> None:
        self.model, self.adapter, self.eos_ids, self.decode = model, adapter, set(eos_ids), decode
        self.capacity = capacity
        for name, v in (("max_draft_rows", max_draft_rows), ("max_diffusion_rows", max_diffusion_rows)):
            if v is not None and v < 0:
                raise ValueError(f"{name} must be >= 0 or None, got {v}")
        self.max_draft_rows = max_draft_rows
        self.max_diffusion_rows = max_draft_rows if max_diffusion_rows is None else max_diffusion_rows
        dev = model.device
        self.cuda_graphs = uses_cuda_graphs(dev, cuda_graphs)
        self.static_shapes = self.cuda_graphs if static_shapes is None else static_shapes
        if self.cuda_graphs and not self.static_shapes:
            raise ValueError("CUDA graphs need static shapes")
        if self.cuda_graphs and dev.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device; the model is on {dev}")
        # slots above the live ones where one-pass cycles put their candidate blocks' K/V (only
        # with an adapter: nothing else drafts that way)
        self.scratch = ONEPASS_SCRATCH if adapter is not None else 0
        self.cache = model.new_cache(max_batch, capacity + self.scratch)
        self.rows: list[Row | None] = [None] * max_batch
        self.lengths_host = [0] * max_batch
        # device state, one entry per slot
        self.lengths = torch.zeros(max_batch, dtype=torch.long, device=dev)  # committed K/V per row
        self.x_t = torch.zeros(max_batch, dtype=torch.long, device=dev)      # last token, not cached
        self.active = torch.zeros(max_batch, dtype=torch.long, device=dev)   # 1 while decoding
        self.seeds = torch.zeros(max_batch, dtype=torch.long, device=dev)
        self.temperature = torch.zeros(max_batch, dtype=torch.float32, device=dev)
        self.top_k = torch.zeros(max_batch, dtype=torch.long, device=dev)
        self.top_p = torch.ones(max_batch, dtype=torch.float32, device=dev)
        # n-gram drafting (GenerationConfig.draft == 'ngram'): a host index per slot, built on the
        # row's first n-gram cycle and then extended with its new tokens only; which slots draft by
        # n-gram (read by cycles that mix both sources); and, per block size K, the static
        # [max_batch, K-1] input the host writes the cycle's drafts into (one upload per cycle;
        # under CUDA graphs its address is fixed at capture, so a replay reads this cycle's drafts)
        self.ngram: list[NgramIndex | None] = [None] * max_batch
        self.ngram_rows = torch.zeros(max_batch, dtype=torch.bool, device=dev)
        # self-drafting rows (GenerationConfig.draft in SELF_DRAFTS), read by cycles in which they
        # share the batch with diffusion-drafted rows
        self.self_rows = torch.zeros(max_batch, dtype=torch.bool, device=dev)
        self.ngram_in: dict[int, Tensor] = {}
        # one-pass schedule, per block size K: the drafts the last pass made for each slot's next
        # cycle [max_batch, K-1], whether each is fresh [max_batch, K-1] (sampled from the q stored
        # beside it in this schedule's last cycle; stale or junk drafts are verified against a
        # one-hot q, which keeps sampling exact), and q [max_batch, K-1, V] (sampling only)
        self.op_drafts: dict[int, Tensor] = {}
        self.op_fresh: dict[int, Tensor] = {}
        self.op_q: dict[int, Tensor] = {}
        self.trees: dict[int, DraftTree] = {}  # tree verification, per block size K (:meth:`tree`)
        # Decode each row's text every cycle (streaming); False: only when a row finishes (or when
        # it has stop strings), which saves O(tokens) host work per row and cycle in batch jobs.
        self.stream_text = True
        self.compiled = compile
        self._cycle_fn = self._cycle
        if compile:
            self._cycle_fn = CompiledCycle(self._cycle, self._mutable_state, trial=compile == "auto")
        # the cycle mutates only lengths and x_t (and not-yet-committed cache slots)
        self.graphs = CycleGraphs(self._cycle_no_grad, (self.lengths, self.x_t)) if self.cuda_graphs else None

    def _mutable_state(self) -> tuple[Tensor, ...]:
        """The tensors a cycle mutates (besides cache slots that a rerun of it rewrites)."""
        return (self.lengths, self.x_t, *self.op_drafts.values(), *self.op_fresh.values(), *self.op_q.values())

    def _onepass_buffers(self, k: int, sampled: bool) -> None:
        """Allocate the one-pass state for block size ``k`` (before any cycle, or capture, reads it),
        and build the adapter's split projections (not inside a cycle: it packs weights)."""
        assert self.adapter is not None
        self.adapter.split_attentions(self.model)
        dev = self.model.device
        if k not in self.op_drafts:
            self.op_drafts[k] = torch.zeros(self.max_batch, k - 1, dtype=torch.long, device=dev)
            self.op_fresh[k] = torch.zeros(self.max_batch, k - 1, dtype=torch.bool, device=dev)
            if self.graphs is not None:
                self.graphs.state += (self.op_drafts[k], self.op_fresh[k])
        if sampled and k not in self.op_q:
            vocab = self.model.config.vocab_size
            self.op_q[k] = torch.zeros(self.max_batch, k - 1, vocab, dtype=torch.float32, device=dev)
            if self.graphs is not None:
                self.graphs.state += (self.op_q[k],)

    # ---- slots --------------------------------------------------------------------------------

    @property
    def max_batch(self) -> int:
        return len(self.rows)

    def free_slots(self) -> list[int]:
        return [i for i, r in enumerate(self.rows) if r is None]

    def busy(self) -> bool:
        return any(r is not None for r in self.rows)

    def add(self, requests: list[tuple[Any, list[int], GenerationConfig, int]]) -> list[Event]:
        """Prefill ``(request_id, prompt_ids, gen, block_size)`` requests into free slots.

        Consecutive free slots are prefilled together (one padded forward each group). Returns the
        first generated token of each request as an event.
        """
        free = self.free_slots()
        if len(requests) > len(free):
            raise ValueError(f"{len(requests)} requests but only {len(free)} free slots")
        # A cycle runs every live row at the largest block size among them, so each row must fit its
        # prompt, its new tokens and that block. Check everything before touching any slot.
        live = [r for r in self.rows if r is not None and r.finish_reason is None]
        k_max = max([cache_room(gen, k) for _, _, gen, k in requests]
                    + [max(r.block_size, r.ngram_block) for r in live])
        for ids, gen in [(r.prompt_ids, r.gen) for r in live] + [(ids, gen) for _, ids, gen, _ in requests]:
            need = len(ids) + gen.max_new_tokens + k_max
            if need > self.capacity:
                raise ValueError(f"a request needs {need} cache positions (block size {k_max}), "
                                 f"the decoder holds {self.capacity}")
        for (rid, ids, gen, k), slot in zip(requests, free):
            self.rows[slot] = Row(rid, slot, list(ids), gen, k, hybrid_ngram_block(gen, k),
                                  logprobs=None if gen.logprobs is None else TokenLogprobs())
            self.ngram[slot] = None  # built lazily on the row's first n-gram cycle
        slots = free[: len(requests)]
        dev = self.model.device
        if any(gen.draft in SELF_DRAFTS and gen.mode == "parallel" for _, _, gen, _ in requests):
            self.model.prepare_self_draft()  # once per model (fp16 copies of its weights), not in a cycle
        self.ngram_rows[torch.tensor(slots, device=dev)] = torch.tensor(
            [self._uses_ngram(self.rows[i]) for i in slots], device=dev)
        self.self_rows[torch.tensor(slots, device=dev)] = torch.tensor(
            [self._uses_self(self.rows[i]) for i in slots], device=dev)
        events: list[Event] = []
        start = 0
        while start < len(slots):  # groups of consecutive slots share one prefill forward
            stop = start + 1
            while stop < len(slots) and slots[stop] == slots[stop - 1] + 1:
                stop += 1
            events += self._prefill(slots[start], slots[stop - 1] + 1)
            start = stop
        return events

    @torch.inference_mode()
    def _prefill(self, a: int, b: int) -> list[Event]:
        rows = [self.rows[i] for i in range(a, b)]
        dev = self.model.device
        n = torch.tensor([len(r.prompt_ids) for r in rows], device=dev)  # [B]
        t_max = int(max(len(r.prompt_ids) for r in rows))
        pad = torch.zeros(len(rows), t_max, dtype=torch.long)
        for i, r in enumerate(rows):
            pad[i, : len(r.prompt_ids)] = torch.tensor(r.prompt_ids)
        tokens = pad.to(dev)
        positions = torch.arange(t_max, device=dev).expand(len(rows), t_max)
        # right padding: pad K/V lands beyond each row's length, where it is dead (never attended)
        hidden = self.model(tokens, positions, self.cache.rows(a, b), kv_len=t_max)
        last = hidden[torch.arange(len(rows), device=dev), n - 1]  # [B, C]
        logits = self.model.logits(last)[:, None]  # [B, 1, V]
        g = [r.gen for r in rows]
        sl = slice(a, b)
        self.seeds[sl] = torch.tensor([x.seed for x in g], device=dev)
        self.temperature[sl] = torch.tensor([x.temperature for x in g], device=dev)
        self.top_k[sl] = torch.tensor([x.top_k for x in g], device=dev)
        self.top_p[sl] = torch.tensor([x.top_p for x in g], device=dev)
        if all(x.temperature == 0 for x in g):
            first = logits[:, 0].argmax(-1)
        else:
            probs = process_logits(logits, self.temperature[sl], self.top_k[sl], self.top_p[sl],
                                   use_filters=any(x.top_k or x.top_p < 1 for x in g))
            first = sample(probs, uniform(self.seeds[sl], (n - 1)[:, None], STREAM_BONUS))[:, 0]
        self.lengths[sl] = n
        self.x_t[sl] = first
        for fresh in self.op_fresh.values():  # a new row has no one-pass drafts yet
            fresh[sl] = False
        self.active[sl] = 1
        for i, r in enumerate(rows):
            self.lengths_host[a + i] = len(r.prompt_ids)
            r.stats.prefill_passes += 1
        fault = ~torch.isfinite(logits).all(-1)[:, 0]  # [B]: no distribution to take a first token from
        top = self.logprobs_top(rows)
        out = torch.stack((first, fault.long()), dim=1)  # [B, 2]
        if top >= 0:
            out = torch.cat((out, pack_logprobs(logits, first[:, None], top)), dim=1)
        host = out.cpu()  # host sync: once per prefill
        first_host, fault_host = host[:, :2].T.tolist()
        unpacked = unpack_logprobs(host[:, 2:], 1, top) if top >= 0 else None
        events = []
        for i, (tok, bad) in enumerate(zip(first_host, fault_host)):
            if bad:
                events.append(self._fail(a + i, "the model's logits became non-finite (NaN or inf) on the prompt: "
                                                "nothing generated for this request"))
                continue
            want = rows[i].gen.logprobs
            lp = None if unpacked is None or want is None else _row_logprobs(*unpacked, i, 1, want)
            events.append(self._emit(a + i, [tok], 0, lp))
        return events

    # ---- one cycle ----------------------------------------------------------------------------

    def _draft(self, hi: int, k: int, kv_len: int, positions: Tensor, sampled: bool,
               filters: bool) -> tuple[Tensor, Tensor | None]:
        """Draft step of one cycle (diffusion view, one forward pass) over slots ``[0, hi)``.

        Args:
            positions: ``[hi, K]`` absolute positions of the block ``[x_t, MASK x (K-1)]``.
            sampled: some row samples (else all rows are greedy); filters: some row uses top-k/p.
        Returns:
            drafts ``[hi, K-1]`` int64 for positions ``positions[:, 1:]``, and the distributions
            they were drawn from ``[hi, K-1, V]`` when ``sampled`` (None when greedy).
        """
        q_logits = self._draft_logits(hi, kv_len, positions)
        if not sampled:
            return q_logits.argmax(-1), None
        q = process_logits(q_logits, self.temperature[:hi], self.top_k[:hi], self.top_p[:hi],
                           use_filters=filters)
        return sample(q, uniform(self.seeds[:hi], positions[:, 1:], STREAM_DRAFT)), q

    def _draft_logits(self, hi: int, kv_len: int, positions: Tensor) -> Tensor:
        """The adapter's draft pass over slots ``[0, hi)`` for the block ``[x_t, MASK x (K-1)]`` at
        ``positions [hi, K]``: logits ``[hi, K-1, V]``, slot i for position ``t+i+1``."""
        assert self.adapter is not None
        model = self.model
        # the block's K/V goes to slots t..t+K-1, which this cycle's verify pass overwrites
        hidden = self.adapter.draft(model, self.x_t[:hi], positions, self.cache.rows(0, hi), kv_len)  # [B, K, C]
        return model.draft_logits(hidden[:, :-1])

    def _self_draft(self, hi: int, k: int, kv_len: int, positions: Tensor, sampled: bool,
                    filters: bool) -> tuple[Tensor, Tensor | None]:
        """Self-drafting over slots ``[0, hi)``: K-1 one-token steps of the model's fp16 copy
        (``Transformer.self_draft_step``), each reading the previous draft (``x_t`` first).

        Step ``j`` reads position ``t+j`` and writes its K/V there (slots the verify pass of this
        cycle overwrites), so it sees the committed cache below ``t`` and its own earlier steps.
        A Python loop of K-1 whole forward passes, not of tokens: drafting one token after
        another is what self-drafting is; nothing here syncs with the host.

        Returns drafts ``[hi, K-1]`` for ``positions[:, 1:]`` and, when ``sampled``, the
        distributions they were drawn from ``[hi, K-1, V]`` (the draft stream's uniform of each
        drafted position, as :meth:`_draft` uses).
        """
        model = self.model
        cache = self.cache.rows(0, hi)
        tok = self.x_t[:hi, None]  # [B, 1]
        drafts: list[Tensor] = []
        qs: list[Tensor] = []
        for j in range(k - 1):
            pos = positions[:, j:j + 1]  # [B, 1]
            logits = model.self_draft_step(tok, pos, cache, kv_len)  # [B, 1, V]
            if sampled:
                qj = process_logits(logits, self.temperature[:hi], self.top_k[:hi], self.top_p[:hi],
                                    use_filters=filters)
                tok = sample(qj, uniform(self.seeds[:hi], pos + 1, STREAM_DRAFT))  # [B, 1]
                qs.append(qj)
            else:
                tok = logits.argmax(-1)
            drafts.append(tok)
        return torch.cat(drafts, dim=1), (torch.cat(qs, dim=1) if sampled else None)

    def _cycle(self, hi: int, k: int, kv_len: int, greedy: bool, filters: bool,
               source: str = "diffusion", candidates: int = 0, logprobs: int = -1) -> Tensor:
        """Device part of one cycle over slots ``[0, hi)`` with block size ``k`` (run it under
        ``torch.no_grad``, as :meth:`run_cycle` does).

        ``source`` says where the drafts come from: ``diffusion`` (the adapter's draft pass),
        ``ngram`` (the host's n-gram drafts in ``self.ngram_in[k]``, written by :meth:`step`
        before the cycle; no draft pass), ``self`` (K-1 steps of the model's fp16 copy,
        :meth:`_self_draft`), or several of them joined by ``+`` in that order's sorted form
        (``diffusion+ngram``, ``ngram+self``, ...: each row takes its own source's drafts, by
        ``self.ngram_rows`` and ``self.self_rows``), or ``onepass`` (the one-pass schedule with ``candidates`` candidate
        blocks: :meth:`_cycle_onepass`). ``logprobs`` >= 0: also the log-probs of the emitted
        tokens and that many alternatives per position (see :meth:`_commit`); -1: none.

        Returns ``[hi, k + 2]`` int64: the ``k`` emitted-token slots (accepted drafts then the
        correction/bonus token; the rest is junk), the number of accepted drafts ``a``, and 1 where
        the row's verify logits were not finite (nothing committed; see :meth:`_commit`); with
        ``logprobs`` >= 0, :func:`pack_logprobs`'s columns follow.
        """
        if source == "onepass":
            return self._cycle_onepass(hi, k, kv_len, greedy, filters, candidates, logprobs)
        if source == "tree":
            return self._cycle_tree(hi, k, kv_len, greedy, filters, logprobs)
        model, dev = self.model, self.model.device
        cache = self.cache.rows(0, hi)
        t, x = self.lengths[:hi], self.x_t[:hi]  # [B]
        steps = torch.arange(k, device=dev)
        positions = t[:, None] + steps  # [B, K]
        sampled = not greedy
        if sampled:
            temp, top_k, top_p = self.temperature[:hi], self.top_k[:hi], self.top_p[:hi]
        srcs = source.split("+") if k > 1 else []
        drafts, q = x.new_zeros(hi, 0), None  # [B, K-1] drafts, [B, K-1, V] their q (sampling)
        if "diffusion" in srcs:
            drafts, q = self._draft(hi, k, kv_len, positions, sampled, filters)
        if "self" in srcs:  # after the diffusion pass: both write slots t.., the self steps last
            d, qs = self._self_draft(hi, k, kv_len, positions, sampled, filters)
            if "diffusion" in srcs:
                pick = self.self_rows[:hi]
                drafts = torch.where(pick[:, None], d, drafts)
                q = torch.where(pick[:, None, None], qs, q) if sampled else None
            else:
                drafts, q = d, qs
        if "ngram" in srcs:  # q: one-hot for these rows, built after verify
            ng = self.ngram_in[k][:hi]
            drafts = ng if len(srcs) == 1 else torch.where(self.ngram_rows[:hi, None], ng, drafts)
        verify_in = torch.cat((x[:, None], drafts), dim=1)  # [B, K]
        p_logits = model.logits(model(verify_in, positions, cache, kv_len))  # [B, K, V]
        if sampled:
            p = process_logits(p_logits, temp, top_k, top_p, use_filters=filters)
            if "ngram" in srcs:
                q = self._ngram_q(drafts, q, p.shape[-1], len(srcs) > 1, hi)
            if k == 1:
                q = p.new_zeros(hi, 0, p.shape[-1])
            n_acc, nxt = self._sampled_accept(drafts, q, p, positions)
        else:
            n_acc, nxt = greedy_accept(drafts, p_logits)
        return self._commit(hi, drafts, n_acc, nxt, p_logits, logprobs)

    def _commit(self, hi: int, drafts: Tensor, n_acc: Tensor, nxt: Tensor, p_logits: Tensor,
                logprobs: int = -1) -> Tensor:
        """Move each active row by ``a + 1`` and make the correction/bonus token its new ``x_t``;
        returns the cycle's ``[hi, K + 2]`` output (see :meth:`_cycle`).

        A row whose verify logits ``p_logits [B, K, V]`` are not all finite has no distribution to
        sample or compare with: it commits nothing and is flagged (last column), so that the host
        fails that request alone (the other rows are not affected: every op here is per row).

        ``logprobs`` >= 0: the emitted token at slot ``j`` was chosen from ``p_logits[:, j]`` (the
        verify pass's distribution at that position), so its log-prob is one gather there (and a
        top-``logprobs``); they are appended to the output (:func:`pack_logprobs`)."""
        fault = ~torch.isfinite(p_logits).all(-1).all(-1)  # [B]
        out = torch.cat((drafts, drafts.new_zeros(hi, 1)), dim=1)  # [B, K]
        out.scatter_(1, n_acc[:, None], nxt[:, None])
        # rows still decoding advance by a + 1; finished (or faulted) rows stay where they are
        act = self.active[:hi] * (~fault)
        self.lengths[:hi] += (n_acc + 1) * act
        self.x_t[:hi] = torch.where(act.bool(), nxt, self.x_t[:hi])
        parts = [out, n_acc[:, None], fault[:, None].long()]
        if logprobs >= 0:
            parts.append(pack_logprobs(p_logits, out, logprobs))
        return torch.cat(parts, dim=1)

    def _cycle_tree(self, hi: int, k: int, kv_len: int, greedy: bool = True, filters: bool = False,
                    logprobs: int = -1) -> Tensor:
        """A cycle that verifies the adapter's drafts as a tree (:mod:`orthrus.decoding.tree`):
        the draft pass as :meth:`_draft` over a block as deep as the tree (``[x_t, MASK x D]``),
        then one verify pass over the tree's ``k`` rows (the anchor and ``k - 1`` nodes drawn from
        each slot's top tokens), then the accepted path's K/V moved to where a chain would have
        written it. Same output as :meth:`_cycle`.

        The frozen model's token after each row is its argmax (greedy rows) or its sample with the
        uniform AR decoding draws for that position (``STREAM_BONUS``, keyed by the seed and the
        row's position); the path follows a child whose token equals it. Every emitted token is
        thus the model's own choice at its position, given the tokens before it: the drafts
        (deterministic top tokens) only decide how many of them one pass yields. A sampled row
        gives the tokens AR decoding gives with the same seed (up to the rounding of a K-row pass)."""
        model, tree = self.model, self.tree(k)
        cache = self.cache.rows(0, hi)
        t, x = self.lengths[:hi], self.x_t[:hi]  # [B]
        # the draft block stops at the tree's depth: deeper slots would never be read (and drafting
        # fewer masks changes the adapter's drafts of the first slots little: README, "Tree verification")
        block = t[:, None] + torch.arange(tree.depth + 1, device=t.device)
        tokens = tree.tokens(x, self._draft_logits(hi, kv_len, block))  # [B, K]
        positions, slots = tree.positions(t)
        p_logits = model.logits(model(tokens, positions, cache, kv_len, mask=tree.mask(t, kv_len), slots=slots))
        if greedy:
            target = p_logits.argmax(-1)  # [B, K]
        else:
            p = process_logits(p_logits, self.temperature[:hi], self.top_k[:hi], self.top_p[:hi],
                               use_filters=filters)
            target = sample(p, uniform(self.seeds[:hi], positions, STREAM_BONUS))
        n_acc, nxt, best = tree.accept(tokens, target)
        tree.commit_moves(cache, t, best)
        rows = tree.path_rows(best)  # [B, D]: the accepted path's rows (then padding)
        drafts = tokens.gather(1, rows)
        pad = k - 1 - drafts.shape[1]
        if pad:
            drafts = torch.cat((drafts, drafts.new_zeros(hi, pad)), dim=1)
        if logprobs >= 0:  # the emitted token at depth j was scored at its parent row
            where = torch.cat((rows.new_zeros(hi, 1), rows, rows.new_zeros(hi, pad)), dim=1)  # [B, K]
            p_logits = p_logits.gather(1, where[:, :, None].expand(-1, -1, p_logits.shape[-1]))
        return self._commit(hi, drafts, n_acc, nxt, p_logits, logprobs)

    def tree(self, k: int) -> DraftTree:
        """The verify tree of block size ``k``: the ``k - 1`` likeliest nodes under the adapter's
        measured rank rates (``AdapterConfig.draft_ranks``, else ``DEFAULT_DRAFT_RANKS``)."""
        if k not in self.trees:
            rates = (self.adapter.config.draft_ranks if self.adapter is not None else ()) or DEFAULT_DRAFT_RANKS
            self.trees[k] = DraftTree(build_tree(rates[: k - 1], k - 1))
            self.trees[k].on(self.model.device)  # its index tensors, before any cycle reads them
        return self.trees[k]

    def _cycle_onepass(self, hi: int, k: int, kv_len: int, greedy: bool, filters: bool, c: int,
                       logprobs: int = -1) -> Tensor:
        """Device part of one one-pass cycle: verify the stored drafts and draft the next block.

        One forward (:meth:`DiffusionAdapter.verify_and_draft`) over ``[x_t, d_1..d_{K-1}]`` (the
        drafts the previous one-pass cycle stored) and ``c`` masked blocks, one per candidate
        acceptance ``j = 0..c-1``; block ``j``'s slot ``i`` drafts position ``t+j+2+i``.

        Consensus is the two-pass one. Then the next drafts: block ``j* = min(a, c-1)``'s slots
        ``i + (a - j*)``, which draft positions ``t'+1+i`` of the next cycle (``t' = t+a+1``); when
        ``a > j*`` the block's last slots run out and the rest are junk. Exactness under sampling:
        a fresh draft was sampled from its block's ``q``, which conditions only on committed tokens
        (the block sees ``x_t, d_1..d_j``, all accepted when ``j <= a``) with the draft stream's
        uniform of its own position, independent of every uniform the consensus used; stale or
        junk drafts get a one-hot ``q`` (see :meth:`_ngram_q`).
        """
        model, ad = self.model, self.adapter
        assert ad is not None
        dev = model.device
        cache = self.cache.rows(0, hi)
        t, x, seeds = self.lengths[:hi], self.x_t[:hi], self.seeds[:hi]
        # copies: this cycle overwrites the stored drafts with the next cycle's
        drafts, fresh = self.op_drafts[k][:hi].clone(), self.op_fresh[k][:hi].clone()  # [B, K-1]
        positions = t[:, None] + torch.arange(k, device=dev)  # [B, K]
        offsets = torch.arange(c, device=dev)
        h_ver, h_cand = ad.verify_and_draft(model, torch.cat((x[:, None], drafts), dim=1), positions, offsets,
                                            cache, kv_len)
        # one LM head over the verify rows and every candidate slot that drafts (slot K-1 would
        # draft past the next verify segment)
        logits = model.logits(torch.cat((h_ver, h_cand[:, :, : k - 1].flatten(1, 2)), dim=1))
        p_logits, q_logits = logits[:, :k], logits[:, k:]  # [B, K, V], [B, C*(K-1), V]
        rows = torch.arange(hi, device=dev)
        if greedy:
            n_acc, nxt = greedy_accept(drafts, p_logits)
            cand = q_logits.argmax(-1).view(hi, c, k - 1)
        else:
            temp, top_k, top_p = self.temperature[:hi], self.top_k[:hi], self.top_p[:hi]
            p = process_logits(p_logits, temp, top_k, top_p, use_filters=filters)
            q_prev = torch.where(fresh[..., None], self.op_q[k][:hi], self._one_hot(drafts, p.shape[-1]))
            n_acc, nxt = self._sampled_accept(drafts, q_prev, p, positions)
            q_c = process_logits(q_logits, temp, top_k, top_p, use_filters=filters)  # [B, C*(K-1), V]
            drafted = (t[:, None, None] + offsets[:, None] + 2 + torch.arange(k - 1, device=dev)).flatten(1)
            cand = sample(q_c, uniform(seeds, drafted, STREAM_DRAFT)).view(hi, c, k - 1)
        j_star = n_acc.clamp(max=c - 1)  # [B]
        src = torch.arange(k - 1, device=dev) + (n_acc - j_star)[:, None]  # [B, K-1] slot of block j*
        self.op_fresh[k][:hi] = src <= k - 2
        src = src.clamp(max=k - 2)
        self.op_drafts[k][:hi] = cand[rows, j_star].gather(1, src)
        if not greedy:
            q_blk = q_c.view(hi, c, k - 1, -1)[rows, j_star]  # [B, K-1, V]
            self.op_q[k][:hi] = q_blk.gather(1, src[..., None].expand(-1, -1, q_blk.shape[-1]))
        return self._commit(hi, drafts, n_acc, nxt, p_logits, logprobs)

    def _sampled_accept(self, drafts: Tensor, q: Tensor, p: Tensor, positions: Tensor) -> tuple[Tensor, Tensor]:
        """Rejection sampling of ``drafts [B, K-1]`` (drawn from ``q [B, K-1, V]``) against
        ``p [B, K, V]`` with this cycle's uniforms, keyed by each row's seed and the absolute
        ``positions [B, K]`` of the verify segment (``t`` first). Returns ``(a, next token)``."""
        seeds, t = self.seeds[: drafts.shape[0]], positions[:, :1]
        u_acc = uniform(seeds, positions[:, 1:], STREAM_ACCEPT)
        u_res = uniform(seeds, t, STREAM_RESIDUAL)[:, 0]
        u_bonus = uniform(seeds, t, STREAM_BONUS)[:, 0]
        return rejection_accept(drafts, q, p, u_acc, u_res, u_bonus)

    @staticmethod
    def _one_hot(drafts: Tensor, vocab: int) -> Tensor:
        """``[B, N]`` tokens -> ``[B, N, V]`` float32 one-hot rows (deterministic drafts' ``q``)."""
        # scatter_ rather than F.one_hot: one_hot validates its indices with a host sync on CPU
        one_hot = torch.zeros(*drafts.shape, vocab, dtype=torch.float32, device=drafts.device)
        return one_hot.scatter_(-1, drafts[..., None], 1.0)

    def _ngram_q(self, drafts: Tensor, q: Tensor | None, vocab: int, mixed: bool, hi: int) -> Tensor:
        """Draft distributions for rejection sampling when (some) drafts are n-gram ones.

        An n-gram draft is a deterministic function of the row's context, i.e. a sample of the
        one-hot distribution at it, so ``rejection_accept`` with one-hot ``q`` is exact unchanged:
        it accepts draft d with probability ``p(d)`` and resamples a rejection from
        ``max(0, p - onehot(d))``, which is ``p`` with ``d`` removed.

        Args:
            drafts: ``[B, K-1]`` the verified drafts; q: ``[B, K-1, V]`` the diffusion rows'
                distributions (``mixed``) or None.
        Returns:
            ``[B, K-1, V]`` float32: one-hot rows for n-gram rows, ``q`` for the others.
        """
        one_hot = self._one_hot(drafts, vocab)
        if not mixed or q is None:
            return one_hot
        return torch.where(self.ngram_rows[:hi, None, None], one_hot, q)

    def run_cycle(self, rows: int, k: int, kv_len: int, greedy: bool, filters: bool,
                  source: str = "diffusion", candidates: int = 0, logprobs: int = -1) -> Tensor:
        """One cycle (see :meth:`_cycle`): a replayed CUDA graph in graph mode, else eager
        (compiled with ``torch.compile`` when asked).

        In graph mode the result is the graph's static output: read it before the next cycle.
        """
        if self.graphs is not None:
            return self.graphs.run(rows, k, kv_len, greedy, filters, source, candidates, logprobs)
        return self._cycle_no_grad(rows, k, kv_len, greedy, filters, source, candidates, logprobs)

    def _cycle_no_grad(self, *key: Any) -> Tensor:
        # no_grad, not inference_mode: torch.compile cannot trace in-place updates of the state
        # tensors under inference mode
        with torch.no_grad():
            return self._cycle_fn(*key)

    def cycle_shape(self, rows: int, need: int) -> tuple[int, int]:
        """``(rows, kv_len)`` of a cycle whose live slots lie below ``rows`` and whose longest row
        reaches cache position ``need`` (exclusive) with this cycle's block.

        Slots are filled lowest-first, so ``[0, rows)`` is mostly live; slots in it that are not
        decoding are parked (length 0, inactive) and compute junk that is never committed.
        """
        if not self.static_shapes:
            if self.compiled:  # row counts in powers of two: fewer graphs to compile
                rows = min(self.max_batch, pow2(rows))
            return rows, min(self.capacity, _round_up(need, KV_BUCKET))
        return min(self.max_batch, pow2(rows)), min(self.capacity, max(STATIC_MIN_KV, pow2(need)))

    def step(self) -> list[Event]:
        """Run one cycle for every active slot; return what each row produced."""
        live = [i for i, r in enumerate(self.rows) if r is not None and r.finish_reason is None]
        if not live:
            return []
        rows = [self.rows[i] for i in live]
        # the row caps are for greedy cycles only: a drafted cycle samples other tokens than a
        # 1-token one (the same distribution), and a seeded row must give the same tokens alone or
        # in any batch
        greedy = all(r.gen.temperature == 0 for r in rows)
        if greedy and self.max_draft_rows is not None and len(live) > self.max_draft_rows:
            ngram, k = [False] * len(rows), 1  # too many rows for drafting to pay: one token a pass
        else:
            ngram = [self._uses_ngram(r) or (r.ngram_block > 0 and self._ngram_matches(i)) for i, r in zip(live, rows)]
            if any(self._uses_self(r) and not ng for r, ng in zip(rows, ngram)):
                # the cycle runs the self-draft steps anyway: hybrid-self rows take those drafts
                # (nearly always accepted whole) rather than their n-gram ones
                ngram = [ng and r.gen.draft != "hybrid-self" for r, ng in zip(rows, ngram)]
            # a hybrid row that drafts by n-gram this cycle runs at its n-gram block size
            k = max(r.ngram_block if ng and r.ngram_block else r.block_size for r, ng in zip(rows, ngram))
            if (greedy and self.max_diffusion_rows is not None and len(live) > self.max_diffusion_rows
                    and any(r.block_size > 1 and not ng and not self._uses_self(r) for r, ng in zip(rows, ngram))):
                ngram, k = [False] * len(rows), 1  # adapter drafts for this many rows lose: one token a pass
        hi, kv_len = self.cycle_shape(live[-1] + 1, max(self.lengths_host[i] for i in live) + k)
        filters = any(r.gen.top_k or r.gen.top_p < 1 for r in rows)
        if any(r.ngram_block for r in rows):  # hybrid rows: this cycle's source per row (one upload)
            flags = [False] * hi
            for i, ng in zip(live, ngram):
                flags[i] = ng
            self.ngram_rows[:hi].copy_(torch.tensor(flags), non_blocking=True)
        source, c = "diffusion", 0
        drafted = [int(k > 1)] * len(rows)  # draft passes each row's cycle costs (for its stats)
        if k > 1 and (any(ngram) or any(self._uses_self(r) for r in rows)):
            kinds = ["ngram" if ng else "self" if self._uses_self(r) else "diffusion" for r, ng in zip(rows, ngram)]
            source = "+".join(sorted(set(kinds)))
            drafted = [{"ngram": 0, "self": k - 1, "diffusion": 1}[kind] for kind in kinds]
            if any(ngram):
                self._upload_ngram_drafts([i for i, ng in zip(live, ngram) if ng], hi, k)
        elif k > 1 and self.scratch and all(r.gen.schedule == "one-pass" for r in rows):
            source, drafted = "onepass", [0] * len(rows)  # drafted by the previous verify pass
            c = self.onepass_candidates(rows, k)
            self._onepass_buffers(k, not greedy)
        elif k > 1 and self.adapter is not None and all(self._uses_tree(r) for r in rows):
            source = "tree"  # adapter drafts only: verify them as a tree
            self.tree(k)  # built outside the cycle, which compiled or captured code replays
        for kk, fresh in self.op_fresh.items():  # only this cycle's one-pass drafts stay fresh
            if source != "onepass" or kk != k:
                fresh[:hi] = False
        top = self.logprobs_top(rows)
        host = self.run_cycle(hi, k, kv_len, greedy, filters, source, c, top).cpu()  # host sync: once per cycle
        result = host[:, : k + 2].tolist()
        unpacked = unpack_logprobs(host[:, k + 2:], k, top) if top >= 0 else None
        events = []
        for j, i in enumerate(live):
            row_out = result[i]
            a = row_out[k]
            r = self.rows[i]
            if row_out[k + 1]:  # non-finite verify logits: fail this request alone, keep its tokens so far
                events.append(self._fail(i, f"the model's logits became non-finite (NaN or inf) at position "
                                            f"{self.lengths_host[i]}: generation stopped for this request"))
                continue
            self.lengths_host[i] += a + 1
            want = r.gen.logprobs
            lp = None if unpacked is None or want is None else _row_logprobs(*unpacked, i, a + 1, want)
            ev = self._emit(i, row_out[: a + 1], a, lp)
            # count the tokens kept, not those cut by EOS / max tokens / a stop string (TPF);
            # an n-gram row had no draft pass (its drafts came from the host)
            r.stats.record_cycle(len(ev.token_ids), a, k, drafted=drafted[j])
            ix = self.ngram[i]
            if ix is not None and ev.finish_reason is None:
                ix.extend(r.tokens[len(ix) - len(r.prompt_ids):])  # the new tokens only
            events.append(ev)
        return events

    @staticmethod
    def logprobs_top(rows: list[Row]) -> int:
        """The alternatives per token a cycle over ``rows`` computes: the most any row asks for,
        or -1 when no row asks for log-probs (then the cycle computes none)."""
        return max((r.gen.logprobs for r in rows if r.gen.logprobs is not None), default=-1)

    @staticmethod
    def onepass_candidates(rows: list[Row], k: int) -> int:
        """Candidate blocks of a one-pass cycle: the most any row asks for (``DEFAULT_CANDIDATES``
        when none says), at most ``k`` (acceptances run ``0..k-1``) and at most what the scratch
        slots hold."""
        want = max(r.gen.candidates or DEFAULT_CANDIDATES for r in rows)
        return max(1, min(want, k, ONEPASS_SCRATCH // k))

    def _ngram_index(self, slot: int) -> NgramIndex:
        """The slot's n-gram index, built on first use from its prompt and tokens so far."""
        ix = self.ngram[slot]
        if ix is None:
            r = self.rows[slot]
            assert r is not None
            ix = self.ngram[slot] = NgramIndex(r.prompt_ids + r.tokens, r.gen.ngram_max)
        return ix

    def _ngram_matches(self, slot: int) -> bool:
        """Hybrid drafts: whether the slot's latest tokens repeat an earlier n-gram of at least
        ``HYBRID_MIN_MATCH`` tokens (then this cycle drafts by n-gram)."""
        return self._ngram_index(slot).match()[0] >= HYBRID_MIN_MATCH

    def _uses_ngram(self, r: Row) -> bool:
        """Whether row ``r`` drafts by n-gram: it asks to, or there is no adapter to draft with and
        it does not self-draft (an AR row beside drafting rows runs at their block size; any draft
        is exact)."""
        return r.gen.draft == "ngram" or (self.adapter is None and not self._uses_self(r))

    def _uses_tree(self, r: Row) -> bool:
        """Whether a row's adapter drafts are verified as a tree (:func:`verifies_by_tree`)."""
        ranks = self.adapter.config.draft_ranks if self.adapter is not None else None
        return verifies_by_tree(r.gen.verify, r.gen.schedule, r.gen.temperature, ranks)

    @staticmethod
    def _uses_self(r: Row) -> bool:
        """Whether row ``r`` self-drafts where it does not draft by n-gram (``self``, ``hybrid-self``)."""
        return r.gen.mode == "parallel" and r.gen.draft in SELF_DRAFTS

    def _upload_ngram_drafts(self, slots: list[int], hi: int, k: int) -> None:
        """Look up the n-gram drafts of ``slots`` on the host and write all rows' drafts into the
        static input ``self.ngram_in[k][:hi]`` as one tensor (other rows: padding, never read).

        Host work per row: building its index once (its first n-gram cycle), then a lookup of at
        most ``ngram_max`` dictionary probes and K-1 list reads; never a rescan of the row.
        """
        indexes: list[NgramIndex | None] = [None] * hi
        for i in slots:
            indexes[i] = self._ngram_index(i)
        buf = self.ngram_in.get(k)
        if buf is None:  # one per block size, allocated before the cycle (and any capture) reads it
            buf = self.ngram_in[k] = torch.zeros(self.max_batch, k - 1, dtype=torch.long,
                                                 device=self.model.device)
        # one host-to-device copy per cycle; it queues behind the previous cycle, whose outputs
        # the host has already read, so it waits for nothing on the device
        buf[:hi].copy_(ngram_drafts(indexes, k - 1), non_blocking=True)

    # ---- host bookkeeping -----------------------------------------------------------------------

    def _emit(self, slot: int, new: list[int], accepted: int, logprobs: TokenLogprobs | None = None) -> Event:
        """Apply EOS / max tokens / stop strings to ``new`` tokens of ``slot`` and build its event.
        ``logprobs``: those of ``new`` (cut with it: every cut keeps a prefix)."""
        r = self.rows[slot]
        assert r is not None
        g = r.gen
        eos_at = None if g.ignore_eos else next((j for j, tok in enumerate(new) if tok in self.eos_ids), None)
        if eos_at is not None:
            new = new[: eos_at + 1]
        room = g.max_new_tokens - len(r.tokens)
        if len(new) > room:  # max_new_tokens ends mid-block (an EOS past it does not count)
            new, eos_at = new[:room], None
        finish = "stop" if eos_at is not None else ("length" if len(new) == room else None)
        before = r.text
        r.tokens += new
        if finish is None and not self.stream_text and not g.stop:  # the text comes with the last event
            return Event(r.request_id, new, "", None, r, self._keep_logprobs(r, logprobs, len(new)))
        text = self._text(r)
        if g.stop:
            cut = self._find_stop(text, g.stop, len(before))
            if cut is not None:
                # keep the fewest tokens whose text reaches a stop string, and cut that text at its
                # first stop string (as AR would: a stop string that starts earlier but completes
                # later in this block must not count)
                base = len(r.tokens) - len(new)
                for j in range(1, len(new) + 1):
                    part = self.decode(r.tokens[: base + j])
                    cut = self._find_stop(part, g.stop, len(before))
                    if cut is not None:
                        r.tokens, new, text = r.tokens[: base + j], new[:j], part
                        break
                text, finish = text[:cut], "stop"
        if finish is None:
            # hold back a trailing partial UTF-8 character until it is complete, and a tail that may
            # grow into a stop string (it may yet be cut: streamed text is never taken back)
            keep = len(before) if text.endswith("\ufffd") else len(text)
            for s in g.stop:
                m = next((m for m in range(min(len(s) - 1, len(text)), 0, -1) if text.endswith(s[:m])), 0)
                keep = min(keep, len(text) - m)
            text = text[:keep] if keep > len(before) else before
        r.text = text
        if finish is not None:
            r.finish_reason = finish
            r.stats.seconds = time.perf_counter() - r.started
            self._park(slot)
        return Event(r.request_id, new, text[len(before):], finish, r, self._keep_logprobs(r, logprobs, len(new)))

    @staticmethod
    def _keep_logprobs(r: Row, logprobs: TokenLogprobs | None, n: int) -> TokenLogprobs | None:
        """The first ``n`` of ``logprobs`` (the tokens kept), added to the row's."""
        if logprobs is None or r.logprobs is None:
            return None
        kept = logprobs.head(n)
        r.logprobs.extend(kept)
        return kept

    def _fail(self, slot: int, message: str) -> Event:
        """End the row in ``slot`` with ``finish_reason='error'`` and ``message`` (``Row.error``)."""
        r = self.rows[slot]
        assert r is not None
        r.finish_reason, r.error = "error", message
        r.stats.seconds = time.perf_counter() - r.started
        self._park(slot)
        return Event(r.request_id, [], "", "error", r)

    def _text(self, r: Row) -> str:
        """``decode(r.tokens)``, re-decoding only the tokens after a settled boundary.

        Decoding a whole row every cycle costs O(length) per cycle (O(n^2) per row). Instead the
        boundary ``dec_at`` moves forward, ``DETOK_WINDOW`` tokens behind the end, whenever splitting
        there provably changes nothing: the window's text is complete UTF-8 and decoding the two
        parts separately gives exactly the text of decoding them together (which fails, and keeps
        the boundary where it is, for tokenizers that merge or strip across a split).
        """
        tail = self.decode(r.tokens[r.dec_at:])
        cut = len(r.tokens) - DETOK_WINDOW
        if cut - r.dec_at >= DETOK_WINDOW:
            head = self.decode(r.tokens[r.dec_at:cut])
            if not head.endswith("\ufffd") and head + self.decode(r.tokens[cut:]) == tail:
                r.dec_at, r.dec_text = cut, r.dec_text + head
                return r.dec_text + tail[len(head):]
        return r.dec_text + tail

    @staticmethod
    def _find_stop(text: str, stops: tuple[str, ...], start: int) -> int | None:
        window = max(0, start - max(len(s) for s in stops))
        hits = [i for i in (text.find(s, window) for s in stops) if i >= 0]
        return min(hits) if hits else None

    def release(self, slot: int) -> None:
        """Free a slot (finished or cancelled); its cache rows are simply overwritten later."""
        self.rows[slot] = None
        self._park(slot)

    def _park(self, slot: int) -> None:
        # A slot that is not decoding still runs through cycles (static shapes) when a live slot
        # lies above it; at length 0 its junk writes stay inside its own first K cache slots.
        self.active[slot] = 0
        self.lengths[slot] = 0
        self.lengths_host[slot] = 0
