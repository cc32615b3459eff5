"""Options shared by the subcommands, and turning them into an engine and a generation config.

A command that generates text does::

    add_model_args(parser); add_generation_args(parser)
    ...
    gen = generation_config(args)   # cheap checks first: errors are instant
    engine = load_engine(args)      # then the model (~3 s for the default one)

Everything cheap (device, dtype, model name, adapter path, adapter kind, mode, generation values,
prompt files) is checked before any weights are read, so bad input fails at once with one line.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import logging
import os
import time
from pathlib import Path
from typing import Any

from orthrus.adapter import WEIGHTS
from orthrus.config import (DRAFTS, DTYPES, SCHEDULES, SELF_BLOCK_SIZE, SELF_DRAFTS, VERIFIES, AdapterConfig,
                            GenerationConfig)
from orthrus.decoding.ngram import NGRAM_BLOCK_SIZE
from orthrus.decoding.generator import DEFAULT_MAX_DIFFUSION_ROWS, DEFAULT_MAX_DRAFT_ROWS
from orthrus.engine import DEFAULT_ADAPTERS, DRAFT_PRECISIONS, Orthrus
from orthrus.errors import OrthrusError
from orthrus.jsonl import iter_jsonl
from orthrus.models.loading import DEFAULT_MODEL, parse_device, parse_dtype, resolve_model
from orthrus.models.quant import fp16_available

log = logging.getLogger(__name__)


# ---- options --------------------------------------------------------------------------------------

COMPILES = ("auto", "on", "off")
COMPILE_ENV = "ORTHRUS_COMPILE"  # the default of --compile (auto, on or off)
# a generate or bench job of at least this many new tokens (prompts x --max-new-tokens, x modes for
# bench) compiles under
# --compile auto: compiling pays ~10% per token on our CPU and a later process's start-up costs ~5 s
# per cycle shape (bench/README.md, "Compiled decoding")
COMPILE_MIN_TOKENS = 8192


def add_compile_arg(parser: Any) -> None:
    """``--compile [auto|on|off]`` and ``--no-compile``."""
    parser.add_argument("--compile", nargs="?", const="on", default=None, choices=COMPILES,
                        help="torch.compile each decoding cycle on a CPU (fused code around the prepacked "
                             "GEMMs, the same tokens; the first run compiles each cycle shape for "
                             "20-60 s, later runs load it from $ORTHRUS_CACHE/inductor in ~5 s). auto "
                             "(default, or $ORTHRUS_COMPILE): for float32 on a CPU in serve and distill, "
                             f"and in generate and bench for jobs of >= {COMPILE_MIN_TOKENS} new tokens, "
                             "compile each cycle shape and keep it where a timing trial finds it faster; "
                             "off in chat and on GPUs")
    parser.add_argument("--no-compile", dest="compile", action="store_const", const="off",
                        help="the same as --compile off")


def resolve_compile(args: argparse.Namespace, job_tokens: int | None) -> bool | str:
    """The engine's ``compile``: ``--compile``, else ``$ORTHRUS_COMPILE``, else ``auto``. ``on``:
    True. ``auto``: for float32 models on a CPU and long jobs (``job_tokens`` new tokens planned,
    at least ``COMPILE_MIN_TOKENS``; None: a long-running command), ``"auto"`` (compile, and keep
    each cycle shape's graph where a timing trial finds it faster); else False."""
    choice = getattr(args, "compile", None)
    if isinstance(choice, bool):  # a namespace built in code
        return choice
    if choice is None:
        choice = os.environ.get(COMPILE_ENV, "auto").strip().lower() or "auto"
        if choice not in COMPILES:
            raise OrthrusError(f"${COMPILE_ENV} must be one of {', '.join(COMPILES)}, got {choice!r}")
    if choice != "auto":
        return choice == "on"
    long_cpu_job = (str(getattr(args, "device", "cpu")).split(":")[0] == "cpu"
                    and getattr(args, "dtype", "float32") == "float32"
                    and (job_tokens is None or job_tokens >= COMPILE_MIN_TOKENS))
    return "auto" if long_cpu_job else False


def add_model_args(parser: argparse.ArgumentParser) -> None:
    """``--model --adapter --adapter-kind --device --dtype --no-cuda-graphs --compile``."""
    g = parser.add_argument_group("model")
    g.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"a known name ({DEFAULT_MODEL}), a Hugging Face folder or a .gguf file "
                        f"(default: {DEFAULT_MODEL})")
    g.add_argument("--adapter", default=None, metavar="PATH|init",
                   help="diffusion adapter folder, or 'init' for a fresh untrained one (exact output, "
                        "little speedup); default: the shipped adapter of the model, if there is one")
    g.add_argument("--adapter-kind", default=None, metavar="full|lora:R",
                   help="with --adapter init: full (own q/k/v/o copies, default) or lora:R")
    g.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default: cpu)")
    g.add_argument("--dtype", default="float32", choices=DTYPES, help="weights dtype (default: float32)")
    g.add_argument("--no-cuda-graphs", dest="cuda_graphs", action="store_false", default=None,
                   help="on CUDA, run each decoding cycle eagerly instead of replaying a captured "
                        "CUDA graph (for debugging; much slower)")
    add_compile_arg(g)
    g.add_argument("--max-draft-rows", type=max_draft_rows_arg, default="auto", metavar="N|all|auto",
                   help="parallel mode: cycles draft only while at most N rows are decoding, beyond that "
                        "every row decodes one token a pass (the output is the same either way); all: "
                        f"always draft; auto (default): {DEFAULT_MAX_DRAFT_ROWS} on a CPU, and "
                        f"{DEFAULT_MAX_DIFFUSION_ROWS} for cycles with adapter drafts, where drafting loses "
                        "to plain decoding past a few rows (measured: bench/README.md), all on a GPU")
    g.add_argument("--draft-precision", default="auto", choices=DRAFT_PRECISIONS,
                   help="weights of the adapter's draft pass: int8 (draft-only int8 copies: a cheaper "
                        "draft, the same exact output; +1/4 of the model's memory), float32 (the "
                        "model's own), auto (int8 for a float32 model on a CPU with fbgemm; default)")


