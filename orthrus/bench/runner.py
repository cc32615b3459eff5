"""Running the same prompts through every mode and measuring them the same way.

Modes (all greedy, same chat-templated token ids, same ``max_new_tokens``, same EOS ids):

* ``ar``: our engine, ``mode="ar"`` (one token per pass). The reference for speedup and exactness.
* ``parallel``: our engine, ``mode="parallel"`` with the given block size (draft + verify; greedy
  rows verify a tree when the adapter records its rank rates, ``verify="auto"``).
* ``chain``: ``parallel`` verifying the drafts' top tokens only (``verify="chain"``), same block size.
* ``ngram``: our engine, parallel mode with n-gram drafts (``draft="ngram"``: prompt lookup on the
  host, no adapter, no draft pass), block size ``block_size`` or ``NGRAM_BLOCK_SIZE``.
* ``onepass``: ``parallel`` in the one-pass schedule (the verify pass drafts the next block for
  ``candidates`` candidate acceptances; one forward per cycle), same block size.
* ``hybrid``: ``parallel`` with hybrid drafts (n-gram where the latest tokens repeat, else the
  adapter's, two-pass), same block size (its n-gram cycles: at least ``NGRAM_BLOCK_SIZE``).
* ``self``: parallel mode with self-drafting (``draft="self"``: an fp16-weight copy of the model
  drafts K-1 tokens one step at a time; no adapter), block size ``self_block_size``.
* ``hybrid-self``: ``draft="hybrid-self"``: n-gram drafts where the latest tokens repeat, else
  self-drafting, at ``self_block_size`` (its n-gram cycles: at least ``NGRAM_BLOCK_SIZE``).
* ``hf``: transformers ``generate`` on ``AutoModelForCausalLM`` loaded from the same folder.
* ``hf-pld``: transformers prompt lookup decoding (``prompt_lookup_num_tokens=10``), a training-free
  speculative peer. transformers runs it at batch size 1 only, so it always does.

Timing is fair under a noisy machine: prompts go in rounds of ``batch_size`` and every mode runs
each round before the next round starts (the mode order rotates from round to round), so a burst of
load elsewhere hits all modes alike. Warm-up rounds run first and are not counted. With
``batch_size > 1`` every mode sees the same static batches (no refill between rounds).
"""

from __future__ import annotations

import logging
import os
import resource
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Sequence

import torch

from orthrus.config import SELF_BLOCK_SIZE, GenerationConfig
from orthrus.decoding.ngram import NGRAM_BLOCK_SIZE
from orthrus.bench.journal import RoundRecord
from orthrus.decoding.stats import DecodeStats
from orthrus.errors import OrthrusError
from orthrus.models.quant import device_name

if TYPE_CHECKING:
    from orthrus.bench.journal import BenchJournal
    from orthrus.engine import Orthrus

log = logging.getLogger(__name__)

MODES = ("ar", "parallel", "chain", "onepass", "hybrid", "ngram", "self", "hybrid-self", "hf", "hf-pld")
OURS = ("ar", "parallel", "chain", "onepass", "hybrid", "ngram", "self", "hybrid-self")  # run by our engine (decoder counters)
SELF_MODES = ("self", "hybrid-self")  # self-drafting: the model's fp16 copy drafts (no adapter needed)
ADAPTER_MODES = ("parallel", "chain", "onepass", "hybrid")  # modes that need an adapter
PLD_TOKENS = 10  # prompt_lookup_num_tokens for hf-pld (transformers' documented example value)


def parse_modes(spec: str) -> tuple[str, ...]:
    """``"ar,parallel,hf"`` -> ``("ar", "parallel", "hf")`` (order kept, duplicates dropped)."""
    modes = tuple(dict.fromkeys(m.strip() for m in spec.split(",") if m.strip()))
    bad = [m for m in modes if m not in MODES]
    if bad or not modes:
        raise OrthrusError(f"unknown mode(s) {', '.join(bad) or repr(spec)}: use a comma list of {', '.join(MODES)}")
    return modes


