"""Held-out evaluation of a training run: expected acceptance length and loss per block kind.

:class:`Evaluation` is a part of :class:`orthrus.train.trainer.Trainer` (a mixin): it reads the
trainer's adapter, held-out rows (``eval_data``), block size, stride, caches and config. The
step-0 evaluation is cached per adapter and held-out set (``$ORTHRUS_CACHE/evals.json``), so a
warm start does not evaluate again what the run before it ended on.
"""

from __future__ import annotations

import hashlib
import json
import logging
from typing import Any

import numpy as np
import torch

from orthrus.config import BLOCK_KINDS
from orthrus.decoding.tree import RANK_WIDTH, accepted_depth, build_tree
from orthrus.train.blocks import BlockDrafter, draft_blocks, eval_anchor_chunks, teacher_forward
from orthrus.train.data import make_batch
from orthrus.train.loss import accepted_prefix, evaluate_slots

log = logging.getLogger(__name__)

EVAL_CACHE = "evals.json"  # step-0 evaluations, under $ORTHRUS_CACHE
EVAL_VERSION = 3  # in the cache key: 2 added the decode-order acceptance, 3 the rank rates and tree


def decode_order_cycles(accepted: dict[int, int]) -> list[int]:
    """The drafts greedy decoding keeps, cycle after cycle, along one held-out response.

    Args:
        accepted: ``{anchor position: accepted drafts}`` for every anchor of the response whose
            whole block lies in it (the anchor is the last kept token; its block drafts the next
            ``K-1``).
    Returns:
        accepted drafts per cycle, in order: decoding's first cycle drafts after the first response
        token (the prefill's), and each next cycle after the token the verify pass added itself
        (``p + a + 1``); it ends where no whole block fits any more.
    """
    out: list[int] = []
    p = min(accepted, default=None)
    while p is not None and p in accepted:
        out.append(accepted[p])
        p += accepted[p] + 1
    return out


