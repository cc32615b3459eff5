"""Shared fixtures and helpers for the engine tests.

* ``real_engine``: the real default model with a fresh adapter (block 8), loaded ONCE per session and
  shared by every test file that needs it (the first load converts the GGUF, ~20 s, then ~3 s).
* ``real_hf``: transformers' own model read from the same converted folder, for parity.
* ``tiny_chat_folder`` / ``tiny_chat_engine``: a tiny random llama as a Hugging Face folder with a
  word-level tokenizer and a chat template (``tiny.make_tiny_folder``), and an engine on it with a
  fresh adapter (block 4): what the server tests serve when they need no real model.
* tiny random models of every family (``tiny_base``) and ``run_decoder``, which drives a
  :class:`~orthrus.decoding.generator.Decoder` exactly like ``Orthrus.stream`` does (continuous
  batching: add into free slots, step, release finished rows), on token-id prompts.
"""

from __future__ import annotations

import os
from typing import Any, Callable

import pytest
import torch

from orthrus.adapter import DiffusionAdapter
from orthrus.config import GenerationConfig
from orthrus.decoding.generator import Decoder, Row
from orthrus.models.llama import Transformer
from tiny import hf_model, make_tiny_folder, ours_from_hf

TINY_FP = "tiny-fingerprint"

# The CLI compiles long jobs' decoding cycles by default (--compile auto). Tests run them eager:
# compiling every test model's cycle shapes would take many minutes. The compiled path has its own
# tests, which ask for it.
os.environ.setdefault("ORTHRUS_COMPILE", "off")


def token_text(ids: list[int]) -> str:
    """A decode function for tiny models: every token id becomes ``<id>``."""
    return "".join(f"<{t}>" for t in ids)


def tiny_base(arch: str, seed: int = 0, **over: Any) -> tuple[Any, Transformer]:
    """(transformers model, our Transformer with the same weights), fp32, eval mode.

    Weights are drawn with std 0.5 (not transformers' 0.02): a near-uniform random model repeats
    one token forever, which would make exactness tests trivially easy to pass.
    """
    over.setdefault("initializer_range", 0.5)
    hf = hf_model(arch, seed, **over)
    return hf, ours_from_hf(hf)


def tiny_adapter(model: Transformer, kind: str = "full", block_size: int = 8,
                 fingerprint: str = TINY_FP) -> DiffusionAdapter:
    """A fresh (untrained) adapter for a tiny model; ``kind``: full | lora (rank 4)."""
    ad = DiffusionAdapter.init(model, fingerprint, kind=kind, block_size=block_size,
                               lora_rank=4 if kind == "lora" else 0)
    return ad.eval().requires_grad_(False)


def run_decoder(model: Transformer, adapter: DiffusionAdapter | None, prompts: list[list[int]],
                gen: GenerationConfig | list[GenerationConfig], *, block_size: int | None = None,
                batch_size: int | None = None, eos_ids: tuple[int, ...] = (),
                decode: Callable[[list[int]], str] = token_text,
                decoder_cls: type[Decoder] = Decoder, capacity: int | None = None,
                ) -> tuple[list[Row], Decoder]:
    """Decode every prompt (token ids) as ``Orthrus.stream`` does; rows come back in prompt order.

    ``gen`` is one config for all prompts or one per prompt. The block size is 1 for ``mode='ar'``,
    else ``block_size`` or the config's or the adapter's.
    """
    gens = gen if isinstance(gen, list) else [gen] * len(prompts)

    def k_of(g: GenerationConfig) -> int:
        if g.mode == "ar":
            return 1
        if block_size or g.block_size:
            return block_size or g.block_size
        assert adapter is not None
        return adapter.config.block_size

    if capacity is None:
        capacity = max(len(p) + g.max_new_tokens + k_of(g) for p, g in zip(prompts, gens))
    dec = decoder_cls(model, adapter, tuple(eos_ids), decode, batch_size or len(prompts), capacity)
    pending = list(enumerate(prompts))
    done: dict[int, Row] = {}

    streamed: dict[int, str] = {i: "" for i in range(len(prompts))}
    dec.streamed = streamed  # type: ignore[attr-defined]  # the text deltas, joined, per request

    def finish(events: list) -> None:
        for ev in events:
            streamed[ev.request_id] += ev.text
            if ev.finish_reason is not None:
                done[ev.request_id] = ev.row
                dec.release(ev.row.slot)

    while pending or dec.busy():
        free = dec.free_slots()
        if free and pending:
            batch, pending = pending[: len(free)], pending[len(free):]
            finish(dec.add([(i, p, gens[i], k_of(gens[i])) for i, p in batch]))
        finish(dec.step())
    return [done[i] for i in range(len(prompts))], dec


def random_prompts(lengths: list[int], vocab: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]


@pytest.fixture(autouse=True, scope="session")
def _one_cpu_thread():
    """Run the test session on one intra-op CPU thread.

    Tiny models gain nothing from more threads, and the real 135M model at batch 1-2 gains little;
    but OpenMP threads spinning on a busy machine (a shared CI runner, parallel jobs) made the same
    tests 5-25x slower in our measurements. A test that wants more threads may set them itself.
    """
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def real_engine():
    """The real default model (SmolLM2-135M-Instruct) with a fresh full adapter, block size 8."""
    from orthrus.engine import Orthrus

    return Orthrus.from_pretrained("smollm2-135m", adapter="init", block_size=8)


@pytest.fixture(scope="session")
def real_hf(real_engine):
    """transformers' model loaded from the engine's converted folder (fp32), for parity."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(real_engine.base.folder, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def tiny_chat_folder(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A tiny llama as a Hugging Face folder, with a tokenizer and a chat template (words ``w5..w96``)."""
    return make_tiny_folder(tmp_path_factory.mktemp("tiny-chat"))


@pytest.fixture(scope="session")
def tiny_chat_engine(tiny_chat_folder: Any) -> Any:
    """An :class:`~orthrus.engine.Orthrus` on ``tiny_chat_folder`` with a fresh adapter, block size 4."""
    from orthrus.engine import Orthrus
    from orthrus.models.loading import load_base

    base = load_base(str(tiny_chat_folder))
    return Orthrus(base, tiny_adapter(base.model, block_size=4))