def exact_match(reference: Sequence[Sequence[int]], other: Sequence[Sequence[int]]) -> tuple[float, list[int | None]]:
    """Fraction of prompts whose token ids equal the reference's, and where each first differs.

    Returns:
        ``(rate, divergence)``: ``divergence[i]`` is None for an identical output, else the first
        index at which the two id lists differ (the shorter one's length if one is a prefix of the
        other).
    """
    if len(reference) != len(other):
        raise ValueError(f"{len(reference)} reference outputs but {len(other)} to compare")
    div: list[int | None] = []
    for a, b in zip(reference, other):
        if list(a) == list(b):
            div.append(None)
            continue
        n = min(len(a), len(b))
        div.append(next((i for i in range(n) if a[i] != b[i]), n))
    rate = sum(d is None for d in div) / len(div) if div else 0.0
    return rate, div


@dataclass
class ModeResult:
    """Everything one mode produced over the measured prompts.

    Attributes:
        token_ids: per prompt, the generated ids (EOS included when it ended the output).
        stats: our decoder's counters summed over prompts; for ``hf*`` modes, tokens and the
            model's forward calls (see ``forward_calls``).
        seconds: wall time of the measured rounds (warm-up excluded).
        forward_calls: transformers modes: calls of the model's forward (prefill included).
        memory: see :meth:`Bench._memory`.
    """

    mode: str
    token_ids: list[list[int]] = field(default_factory=list)
    finish_reasons: list[str] = field(default_factory=list)
    stats: DecodeStats = field(default_factory=DecodeStats)
    seconds: float = 0.0
    forward_calls: int = 0
    batch_size: int = 1
    block_size: int = 1
    peak_extra_bytes: int = 0  # CUDA: what one run of it reserves from nothing (see Bench._probe_memory)
    memory: dict = field(default_factory=dict)

    @property
    def tokens(self) -> int:
        return sum(len(t) for t in self.token_ids)


class _HFRunner:
    """transformers ``generate``, greedy, on the engine's base folder; counts forward calls."""

    def __init__(self, engine: "Orthrus") -> None:
        from transformers import AutoModelForCausalLM

        self.engine = engine
        dev, dt = engine.model.device, engine.model.dtype
        try:
            self.model = AutoModelForCausalLM.from_pretrained(engine.base.folder, dtype=dt).to(dev).eval()
        except Exception as e:  # transformers raises many kinds
            raise OrthrusError(f"transformers could not load '{engine.base.folder}': {e}") from e
        self.calls = 0
        self.model.register_forward_hook(self._count)
        self.eos = list(engine.base.eos_ids)
        tok = engine.tokenizer
        self.pad = tok.pad_token_id if tok.pad_token_id is not None else self.eos[0]

    def _count(self, *_: Any) -> None:
        self.calls += 1

    @torch.inference_mode()
    def run(self, chunk: list[list[int]], max_new_tokens: int, pld: bool) -> list[list[int]]:
        """Generate for ``chunk`` (left-padded into one batch; ``pld``: one prompt at a time)."""
        from transformers import GenerationConfig as HFGenerationConfig

        if pld and len(chunk) > 1:
            return [ids for c in chunk for ids in self.run([c], max_new_tokens, pld)]
        cfg = HFGenerationConfig(do_sample=False, num_beams=1, max_new_tokens=max_new_tokens,
                                 eos_token_id=self.eos, pad_token_id=self.pad,
                                 prompt_lookup_num_tokens=PLD_TOKENS if pld else None)
        dev = self.model.device
        t = max(len(c) for c in chunk)
        ids = torch.full((len(chunk), t), self.pad, dtype=torch.long)
        mask = torch.zeros(len(chunk), t, dtype=torch.long)
        for i, c in enumerate(chunk):  # left padding: every row's last prompt token at t - 1
            ids[i, t - len(c):] = torch.tensor(c)
            mask[i, t - len(c):] = 1
        out = self.model.generate(ids.to(dev), attention_mask=mask.to(dev), generation_config=cfg)
        rows = out[:, t:].tolist()
        eos = set(self.eos)
        # a finished row is padded on; keep each row up to and including its first EOS
        return [r[: next((j + 1 for j, x in enumerate(r) if x in eos), len(r))] for r in rows]