def max_draft_rows_arg(value: str) -> int | None | str:
    """``--max-draft-rows``: an integer >= 0, ``all`` (None: always draft) or ``auto``."""
    if value in ("auto", "all"):
        return None if value == "all" else value
    try:
        n = int(value)
    except ValueError:
        n = -1
    if n < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, 'all' or 'auto', got {value!r}")
    return n


def add_generation_args(parser: argparse.ArgumentParser) -> None:
    """``--mode --draft --block-size --max-new-tokens --temperature --top-k --top-p --seed --stop``."""
    g = parser.add_argument_group("generation")
    g.add_argument("--mode", choices=("ar", "parallel"), default=None,
                   help="parallel: draft a block with the adapter, verify with the frozen model; ar: "
                        "one token per pass. Default: parallel when an adapter is available "
                        "(--adapter given, or the model's shipped adapter exists) or with --draft "
                        "ngram, else ar")
    add_draft_arg(g)
    g.add_argument("--block-size", type=block_size_arg, default=None, metavar="K|auto",
                   help="tokens drafted per cycle in parallel mode (default: the adapter's; 32 for init; "
                        "auto on a CPU with the model's shipped adapter); "
                        "auto: measure the pass costs and the adapter's acceptance here and pick the "
                        "fastest K, or plain AR decoding when no K would be faster")
    g.add_argument("--max-new-tokens", type=int, default=256, metavar="N", help="(default: 256)")
    g.add_argument("--temperature", type=float, default=0.0, metavar="T", help="0 = greedy (default: 0)")
    g.add_argument("--top-k", type=int, default=0, metavar="K", help="0 = off (default: 0)")
    g.add_argument("--top-p", type=float, default=1.0, metavar="P", help="1 = off (default: 1)")
    g.add_argument("--seed", type=int, default=0,
                   help="sampling seed: prompt i of the call samples with SEED + i, so rows are "
                        "independent samples and the run is repeatable (default: 0)")
    g.add_argument("--stop", action="append", default=[], metavar="STR",
                   help="end a completion at this string (not included); repeatable")


