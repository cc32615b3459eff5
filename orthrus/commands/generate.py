"""``orthrus generate``: complete prompts from the command line or a JSONL file.

Plain output streams text to stdout as it is generated (one prompt, or ``--batch-size 1``: live;
several prompts decoded together: each under a header as it finishes). ``--json`` prints one JSON
object per prompt, in input order, each as soon as it and every earlier row are done (rows finish
out of order under continuous batching; finished work is never held back longer than that).
Logs and the final summary line go to stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any, TextIO

from orthrus.commands.common import (add_generation_args, add_model_args, apply_auto_block_size,
                                     generation_config, load_engine,
                                     read_prompts_jsonl)
from orthrus.engine import Completion, run_stats
from orthrus.errors import OrthrusError


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "generate", help="generate text for prompts (parallel decoding when an adapter is available)",
        description="Generate completions. Greedy output is identical to the frozen model's own; "
                    "sampling has its exact distribution.")
    p.add_argument("prompts", nargs="*", metavar="PROMPT", help="prompt text (one chat user turn each)")
    p.add_argument("--prompts-file", default=None, metavar="FILE.jsonl",
                   help="JSON Lines, one {\"prompt\": ..., \"id\": ...} per line ('-': stdin); "
                        "added after the PROMPT arguments")
    add_model_args(p)
    add_generation_args(p)
    p.add_argument("--batch-size", type=int, default=8, metavar="N",
                   help="prompts decoded together, continuously refilled (default: 8)")
    p.add_argument("--no-chat-template", action="store_true",
                   help="feed the prompt text as it is, without the model's chat template")
    p.add_argument("--json", action="store_true",
                   help="print JSON Lines: id, prompt, text, token_ids, finish_reason, stats")
    p.set_defaults(func=run)


def collect_prompts(args: argparse.Namespace) -> list[tuple[Any, str]]:
    """``(id, prompt)`` for the PROMPT arguments (id: their index), then the file's rows."""
    rows: list[tuple[Any, str]] = []
    for i, prompt in enumerate(args.prompts):
        if not prompt.strip():
            raise OrthrusError(f"prompt {i} is empty: give some text")
        rows.append((i, prompt))
    if args.prompts_file is not None:
        # a file row without an id is numbered by its place among all prompts
        rows += read_prompts_jsonl(args.prompts_file, start=len(rows))
    if not rows:
        raise OrthrusError("no prompt given: pass PROMPT arguments or --prompts-file FILE.jsonl")
    return rows


def run(args: argparse.Namespace) -> int:
    # cheap checks first, so bad input fails before the model is loaded
    if args.batch_size < 1:
        raise OrthrusError(f"--batch-size must be >= 1, got {args.batch_size}")
    rows = collect_prompts(args)
    gen = generation_config(args)
    engine = load_engine(args, job_tokens=len(rows) * gen.max_new_tokens)
    gen = apply_auto_block_size(args, engine, gen, len(rows))

    ids = [rid for rid, _ in rows]
    prompts = [p for _, p in rows]
    out = sys.stdout
    live = not args.json and (len(rows) == 1 or args.batch_size == 1)
    done: dict[int, Completion] = {}
    next_out = 0  # --json: rows [0, next_out) are printed
    started: set[int] = set()  # live output: rows whose header is printed
    t0 = time.perf_counter()
    # the engine's request ids are input positions; the user's ids may repeat or be strings
    for ev in engine.stream(prompts, gen, batch_size=args.batch_size,
                            chat_template=not args.no_chat_template, stream_text=live):
        i = ev.request_id
        if live:
            if len(rows) > 1 and i not in started:
                started.add(i)
                _header(out, ids[i])
            out.write(ev.text)
            out.flush()
        if ev.finish_reason is None:
            continue
        r = ev.row
        done[i] = Completion(ids[i], prompts[i], r.text, r.tokens, r.finish_reason, r.stats,
                             len(r.prompt_ids), r.error)
        if r.error is not None:
            print(f"orthrus: prompt {ids[i]}: {r.error}", file=sys.stderr)
        if args.json:
            while next_out in done:
                out.write(json.dumps(done[next_out].to_dict(), ensure_ascii=False) + "\n")
                next_out += 1
            out.flush()
        elif live:
            out.write("\n")
            out.flush()
        else:
            _header(out, ids[i])
            out.write(r.text + "\n")
            out.flush()
    seconds = time.perf_counter() - t0
    completions = [done[i] for i in range(len(rows))]
    total = run_stats(completions, seconds)
    # tokens and tok/s: every generated token over the wall time (prefill included); TPF and
    # acceptance length: the decoder's counters (DecodeStats), as defined in METHOD.md
    tokens = sum(len(c.token_ids) for c in completions)
    summary = (f"orthrus: {len(rows)} prompt(s), {tokens} tokens in {seconds:.2f} s: "
               f"{tokens / seconds if seconds > 0 else 0.0:.1f} tok/s, {total.forward_passes} forward passes "
               f"(draft {total.draft_passes} + verify {total.verify_passes}), TPF {total.tpf:.2f}")
    if gen.mode == "parallel":
        summary += f", acceptance length {total.acceptance_length:.2f}"
    draft = f", draft {gen.draft}" if gen.mode == "parallel" and gen.draft != "diffusion" else ""
    print(f"{summary} [mode {gen.mode}{draft}]", file=sys.stderr)
    failed = sum(c.finish_reason == "error" for c in completions)
    return 1 if failed else 0


def _header(out: TextIO, rid: Any) -> None:
    out.write(f"=== {rid} ===\n")
