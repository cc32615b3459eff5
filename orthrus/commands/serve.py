"""``orthrus serve``: the OpenAI-compatible HTTP server (see :mod:`orthrus.serve.app`).

    orthrus serve --model smollm2-135m --port 8000
    curl localhost:8000/v1/chat/completions -d '{"model": "smollm2-135m", "messages": [...]}'
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
from typing import Any

from orthrus.commands.common import (add_draft_arg, add_model_args, apply_auto_block_size, block_size_arg,
                                     check_model_args, load_engine, resolve_draft, resolve_mode,
                                     resolve_schedule)
from orthrus.config import GenerationConfig
from orthrus.errors import OrthrusError

log = logging.getLogger(__name__)

API_KEY_ENV = "ORTHRUS_API_KEY"
DEFAULT_MAX_BODY_BYTES = 4 * 1024 * 1024  # as orthrus.serve.gate (not imported here: needs the serve extra)
DEFAULT_DRAIN_TIMEOUT = 30.0               # as orthrus.serve.run


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "serve", help="OpenAI-compatible HTTP server with continuous batching",
        description="Serve /v1/chat/completions, /v1/completions, /v1/models, /health and /metrics. "
                    "Concurrent requests are decoded together; greedy output (temperature 0) is "
                    "identical to the frozen model's own.")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="(default: 8000)")
    add_model_args(p)
    g = p.add_argument_group("serving")
    g.add_argument("--mode", choices=("ar", "parallel"), default=None,
                   help="decoding for every request (default: parallel when an adapter is available, else ar)")
    add_draft_arg(g)
    g.add_argument("--block-size", type=block_size_arg, default=None, metavar="K|auto",
                   help="tokens drafted per cycle in parallel mode (default: the adapter's; 32 for init; "
                        "on a CPU with the shipped adapter: auto); auto: measured here at "
                        "--max-batch-size (plain AR when no K would be faster)")
    g.add_argument("--max-batch-size", type=int, default=8, metavar="N",
                   help="requests decoded together; more wait in a queue (default: 8)")
    g.add_argument("--max-queue", type=int, default=256, metavar="N",
                   help="sequences that may wait for a slot; a request past that gets 429 with "
                        "Retry-After (default: 256)")
    g.add_argument("--max-seq-len", type=int, default=None, metavar="N",
                   help="prompt + completion tokens per request (default: min(model context, 2048)); "
                        "the KV cache holds N positions per slot")
    g.add_argument("--warmup", type=int, default=None, metavar="N",
                   help="before listening, decode a short request in 1, 2, 4, ... up to N slots at once, "
                        "so that compiled decoding compiles those cycle shapes before the first clients "
                        "wait on them (0: no warm-up; default: 1 when decoding is compiled, else 0)")
    h = p.add_argument_group("HTTP")
    h.add_argument("--api-key", default=None, metavar="KEY",
                   help=f"require 'Authorization: Bearer KEY' on every /v1 request (else 401); default: "
                        f"${API_KEY_ENV} if set, else no key. /health and /metrics stay open")
    h.add_argument("--max-body-bytes", type=int, default=DEFAULT_MAX_BODY_BYTES, metavar="N",
                   help=f"larger request bodies get 413 (default: {DEFAULT_MAX_BODY_BYTES}, 4 MiB)")
    h.add_argument("--drain-timeout", type=float, default=DEFAULT_DRAIN_TIMEOUT, metavar="S",
                   help="on SIGTERM: new requests get 503, those in flight get S seconds to finish, then "
                        f"the server exits (default: {DEFAULT_DRAIN_TIMEOUT:g})")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    missing = [m for m in ("fastapi", "uvicorn", "prometheus_client") if importlib.util.find_spec(m) is None]
    if missing:
        raise OrthrusError(f"orthrus serve needs {', '.join(missing)}: pip install 'orthrus-lm[serve]'")
    if not 0 <= args.port < 65536:
        raise OrthrusError(f"--port must be in [0, 65535], got {args.port}")
    if args.max_batch_size < 1:
        raise OrthrusError(f"--max-batch-size must be >= 1, got {args.max_batch_size}")
    if args.max_queue < 0:
        raise OrthrusError(f"--max-queue must be >= 0, got {args.max_queue}")
    if args.max_seq_len is not None and args.max_seq_len < 2:
        raise OrthrusError(f"--max-seq-len must be >= 2, got {args.max_seq_len}")
    if args.warmup is not None and args.warmup < 0:
        raise OrthrusError(f"--warmup must be >= 0 (row counts to warm up; 0: none), got {args.warmup}")
    if args.max_body_bytes < 1:
        raise OrthrusError(f"--max-body-bytes must be >= 1, got {args.max_body_bytes}")
    if not args.drain_timeout >= 0:  # also refuses nan
        raise OrthrusError(f"--drain-timeout must be a number of seconds >= 0, got {args.drain_timeout}")
    api_key = args.api_key if args.api_key is not None else os.environ.get(API_KEY_ENV) or None
    if api_key is not None and not api_key.strip():
        raise OrthrusError("--api-key is empty: give a non-empty key, or leave it out to serve without one")
    check_model_args(args)
    mode = resolve_mode(args)
    engine = load_engine(args)
    gen = apply_auto_block_size(argparse.Namespace(**{**vars(args), "batch_size": args.max_batch_size}), engine,
                                GenerationConfig(mode=mode, block_size=None if args.block_size == "auto"
                                                 else args.block_size, draft=resolve_draft(args),
                                                 schedule=resolve_schedule(args), candidates=args.candidates,
                                                 verify=args.verify))
    mode, block_size = gen.mode, gen.block_size

    from orthrus.serve import run as runner
    from orthrus.serve.app import create_app

    app = create_app(engine, model_name=args.model, mode=mode, max_batch_size=args.max_batch_size,
                     max_seq_len=args.max_seq_len, block_size=block_size, draft=gen.draft,
                     schedule=gen.schedule, candidates=gen.candidates, verify=gen.verify, max_queue=args.max_queue,
                     api_key=api_key, max_body_bytes=args.max_body_bytes)
    warmup = args.warmup if args.warmup is not None else int(bool(engine.compile))
    if warmup:
        app.state.server.warm_up(warmup)
    log.info("listening on http://%s:%d/v1%s", args.host, args.port, " (API key required)" if api_key else "")
    runner.serve(app, host=args.host, port=args.port, drain_timeout=args.drain_timeout)
    return 0
