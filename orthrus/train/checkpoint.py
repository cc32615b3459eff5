"""Checkpoints of a training run: the adapter and ``trainer_state.pt`` (atomic writes), resuming
exactly, the run folder (``log.jsonl``, ``train_config.json``) and ``OUT/best``.

:class:`Checkpoints` is a part of :class:`orthrus.train.trainer.Trainer` (a mixin): it reads and
restores the trainer's adapter, optimizer, scheduler, step and RNG states.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import random
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from orthrus.adapter import WEIGHTS
from orthrus.errors import OrthrusError
from orthrus.models.quant import machine_name
from orthrus.train.config import BEST, LOG, RESUME_KEYS, STATE, TRAIN_CONFIG

log = logging.getLogger(__name__)


def _atomic_json_lines(path: Path, lines: list[str]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(lines))
    os.replace(tmp, path)


class Checkpoints:
    """Saving and resuming (a part of the trainer; see the module docstring)."""

    def save(self) -> None:
        """Adapter (``adapter.safetensors``) then ``trainer_state.pt``, each written atomically.

        The state holds its own copy of the weights, so a crash between the two files still
        resumes consistently (from the state). Under DDP every rank calls this: the ranks compare
        a hash of their weights first (they must be identical; a mismatch is a bug, not bad input).
        """
        weights = {k: v.detach().cpu().clone() for k, v in self.adapter.trainable_state_dict().items()}
        digest = hashlib.sha256(b"".join(weights[k].numpy().tobytes() for k in sorted(weights))).hexdigest()
        self.rank_digests = [digest]
        if self.world > 1:
            self.rank_digests = [None] * self.world
            dist.all_gather_object(self.rank_digests, digest)
            if len(set(self.rank_digests)) != 1:
                raise RuntimeError(f"DDP ranks hold different adapter weights at step {self.step}: {self.rank_digests}")
        self.last_saved = self.step
        if self.rank != 0:
            return
        self.adapter.save(self.out)
        state = {
            "version": 1, "step": self.step, "tokens": self.tokens, "config": self.cfg.to_dict(),
            "block_size": self.block_size, "world_size": self.world, "data_hash": self.data_hash,
            "total_steps": self.total_steps,
            "adapter": weights,
            "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
            "rng": {"torch": torch.get_rng_state(), "python": random.getstate(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
        }
        tmp = self.out / f".{STATE}.tmp"
        torch.save(state, tmp)
        os.replace(tmp, self.out / STATE)

    def _resume(self) -> None:
        path = self.out / STATE
        if not path.is_file():
            raise OrthrusError(f"--resume: '{self.out}' has no {STATE} to continue from")
        try:
            state = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as e:
            raise OrthrusError(f"--resume: '{path}' is unreadable: {e}") from e
        old = state["config"]
        old = dict(old, block_kind=old.get("block_kind", "anchor"))  # runs from before --block-kind
        changed = [k for k in RESUME_KEYS if old.get(k) != getattr(self.cfg, k)
                   and not (k == "block_size" and self.cfg.block_size is None)]
        if state.get("world_size") != self.world:
            changed.append(f"processes ({state.get('world_size')} -> {self.world})")
        if state.get("data_hash") != self.data_hash:
            changed.append("the data (its packed rows differ)")
        if changed:
            raise OrthrusError(f"--resume: the run in '{self.out}' was made with different settings: "
                               f"{', '.join(changed)}; keep them or start a new --out")
        if state.get("total_steps") != self.total_steps:
            log.warning("resuming with %d total steps instead of %d: the lr schedule changes from here",
                        self.total_steps, state.get("total_steps"))
        own = dict(self.adapter.named_parameters())
        with torch.no_grad():
            for k, v in state["adapter"].items():
                own[k].copy_(v)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"]["torch"])
        random.setstate(state["rng"]["python"])
        if state["rng"]["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        self.step, self.tokens, self.last_saved = state["step"], state["tokens"], state["step"]
        best = self.out / BEST / "best.json"
        if best.is_file():  # a best kept after the checkpoint still counts: it was evaluated
            self.best = json.loads(best.read_text()).get("eval_acceptance_length")
        log.info("resumed %s at step %d", self.out, self.step)

    def _prepare_out(self) -> None:
        """Resume, or refuse to overwrite a run or an adapter without --resume."""
        if self.cfg.resume:
            self._resume()
        elif (self.out / STATE).exists() or (self.out / WEIGHTS).exists():
            raise OrthrusError(f"'{self.out}' already holds a training run or an adapter: pass --resume to "
                               "continue it, or choose another --out")
        if self.rank == 0:
            self.out.mkdir(parents=True, exist_ok=True)
            logp = self.out / LOG
            kept = []
            if self.cfg.resume and logp.exists():  # drop records past the checkpoint (they are redone)
                for line in logp.read_text().splitlines(keepends=True):
                    try:
                        if json.loads(line).get("step", 0) <= self.step:
                            kept.append(line if line.endswith("\n") else line + "\n")
                    except json.JSONDecodeError:
                        break
            _atomic_json_lines(logp, kept)
            cfgd = dict(self.cfg.to_dict(), block_size=self.block_size, total_steps=self.total_steps,
                        world_size=self.world, machine=machine_name(self.device),
                        threads=torch.get_num_threads())
            (self.out / TRAIN_CONFIG).write_text(json.dumps(cfgd, indent=1))

    def _log(self, record: dict[str, Any]) -> None:
        if self.rank != 0:
            return
        with open(self.out / LOG, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()

    def _evaluated(self, ev: dict[str, Any]) -> None:
        """Log an evaluation; when its held-out acceptance (the first block kind's) beats every
        earlier one of this run, keep this adapter in ``OUT/best``, shaped as a run folder (the
        adapter, ``train_config.json``, the log up to this evaluation), so that it can be
        evaluated, used or shipped (``scripts/ship_adapter.py OUT/best``) like the run itself
        while training goes on: held-out acceptance is noisy and not monotone, and the last
        checkpoint is not always the best.

        The evaluation's rank rates (``eval_draft_ranks``) go into the adapter's config from here
        on, so every adapter the run saves builds its verify tree from its latest evaluation."""
        if ev.get("eval_draft_ranks"):
            self.adapter.config = dataclasses.replace(self.adapter.config, draft_ranks=ev["eval_draft_ranks"])
        self._log(ev)
        acc = ev.get("eval_acceptance_length")
        if self.rank != 0 or acc is None or (self.best is not None and acc <= self.best):
            return
        self.best = acc
        best = self.out / BEST
        tmp = self.out / f".{BEST}.tmp"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        self.adapter.save(tmp)
        shutil.copy2(self.out / TRAIN_CONFIG, tmp / TRAIN_CONFIG)
        shutil.copy2(self.out / LOG, tmp / LOG)
        (tmp / "best.json").write_text(json.dumps({"step": self.step, "eval_acceptance_length": acc}))
        if best.exists():
            shutil.rmtree(best)
        os.replace(tmp, best)
        log.info("best held-out acceptance so far (%.3f at step %d): adapter kept in %s", acc, self.step, best)