def add_draft_arg(group: Any) -> None:
    """``--draft diffusion|ngram|hybrid`` and ``--schedule two-pass|one-pass|auto``."""
    group.add_argument("--draft", choices=DRAFTS, default=None,
                       help="where parallel mode's drafts come from (default: hybrid-self for a float32 "
                            "model on a CPU, hybrid when --adapter is given or elsewhere with an adapter, "
                            "diffusion with --schedule one-pass): diffusion (the adapter); "
                            "ngram (prompt lookup over the prompt and the output so far: no adapter "
                            f"needed, implies --mode parallel, block size {NGRAM_BLOCK_SIZE} by default); "
                            "hybrid (each cycle: n-gram drafts when the latest tokens repeat earlier ones, "
                            f"at block size max(K, {NGRAM_BLOCK_SIZE}), else the adapter's); self "
                            "(self-drafting: a float16-weight copy of the model drafts K-1 tokens one "
                            "step at a time; no adapter needed, implies --mode parallel, block size "
                            f"{SELF_BLOCK_SIZE} by default; a CPU); hybrid-self (hybrid with self-drafting "
                            "in place of the adapter)")
    group.add_argument("--schedule", choices=SCHEDULES, default="two-pass",
                       help="parallel mode with diffusion drafts: two-pass (a draft pass, then a verify "
                            "pass; default), one-pass (the verify pass also drafts the next block for "
                            "--candidates guesses of how much it accepts: one forward per cycle), auto "
                            "(measured on this machine with --block-size auto)")
    group.add_argument("--candidates", type=int, default=None, metavar="C",
                       help="one-pass schedule: candidate next blocks drafted per pass (default: 2)")
    group.add_argument("--verify", choices=VERIFIES, default="auto",
                       help="how the adapter's drafts are verified: tree (the verify pass checks the "
                            "likeliest paths through each draft slot's top tokens, in the same K rows: "
                            "more tokens per pass, same output; sampled rows too), chain (the top tokens "
                            "only), auto (default: a tree for greedy rows when the adapter records its "
                            "measured rank rates)")


def block_size_arg(value: str) -> int | str:
    """argparse type of ``--block-size``: an integer or ``auto``."""
    if value == "auto":
        return value
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1 or 'auto', got {value!r}") from None


# ---- cheap checks ----------------------------------------------------------------------------------

def has_adapter(args: argparse.Namespace) -> bool:
    """True if the engine built from ``args`` will have an adapter (given, or the shipped default)."""
    if getattr(args, "adapter", None) is not None:
        return True
    default = DEFAULT_ADAPTERS.get(args.model)
    return default is not None and (default / WEIGHTS).is_file()


def resolve_mode(args: argparse.Namespace) -> str:
    """``--mode``, or its default: ``parallel`` if the drafts have a source (an adapter, or the
    model's self-drafting copy, see :func:`resolve_draft`), else ``ar``."""
    mode = getattr(args, "mode", None)
    explicit = getattr(args, "draft", None)
    draft = resolve_draft(args)
    if explicit in SELF_DRAFTS and not self_drafting_available(args):
        raise OrthrusError(f"--draft {explicit} (self-drafting with a float16 copy of the weights) needs "
                           f"--device cpu and --dtype float32 (got {args.device}, {args.dtype}): "
                           "use --draft ngram, or an adapter's drafts")
    if explicit in ("ngram",) + SELF_DRAFTS:  # n-gram drafts and self-drafting need no adapter
        if mode == "ar":
            raise OrthrusError(f"--draft {explicit} drafts in parallel mode: drop --mode ar (or --draft)")
        return "parallel"
    if mode is None:
        return "parallel" if has_adapter(args) or draft in SELF_DRAFTS else "ar"
    if mode == "parallel" and not has_adapter(args) and draft not in SELF_DRAFTS:
        raise OrthrusError(f"--mode parallel needs an adapter and model '{args.model}' has none shipped: "
                           "pass --adapter PATH, or --adapter init (untrained: exact, but no speedup), "
                           "or draft without one (--draft ngram)")
    return mode


