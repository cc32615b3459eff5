"""``orthrus train``: fit a diffusion adapter on self-distilled data.

    orthrus train --data runs/data.jsonl --out runs/adapter --max-steps 1000
    torchrun --nproc-per-node 8 -m orthrus.cli train --data ... --out ... --device cuda

DIR gets ``adapter.safetensors`` + ``adapter_config.json`` (usable with ``--adapter DIR``),
``log.jsonl`` (one JSON object per logged step and per evaluation), ``train_config.json`` and
``trainer_state.pt`` (for ``--resume``). See ``orthrus.train.trainer`` for the scheme.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from orthrus.config import DTYPES
from orthrus.errors import OrthrusError
from orthrus.models.loading import DEFAULT_MODEL


def register(subparsers: Any) -> None:
    from orthrus.train.config import TrainConfig as C

    p = subparsers.add_parser(
        "train", help="train a diffusion adapter by self-distillation (KL to the frozen model)",
        description="Train the diffusion view of a frozen model on JSON Lines data from orthrus distill "
                    "(prompt_ids/response_ids) or prompt/response text. Runs under torchrun for DDP.")
    p.add_argument("--data", required=True, metavar="FILE.jsonl", help="training data")
    p.add_argument("--out", default=None, metavar="DIR", help="output folder (adapter, log, state); required "
                   "unless --eval-only")
    p.add_argument("--eval-only", action="store_true",
                   help="evaluate --adapter (else a fresh one) on the held-out rows (--eval-rows, "
                        "--eval-blocks, --block-size) and print the result as JSON; trains and writes nothing")
    p.add_argument("--save-ranks", action="store_true",
                   help="with --eval-only: write the measured rank rates (eval_draft_ranks) into --adapter's "
                        "config, so that decoding builds its verify tree from them (training runs record "
                        "them at every evaluation)")
    g = p.add_argument_group("model")
    g.add_argument("--model", default=DEFAULT_MODEL, help=f"frozen base model (default: {DEFAULT_MODEL})")
    g.add_argument("--adapter", default=None, metavar="DIR", help="continue from this adapter (default: fresh)")
    g.add_argument("--adapter-kind", default=None, metavar="full|lora:R",
                   help="fresh adapter's kind (default: full)")
    g.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default: cpu)")
    g.add_argument("--dtype", default=None, choices=DTYPES,
                   help="base model dtype (default: float32 on cpu, bfloat16 + autocast on cuda)")
    g = p.add_argument_group("schedule")
    g.add_argument("--max-steps", type=int, default=None, metavar="N", help="optimizer steps (default: one epoch)")
    g.add_argument("--epochs", type=int, default=None, metavar="N",
                   help="passes over the data (with --max-steps: whichever ends first)")
    g.add_argument("--max-minutes", type=float, default=None, metavar="M",
                   help="time budget: after timing a few steps, train only as many steps as fit in M "
                        "minutes (the lr schedule ends at the last of them)")
    g.add_argument("--lr", type=float, default=C.lr, help=f"peak learning rate (default: {C.lr})")
    g.add_argument("--warmup", type=int, default=None, metavar="STEPS",
                   help="linear warm-up steps, then cosine decay to lr/10 (default: 5%% of the steps)")
    g.add_argument("--weight-decay", type=float, default=C.weight_decay, help="AdamW (default: 0)")
    g.add_argument("--loss", choices=("kl", "ce"), default=C.loss,
                   help="kl: forward KL to the frozen model (default); ce: cross-entropy on the tokens")
    g.add_argument("--slot-decay", type=float, default=None, metavar="D",
                   help="weigh block slot i's loss by exp(-i/D): later slots count only once the earlier "
                        "ones are accepted (default: uniform)")
    g.add_argument("--seed", type=int, default=C.seed, help="data order, anchors, init (default: 0)")
    g = p.add_argument_group("batches")
    g.add_argument("--block-size", type=int, default=None, metavar="K",
                   help="tokens per drafted block (default: the continued adapter's, else 16)")
    g.add_argument("--block-kind", default="anchor", choices=("anchor", "masked", "mix"),
                   help="blocks to train: anchor, [x_s, MASK..] (the two-pass schedule's draft); masked, "
                        "[MASK..] without x_s (the one-pass schedule's); mix: half of each (default: anchor)")
    g.add_argument("--seq-len", type=int, default=C.seq_len, metavar="S",
                   help=f"packed row length; longer documents are cut (default: {C.seq_len})")
    g.add_argument("--anchors-per-seq", type=int, default=C.anchors_per_seq, metavar="N",
                   help=f"blocks trained per row (default: {C.anchors_per_seq})")
    g.add_argument("--batch-size", type=int, default=C.batch_size, metavar="B",
                   help=f"rows per micro-batch per process (default: {C.batch_size})")
    g.add_argument("--grad-accum", type=int, default=C.grad_accum, metavar="A",
                   help="micro-batches per optimizer step (default: 1)")
    g.add_argument("--flex", dest="use_flex", action="store_true", default=None,
                   help="flex attention for the blocks (default on cuda)")
    g.add_argument("--no-flex", dest="use_flex", action="store_false", help="dense masks (default on cpu)")
    g = p.add_argument_group("logging and checkpoints")
    g.add_argument("--log-every", type=int, default=C.log_every, metavar="N", help="(default: 1)")
    g.add_argument("--eval-every", type=int, default=C.eval_every, metavar="N",
                   help=f"held-out eval every N steps, plus before and after (0: only those; default: {C.eval_every})")
    g.add_argument("--eval-rows", type=int, default=None, metavar="N",
                   help="held-out rows: the last N of the data (default: 2%%, none under 20 rows)")
    g.add_argument("--eval-blocks", type=int, default=C.eval_blocks, metavar="N",
                   help="held-out blocks per evaluation, at most about N: every k-th anchor when the "
                        "held-out rows have more (default: 4096 on CUDA, 256 on a CPU); with every "
                        "anchor evaluated, also the acceptance greedy decoding gets along the responses")
    g.add_argument("--save-every", type=int, default=C.save_every, metavar="N",
                   help=f"checkpoint every N steps and at the end (0: at the end; default: {C.save_every})")
    g.add_argument("--resume", action="store_true", help="continue the run in --out (optimizer, data position)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from orthrus.train.config import TrainConfig
    from orthrus.train.trainer import run_training

    if args.out is None and not args.eval_only:
        raise OrthrusError("--out DIR is required (the folder for the adapter, log and state), unless --eval-only")
    cfg = TrainConfig(
        data=args.data, out=args.out or "", eval_only=args.eval_only, model=args.model, adapter=args.adapter, adapter_kind=args.adapter_kind,
        max_steps=args.max_steps, epochs=args.epochs, max_minutes=args.max_minutes, block_size=args.block_size, seq_len=args.seq_len,
        anchors_per_seq=args.anchors_per_seq, batch_size=args.batch_size, grad_accum=args.grad_accum,
        lr=args.lr, warmup=args.warmup, weight_decay=args.weight_decay, loss=args.loss, device=args.device,
        dtype=args.dtype, resume=args.resume, seed=args.seed, log_every=args.log_every,
        eval_every=args.eval_every, save_every=args.save_every, eval_rows=args.eval_rows, eval_blocks=args.eval_blocks,
        use_flex=args.use_flex, block_kind=args.block_kind, slot_decay=args.slot_decay, save_ranks=args.save_ranks)
    summary = run_training(cfg, progress=not args.no_progress)
    if args.eval_only:
        print(json.dumps(summary))
        return 0
    if int(os.environ.get("RANK", "0")) == 0:
        ev0, ev1 = summary.get("eval_before"), summary.get("eval_after")
        acc = "".join(f", eval acceptance length{sfx.replace('_', ' ')} {ev0[key]:.3f} -> {ev1[key]:.3f}"
                      for sfx in ("", "_masked") for key in [f"eval_acceptance_length{sfx}"]
                      if ev0 and ev1 and key in ev0 and key in ev1)
        first, last = summary.get("first_loss"), summary.get("last_loss")
        losses = f"loss {first:.4f} -> {last:.4f}" if first is not None else "no steps run"
        print(f"orthrus train: {summary['steps']} steps in {summary['seconds']:.1f} s, {losses}{acc} -> "
              f"{summary['out']}", file=sys.stderr)
        print(json.dumps(summary))
    return 0
