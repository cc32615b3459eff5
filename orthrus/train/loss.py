"""Distillation losses and the acceptance metric.

Block slot ``i`` (0..K-2) of the block at anchor ``s`` drafts position ``s+i+1``; its teacher is the
frozen model's next-token distribution at position ``s+i``, i.e. ``p_AR(. | x_<=s+i)``.

* ``kl``: forward KL ``KL(p_teacher || p_student)`` per slot (the paper's choice);
* ``ce``: cross-entropy on the actual next token (for comparison).

Both are averaged over the valid slots, uniformly or with slot ``i`` weighted ``exp(-i / decay)``
(:func:`slot_weights`): a block's slot ``i`` only counts once slots ``0..i-1`` are accepted, so
the later slots matter less to the acceptance length. The vocabulary is large (49k-152k) and the number of slots
per batch can reach tens of thousands on a GPU, so logits are computed a chunk of slots at a time;
with more than one chunk each chunk is checkpointed (its logits are recomputed in the backward pass
instead of being kept), which bounds memory by one chunk.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

LOSSES = ("kl", "ce")
CHUNK_ELEMENTS = 1 << 25  # logits per chunk (x4 bytes, x ~3 live copies): ~400 MB


def _slot_losses(head: Callable[[Tensor], Tensor], student: Tensor, teacher: Tensor, target: Tensor,
                 kind: str) -> Tensor:
    """Loss per slot ``[M]`` (float32) for student hidden ``[M, C]``, teacher hidden ``[M, C]``."""
    log_q = F.log_softmax(head(student), dim=-1)  # [M, V]
    if kind == "ce":
        return -log_q.gather(1, target[:, None])[:, 0]
    with torch.no_grad():
        log_p = F.log_softmax(head(teacher), dim=-1)
    return F.kl_div(log_q, log_p, log_target=True, reduction="none").sum(-1)


def slot_weights(k_minus_1: int, decay: float | None, device: torch.device | str = "cpu") -> Tensor | None:
    """Per-slot loss weights ``[K-1]``: ``exp(-i / decay)`` for slot ``i``; None (uniform) for no decay."""
    if decay is None:
        return None
    return torch.exp(-torch.arange(k_minus_1, dtype=torch.float32, device=device) / decay)


def distill_loss(head: Callable[[Tensor], Tensor], student: Tensor, teacher: Tensor, target: Tensor,
                 valid: Tensor, kind: str = "kl", chunk: int | None = None,
                 weight: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Sum of per-slot losses over the valid slots, and their number (both weighted by ``weight``).

    Args:
        head: hidden ``[M, C]`` -> float32 logits ``[M, V]`` (the frozen LM head).
        student: ``[..., C]`` diffusion-view hidden states of the draft slots (requires grad).
        teacher: ``[..., C]`` AR hidden states at the positions whose next token the slot drafts.
        target: ``[...]`` the actual next tokens (``ce``).
        valid: ``[...]`` bool.
        kind: ``kl`` or ``ce``.
        chunk: slots per chunk (see :func:`chunk_slots`); None: all at once.
        weight: ``[K-1]`` per-slot weights for the last dim of ``valid`` (:func:`slot_weights`);
            None: 1 each.
    Returns:
        ``(loss_sum, count)``: 0-dim float32 tensors; the mean loss is their ratio.
    """
    if kind not in LOSSES:
        raise ValueError(f"unknown loss {kind!r}")
    c = student.shape[-1]
    idx = valid.reshape(-1).nonzero()[:, 0]  # training step, not a decode hot path: a sync is fine
    s, t, y = student.reshape(-1, c)[idx], teacher.reshape(-1, c)[idx], target.reshape(-1)[idx]
    w = None if weight is None else weight.to(torch.float32).expand(valid.shape).reshape(-1)[idx]  # [M]
    count = torch.tensor(float(idx.numel()), device=student.device) if w is None else w.sum()
    if idx.numel() == 0:
        return student.sum() * 0.0, count

    def weighted_sum(loss: Tensor, a: int = 0) -> Tensor:
        return loss.sum() if w is None else (loss * w[a: a + loss.shape[0]]).sum()

    if chunk is None or s.shape[0] <= chunk:
        return weighted_sum(_slot_losses(head, s, t, y, kind)), count
    total = student.new_zeros((), dtype=torch.float32)
    for a in range(0, s.shape[0], chunk):
        part = checkpoint(_slot_losses, head, s[a: a + chunk], t[a: a + chunk], y[a: a + chunk], kind,
                          use_reentrant=False)
        total = total + weighted_sum(part, a)
    return total, count


@torch.no_grad()
def evaluate_slots(head: Callable[[Tensor], Tensor], student: Tensor, teacher: Tensor, target: Tensor,
                   valid: Tensor, kind: str = "kl", chunk: int | None = None
                   ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Held-out evaluation from one LM-head pass over each hidden state: the loss sum over the
    valid slots and their number (as :func:`distill_loss`), the student's and the teacher's
    greedy tokens ``[...]`` for every slot (for :func:`accepted_prefix`), and the rank of the
    teacher's token among the student's logits ``[...]`` (0: the student's top token; for the
    verify tree's rank rates). Arguments as in :func:`distill_loss`; no gradient."""
    if kind not in LOSSES:
        raise ValueError(f"unknown loss {kind!r}")
    c = student.shape[-1]
    s, t, y, v = student.reshape(-1, c), teacher.reshape(-1, c), target.reshape(-1), valid.reshape(-1)
    step = chunk or max(1, s.shape[0])
    losses, s_arg, t_arg, t_rank = [], [], [], []
    for a in range(0, s.shape[0], step):
        log_q = F.log_softmax(head(s[a: a + step]), dim=-1)
        log_p = F.log_softmax(head(t[a: a + step]), dim=-1)
        s_arg.append(log_q.argmax(-1))
        t_arg.append(log_p.argmax(-1))
        t_rank.append((log_q > log_q.gather(1, t_arg[-1][:, None])).sum(-1))
        losses.append(-log_q.gather(1, y[a: a + step, None])[:, 0] if kind == "ce" else
                      F.kl_div(log_q, log_p, log_target=True, reduction="none").sum(-1))
    loss = torch.cat(losses) if losses else s.new_zeros(0)
    total = torch.where(v, loss, torch.zeros_like(loss)).sum(dtype=torch.float32)
    shape = student.shape[:-1]
    empty = torch.zeros(shape, dtype=torch.long, device=student.device)
    return (total, v.sum().float(), torch.cat(s_arg).view(shape) if s_arg else empty,
            torch.cat(t_arg).view(shape) if t_arg else empty, torch.cat(t_rank).view(shape) if t_rank else empty)


def chunk_slots(vocab_size: int) -> int:
    """Slots per loss chunk for a vocabulary of ``vocab_size`` (``CHUNK_ELEMENTS`` logits each)."""
    return max(1, CHUNK_ELEMENTS // vocab_size)


@torch.no_grad()
def accepted_prefix(student_argmax: Tensor, teacher_argmax: Tensor) -> Tensor:
    """Per block, whether each draft slot would be accepted by greedy verification.

    Args:
        student_argmax, teacher_argmax: ``[..., K-1]`` token ids per slot.
    Returns:
        ``[..., K-1]`` float: 1 where this slot and all earlier slots agree (cumulative product).
    """
    return (student_argmax == teacher_argmax).float().cumprod(dim=-1)
