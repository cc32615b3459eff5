"""``orthrus chat``: a terminal chat that streams each answer and prints a stats line after it.

The conversation is kept as chat messages and the whole history is re-encoded with the model's chat
template every turn. ``/reset`` clears the history, ``/exit`` (or end of input) quits. The answer
goes to stdout; prompts and the stats line (tok/s, TPF, acceptance length) go to stderr, so
``orthrus chat < questions.txt > answers.txt`` keeps the answers clean.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any, TextIO

from orthrus.commands.common import (add_generation_args, add_model_args, apply_auto_block_size,
                                     generation_config, load_engine)
from orthrus.config import GenerationConfig
from orthrus.engine import Orthrus
from orthrus.errors import OrthrusError

HELP = "commands: /reset clears the conversation, /exit quits (or end of input: Ctrl-D)"


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("chat", help="interactive chat in the terminal (streams, prints tok/s and TPF)",
                              description=f"Chat with the model. {HELP}.")
    add_model_args(p)
    add_generation_args(p)
    p.add_argument("--system", default=None, metavar="TEXT", help="a system message for the conversation")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    gen = generation_config(args)  # cheap checks before the model loads
    engine = load_engine(args, job_tokens=0)  # interactive: --compile auto stays eager
    gen = apply_auto_block_size(args, engine, gen, n_prompts=1)
    chat_loop(engine, gen, sys.stdin, sys.stdout, sys.stderr, system=args.system)
    return 0


def stats_line(tokens: int, seconds: float, tpf: float, acceptance: float, finish: str) -> str:
    rate = tokens / seconds if seconds > 0 else 0.0
    return (f"[{tokens} tokens, {rate:.1f} tok/s, TPF {tpf:.2f}, acceptance {acceptance:.2f}, "
            f"{seconds:.2f} s, finish: {finish}]")


def chat_loop(engine: Orthrus, gen: GenerationConfig, stdin: TextIO, out: TextIO, err: TextIO,
              system: str | None = None) -> list[dict[str, str]]:
    """Run the chat until ``/exit`` or end of input; returns the final history (for tests)."""
    interactive = stdin.isatty()
    start: list[dict[str, str]] = [{"role": "system", "content": system}] if system else []
    history = list(start)
    if interactive:
        print(HELP, file=err)
    while True:
        if interactive:
            err.write("> ")
            err.flush()
        line = stdin.readline()
        if not line:  # end of input
            break
        text = line.strip()
        if text == "/exit":
            break
        if text == "/reset":
            history = list(start)
            print("[conversation cleared]", file=err)
            continue
        if not text:
            continue
        if text.startswith("/"):
            print(f"unknown command {text.split()[0]}: {HELP}", file=err)
            continue
        history.append({"role": "user", "content": text})
        try:
            reply = _answer(engine, gen, history, out, err)
        except OrthrusError as e:  # e.g. the conversation outgrew the context: say so, keep going
            history.pop()
            print(f"error: {e} (/reset starts a new conversation)", file=err)
            continue
        history.append({"role": "assistant", "content": reply})
    return history


def _answer(engine: Orthrus, gen: GenerationConfig, history: list[dict[str, str]], out: TextIO,
            err: TextIO) -> str:
    """Stream one reply to ``out``; print its stats line to ``err``; return the reply text."""
    ids = engine.encode(history)
    t0 = time.perf_counter()
    parts: list[str] = []
    last = None
    try:
        for ev in engine.stream([ids], gen, batch_size=1):
            if ev.text:
                parts.append(ev.text)
                out.write(ev.text)
                out.flush()
            last = ev
    except KeyboardInterrupt:  # Ctrl-C stops this answer, not the chat
        out.write("\n")
        print("[interrupted]", file=err)
        return "".join(parts)
    seconds = time.perf_counter() - t0
    out.write("\n")
    out.flush()
    if last is not None:
        row = last.row
        print(stats_line(len(row.tokens), seconds, row.stats.tpf, row.stats.acceptance_length,
                         row.finish_reason or "-"), file=err)
        err.flush()
    return "".join(parts)
