"""Training the diffusion view by self-distillation from the frozen model (METHOD.md, "Training").

One optimizer step, per micro-batch of ``B`` packed rows of ``S`` slots:

1. **Teacher** (no grad): one AR forward of the frozen model over the packed rows with the
   document-causal mask fills a static cache ``[B, Hkv, S, D]`` per layer with the AR K/V and gives
   the hidden state at every slot (the teacher's next-token distribution after the LM head).
2. **Anchors**: ``N`` per row, sampled (without replacement) among response tokens whose next slot
   is in the same document. Block n is ``[x_s, MASK x (K-1)]`` at positions ``pos(s)..pos(s)+K-1``.
3. **Student**: all ``N*K`` block queries of the batch go through the diffusion view in ONE forward,
   reading the teacher's cache through ``ctx_mask`` (slots ``< s`` of s's document) and their own
   block bidirectionally, each block against its own keys (``block_attention``); flex attention on
   CUDA (see ``masks.py``).
4. **Loss**: slot i of a block drafts ``s+i+1``; KL from the teacher at ``s+i`` (or CE on the real
   token), averaged over valid slots (same document, inside the row). Only adapter parameters have
   gradients; the frozen model is never handed to the optimizer and comes out bit-identical.

Packing scheme (why it is correct): documents are laid back to back in a row; positions restart at
0 per document and every mask (teacher and blocks) keeps attention inside a document, so each
document sees exactly what it would see alone, and a block's context never crosses a document
boundary. This is why the teacher pass is :func:`teacher_forward` (the frozen model's own modules,
with a document mask and per-slot cache writes) rather than ``model(tokens, positions, cache)``,
whose mask is causal over positions and whose cache slot is the position (tested equal per document).

Runs are resumable (``trainer_state.pt``: adapter weights in fp32, optimizer, scheduler, step, RNG
states; data order is a pure function of seed, epoch and batch index), multi-process with torchrun
(DDP; rank r takes global batches r, r+W, ...; rank 0 alone logs, evaluates and writes), and stop
with a clear error on a non-finite loss, keeping the last good checkpoint.

Files: ``config.py`` (:class:`TrainConfig`), ``blocks.py`` (the two passes and the anchors),
``masks.py``, ``loss.py``, ``data.py`` (documents, packing), ``evaluation.py`` (held-out
acceptance), ``checkpoint.py`` (saving, resuming, the run folder); this one: the step, the loop,
the time budget and DDP.
"""

from __future__ import annotations

import collections
import copy
import dataclasses
import hashlib
import logging
import math
import os
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from orthrus.adapter import CONFIG, WEIGHTS, DiffusionAdapter
from orthrus.config import AdapterConfig
from orthrus.errors import OrthrusError
from orthrus.models.llama import Transformer
from orthrus.train.data import Document, make_batch, pack, split_eval
from orthrus.train.loss import chunk_slots, distill_loss, slot_weights
from orthrus.train.blocks import (BlockDrafter, anchor_candidates, draft_blocks, masked_blocks, teacher_forward,
                                  train_anchors)
from orthrus.train.checkpoint import Checkpoints
from orthrus.train.config import STATE, TrainConfig, check
from orthrus.train.evaluation import Evaluation

log = logging.getLogger(__name__)

BUDGET_SKIP, BUDGET_PROBE = 3, 10  # --max-minutes: steps not timed, then steps timed


# ---- distributed -----------------------------------------------------------------------------------