def check_model_args(args: argparse.Namespace) -> None:
    """Validate the model options without reading any weights."""
    device = parse_device(args.device)
    parse_dtype(args.dtype)
    if getattr(args, "draft_precision", "auto") == "int8" and (device.type != "cpu" or args.dtype != "float32"):
        raise OrthrusError(f"--draft-precision int8 needs --device cpu and --dtype float32 (got {args.device}, "
                           f"{args.dtype}): use --draft-precision auto or float32")
    resolve_model(args.model)
    adapter, kind = args.adapter, args.adapter_kind
    if kind is not None:
        AdapterConfig.parse_kind(kind)
        if adapter != "init":
            raise OrthrusError("--adapter-kind only applies to a fresh adapter: use it with --adapter init")
    if adapter is not None and adapter != "init":
        path = Path(adapter).expanduser()
        if not path.is_dir():
            raise OrthrusError(f"adapter '{adapter}' is not a folder: give a folder saved by orthrus "
                               "train (holding adapter.safetensors), or 'init'")
        if not (path / WEIGHTS).is_file():
            raise OrthrusError(f"adapter folder '{adapter}' has no {WEIGHTS}: give a folder saved by "
                               "orthrus train, or 'init'")
    block = getattr(args, "block_size", None)
    if block is not None and block != "auto" and block < 1:
        raise OrthrusError(f"--block-size must be >= 1, got {block}")


def generation_config(args: argparse.Namespace) -> GenerationConfig:
    """The :class:`GenerationConfig` the options describe (validated; the mode resolved)."""
    if args.max_new_tokens <= 0:
        raise OrthrusError(f"--max-new-tokens must be a positive integer, got {args.max_new_tokens}")
    return GenerationConfig(
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
        top_p=args.top_p, seed=args.seed, stop=tuple(args.stop or ()), mode=resolve_mode(args),
        block_size=None if getattr(args, "block_size", None) in (None, "auto") else args.block_size,
        draft=resolve_draft(args), schedule=resolve_schedule(args),
        candidates=getattr(args, "candidates", None), verify=getattr(args, "verify", "auto"))


def self_drafting_available(args: argparse.Namespace) -> bool:
    """Whether the model of ``args`` can self-draft here: float32 on a CPU with fbgemm's fp16 GEMM."""
    return args.device == "cpu" and args.dtype == "float32" and fp16_available()


def resolve_draft(args: argparse.Namespace) -> str:
    """``--draft``, or its default, the fastest exact choice we measured (bench/README.md):

    * ``diffusion`` with ``--schedule one-pass`` (the schedule drafts with the adapter);
    * ``hybrid`` (n-gram drafts where they match, else the adapter's) when ``--adapter`` is given;
    * ``hybrid-self`` (n-gram drafts where they match, else self-drafting) where the model can
      self-draft (float32 on a CPU): 1.99x our AR on 16 HumanEval prompts, against 1.64x for
      ``hybrid`` with the shipped adapter; it needs no adapter, so every model gets it;
    * else ``hybrid`` when the model has a shipped adapter, else ``diffusion`` (then AR mode).
    """
    draft = getattr(args, "draft", None)
    if draft is not None:
        return draft
    if getattr(args, "schedule", "two-pass") == "one-pass":
        return "diffusion"
    if getattr(args, "adapter", None) is None and self_drafting_available(args):
        return "hybrid-self"
    return "hybrid" if has_adapter(args) else "diffusion"


