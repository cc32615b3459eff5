"""Typed, frozen configuration dataclasses.

`ModelConfig` describes the frozen base (read from a Hugging Face config), `AdapterConfig` the
diffusion view, `GenerationConfig` one generate call. Every dataclass validates itself in
``__post_init__`` and round-trips through plain JSON dicts (``to_dict`` / ``from_dict``), so that
every checkpoint carries its config.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from orthrus.errors import OrthrusError

SUPPORTED_ARCHS = ("llama", "qwen2", "qwen3", "mistral")
DTYPES = ("float32", "bfloat16", "float16")
DRAFTS = ("diffusion", "ngram", "hybrid", "self", "hybrid-self")  # draft sources of parallel mode (GenerationConfig.draft)
SELF_DRAFTS = ("self", "hybrid-self")  # the ones that draft with the model's own fp16 copy (no adapter)
SELF_BLOCK_SIZE = 8  # self-drafting's default K (7 one-token draft steps a cycle)
HYBRID_DRAFTS = ("hybrid", "hybrid-self")  # the ones that switch to n-gram drafts where they match
# training block kinds: ``anchor`` is ``[x_s, MASK x (K-1)]`` at ``s..`` seeing the AR K/V below
# ``s`` (the two-pass schedule's draft); ``masked`` is ``[MASK x K]`` at ``s..`` seeing the same
# context, i.e. without the token at ``s`` (the one-pass schedule's candidate block, drafted in the
# pass that verifies ``x_s``'s predecessor)
BLOCK_KINDS = ("anchor", "masked")
SCHEDULES = ("two-pass", "one-pass", "auto")  # GenerationConfig.schedule
VERIFIES = ("auto", "tree", "chain")  # GenerationConfig.verify
MAX_LOGPROBS = 20  # most alternatives per token GenerationConfig.logprobs may ask for (OpenAI's cap)


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise OrthrusError(msg)


class _Serializable:
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls, d: dict[str, Any]):
        names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        return cls(**{k: v for k, v in d.items() if k in names})


@dataclass(frozen=True)
class RopeConfig(_Serializable):
    """Rotary embedding parameters. ``kind``: default | linear | llama3."""

    theta: float = 10000.0
    kind: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def __post_init__(self) -> None:
        _check(self.kind in ("default", "linear", "llama3"),
               f"unsupported rope scaling '{self.kind}': supported are default, linear, llama3")
        _check(self.theta > 0 and self.factor > 0, "rope theta and factor must be positive")


@dataclass(frozen=True)
class ModelConfig(_Serializable):
    """The frozen Llama-family base model (llama, qwen2, qwen3, mistral)."""

    arch: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope: RopeConfig = field(default_factory=RopeConfig)
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    qkv_bias: bool = False      # qwen2 (and llama with attention_bias)
    o_bias: bool = False        # llama with attention_bias
    mlp_bias: bool = False
    qk_norm: bool = False       # qwen3
    sliding_window: int | None = None

    def __post_init__(self) -> None:
        _check(self.arch in SUPPORTED_ARCHS,
               f"unsupported architecture '{self.arch}': supported are {', '.join(SUPPORTED_ARCHS)}")
        _check(self.num_heads % self.num_kv_heads == 0,
               f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})")
        if isinstance(self.rope, dict):  # from_dict
            object.__setattr__(self, "rope", RopeConfig.from_dict(self.rope))

    @property
    def max_context(self) -> int:
        """Longest sequence (prompt + generated) the model is used for."""
        if self.sliding_window:
            return min(self.max_position_embeddings, self.sliding_window)
        return self.max_position_embeddings

    @classmethod
    def from_hf(cls, hf: Any) -> "ModelConfig":
        """Build from a transformers ``PretrainedConfig`` (public attributes only)."""
        arch = getattr(hf, "model_type", None)
        _check(arch in SUPPORTED_ARCHS,
               f"unsupported architecture '{arch}': supported are {', '.join(SUPPORTED_ARCHS)}")
        act = getattr(hf, "hidden_act", "silu")
        _check(act == "silu", f"unsupported activation '{act}': only silu (SwiGLU) is supported")
        rp = dict(getattr(hf, "rope_parameters", None) or getattr(hf, "rope_scaling", None) or {})
        theta = rp.get("rope_theta", getattr(hf, "rope_theta", 10000.0))
        kind = rp.get("rope_type", rp.get("type", "default"))
        rope = RopeConfig(
            theta=float(theta), kind=kind, factor=float(rp.get("factor", 1.0)),
            low_freq_factor=float(rp.get("low_freq_factor", 1.0)),
            high_freq_factor=float(rp.get("high_freq_factor", 4.0)),
            original_max_position_embeddings=int(rp.get("original_max_position_embeddings", 8192)),
        )
        heads = hf.num_attention_heads
        head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // heads
        attn_bias = bool(getattr(hf, "attention_bias", False))
        sliding = None
        if arch == "mistral" or (arch in ("qwen2", "qwen3") and getattr(hf, "use_sliding_window", False)):
            sliding = getattr(hf, "sliding_window", None)
        return cls(
            arch=arch, vocab_size=hf.vocab_size, hidden_size=hf.hidden_size,
            intermediate_size=hf.intermediate_size, num_layers=hf.num_hidden_layers,
            num_heads=heads, num_kv_heads=getattr(hf, "num_key_value_heads", None) or heads,
            head_dim=head_dim, rms_norm_eps=float(hf.rms_norm_eps), rope=rope,
            max_position_embeddings=int(getattr(hf, "max_position_embeddings", 4096)),
            tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
            qkv_bias=(arch == "qwen2") or attn_bias,
            o_bias=attn_bias and arch in ("llama", "qwen3"),
            mlp_bias=bool(getattr(hf, "mlp_bias", False)),
            qk_norm=(arch == "qwen3"),
            sliding_window=sliding,
        )


ADAPTER_KINDS = ("full", "lora")


@dataclass(frozen=True)
class AdapterConfig(_Serializable):
    """The diffusion view: its kind, block size and the base it belongs to.

    ``kind`` is ``full`` (own copies of q/k/v/o, as in the paper) or ``lora`` (a rank-``lora_rank``
    delta on the frozen projections, zero-initialised). ``base_fingerprint`` ties an adapter to the
    exact base weights it was made for.
    """

    kind: str = "full"
    block_size: int = 32
    lora_rank: int = 0
    lora_alpha: float = 0.0
    base_fingerprint: str = ""
    base_arch: str = ""
    num_layers: int = 0
    hidden_size: int = 0
    block_kinds: tuple[str, ...] = ("anchor",)  # the block kinds it was trained on (BLOCK_KINDS)
    # draft_ranks[d][r]: on held-out data, how often the frozen model's token at draft slot d+1
    # has rank r among the adapter's drafts there, given slots 1..d were right; builds the verify
    # tree (orthrus.decoding.tree). Empty: not measured.
    draft_ranks: tuple[tuple[float, ...], ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "draft_ranks", tuple(tuple(float(p) for p in row) for row in self.draft_ranks))
        _check(all(0 <= p <= 1 for row in self.draft_ranks for p in row),
               f"draft_ranks are rates in [0, 1], got {self.draft_ranks!r}")
        if isinstance(self.block_kinds, (list, str)):  # from JSON
            kinds = (self.block_kinds,) if isinstance(self.block_kinds, str) else tuple(self.block_kinds)
            object.__setattr__(self, "block_kinds", kinds)
        _check(bool(self.block_kinds) and all(k in BLOCK_KINDS for k in self.block_kinds),
               f"adapter block kinds must be among {', '.join(BLOCK_KINDS)}, got {self.block_kinds!r}")
        _check(self.kind in ADAPTER_KINDS, f"unknown adapter kind '{self.kind}': use full or lora:R")
        _check(self.block_size >= 1, f"block size must be >= 1, got {self.block_size}")
        if self.kind == "lora":
            _check(self.lora_rank >= 1, f"lora rank must be >= 1, got {self.lora_rank}")

    @staticmethod
    def parse_kind(spec: str) -> tuple[str, int]:
        """``"full"`` -> ("full", 0); ``"lora:16"`` -> ("lora", 16)."""
        if spec == "full":
            return "full", 0
        if spec.startswith("lora:") and spec[5:].isdigit() and int(spec[5:]) > 0:
            return "lora", int(spec[5:])
        raise OrthrusError(f"adapter kind '{spec}' is not valid: use 'full' or 'lora:R' with R >= 1")


@dataclass(frozen=True)
class GenerationConfig(_Serializable):
    """One generate call.

    ``temperature == 0`` is greedy. ``top_k == 0`` and ``top_p == 1`` switch those filters off.
    ``stop`` strings end a row (not included in the text). ``mode``: ``ar`` or ``parallel``.
    ``draft`` (parallel mode): where the drafts come from: ``diffusion`` (the adapter's diffusion
    view, one extra forward pass per cycle) or ``ngram`` (prompt lookup over the row's own prompt
    and output, on the host: no adapter and no draft pass) or ``hybrid`` (per cycle and row: n-gram
    drafts when the latest tokens repeat an earlier n-gram, else the diffusion view's; the n-gram
    cycles run at block size ``max(K, 8)``), ``self`` (self-drafting: an fp16-weight copy of the
    frozen model drafts K-1 tokens one step at a time, each step streaming half the bytes of an
    fp32 step; no adapter; a CPU) or ``hybrid-self`` (``hybrid`` with self-drafting in place of the
    diffusion view). ``ngram_max``: the longest suffix the
    n-gram lookup tries to match (then shorter ones, down to 1).
    ``schedule`` (parallel mode, diffusion drafts): ``two-pass`` (a draft pass, then a verify pass),
    ``one-pass`` (the verify pass also drafts the next block, for ``candidates`` guesses of how
    many drafts it will accept: one forward per cycle) or ``auto`` (the engine picks one from the
    adapter and the measured pass costs of this machine). ``candidates`` None: the engine's default.
    ``verify`` (adapter drafts, two-pass): ``tree`` checks, in the verify pass's K rows, the
    likeliest paths through each draft slot's top tokens instead of the top tokens alone
    (:mod:`orthrus.decoding.tree`; same output, more tokens per pass), ``chain`` the top tokens
    only, ``auto`` a tree for greedy rows when the adapter records its measured rank rates, else a
    chain. A sampled row verified as a tree emits the model's own sample at each position (AR's
    tokens for the same seed, up to the rounding of a K-row pass); ``auto`` leaves sampled rows on
    chains (rejection sampling), which kept more per pass at temperature 1 (README).
    ``logprobs``: None (off), or N in ``[0, MAX_LOGPROBS]``: each generated token comes with its log
    probability and the N most likely tokens at its position with theirs, all from the frozen
    model's own distribution (the verify pass's log-softmax, before temperature, top-k and top-p).
    """

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    stop: tuple[str, ...] = ()
    mode: str = "ar"
    block_size: int | None = None   # parallel mode; None: the adapter's
    ignore_eos: bool = False
    draft: str = "diffusion"
    ngram_max: int = 4
    schedule: str = "two-pass"
    candidates: int | None = None
    logprobs: int | None = None
    verify: str = "auto"

    def __post_init__(self) -> None:
        _check(self.verify in VERIFIES, f"verify must be one of {', '.join(VERIFIES)}, got {self.verify!r}")
        _check(self.verify != "tree" or (self.draft in ("diffusion", "hybrid") and self.schedule != "one-pass"),
               "verify 'tree' checks the adapter's drafts in the two-pass schedule (draft 'diffusion' or "
               f"'hybrid'; got draft {self.draft!r}, schedule {self.schedule!r}): use verify 'auto' or 'chain'")
        _check(self.schedule in SCHEDULES, f"schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        _check(self.schedule != "one-pass" or self.draft == "diffusion",
               f"schedule 'one-pass' drafts with the diffusion view: use draft 'diffusion' (got {self.draft!r}) "
               "or schedule 'two-pass'")
        _check(self.candidates is None or (isinstance(self.candidates, int) and self.candidates >= 1),
               f"candidates must be an integer >= 1, got {self.candidates!r}")
        _check(isinstance(self.max_new_tokens, int) and self.max_new_tokens > 0,
               f"max_new_tokens must be a positive integer, got {self.max_new_tokens!r}")
        _check(math.isfinite(self.temperature) and self.temperature >= 0,
               f"temperature must be a finite number >= 0, got {self.temperature!r}")
        _check(self.top_k >= 0, f"top_k must be >= 0 (0 = off), got {self.top_k!r}")
        _check(math.isfinite(self.top_p) and 0 < self.top_p <= 1,
               f"top_p must be in (0, 1], got {self.top_p!r}")
        _check(self.mode in ("ar", "parallel"), f"mode must be 'ar' or 'parallel', got {self.mode!r}")
        _check(self.draft in DRAFTS, f"draft must be one of {', '.join(DRAFTS)}, got {self.draft!r}")
        _check(isinstance(self.ngram_max, int) and self.ngram_max >= 1,
               f"ngram_max must be an integer >= 1, got {self.ngram_max!r}")
        _check(self.block_size is None or self.block_size >= 1,
               f"block size must be >= 1, got {self.block_size!r}")
        _check(0 <= self.seed < 2**63, f"seed must be in [0, 2^63), got {self.seed!r}")
        if isinstance(self.stop, (list, str)):
            object.__setattr__(self, "stop", (self.stop,) if isinstance(self.stop, str) else tuple(self.stop))
        _check(all(isinstance(s, str) and s for s in self.stop), "stop strings must be non-empty strings")
        _check(self.logprobs is None or (type(self.logprobs) is int and 0 <= self.logprobs <= MAX_LOGPROBS),
               f"logprobs must be None or an integer in [0, {MAX_LOGPROBS}], got {self.logprobs!r}")