def init_distributed(device: torch.device) -> tuple[int, int, int]:
    """``(rank, world_size, local_rank)``; joins the process group when launched by torchrun
    (``RANK`` / ``WORLD_SIZE`` / ``MASTER_ADDR`` from the environment): nccl for CUDA, else gloo."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, 0
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(device)
        dist.init_process_group(backend=backend)
    return dist.get_rank(), dist.get_world_size(), local


def _mix(*values: int) -> int:
    """A 63-bit seed from integers (stable across processes and runs)."""
    return int(np.random.SeedSequence([v & 0xFFFFFFFF for v in values]).generate_state(2, np.uint64)[0] >> 1)


# ---- the trainer -------------------------------------------------------------------------------------

class Trainer(Evaluation, Checkpoints):
    """Trains a :class:`DiffusionAdapter` on documents (see the module docstring).

    Args:
        cfg: the run.
        base: the frozen model, already on its device and dtype (never modified).
        fingerprint: the base's fingerprint (stored with the adapter).
        docs: all documents; the last ``eval_rows`` are held out for evaluation.
        adapter: an adapter to continue from, or None for a fresh one of ``cfg.adapter_kind``.
        progress: show a tqdm bar on stderr (rank 0).
    """

    def __init__(self, cfg: TrainConfig, base: Transformer, fingerprint: str, docs: list[Document],
                 adapter: DiffusionAdapter | None = None, progress: bool = True) -> None:
        self.cfg, self.progress = cfg, progress
        # held-out evaluation runs with the model that decodes: on a CPU a bf16 run (bf16 GEMMs pay
        # on CPUs with AMX) trains a bf16 copy of the float32 model it is given and is judged by the
        # float32 model, which verifies there
        self.eval_base = base
        if (base.device.type == "cpu" and base.dtype == torch.float32 and cfg.base_dtype != "float32"
                and not cfg.eval_only):
            base = copy.deepcopy(base).to(getattr(torch, cfg.base_dtype))
            adapter = adapter.bound_to(base) if adapter is not None else None
        self.base = base
        self.device = base.device
        self.rank, self.world, _ = init_distributed(self.device)
        self.out = Path(cfg.out).expanduser()
        kind, rank = AdapterConfig.parse_kind(cfg.adapter_kind or "full")
        if adapter is not None and cfg.adapter_kind is not None:
            have = (adapter.config.kind, adapter.config.lora_rank if adapter.config.kind == "lora" else 0)
            if have != (kind, rank):
                raise OrthrusError(f"--adapter-kind {cfg.adapter_kind} differs from the continued adapter's "
                                   f"kind ({have[0]}{':' + str(have[1]) if have[1] else ''}): leave it out")
        self.block_size = cfg.block_size or (adapter.config.block_size if adapter is not None else 16)
        check(self.block_size < cfg.seq_len,
              f"--block-size ({self.block_size}) must be smaller than --seq-len ({cfg.seq_len})")
        # the model is never used past its context (for a sliding-window model: its window), so
        # neither are the training rows; the masks need no window then
        check(cfg.seq_len <= base.config.max_context,
              f"--seq-len ({cfg.seq_len}) exceeds the model's context of {base.config.max_context} tokens")
        torch.manual_seed(cfg.seed)  # lora init; DDP broadcasts rank 0's weights anyway
        if adapter is None:
            adapter = DiffusionAdapter.init(base, fingerprint, kind=kind, block_size=self.block_size, lora_rank=rank)
        # the kinds this run trains (a warm start's earlier kinds are not claimed: they may fade)
        adapter.config = dataclasses.replace(adapter.config, block_size=self.block_size,
                                             block_kinds=self.block_kinds)
        # fp32 master weights; under bf16 the forward runs in autocast
        self.adapter = adapter.to(device=self.device, dtype=torch.float32).train().requires_grad_(True)
        base.requires_grad_(False)
        self.use_flex = cfg.use_flex if cfg.use_flex is not None else self.device.type == "cuda"
        check(not self.use_flex or self.device.type == "cuda",
              "--flex needs a CUDA device (on the CPU flex attention has no exact backward pass): use --no-flex")

        train_docs, eval_docs = split_eval(docs, cfg.eval_rows, all_rows=cfg.eval_only)
        if cfg.eval_only:  # every row may be held out: nothing trains
            check(bool(eval_docs), "--eval-only: no held-out rows (--eval-rows N holds out the last N rows)")
        else:
            check(bool(train_docs), "no training rows left after holding out --eval-rows")
        self.eval_data = None
        if eval_docs:
            try:
                self.eval_data = pack(eval_docs, cfg.seq_len)
            except OrthrusError:
                check(not cfg.eval_only, "--eval-only: no held-out row keeps a response within --seq-len")
                log.warning("no held-out row keeps a response within --seq-len: no evaluation")
        self.train_data = self.eval_data if cfg.eval_only else pack(train_docs, cfg.seq_len)
        # evaluate every anchor, or every eval_stride-th one when there are more than --eval-blocks
        self.eval_stride = 1
        if self.eval_data is not None:
            rows = np.arange(len(self.eval_data))
            total = int(anchor_candidates(make_batch(self.eval_data, rows, "cpu"), self.block_size).sum())
            self.eval_stride = max(1, -(-total // cfg.eval_block_budget))
        per_step = cfg.batch_size * cfg.grad_accum * self.world
        self.steps_per_epoch = len(self.train_data) // per_step
        check(self.steps_per_epoch >= 1 or cfg.eval_only,
              f"the data packs into {len(self.train_data)} rows of {cfg.seq_len} tokens, but one step needs "
              f"{per_step} (--batch-size x --grad-accum x processes): add data or lower them")
        limit = math.inf if cfg.max_steps is None else cfg.max_steps
        epochs = cfg.epochs if cfg.epochs is not None else (math.inf if cfg.max_steps else 1)
        self.total_steps = int(min(limit, epochs * self.steps_per_epoch))
        self.planned_steps = self.total_steps  # before --max-minutes fits it
        self.warmup = cfg.warmup if cfg.warmup is not None else max(1, round(0.05 * self.total_steps))
        packed_bytes = self.train_data.tokens.tobytes() + self.train_data.doc.tobytes()
        self.data_hash = hashlib.sha256(packed_bytes).hexdigest()[:16]

        assert not any(p.requires_grad for p in base.parameters())
        if not cfg.eval_only:  # an evaluation needs no optimizer state (two fp32 copies of the adapter)
            params = [p for p in self.adapter.parameters() if p.requires_grad]
            self.optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.95),
                                               weight_decay=cfg.weight_decay)
            self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_factor)
            self.drafter: nn.Module = BlockDrafter(self.adapter)
            if self.world > 1:
                self.drafter = nn.parallel.DistributedDataParallel(self.drafter, device_ids=None)
        self.cache = base.new_cache(cfg.batch_size, cfg.seq_len)
        self.eval_cache = self.cache if self.eval_base is base else self.eval_base.new_cache(cfg.batch_size,
                                                                                             cfg.seq_len)
        self.chunk = chunk_slots(base.config.vocab_size)
        self.slot_weight = slot_weights(self.block_size - 1, cfg.slot_decay, self.device)  # [K-1] or None
        self.step = 0
        self.tokens = 0
        self._orders: dict[int, np.ndarray] = {}
        self.last_saved: int | None = None
        self.best: float | None = None  # the best held-out acceptance so far (its adapter is in OUT/best)
        self.rank_digests: list[str | None] = []

    # ---- schedule, data order --------------------------------------------------------------------

    def _fit_budget(self, per_step: float, elapsed: float, eval_seconds: float = 0.0) -> int:
        """Fit ``total_steps`` to what ``max_minutes`` leaves at ``per_step`` seconds a step (never
        past the steps planned without a budget).

        The evaluations still to come (one every ``eval_every`` steps and one at the end) are
        counted at ``eval_seconds`` each (the first one's time); 5% of the budget is kept for
        checkpoints. The horizon moves both ways: a busy spell cuts it, and when steps get fast
        again it grows back (the cosine schedule is re-aimed at the new last step each time), so a
        transient slowdown does not cost the rest of the run. The warm-up (when it was 5% of the
        steps) follows the horizon. Under DDP rank 0 decides and the others follow, so that every
        rank stops at the same step. Returns the new total.
        """
        left = self.cfg.max_minutes * 60 * 0.95 - elapsed - eval_seconds
        per = per_step + (eval_seconds / self.cfg.eval_every if self.cfg.eval_every else 0.0)
        fit = self.step + max(0, int(left / per))
        if self.world > 1:
            t = torch.tensor([fit], dtype=torch.long, device=self.device)
            dist.broadcast(t, 0)
            fit = int(t.item())
        fit = min(fit, self.planned_steps)
        if fit != self.total_steps:
            log.info("--max-minutes %.1f: %.3f s a step, %d steps fit (of %d planned)", self.cfg.max_minutes,
                     per_step, fit, self.planned_steps)
            self.total_steps = fit
            if self.cfg.warmup is None:
                self.warmup = max(1, round(0.05 * fit))
        return self.total_steps

    def _lr_factor(self, step: int) -> float:
        """Linear warm-up to 1, then cosine down to ``min_lr_ratio`` at the last step."""
        if step < self.warmup:
            return (step + 1) / self.warmup
        progress = (step - self.warmup) / max(1, self.total_steps - self.warmup)
        r = self.cfg.min_lr_ratio
        return r + (1 - r) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    def _rows(self, epoch: int, g: int) -> np.ndarray:
        """Packed row indices of global batch ``g`` of ``epoch`` (a seeded shuffle per epoch)."""
        if epoch not in self._orders:
            self._orders = {epoch: np.random.default_rng([self.cfg.seed, epoch]).permutation(len(self.train_data))}
        b = self.cfg.batch_size
        return self._orders[epoch][g * b: (g + 1) * b]

    def _autocast(self, base: Transformer | None = None):
        """bf16/fp16 autocast around passes of ``base`` (default: the training base) when its
        weights are not float32; else nothing."""
        base = self.base if base is None else base
        if base.dtype == torch.float32:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=base.dtype)

    # ---- one step ------------------------------------------------------------------------------

    def _micro_loss(self, epoch: int, g: int) -> tuple[Tensor, Tensor, int]:
        """Loss summed over the valid slots of global batch ``g``, their number, and its real
        token count."""
        rows = self._rows(epoch, g)
        cpu = make_batch(self.train_data, rows, "cpu")
        gen = torch.Generator().manual_seed(_mix(self.cfg.seed, epoch, g))
        anchors, valid = train_anchors(cpu, self.cfg.anchors_per_seq, gen)
        batch = cpu.to(self.device)
        anchors, valid = anchors.to(self.device), valid.to(self.device)
        with self._autocast():
            th = teacher_forward(self.base, batch, self.cache)
            out = draft_blocks(self.drafter, self.base, batch, self.cache, th, anchors, valid,
                               self.block_size, self.use_flex, masked_blocks(self.cfg.block_kind, anchors))
            loss_sum, count = distill_loss(self.base.logits, out.student, out.teacher, out.target, out.valid,
                                           self.cfg.loss, self.chunk, self.slot_weight)
        return loss_sum, count, self.train_data.real_tokens(rows)

    def _train_step(self) -> dict[str, float]:
        """One optimizer step. The loss is the mean over every valid block slot of the step (all
        micro-batches, all ranks), not a mean of per-micro-batch means: a micro-batch with fewer
        valid slots (short documents, row ends) weighs less, not more."""
        cfg = self.cfg
        epoch, i = divmod(self.step, self.steps_per_epoch)
        sums = torch.zeros(3, device=self.device)  # loss sum, valid slots, real tokens
        for m in range(cfg.grad_accum):
            g = (i * cfg.grad_accum + m) * self.world + self.rank
            sync = m == cfg.grad_accum - 1 or self.world == 1
            with (nullcontext() if sync else self.drafter.no_sync()):
                loss_sum, count, n = self._micro_loss(epoch, g)
                loss_sum.backward()
            sums += torch.stack((loss_sum.detach().float(), count.float(), count.new_tensor(float(n))))
        if self.world > 1:
            dist.all_reduce(sums)  # the same totals on every rank
        params = [p for p in self.adapter.parameters() if p.requires_grad]
        scale = self.world / sums[1].clamp(min=1)  # DDP averaged the summed gradients over ranks
        for p in params:
            if p.grad is not None:
                p.grad.mul_(scale)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.clip)
        loss_sum_v, count_v, tokens_v = sums.tolist()  # one host sync per step (logging, NaN check)
        loss_v = loss_sum_v / max(count_v, 1.0)
        norm_v = grad_norm.item()  # equal on all ranks
        if not (math.isfinite(loss_v) and math.isfinite(norm_v)):
            kept = (f"the last good checkpoint (step {self.last_saved}) is kept in {self.out}"
                    if self.last_saved is not None else "no checkpoint had been written yet")
            raise OrthrusError(f"the loss became {loss_v} (gradient norm {norm_v}) at step {self.step + 1}: "
                               f"training stopped; {kept}. Lower --lr or check the data")
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.tokens += int(tokens_v)
        return {"loss": loss_v, "grad_norm": norm_v, "lr": lr}

    # ---- the loop ------------------------------------------------------------------------------------

    def train(self, stop_after: int | None = None) -> dict[str, Any]:
        """Train to ``total_steps`` (or ``stop_after`` more steps: the run stays resumable).

        Returns a summary: steps, first/last logged loss, evaluation before/after, seconds.
        """
        from tqdm import tqdm

        cfg = self.cfg
        self._prepare_out()
        started = time.perf_counter()
        summary: dict[str, Any] = {"out": str(self.out), "start_step": self.step, "total_steps": self.total_steps}
        eval_seconds = 0.0
        if self.step == 0 and self.rank == 0:
            ev = self._first_evaluation()
            eval_seconds = time.perf_counter() - started
            if ev is not None:
                self._evaluated(ev)
                summary["eval_before"] = ev
        bar = tqdm(total=self.total_steps, initial=self.step, unit="step", file=sys.stderr, dynamic_ncols=True,
                   disable=not self.progress or self.rank != 0)
        window: list[float] = []
        win_tokens, win_time = self.tokens, 0.0
        losses: list[float] = []
        last_eval = None
        cap = self.total_steps if stop_after is None else self.step + stop_after  # stop_after: this call only
        end = min(self.total_steps, cap)
        budget_from = self.step + BUDGET_SKIP  # first steps compile kernels: not timed for the budget
        recent: collections.deque[float] = collections.deque(maxlen=50)  # step times, for the budget
        try:
            while self.step < end:
                t0 = time.perf_counter()
                rec = self._train_step()
                step_time = time.perf_counter() - t0
                win_time += step_time
                if self.step > budget_from:
                    recent.append(step_time)
                if (len(recent) >= BUDGET_PROBE and cfg.max_minutes is not None
                        and (len(recent) == BUDGET_PROBE or self.step % cfg.log_every == 0)):
                    # after the probe, again at every log step: a run that slows down (a busy
                    # machine) still ends within --max-minutes, and one that speeds up again gets
                    # its steps back. The median of the recent steps: a pause (SIGSTOP for a
                    # benchmark) spends the budget's wall clock but does not make the steps still
                    # to come look slower
                    per_step = statistics.median(recent)
                    fitted = self._fit_budget(per_step, time.perf_counter() - started, eval_seconds)
                    end = fitted if stop_after is None else min(fitted, cap)
                window.append(rec["loss"])
                bar.update(1)
                bar.set_postfix(loss=f"{rec['loss']:.4f}", lr=f"{rec['lr']:.2e}")
                if self.step % cfg.log_every == 0 or self.step == end:
                    loss = sum(window) / len(window)
                    losses.append(loss)
                    self._log({"step": self.step, "epoch": round(self.step / self.steps_per_epoch, 4),
                               "loss": loss, "lr": rec["lr"], "grad_norm": rec["grad_norm"],
                               "tokens": self.tokens,
                               "tokens_per_second": (self.tokens - win_tokens) / max(win_time, 1e-9),
                               "elapsed_s": round(time.perf_counter() - started, 3)})
                    window, win_tokens, win_time = [], self.tokens, 0.0
                if cfg.eval_every and self.step % cfg.eval_every == 0 and self.rank == 0:
                    last_eval = self.evaluate()
                    if last_eval is not None:
                        self._evaluated(last_eval)
                if cfg.save_every and self.step % cfg.save_every == 0:
                    self.save()
        finally:
            bar.close()
        if self.last_saved != self.step:
            self.save()
        finished_now = self.step == self.total_steps > summary["start_step"]
        if self.rank == 0 and finished_now and (last_eval is None or last_eval["step"] != self.step):
            last_eval = self.evaluate()
            if last_eval is not None:
                self._evaluated(last_eval)
        summary.update(steps=self.step, total_steps=self.total_steps, first_loss=losses[0] if losses else None,
                       last_loss=losses[-1] if losses else None, eval_after=last_eval,
                       world_size=self.world, rank_weight_digests=self.rank_digests,
                       seconds=round(time.perf_counter() - started, 2))
        return summary


def run_training(cfg: TrainConfig, progress: bool = True) -> dict[str, Any]:
    """Load the base (and the adapter to continue from), read the data, train. For the CLI."""
    from orthrus.models.loading import load_base, parse_device, parse_dtype
    from orthrus.train.data import read_documents

    parse_device(cfg.device)
    parse_dtype(cfg.base_dtype)
    out = Path(cfg.out).expanduser()
    if cfg.eval_only:
        check(not cfg.resume, "--eval-only evaluates an adapter; --resume continues a run: pass one of them")
    elif not cfg.resume and ((out / STATE).exists() or (out / WEIGHTS).exists()):
        raise OrthrusError(f"'{out}' already holds a training run or an adapter: pass --resume to continue "
                           "it, or choose another --out")
    if cfg.resume and not (out / STATE).is_file():
        raise OrthrusError(f"--resume: '{out}' has no {STATE} to continue from")
    if cfg.adapter is not None and not (Path(cfg.adapter).expanduser() / CONFIG).is_file():
        raise OrthrusError(f"--adapter '{cfg.adapter}' is not an adapter folder (no {CONFIG})")
    device = cfg.device
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and device.startswith("cuda"):
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    # on a CPU the Trainer makes its own low-precision copy and evaluates with the float32 model
    loaded = load_base(cfg.model, device=device, dtype="float32" if device == "cpu" else cfg.base_dtype)
    docs = read_documents(cfg.data, loaded.tokenizer, loaded.model.config.vocab_size)
    adapter = None
    if cfg.adapter is not None:
        adapter = DiffusionAdapter.load(cfg.adapter, loaded.model, loaded.fingerprint)
    trainer = Trainer(cfg, loaded.model, loaded.fingerprint, docs, adapter, progress=progress)
    if cfg.eval_only:
        ev = trainer._first_evaluation()
        if cfg.save_ranks and ev and ev.get("eval_draft_ranks"):
            DiffusionAdapter.rewrite_config(cfg.adapter, dataclasses.replace(
                trainer.adapter.config, draft_ranks=ev["eval_draft_ranks"]))
            log.info("rank rates written into %s", cfg.adapter)
        return {"eval_only": True, "adapter": cfg.adapter, "data": cfg.data,
                "eval_rows": len(split_eval(docs, cfg.eval_rows, all_rows=True)[1]),
                "block_size": trainer.block_size, "eval": ev}
    try:
        summary = trainer.train()
        if trainer.world > 1:  # every rank done before the group goes: a rank that tore it down first
            dist.barrier()     # sometimes aborted the other in gloo ("terminate called without an active exception")
        return summary
    finally:
        if trainer.world > 1 and dist.is_initialized():
            dist.destroy_process_group()