def resolve_schedule(args: argparse.Namespace) -> str:
    """``--schedule``: ``auto`` becomes what the block-size measurement picks (two-pass until it
    runs: see :func:`apply_auto_block_size`)."""
    schedule = getattr(args, "schedule", "two-pass")
    return "two-pass" if schedule == "auto" else schedule


def auto_block_size_wanted(args: argparse.Namespace, gen: GenerationConfig) -> bool:
    """``--block-size auto``, or the default on a CPU with the model's shipped adapter: a K-token
    pass costs more than a 1-token pass there, so the block size (or plain AR) is measured rather
    than taken from the adapter, and CPU users are never made slower than AR by default."""
    if gen.mode != "parallel" or gen.draft in ("ngram",) + SELF_DRAFTS:
        return False  # the calibration measures the adapter's drafts; n-gram and self use their default K
    block = getattr(args, "block_size", None)
    return block == "auto" or getattr(args, "schedule", None) == "auto" or (
        block is None and getattr(args, "adapter", None) is None and parse_device(args.device).type == "cpu"
        and has_adapter(args))


def apply_auto_block_size(args: argparse.Namespace, engine: Orthrus, gen: GenerationConfig,
                          n_prompts: int | None = None) -> GenerationConfig:
    """For ``--block-size auto`` in parallel mode (see :func:`auto_block_size_wanted`): the measured
    choice (block size 1 means AR), timed at the batch size the run will have (``--batch-size``, at
    most ``n_prompts``, at most 8), measured once per setup and then cached.

    The schedule is measured too when the adapter was trained for one-pass (``masked`` blocks):
    ``--schedule auto`` takes the measured one, an explicit ``--schedule`` is kept (and with it
    the measurement is of that schedule's K only when it is two-pass). ``--schedule auto`` with an
    explicit ``--block-size K`` picks the faster schedule at that K. Where the run will verify the
    drafts as trees (greedy, an adapter with rank rates: the default), tree-verified cycles are
    what is calibrated and timed, at each candidate K."""
    if not auto_block_size_wanted(args, gen):
        return gen
    from orthrus.bench.blocksize import DEFAULT_CANDIDATES, cached_block_size
    from orthrus.decoding.tree import verifies_by_tree

    batch = min(getattr(args, "batch_size", 1) or 1, n_prompts or 1 << 30, 8)
    fixed = gen.block_size  # an explicit --block-size with --schedule auto
    adapter = getattr(engine, "adapter", None)
    tree = verifies_by_tree(gen.verify, gen.schedule, gen.temperature,
                            adapter.config.draft_ranks if adapter is not None else None)
    choice = cached_block_size(engine, batch_size=batch,  # measured once per setup; logs why
                               candidates=(fixed,) if fixed else DEFAULT_CANDIDATES, tree=tree)
    auto_schedule = getattr(args, "schedule", None) == "auto"
    if gen.draft == "hybrid":  # the measured K is that of its diffusion cycles (two-pass)
        if choice.block_size <= 1 and not fixed:  # no diffusion cycle pays here: n-gram alone still does
            log.info("hybrid drafts: no diffusion block size pays on this machine; drafting by n-gram only")
            return dataclasses.replace(gen, draft="ngram", block_size=None)
        return dataclasses.replace(gen, block_size=fixed or choice.block_size)
    if fixed:  # the user's K stays; only the schedule is chosen
        return dataclasses.replace(gen, schedule=choice.schedule, candidates=choice.candidates or gen.candidates)
    if choice.block_size <= 1:
        return dataclasses.replace(gen, mode="ar", block_size=None)
    if auto_schedule:
        return dataclasses.replace(gen, block_size=choice.block_size, schedule=choice.schedule,
                                   candidates=choice.candidates or gen.candidates)
    return dataclasses.replace(gen, block_size=choice.block_size)


# ---- loading ---------------------------------------------------------------------------------------

