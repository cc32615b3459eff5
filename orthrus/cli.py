"""The ``orthrus`` command: ``generate | chat | distill | train | bench | serve``.

Each subcommand lives in ``orthrus/commands/<name>.py`` and exposes ``register(subparsers)``, which
adds its parser and sets ``func``. Bad input (an :class:`OrthrusError`) prints one line to stderr
and exits with status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from orthrus.errors import OrthrusError

COMMANDS = ("generate", "chat", "distill", "train", "bench", "serve")


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args, **kwargs) -> None:  # noqa: ANN002, ANN003
        # no prefix matching: '--prompt X' must not silently mean '--prompts-file X'
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> None:  # argparse's own errors: one line, exit 2
        print(f"orthrus: error: {message}", file=sys.stderr)
        sys.exit(2)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="orthrus", description="Lossless parallel decoding of frozen LLMs.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging on stderr")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"orthrus.commands.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"orthrus.commands.{name}":
                raise
            continue
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, stream=sys.stderr,
                        format="%(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        return int(args.func(args) or 0)
    except OrthrusError as e:
        print(f"orthrus: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("orthrus: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `orthrus generate ... | head`: the reader left, not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