def now() -> float:
    """The clock of the time budget (``time.monotonic``; a function, so that tests can replace it)."""
    return time.monotonic()


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def _weights_bytes(module: torch.nn.Module | None) -> int:
    if module is None:
        return 0
    seen = {id(p): p for p in module.parameters()}  # tied weights once
    seen.update({id(b): b for b in module.buffers()})
    return sum(t.numel() * t.element_size() for t in seen.values())


def kv_bytes(engine: "Orthrus", rows: int, positions: int) -> int:
    """Bytes of K and V for ``rows`` x ``positions`` in the base model's shape and dtype."""
    c = engine.model.config
    elem = torch.tensor([], dtype=engine.model.dtype).element_size()
    return 2 * c.num_layers * rows * c.num_kv_heads * positions * c.head_dim * elem


def rss_bytes() -> int:
    """The process's resident memory now (Linux ``/proc``; 0 where unavailable)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def peak_rss_bytes() -> int:
    """Peak resident memory of the whole process so far (``ru_maxrss``, KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@dataclass(frozen=True)
class BenchSettings:
    """What to run. ``block_size`` is for ``parallel`` (None: the adapter's) and, unless
    ``ngram_block_size`` is set, for ``ngram`` (None: ``NGRAM_BLOCK_SIZE``); ``warmup``: prompts run
    through every mode first, untimed."""

    modes: tuple[str, ...]
    max_new_tokens: int = 256
    batch_size: int = 1
    warmup: int = 1
    block_size: int | None = None
    ngram_block_size: int | None = None  # set when block_size is the adapter's measured choice
    self_block_size: int | None = None  # self and hybrid-self (None: SELF_BLOCK_SIZE)
    candidates: int | None = None  # onepass: candidate blocks per pass (None: the decoder's default)

    def __post_init__(self) -> None:
        object.__setattr__(self, "modes", parse_modes(",".join(self.modes)))
        if self.max_new_tokens < 1:
            raise OrthrusError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.batch_size < 1:
            raise OrthrusError(f"batch size must be >= 1, got {self.batch_size}")
        if self.warmup < 0:
            raise OrthrusError(f"warm-up must be >= 0 prompts, got {self.warmup}")
        if self.block_size is not None and self.block_size < 1:
            raise OrthrusError(f"block size must be >= 1, got {self.block_size}")


class Bench:
    """Runs :class:`BenchSettings` over a list of prompts with one engine."""

    def __init__(self, engine: "Orthrus", settings: BenchSettings) -> None:
        s = settings
        need = [m for m in s.modes if m in ADAPTER_MODES]
        if need and engine.adapter is None:
            raise OrthrusError(f"mode '{need[0]}' needs an adapter: pass --adapter PATH or --adapter init")
        self.engine, self.settings = engine, s
        self.device = engine.model.device
        self.cuda = self.device.type == "cuda"
        self.hf = _HFRunner(engine) if any(m.startswith("hf") for m in s.modes) else None
        self.block = 1
        if any(m in ADAPTER_MODES for m in s.modes):
            assert engine.adapter is not None
            self.block = s.block_size or engine.adapter.config.block_size
        self.ngram_block = s.ngram_block_size or s.block_size or NGRAM_BLOCK_SIZE
        self.self_block = s.self_block_size or SELF_BLOCK_SIZE

    def _sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def _gen(self, mode: str) -> GenerationConfig:
        if mode == "ngram":
            return GenerationConfig(max_new_tokens=self.settings.max_new_tokens, mode="parallel",
                                    draft="ngram", block_size=self.ngram_block)
        if mode in SELF_MODES:
            return GenerationConfig(max_new_tokens=self.settings.max_new_tokens, mode="parallel",
                                    draft=mode, block_size=self.self_block)
        if mode in ADAPTER_MODES:
            return GenerationConfig(max_new_tokens=self.settings.max_new_tokens, mode="parallel",
                                    block_size=self.block, schedule="one-pass" if mode == "onepass" else "two-pass",
                                    candidates=self.settings.candidates if mode == "onepass" else None,
                                    draft="hybrid" if mode == "hybrid" else "diffusion",
                                    verify="chain" if mode == "chain" else "auto")
        return GenerationConfig(max_new_tokens=self.settings.max_new_tokens, mode=mode)

    def _block_of(self, mode: str) -> int:
        if mode in SELF_MODES:
            return self.self_block
        return self.ngram_block if mode == "ngram" else self.block if mode in ADAPTER_MODES else 1

    def _run(self, mode: str, chunk: list[list[int]]) -> tuple[list[list[int]], list[str], DecodeStats]:
        """One round of ``mode`` over ``chunk`` (untimed here)."""
        if mode in OURS:
            # each mode keeps its own decoder (cache + CUDA graphs) from round to round
            comps = self.engine.generate(chunk, config=self._gen(mode), batch_size=len(chunk), decoder_key=mode)
            stats = DecodeStats()
            for c in comps:
                stats = stats.merge(c.stats)
            return [c.token_ids for c in comps], [c.finish_reason for c in comps], stats
        assert self.hf is not None
        out = self.hf.run(chunk, self.settings.max_new_tokens, pld=mode == "hf-pld")
        eos = set(self.hf.eos)
        finish = ["stop" if r and r[-1] in eos else "length" for r in out]
        return out, finish, DecodeStats(tokens=sum(len(r) for r in out))

    def run(self, prompt_ids: list[list[int]], journal: "BenchJournal | None" = None,
            max_seconds: float | None = None) -> dict[str, ModeResult]:
        """Warm up, then measure every mode on ``prompt_ids`` (chat-templated ids).

        ``journal``: rounds it holds are taken from it, not run again; each round run here is
        appended to it as soon as every mode has run it (see :mod:`orthrus.bench.journal`).
        ``max_seconds``: no round starts once this much time has passed since the call (warm-up
        included); the results then cover the rounds done (``self.rounds_done`` of
        ``self.rounds_total``), and the prompts of later rounds are left out.
        """
        deadline = None if max_seconds is None else now() + max_seconds
        s, eng = self.settings, self.engine
        if not prompt_ids:
            raise OrthrusError("no prompts to benchmark")
        for i, ids in enumerate(prompt_ids):  # fail before anything runs, naming the prompt
            if len(ids) + s.max_new_tokens > eng.max_context:
                raise OrthrusError(f"prompt {i} ({len(ids)} tokens) + max_new_tokens ({s.max_new_tokens}) "
                                   f"exceeds the model's context of {eng.max_context} tokens")
        b = s.batch_size
        rounds = [prompt_ids[i:i + b] for i in range(0, len(prompt_ids), b)]
        done = journal.done if journal is not None else {}
        todo = [r for r in range(len(rounds)) if r not in done]
        warm = prompt_ids[: s.warmup] if todo else []
        for mode in s.modes if warm else ():
            t0 = time.perf_counter()
            for i in range(0, len(warm), b):
                self._run(mode, warm[i:i + b])
            log.info("warm-up %s: %.1f s", mode, time.perf_counter() - t0)
        results = {m: ModeResult(m, batch_size=1 if m == "hf-pld" else b,
                                 block_size=self._block_of(m)) for m in s.modes}
        per_prompt: dict[str, list[tuple[list[int], str]]] = {m: [] for m in s.modes}
        self.rounds_total, self.rounds_done = len(rounds), 0
        for r, chunk in enumerate(rounds):
            got = done.get(r)
            if got is None and deadline is not None and now() >= deadline:
                log.info("time budget spent: %d of %d rounds done%s", r, len(rounds),
                         " (the journal keeps them: rerun to go on)" if journal is not None else "")
                break
            if got is None:
                got = self._round(r, chunk)
                if journal is not None:
                    journal.record(r, got, load_average())
            missing = [m for m in s.modes if m not in got]
            if missing:  # a journal's header pins the modes, so only a hand-edited one gets here
                raise OrthrusError(f"journal round {r} lacks mode(s) {', '.join(missing)}")
            for mode in s.modes:
                res, rec = results[mode], got[mode]
                res.seconds += rec.seconds
                res.stats = res.stats.merge(rec.stats)
                res.forward_calls += rec.forward_calls
                per_prompt[mode] += list(zip(rec.ids, rec.finish))
            self.rounds_done = r + 1
            log.info("round %d/%d %s", r + 1, len(rounds), "done" if r in todo else "from the journal")
        if not self.rounds_done:
            raise OrthrusError("the time budget ended before the first round: nothing was measured")
        rounds = rounds[: self.rounds_done]
        measured = [x for c in rounds for x in c]
        if self.cuda:
            longest = max(rounds, key=lambda c: max(len(x) for x in c))
            for mode, res in results.items():
                res.peak_extra_bytes = self._probe_memory(mode, longest)
        for mode, res in results.items():
            res.token_ids = [x for x, _ in per_prompt[mode]]
            res.finish_reasons = [f for _, f in per_prompt[mode]]
            res.stats.seconds = res.seconds
            res.memory = self._memory(res, measured)
        return results

    def _round(self, r: int, chunk: list[list[int]]) -> dict[str, RoundRecord]:
        """Every mode over one round of prompts, timed; the mode order rotates with ``r``."""
        modes = self.settings.modes
        shift = r % len(modes)
        out: dict[str, RoundRecord] = {}
        for mode in modes[shift:] + modes[:shift]:  # rotate: no mode always runs first
            calls0 = self.hf.calls if self.hf else 0
            self._sync()
            t0 = time.perf_counter()
            ids, finish, stats = self._run(mode, chunk)
            self._sync()
            out[mode] = RoundRecord(ids, finish, stats, time.perf_counter() - t0,
                                    (self.hf.calls - calls0) if self.hf else 0)
        return out

    def _probe_memory(self, mode: str, chunk: list[list[int]]) -> int:
        """CUDA bytes one run of ``mode`` over ``chunk`` needs beyond the weights, as if alone.

        Every kept decoder is dropped and the allocator's cache emptied first, so the run allocates
        its KV cache, its activations and (ours) its CUDA graph pools from nothing; the peak of
        *reserved* memory counts graph pools too (their intermediates are reserved, not allocated).
        """
        self.engine.release_decoders()
        self._sync()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)
        before = torch.cuda.memory_reserved(self.device)
        self._run(mode, chunk)
        self._sync()
        extra = torch.cuda.max_memory_reserved(self.device) - before
        self.engine.release_decoders()
        torch.cuda.empty_cache()
        return extra

    def _memory(self, res: ModeResult, prompt_ids: list[list[int]]) -> dict:
        """Peak memory of one mode as if it ran alone: its weights plus what its runs allocate.

        CUDA: weights + the peak reserved memory of one run of the longest round from an empty
        allocator (:meth:`_probe_memory`), measured.
        CPU: the process RSS is shared by every mode (both models are loaded), so this reports the
        weights plus the KV cache bytes the mode allocates (ours: the static cache; transformers:
        the same K/V, grown as it goes); activations are not counted.
        """
        eng, s = self.engine, self.settings
        ours = res.mode in OURS
        weights = _weights_bytes(eng.model) if ours else _weights_bytes(self.hf.model if self.hf else None)
        if res.mode in ADAPTER_MODES:
            weights += _weights_bytes(eng.adapter)
        rows = min(res.batch_size, len(prompt_ids))
        longest = max(len(x) for x in prompt_ids) + s.max_new_tokens
        cache = kv_bytes(eng, rows, longest + (res.block_size if ours else 0))
        if self.cuda:
            return {"kind": "cuda_max_reserved", "peak_bytes": weights + res.peak_extra_bytes,
                    "weights_bytes": weights, "kv_cache_bytes": cache}
        return {"kind": "cpu_weights_plus_kv_cache", "peak_bytes": weights + cache,
                "weights_bytes": weights, "kv_cache_bytes": cache}
