"""``orthrus bench``: tokens per second, TPF, acceptance and exactness of every mode on one prompt set.

    orthrus bench --prompts humaneval --limit 10 --modes ar,parallel,hf --adapter init \\
        --block-size 4 --max-new-tokens 128 --out bench/results/NAME

prints one fixed table and writes ``NAME.json`` and ``NAME.png`` (see ``bench/README.md``).
"""

from __future__ import annotations

import argparse
import math
import shlex
from typing import Any

import torch

from orthrus.config import SELF_BLOCK_SIZE
from orthrus.commands.common import add_model_args, check_model_args, has_adapter, load_engine
from orthrus.errors import OrthrusError


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "bench", help="benchmark AR, parallel and transformers decoding on a prompt set",
        description="Run the same prompts (greedy, same max new tokens) through each mode and report "
                    "tokens/s, TPF, acceptance length, speedups, exact match vs AR and peak memory.")
    p.add_argument("--prompts", default="humaneval", metavar="humaneval|mtbench|sharegpt|FILE.jsonl",
                   help="a named prompt set or a JSONL file with a 'prompt' field per line (default: humaneval)")
    p.add_argument("--limit", type=int, default=10, metavar="N",
                   help="first N prompts of the set (default: 10; 0 = all)")
    p.add_argument("--modes", default="ar,parallel,hf", metavar="LIST",
                   help="comma list of ar, parallel (two-pass diffusion drafts; a verify tree where the adapter "
                        "records its rank rates), chain (parallel verifying the drafts' top tokens only), onepass (the one-pass "
                        "schedule), hybrid (n-gram drafts where they match, else diffusion), ngram "
                        "(n-gram drafts, no adapter needed), self (self-drafting: the model's fp16 copy "
                        "drafts, no adapter needed), hybrid-self (n-gram where it matches, else self), "
                        "hf, hf-pld (default: ar,parallel,hf)")
    add_model_args(p)
    p.add_argument("--block-size", default=None, metavar="K|auto",
                   help="parallel block size; 'auto': measured on this device (1 = AR when nothing "
                        "pays); default: the adapter's (32 for --adapter init)")
    p.add_argument("--ngram-block-size", type=int, default=None, metavar="K",
                   help="block size of the ngram mode (default: --block-size, else 8)")
    p.add_argument("--self-block-size", type=int, default=None, metavar="K",
                   help=f"block size of the self and hybrid-self modes (default: {SELF_BLOCK_SIZE})")
    p.add_argument("--candidates", type=int, default=None, metavar="C",
                   help="onepass: candidate next blocks drafted per pass (default: 2)")
    p.add_argument("--max-new-tokens", type=int, default=256, metavar="N", help="(default: 256)")
    p.add_argument("--batch-size", type=int, default=1, metavar="N", help="prompts per round (default: 1)")
    p.add_argument("--warmup", type=int, default=1, metavar="N",
                   help="run the first N prompts through every mode first, untimed (default: 1)")
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="CPU threads for torch (default: torch's own choice); recorded in the report")
    p.add_argument("--pass-costs", action="store_true",
                   help="after the runs, time one decoding cycle of each schedule at the block size (AR, "
                        "two-pass, one-pass) and record them in the JSON and the table")
    p.add_argument("--journal", default=None, metavar="FILE.jsonl",
                   help="append each finished round to FILE and, when FILE exists, resume from it: its "
                        "rounds are not run again (it must come from the same machine, model, adapter, "
                        "settings and prompts; checked). For runs longer than a quiet stretch of the machine")
    p.add_argument("--max-minutes", type=float, default=None, metavar="M",
                   help="start no round after M minutes; the report covers the rounds done (marked "
                        "incomplete). With --journal, rerun the same command to go on")
    p.add_argument("--out", default=None, metavar="PATH",
                   help="write PATH.json and PATH.png (e.g. bench/results/NAME); default: table only")
    p.set_defaults(func=run)


def _block_size(spec: str | None) -> tuple[int | None, bool]:
    """``--block-size`` -> (K or None, auto?)."""
    if spec is None:
        return None, False
    if spec == "auto":
        return None, True
    if not spec.isdigit() or int(spec) < 1:
        raise OrthrusError(f"--block-size must be a positive integer or 'auto', got {spec!r}")
    return int(spec), False


