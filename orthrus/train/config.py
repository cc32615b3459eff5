"""A training run's configuration (``orthrus train``'s options) and the names of its files."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from orthrus.config import BLOCK_KINDS, DTYPES, AdapterConfig
from orthrus.errors import OrthrusError
from orthrus.models.loading import DEFAULT_MODEL
from orthrus.train.loss import LOSSES

STATE = "trainer_state.pt"
LOG = "log.jsonl"
TRAIN_CONFIG = "train_config.json"
BEST = "best"  # sub-folder: the adapter of the run's best held-out evaluation, shaped as a run folder
# options that fix the data order and the meaning of a step: a resumed run must keep them
RESUME_KEYS = ("seq_len", "batch_size", "grad_accum", "anchors_per_seq", "block_size", "seed",
               "eval_rows", "adapter_kind", "loss", "block_kind", "slot_decay")
TRAIN_BLOCK_KINDS = BLOCK_KINDS + ("mix",)  # --block-kind; mix: alternate anchors of a row


def check(cond: bool, msg: str) -> None:
    """A clear error (:class:`OrthrusError`, ``msg``) unless ``cond``: bad options, bad data."""
    if not cond:
        raise OrthrusError(msg)


@dataclass(frozen=True)
class TrainConfig:
    """One training run (saved as ``train_config.json`` and inside ``trainer_state.pt``).

    ``max_steps`` and ``epochs``: training stops at whichever comes first; with neither, one epoch.
    ``max_minutes``: a time budget; once a few steps are timed, and again at every log step (a run
    that slows down still ends in time), the step count (and the lr schedule's horizon) is cut to
    what fits, so the cosine decay still ends at the last step.
    ``adapter_kind`` and ``block_size`` None: the continued adapter's, else ``full`` and 16.
    ``warmup`` None: 5% of the steps. ``block_kind``: which blocks to train (``BLOCK_KINDS``, or
    ``mix``: every other anchor of a row is a ``masked`` block, so one adapter drafts for both
    schedules). ``slot_decay``: weigh slot ``i``'s loss by ``exp(-i / slot_decay)`` (None: uniform).
    ``eval_only``: evaluate the adapter on the held-out rows and stop (nothing trained, nothing
    written; ``out`` unused; ``save_ranks``: except the measured rank rates, written into the adapter's config). ``eval_rows`` None: the last 2% of documents (none under 20). ``dtype`` None: float32 on CPU,
    bfloat16 on CUDA (then bf16 autocast, fp32 adapter weights). ``bfloat16`` on a CPU trains the
    same way on a bf16 copy of the float32 model (2x faster on CPUs with AMX) and evaluates with
    the float32 model, which is what decodes on a CPU. ``use_flex`` None: on CUDA.
    """

    data: str
    out: str
    model: str = DEFAULT_MODEL
    adapter: str | None = None
    adapter_kind: str | None = None
    max_steps: int | None = None
    epochs: int | None = None
    max_minutes: float | None = None
    block_size: int | None = None
    seq_len: int = 512
    anchors_per_seq: int = 16
    batch_size: int = 2
    grad_accum: int = 1
    lr: float = 5e-4
    min_lr_ratio: float = 0.1
    warmup: int | None = None
    weight_decay: float = 0.0
    clip: float = 1.0
    loss: str = "kl"
    device: str = "cpu"
    dtype: str | None = None
    resume: bool = False
    seed: int = 0
    log_every: int = 1
    eval_every: int = 100
    save_every: int = 100
    eval_rows: int | None = None
    eval_blocks: int | None = None
    use_flex: bool | None = None
    block_kind: str = "anchor"
    slot_decay: float | None = None
    eval_only: bool = False
    save_ranks: bool = False

    def __post_init__(self) -> None:
        check(not self.save_ranks or (self.eval_only and self.adapter is not None),
              "--save-ranks writes an evaluated adapter's rank rates: use it with --eval-only and --adapter DIR")
        check(self.block_kind in TRAIN_BLOCK_KINDS,
              f"--block-kind must be one of {', '.join(TRAIN_BLOCK_KINDS)}, got {self.block_kind!r}")
        if self.adapter_kind is not None:
            AdapterConfig.parse_kind(self.adapter_kind)
        check(self.max_steps is None or self.max_steps >= 1, f"--max-steps must be >= 1, got {self.max_steps}")
        check(self.epochs is None or self.epochs >= 1, f"--epochs must be >= 1, got {self.epochs}")
        check(self.max_minutes is None or (math.isfinite(self.max_minutes) and self.max_minutes > 0),
              f"--max-minutes must be a positive number, got {self.max_minutes}")
        check(self.block_size is None or self.block_size >= 2,
              f"--block-size must be >= 2 (a block drafts K-1 tokens), got {self.block_size}")
        check(self.seq_len >= 3, f"--seq-len must be >= 3, got {self.seq_len}")
        check(self.block_size is None or self.block_size < self.seq_len,
              f"--block-size ({self.block_size}) must be smaller than --seq-len ({self.seq_len})")
        for name in ("anchors_per_seq", "batch_size", "grad_accum", "log_every"):
            check(getattr(self, name) >= 1, f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        for name in ("eval_every", "save_every"):
            check(getattr(self, name) >= 0, f"--{name.replace('_', '-')} must be >= 0 (0: at the end only)")
        check(math.isfinite(self.lr) and self.lr > 0, f"--lr must be a positive number, got {self.lr}")
        check(0 <= self.min_lr_ratio <= 1, f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        check(self.warmup is None or self.warmup >= 0, f"--warmup must be >= 0, got {self.warmup}")
        check(self.weight_decay >= 0, f"--weight-decay must be >= 0, got {self.weight_decay}")
        check(self.clip > 0, f"gradient clipping must be > 0, got {self.clip}")
        check(self.loss in LOSSES, f"--loss must be one of {', '.join(LOSSES)}, got {self.loss!r}")
        check(self.dtype is None or self.dtype in DTYPES, f"--dtype must be one of {', '.join(DTYPES)}")
        check(self.eval_rows is None or self.eval_rows >= 0, f"--eval-rows must be >= 0, got {self.eval_rows}")
        check(self.slot_decay is None or (math.isfinite(self.slot_decay) and self.slot_decay > 0),
              f"--slot-decay must be a positive number, got {self.slot_decay}")
        check(self.eval_blocks is None or self.eval_blocks >= 1, f"--eval-blocks must be >= 1, got {self.eval_blocks}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def eval_block_budget(self) -> int:
        """``eval_blocks``, or its default: 4096 on CUDA, 256 on a CPU, where a float32 evaluation
        of the default model took ~50 s for 508 blocks (1 thread, beside other work): at 256 blocks
        and ``--eval-every 200``, ~3% of a bf16 run of 3.7-s steps."""
        if self.eval_blocks is not None:
            return self.eval_blocks
        return 4096 if self.device.startswith("cuda") else 256

    @property
    def base_dtype(self) -> str:
        return self.dtype or ("bfloat16" if self.device.startswith("cuda") else "float32")
