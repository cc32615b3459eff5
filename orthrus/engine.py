"""The Python API: ``Orthrus.from_pretrained(model, adapter=...)`` then ``.generate`` / ``.stream``.

>>> o = Orthrus.from_pretrained("smollm2-135m", adapter="init")
>>> [c.text for c in o.generate(["Write a haiku."], mode="parallel", max_new_tokens=32)]
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch

from orthrus.adapter import DiffusionAdapter
from orthrus.config import SELF_BLOCK_SIZE, SELF_DRAFTS, AdapterConfig, GenerationConfig
from orthrus.decoding.generator import (DEFAULT_MAX_DIFFUSION_ROWS, DEFAULT_MAX_DRAFT_ROWS, Decoder, Event,
                                        cache_room, pow2, uses_cuda_graphs)
from orthrus.decoding.ngram import NGRAM_BLOCK_SIZE
from orthrus.decoding.stats import DecodeStats
from orthrus.errors import ContextLengthError, OrthrusError
from orthrus.models.loading import DEFAULT_MODEL, LoadedModel, load_base
from orthrus.models.quant import int8_available

log = logging.getLogger(__name__)

DEFAULT_ADAPTERS = {DEFAULT_MODEL: Path(__file__).parent / "adapters" / "smollm2-135m"}
DRAFT_PRECISIONS = ("auto", "int8", "float32")
SEED_SPACE = 2**63  # seeds are non-negative int64 (the decoder keeps them in an int64 tensor)


def row_seed(seed: int, index: int) -> int:
    """The seed of row ``index`` of a call whose seed is ``seed``: ``seed + index`` (mod 2^63).

    Rows of one call (prompts of one ``generate``, choices of one ``n > 1`` request) therefore draw
    independent samples, and row ``i`` of a call with seed ``s`` is reproduced by that prompt alone
    with seed ``s + i``. The sampler hashes (seed, position, stream), so neighbouring seeds give
    unrelated random streams.
    """
    return (seed + index) % SEED_SPACE


@dataclass
class Completion:
    """One finished request."""

    id: Any
    prompt: str | list[int]
    text: str
    token_ids: list[int]
    finish_reason: str
    stats: DecodeStats
    prompt_tokens: int = 0
    error: str | None = None  # set when finish_reason is 'error' (a numerical fault; the text so far is kept)

    def to_dict(self) -> dict:
        d = {"id": self.id, "prompt": self.prompt, "text": self.text, "token_ids": self.token_ids,
             "finish_reason": self.finish_reason, "stats": self.stats.to_dict()}
        if self.error is not None:
            d["error"] = self.error
        return d


class Orthrus:
    """A frozen base model plus (optionally) its diffusion adapter."""

    def __init__(self, base: LoadedModel, adapter: DiffusionAdapter | None, cuda_graphs: bool | None = None,
                 compile: bool | str = False, prepare: bool = True, draft_precision: str = "auto",
                 max_draft_rows: int | None | str = "auto") -> None:
        """``prepare``: fuse and (fp32 on CPU) prepack the weights for decoding (see
        ``Transformer.prepare_inference``); False keeps the plain per-projection GEMMs.
        ``draft_precision``: the weights of the adapter's draft pass: ``int8`` (draft-only int8
        copies, ``orthrus.models.quant``: a cheaper draft, the same exact output), ``float32``
        (the model's own), ``auto`` (int8 where it is the faster choice: a prepared fp32 model on
        a CPU with fbgemm, and an adapter; compiled cycles call them as opaque ops).
        ``compile``: see :meth:`from_pretrained`. ``max_draft_rows``: cycles draft only while at most this many rows
        decode, else one token a pass (see ``Decoder``); None: always draft; ``auto``:
        ``DEFAULT_MAX_DRAFT_ROWS`` on a CPU (measured), and ``DEFAULT_MAX_DIFFUSION_ROWS`` for cycles
        with adapter drafts; None on a GPU."""
        if draft_precision not in DRAFT_PRECISIONS:
            raise OrthrusError(f"draft precision must be one of {', '.join(DRAFT_PRECISIONS)}, got {draft_precision!r}")
        if compile not in (True, False, "auto"):
            raise OrthrusError(f"compile must be True, False or 'auto', got {compile!r}")
        self.base = base
        self.model = base.model
        self.tokenizer = base.tokenizer
        self.adapter = adapter
        cpu32 = self.model.device.type == "cpu" and self.model.dtype == torch.float32
        if draft_precision == "int8" and not (cpu32 and int8_available()):
            raise OrthrusError("--draft-precision int8 needs a float32 model on a CPU and a torch with "
                               "fbgemm (x86); use float32 or auto")
        self.draft_int8 = adapter is not None and (
            draft_precision == "int8"
            or (draft_precision == "auto" and prepare and cpu32 and int8_available()))
        # under compile too: compiled graphs call the prepacked kernels as opaque ops (orthrus.models.opaque)
        if prepare:
            self.model.prepare_inference()
        if self.draft_int8:
            self.model.prepare_draft()
        if adapter is not None and (prepare or self.draft_int8):
            adapter.prepare_inference(None, int8=self.draft_int8)
        self.cuda_graphs = cuda_graphs
        self.compile = compile
        self.max_diffusion_rows: int | None = None  # an explicit max_draft_rows caps every source alike
        if max_draft_rows == "auto":
            cpu = self.model.device.type == "cpu"
            max_draft_rows = DEFAULT_MAX_DRAFT_ROWS if cpu else None
            self.max_diffusion_rows = DEFAULT_MAX_DIFFUSION_ROWS if cpu else None
        if max_draft_rows is not None and (not isinstance(max_draft_rows, int) or max_draft_rows < 0):
            raise OrthrusError(f"max draft rows must be an integer >= 0, 'auto' or None, got {max_draft_rows!r}")
        self.max_draft_rows = max_draft_rows
        # idle decoders kept for their static cache and captured CUDA graphs, one per key
        self._spares: dict[str, Decoder] = {}

    @classmethod
    def from_pretrained(cls, model: str = DEFAULT_MODEL, adapter: str | None = None, device: str = "cpu",
                        dtype: str = "float32", adapter_kind: str = "full",
                        block_size: int | None = None, cuda_graphs: bool | None = None,
                        compile: bool | str = False, draft_precision: str = "auto",
                        max_draft_rows: int | None | str = "auto") -> "Orthrus":
        """Load a base model and an adapter.

        Args:
            model: ``smollm2-135m``, a Hugging Face folder or a ``.gguf`` file.
            adapter: a folder saved by ``DiffusionAdapter.save``, ``"init"`` (fresh, untrained), or
                None (the shipped default adapter for the default model, if any; else no adapter).
            adapter_kind: for ``init``: ``full`` or ``lora:R``.
            block_size: for ``init``: the adapter's block size (default 32).
            cuda_graphs: replay each decoding cycle as a CUDA graph (None: yes on CUDA devices).
            compile: ``torch.compile`` each decoding cycle (fused code around the prepacked GEMMs;
                the first cycle of each shape compiles, 20-170 s on a 2-core CPU, ~5 s once cached
                on disk); ``"auto"``: compile, and keep each shape's compiled graph only where a
                timing trial on its first cycle finds it faster (``orthrus.decoding.compiled``).
            draft_precision: ``auto``, ``int8`` or ``float32`` (see :class:`Orthrus`).
            max_draft_rows: ``auto``, an integer or None (see :class:`Orthrus`).
        """
        base = load_base(model, device=device, dtype=dtype)
        ad = None
        if adapter == "init":
            kind, rank = AdapterConfig.parse_kind(adapter_kind)
            ad = DiffusionAdapter.init(base.model, base.fingerprint, kind=kind, block_size=block_size or 32,
                                       lora_rank=rank)
        elif adapter is not None:
            ad = DiffusionAdapter.load(adapter, base.model, base.fingerprint)
        elif model in DEFAULT_ADAPTERS and (DEFAULT_ADAPTERS[model] / "adapter.safetensors").is_file():
            ad = DiffusionAdapter.load(DEFAULT_ADAPTERS[model], base.model, base.fingerprint)
        if ad is not None:
            ad = ad.to(device=base.model.device, dtype=base.model.dtype).eval().requires_grad_(False)
        return cls(base, ad, cuda_graphs, compile, draft_precision=draft_precision, max_draft_rows=max_draft_rows)

    # ---- prompts ------------------------------------------------------------------------------

    def encode(self, prompt: str | list[int] | list[dict], chat_template: bool = True) -> list[int]:
        """Token ids of a prompt: a string (chat-templated as one user turn by default), a list of
        chat messages, or ids as they are."""
        if isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):
            ids = list(prompt)
        elif isinstance(prompt, str) or isinstance(prompt, list):
            if isinstance(prompt, str) and not prompt.strip():
                raise OrthrusError("the prompt is empty: give some text")
            tok = self.tokenizer
            if chat_template and tok.chat_template:
                msgs = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
                out = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
                ids = list(out["input_ids"] if hasattr(out, "keys") else out)
            elif isinstance(prompt, str):
                ids = tok(prompt)["input_ids"]
            else:
                raise OrthrusError("chat messages need a tokenizer with a chat template")
        else:
            raise OrthrusError(f"a prompt must be a string, chat messages or token ids, got {type(prompt).__name__}")
        if not ids:
            raise OrthrusError("the prompt is empty after tokenisation")
        return ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    @property
    def max_context(self) -> int:
        return self.model.config.max_context

    def _block_size(self, gen: GenerationConfig) -> int:
        if gen.mode == "ar":
            return 1
        if gen.draft == "ngram":  # drafts by prompt lookup: no adapter needed
            return gen.block_size or NGRAM_BLOCK_SIZE
        if gen.draft in SELF_DRAFTS:  # the model's own fp16 copy drafts: no adapter needed
            try:
                self.model.prepare_self_draft()
            except ValueError as e:
                raise OrthrusError(f"draft {gen.draft!r}: {e}; use draft 'ngram' or an adapter's drafts") from e
            return gen.block_size or SELF_BLOCK_SIZE
        if self.adapter is None:
            raise OrthrusError("parallel mode needs an adapter: pass --adapter PATH or --adapter init, "
                               "or draft by n-gram (--draft ngram), which needs none")
        return gen.block_size or self.adapter.config.block_size

    def check_fits(self, n_prompt: int, gen: GenerationConfig) -> None:
        if n_prompt + gen.max_new_tokens > self.max_context:
            raise ContextLengthError(
                f"prompt ({n_prompt} tokens) + max_new_tokens ({gen.max_new_tokens}) exceeds the model's "
                f"context of {self.max_context} tokens")

    def new_decoder(self, max_batch: int, capacity: int, compile: bool | str | None = None) -> Decoder:
        """A decoder with the engine's settings (``compile``: this one's, None: the engine's)."""
        return Decoder(self.model, self.adapter, self.base.eos_ids, self.decode, max_batch, capacity,
                       cuda_graphs=self.cuda_graphs, compile=self.compile if compile is None else compile,
                       max_draft_rows=self.max_draft_rows,
                       max_diffusion_rows=self.max_diffusion_rows)

    def release_decoders(self) -> None:
        """Drop the idle decoders kept between calls (their caches and CUDA graphs)."""
        self._spares.clear()

    def _take_decoder(self, max_batch: int, capacity: int, key: str) -> Decoder:
        """An idle decoder of ``max_batch`` slots holding at least ``capacity`` positions.

        The last one used under ``key`` is reused while it fits, so its static cache and its
        captured CUDA graphs outlive one ``generate`` call; with static shapes a new one gets a
        power-of-two capacity (fewer distinct shapes). A decoder in use by another (interleaved)
        stream is never shared.
        """
        dec = self._spares.pop(key, None)
        if dec is not None and dec.max_batch == max_batch and dec.capacity >= capacity:
            return dec
        dec = None  # free the old cache before allocating the new one
        if self.uses_cuda_graphs or self.compile:  # few distinct cache shapes to capture or compile
            capacity = max(capacity, min(max(512, pow2(capacity)), self.max_context + 64))
        return self.new_decoder(max_batch, capacity)

    @property
    def uses_cuda_graphs(self) -> bool:
        """Whether decoders replay CUDA graphs (asked for, or by default on a CUDA device)."""
        return uses_cuda_graphs(self.model.device, self.cuda_graphs)

    # ---- generation ---------------------------------------------------------------------------

    def stream(self, prompts: Iterable[str | list[int]], config: GenerationConfig | None = None,
               batch_size: int = 8, chat_template: bool = True, ids: list[Any] | None = None,
               stream_text: bool = True, decoder_key: str = "default", seeds: list[int] | None = None,
               **kwargs: Any) -> Iterator[Event]:
        """Yield :class:`Event` s (new final tokens and text per request) as decoding proceeds.

        Seeds: prompt ``i`` samples with ``seeds[i]`` when ``seeds`` is given (a row with its own
        seed gives the same output alone or in any batch), else with ``row_seed(config.seed, i)``
        (``config.seed + i``), so that rows of one call are independent samples.

        Requests are decoded ``batch_size`` at a time with continuous batching: a finished row's
        slot is refilled with the next prompt at once. With ``stream_text=False`` the events carry
        token ids as they come but the text only in each request's last event (less host work).
        The decoder (its cache and CUDA graphs) is kept for the next call with the same
        ``decoder_key``; workloads that alternate shapes (a benchmark's modes) use a key each.
        """
        gen = config or GenerationConfig(**kwargs)
        prompts = list(prompts)
        if batch_size < 1:
            raise OrthrusError(f"batch size must be >= 1, got {batch_size}")
        encoded = [self.encode(p, chat_template) for p in prompts]
        k = self._block_size(gen)
        for n in encoded:
            self.check_fits(len(n), gen)
        ids = ids if ids is not None else list(range(len(prompts)))
        if seeds is None:
            seeds = [row_seed(gen.seed, i) for i in range(len(prompts))]
        elif len(seeds) != len(prompts):
            raise OrthrusError(f"{len(seeds)} seeds for {len(prompts)} prompts: give one seed per prompt")
        # each row's own config (only its seed differs); GenerationConfig validates the seed
        gens = [gen if s == gen.seed else replace(gen, seed=s) for s in seeds]
        if not encoded:
            return
        capacity = max(len(n) for n in encoded) + gen.max_new_tokens + cache_room(gen, k)
        dec = self._take_decoder(min(batch_size, len(encoded)), capacity, decoder_key)
        dec.stream_text = stream_text
        pending = list(zip(ids, encoded, gens))
        try:
            while pending or dec.busy():
                free = dec.free_slots()
                if free and pending:
                    batch, pending = pending[: len(free)], pending[len(free):]
                    yield from self._finish(dec, dec.add([(rid, n, g, k) for rid, n, g in batch]))
                yield from self._finish(dec, dec.step())
        finally:
            for slot, row in enumerate(dec.rows):  # a stream closed early leaves rows behind
                if row is not None:
                    dec.release(slot)
            self._spares[decoder_key] = dec

    @staticmethod
    def _finish(dec: Decoder, events: list[Event]) -> Iterator[Event]:
        for ev in events:
            yield ev
            if ev.finish_reason is not None:
                dec.release(ev.row.slot)

    def generate(self, prompts: Iterable[str | list[int]] | str, config: GenerationConfig | None = None,
                 batch_size: int = 8, chat_template: bool = True, decoder_key: str = "default",
                 seeds: list[int] | None = None, **kwargs: Any) -> list[Completion]:
        """Generate for every prompt; returns completions in prompt order (see :meth:`stream`,
        also for the seeds)."""
        if isinstance(prompts, str):
            prompts = [prompts]
        prompts = list(prompts)
        rows: dict[Any, Any] = {}
        for ev in self.stream(prompts, config, batch_size, chat_template, stream_text=False,
                              decoder_key=decoder_key, seeds=seeds, **kwargs):
            if ev.finish_reason is not None:
                rows[ev.request_id] = ev.row
        return [Completion(i, p, rows[i].text, rows[i].tokens, rows[i].finish_reason, rows[i].stats,
                           len(rows[i].prompt_ids), rows[i].error) for i, p in enumerate(prompts)]


def run_stats(completions: list[Completion], seconds: float) -> DecodeStats:
    """Sum the per-row stats of a run; ``seconds`` is the run's wall time."""
    total = DecodeStats()
    for c in completions:
        total = total.merge(c.stats)
    total.seconds = seconds
    return total