def _command(args: argparse.Namespace, block: int | str | None) -> str:
    """The command line that reproduces this run, every option spelled out (for the report)."""
    parts = ["orthrus", "bench", "--prompts", args.prompts, "--limit", str(args.limit), "--modes", args.modes,
             "--model", args.model, "--device", args.device, "--dtype", args.dtype,
             "--max-new-tokens", str(args.max_new_tokens), "--batch-size", str(args.batch_size),
             "--warmup", str(args.warmup)]
    if args.adapter is not None:
        parts += ["--adapter", args.adapter]
    if args.adapter_kind is not None:
        parts += ["--adapter-kind", args.adapter_kind]
    if block is not None:
        parts += ["--block-size", str(block)]
    if args.candidates is not None:
        parts += ["--candidates", str(args.candidates)]
    if args.ngram_block_size is not None:
        parts += ["--ngram-block-size", str(args.ngram_block_size)]
    if args.self_block_size is not None:
        parts += ["--self-block-size", str(args.self_block_size)]
    if args.threads is not None:
        parts += ["--threads", str(args.threads)]
    if args.pass_costs:
        parts.append("--pass-costs")
    if args.journal:
        parts += ["--journal", args.journal]
    if args.max_minutes is not None:
        parts += ["--max-minutes", str(args.max_minutes)]
    if args.out:
        parts += ["--out", args.out]
    return shlex.join(parts)


def run(args: argparse.Namespace) -> int:
    from orthrus.bench import ADAPTER_MODES, BenchSettings, format_table, parse_modes, run_bench
    from orthrus.bench.journal import check_journal_path
    from orthrus.bench.report import check_plotting
    from orthrus.datasets import load_prompts

    # cheap checks first: bad input fails before the model loads
    modes = parse_modes(args.modes)
    block, auto = _block_size(args.block_size)
    for name in ("max_new_tokens", "batch_size"):
        if getattr(args, name) < 1:
            raise OrthrusError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.limit < 0 or args.warmup < 0:
        raise OrthrusError("--limit and --warmup must be >= 0")
    if args.max_minutes is not None and not (math.isfinite(args.max_minutes) and args.max_minutes > 0):
        raise OrthrusError(f"--max-minutes must be a positive number, got {args.max_minutes}")
    if args.threads is not None:
        if args.threads < 1:
            raise OrthrusError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    need = [m for m in modes if m in ADAPTER_MODES]
    if need and not has_adapter(args):
        raise OrthrusError(f"mode '{need[0]}' needs an adapter: pass --adapter PATH or --adapter init, "
                           "or drop it from --modes")
    for name in ("candidates", "ngram_block_size", "self_block_size"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise OrthrusError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    args.block_size = block  # load_engine reads it (the block size of a fresh --adapter init)
    check_model_args(args)
    if args.journal:
        check_journal_path(args.journal)
    if args.out:
        check_plotting()
    prompts = load_prompts(args.prompts, limit=args.limit or None)
    # --compile auto compiles a long bench only: a short one (the setup script's) would spend minutes compiling
    engine = load_engine(args, job_tokens=len(prompts) * args.max_new_tokens * len(modes))
    settings = BenchSettings(modes=modes, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                             warmup=args.warmup, block_size=block, candidates=args.candidates,
                             ngram_block_size=args.ngram_block_size, self_block_size=args.self_block_size)
    command = _command(args, block="auto" if auto else block)
    report = run_bench(engine, prompts, settings, out=args.out, block_size_auto=auto,
                       prompt_source=args.prompts, limit=args.limit or None, command=command,
                       adapter_source=args.adapter, pass_costs=args.pass_costs, journal=args.journal,
                       max_minutes=args.max_minutes)
    st, env = report["settings"], report["environment"]
    n = env["cpu_threads"]
    print(f"{report['model']['name']} {st['dtype']} on {env['device_name']} ({env['device']}, "
          f"{n} CPU thread{'s' * (n != 1)}) | {st['prompts']}: {st['n_prompts']} prompts, "
          f"{st['max_new_tokens']} new tokens, batch {st['batch_size']}, warm-up {st['warmup']}")
    if not st["complete"]:
        print(f"INCOMPLETE: the time budget ({args.max_minutes} min) covered {st['n_prompts']} of "
              f"{st['n_prompts_planned']} prompts" + ("; rerun the same command to go on" if args.journal else ""))
    if report["journal"]:
        j = report["journal"]
        print(f"journal {j['path']}: {j['rounds']} rounds, {j['resumed_rounds']} of them from earlier runs "
              f"({j['processes']} process{'es' * (j['processes'] != 1)} wrote it)")
    if report["block_size_choice"]:
        print(f"block size auto: {report['block_size_choice']['reason']}")
    print(format_table(report["results"]))
    if report.get("pass_costs"):
        pc = report["pass_costs"]
        for label, table in (("compiled" if "eager" in pc else "", pc), ("eager", pc.get("eager"))):
            if table:
                print(f"pass costs{' ' + label if label else ''} (one cycle, median ms; x the AR step): " + ", ".join(
                    f"{key.removesuffix('_ms')} {v:.1f}" + (f" ({table[key[:-3] + '_x_ar']:.2f}x)" if key != "ar_ms" else "")
                    for key, v in table.items() if key.endswith("_ms")))
    if args.out:
        print(f"wrote {args.out}.json and {args.out}.png")
    return 0