class Evaluation:
    """Held-out evaluation (a part of the trainer; see the module docstring)."""

    @property
    def block_kinds(self) -> tuple[str, ...]:
        """The block kinds this run trains (and evaluates)."""
        return BLOCK_KINDS if self.cfg.block_kind == "mix" else (self.cfg.block_kind,)

    @torch.no_grad()
    def evaluate(self) -> dict[str, Any] | None:
        """Held-out KL / CE and expected acceptance (every anchor whose block lies in a response, or
        every ``eval_stride``-th of them: at most about ``--eval-blocks`` blocks), for each block
        kind the run trains: the ``anchor`` kind's keys have no suffix, the ``masked`` kind's end
        in ``_masked``.

        ``eval_slot_accept[i]``: fraction of blocks whose drafts 1..i+1 all equal the teacher's
        argmax (greedy verification accepts them); ``eval_acceptance_length``: 1 + their sum, the
        expected tokens per verify pass at a position drawn uniformly from the responses.

        Decoding does not draw positions uniformly: each cycle starts right after the token its
        last verify pass had to correct, which is often harder to continue. When every anchor is
        evaluated (stride 1: ``--eval-blocks`` at least the held-out rows' blocks), the anchor
        kind also reports ``eval_decode_acceptance``: the mean tokens per verify pass of greedy
        decoding itself along the held-out responses (:func:`decode_order_cycles`, float32
        drafts), over ``eval_decode_cycles`` cycles (``eval_decode_hist[a]``: the cycles that kept
        ``a`` drafts).

        The anchor kind also reports ``eval_draft_ranks[d][r]``: among blocks whose slots ``1..d``
        were right, how often the teacher's token at slot ``d+1`` has rank ``r`` (< ``RANK_WIDTH``)
        among the student's; the rates the verify tree is built from (``AdapterConfig.draft_ranks``,
        :mod:`orthrus.decoding.tree`). With every anchor evaluated, ``eval_decode_acceptance_tree``
        is decoding's tokens per verify pass with that tree of ``K`` rows (``eval_decode_hist_tree``:
        its cycles per accepted count). Decoding drafts blocks only as deep as its tree; the ranks
        here come from blocks of ``K`` (the same rates within 0.01 for the shipped adapter: README,
        "Tree verification"), so this figure is decoding's up to that difference.
        """
        if self.eval_data is None:
            return None
        record: dict[str, Any] = {"step": self.step}
        for kind in self.block_kinds:
            ev = self._evaluate_kind(kind == "masked")
            suffix = "_masked" if kind == "masked" else ""
            record.update({f"{key}{suffix}": v for key, v in ev.items()})
        return record

    def _evaluate_kind(self, masked: bool) -> dict[str, Any]:
        k, n = self.block_size, self.cfg.anchors_per_seq
        loss_sum = torch.zeros((), device=self.device)
        slots = torch.zeros(k - 1, device=self.device)
        blocks = torch.zeros((), device=self.device)
        count = torch.zeros((), device=self.device)
        # {(held-out row, document): {anchor position: accepted drafts}}, when every anchor is drawn
        per_doc: dict[tuple[int, int], dict[int, int]] | None = {} if self.eval_stride == 1 and not masked else None
        ranks_of: dict[tuple[int, int], dict[int, tuple[int, ...]]] = {}  # the same, the teacher tokens' ranks
        rank_num = torch.zeros(k - 1, RANK_WIDTH, device=self.device)
        rank_den = torch.zeros(k - 1, device=self.device)
        self.adapter.eval()
        base = self.eval_base
        drafter = BlockDrafter(self.adapter if base is self.base else self.adapter.bound_to(base).eval())
        for a in range(0, len(self.eval_data), self.cfg.batch_size):
            rows = np.arange(a, min(a + self.cfg.batch_size, len(self.eval_data)))
            cpu = make_batch(self.eval_data, rows, "cpu")
            batch = cpu.to(self.device)
            cache = self.eval_cache.rows(0, len(rows))
            with self._autocast(self.eval_base):
                th = teacher_forward(base, batch, cache)
                for anchors, valid in eval_anchor_chunks(cpu, n, k, self.eval_stride):
                    anchors, valid = anchors.to(self.device), valid.to(self.device)
                    out = draft_blocks(drafter, base, batch, cache, th, anchors, valid, k, self.use_flex,
                                       valid if masked else None)
                    ls, c, sa, ta, rk = evaluate_slots(base.logits, out.student, out.teacher, out.target,
                                                       out.valid, self.cfg.loss, self.chunk)  # [B, N, K-1]
                    loss_sum += ls
                    count += c
                    acc = accepted_prefix(sa, ta) * valid[:, :, None]
                    slots += acc.sum((0, 1))
                    blocks += valid.sum()
                    # rank rates: slot d's rank, in blocks whose slots before d were right
                    right_before = torch.cat((torch.ones_like(acc[..., :1]), acc[..., :-1]), -1).bool()
                    cond = right_before & out.valid & valid[:, :, None]
                    rank_den += cond.sum((0, 1))
                    rank_num += (torch.nn.functional.one_hot(rk.clamp(max=RANK_WIDTH), RANK_WIDTH + 1)[..., :RANK_WIDTH]
                                 * cond[..., None]).sum((0, 1))
                    if per_doc is not None:
                        kept, pos, rkc = acc.sum(-1).long().cpu(), anchors.cpu(), rk.clamp(max=RANK_WIDTH).cpu()
                        for i, j in valid.cpu().nonzero().tolist():
                            p, key = int(pos[i, j]), (int(rows[i]), int(cpu.doc[i, int(pos[i, j])]))
                            per_doc.setdefault(key, {})[p] = int(kept[i, j])
                            ranks_of.setdefault(key, {})[p] = tuple(rkc[i, j].tolist())
        self.adapter.train()
        nb = max(1.0, blocks.item())
        rates = (slots / nb).tolist()
        out = {"eval_loss": (loss_sum / count.clamp(min=1)).item(),
               "eval_slot_accept": [round(r, 5) for r in rates],
               "eval_acceptance_length": 1.0 + sum(rates), "eval_blocks": int(blocks.item())}
        if not masked:
            rates = (rank_num / rank_den.clamp(min=1)[:, None]).tolist()
            out["eval_draft_ranks"] = [[round(r, 5) for r in row] for row in rates]
        if per_doc:
            def histogram(kept: list[int]) -> list[int]:  # cycles per accepted drafts 0..K-1
                return [kept.count(a) for a in range(k)]

            cycles = [a for doc in per_doc.values() for a in decode_order_cycles(doc)]
            nodes = set(build_tree(out["eval_draft_ranks"], k - 1))
            tree = [a for doc in ranks_of.values()
                    for a in decode_order_cycles({p: accepted_depth(r, nodes) for p, r in doc.items()})]
            out |= {"eval_decode_acceptance": 1.0 + sum(cycles) / len(cycles), "eval_decode_cycles": len(cycles),
                    "eval_decode_hist": histogram(cycles), "eval_decode_acceptance_tree": 1.0 + sum(tree) / len(tree),
                    "eval_decode_hist_tree": histogram(tree)}
        return out

    def _eval_key(self) -> str:
        """What a held-out evaluation depends on: the adapter's weights, the held-out rows, the
        block size and kinds, the sampling of blocks, the loss, the evaluating model and torch."""
        h = hashlib.sha256()
        for k, v in sorted(self.adapter.trainable_state_dict().items()):
            h.update(k.encode())
            h.update(v.detach().float().cpu().numpy().tobytes())
        ev = self.eval_data
        h.update(ev.tokens.tobytes() + ev.doc.tobytes())
        h.update(json.dumps([EVAL_VERSION, self.block_size, list(self.block_kinds), self.eval_stride, self.cfg.anchors_per_seq,
                             self.cfg.batch_size, self.cfg.loss, self.adapter.config.base_fingerprint,
                             str(self.eval_base.dtype), torch.__version__]).encode())
        return h.hexdigest()

    def _first_evaluation(self) -> dict[str, Any] | None:
        """The step-0 evaluation, reused from ``$ORTHRUS_CACHE/evals.json`` when the same adapter
        was already evaluated on the same held-out rows the same way (a warm start from a shipped
        or earlier adapter evaluates what the run before it ended on)."""
        if self.eval_data is None:
            return None
        from orthrus.models.loading import cache_root, read_cache_entries, write_cache_entries

        path = cache_root() / EVAL_CACHE
        key = self._eval_key()
        entries = read_cache_entries(path)
        if isinstance(entries.get(key), dict):
            log.info("step-0 evaluation: the same adapter and held-out rows were evaluated before (%s)", path)
            return {**entries[key], "step": self.step, "cached": True}
        ev = self.evaluate()
        if ev is not None:
            entries[key] = ev
            write_cache_entries(path, entries, "the step-0 evaluation")
        return ev