def _stamp(path: Path | None) -> tuple[int, int] | None:
    """(mtime, size) of a file or folder, so a changed file is not served from the engine cache."""
    try:
        st = path.stat() if path is not None else None
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size) if st else None


@functools.lru_cache(maxsize=1)
def _cached_engine(model: str, adapter: str | None, device: str, dtype: str, adapter_kind: str,
                   block_size: int | None, cuda_graphs: bool | None, compile: bool, draft_precision: str,
                   max_draft_rows: int | None | str, stamps: tuple[Any, ...]) -> Orthrus:
    del stamps  # part of the cache key only
    return Orthrus.from_pretrained(model, adapter=adapter, device=device, dtype=dtype, adapter_kind=adapter_kind,
                                   block_size=block_size, cuda_graphs=cuda_graphs, compile=compile,
                                   draft_precision=draft_precision, max_draft_rows=max_draft_rows)


def load_engine(args: argparse.Namespace, reuse: bool = True, job_tokens: int | None = None) -> Orthrus:
    """Check the model options, then load the base model and its adapter.

    ``job_tokens``: the new tokens the command plans (``--compile auto`` compiles long jobs; None:
    a long-running command, see :func:`resolve_compile`).

    With ``reuse`` (default) the same options in one process give back the same engine (one kept),
    which makes repeated in-process calls (tests, notebooks) cheap; callers that change the
    engine's weights must pass ``reuse=False``.
    """
    check_model_args(args)
    kind = args.adapter_kind or "full"
    block = getattr(args, "block_size", None) if args.adapter == "init" else None
    block = None if block == "auto" else block  # auto picks a K <= the adapter's own (32 for init)
    model_path = resolve_model(args.model).path
    adapter_path = (Path(args.adapter).expanduser() / WEIGHTS if args.adapter not in (None, "init")
                    else DEFAULT_ADAPTERS.get(args.model, Path("-")) / WEIGHTS)
    key = (args.model, args.adapter, args.device, args.dtype, kind, block, getattr(args, "cuda_graphs", None),
           resolve_compile(args, job_tokens), getattr(args, "draft_precision", "auto"),
           getattr(args, "max_draft_rows", "auto"), (_stamp(model_path), _stamp(adapter_path)))
    log.info("loading %s (adapter: %s) on %s in %s", args.model, args.adapter or "default",
             args.device, args.dtype)
    t0 = time.perf_counter()
    engine = _cached_engine(*key) if reuse else _cached_engine.__wrapped__(*key)
    log.info("ready in %.1f s (adapter: %s; decoding cycles %s)", time.perf_counter() - t0,
             "none" if engine.adapter is None else engine.adapter.config.kind,
             {True: "compiled on first use", "auto": "compiled on first use where it measures faster",
              False: "eager"}[engine.compile])
    return engine


# ---- prompts ---------------------------------------------------------------------------------------

def read_prompts_jsonl(path: str, start: int = 0) -> list[tuple[Any, str]]:
    """Read ``(id, prompt)`` pairs from a JSON Lines file (``-``: stdin).

    Each non-blank line is an object with a string ``prompt`` and an optional ``id`` (string or
    integer); a row without an id gets ``start`` + its 0-based index among the rows. Errors name
    the line.
    """
    rows: list[tuple[Any, str]] = []
    for where, obj in iter_jsonl(path, "prompts file"):
        prompt = obj.get("prompt")
        if not isinstance(prompt, str):
            got = "missing" if prompt is None else f"a {type(prompt).__name__}"
            raise OrthrusError(f"{where}: 'prompt' must be a string, it is {got}")
        if not prompt.strip():
            raise OrthrusError(f"{where}: the prompt is empty")
        rid = obj.get("id", start + len(rows))
        if not isinstance(rid, (str, int)) or isinstance(rid, bool):
            raise OrthrusError(f"{where}: 'id' must be a string or an integer")
        rows.append((rid, prompt))
    if not rows:
        raise OrthrusError(f"prompts file '{path}' has no prompts")
    return rows
