"""The two passes of a training step and the anchors they run at.

* :func:`teacher_forward`: the frozen model over packed rows (document-causal), filling the cache
  with the AR K/V and giving the teacher's hidden states.
* :func:`draft_blocks`: all blocks of the rows through the diffusion view in one forward
  (:class:`BlockDrafter`, what DDP wraps), with each slot's teacher state and target.
* Anchors: :func:`train_anchors` (sampled), :func:`eval_anchor_chunks` (every block inside a
  response), :func:`masked_blocks` (which blocks are of the ``masked`` kind).

``orthrus.train.trainer`` explains the scheme; ``orthrus.train.masks`` the masks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from orthrus.adapter import DiffusionAdapter
from orthrus.cache import KVCache
from orthrus.models.llama import Transformer, cached_attention, rope_cos_sin
from orthrus.train.data import Batch
from orthrus.train.masks import block_context_mask, block_inputs, document_causal_mask, flex_block_attention


@torch.no_grad()
def teacher_forward(base: Transformer, batch: Batch, cache: KVCache) -> Tensor:
    """The frozen AR forward over packed rows: fills ``cache`` slots ``0..S-1`` with K/V.

    The same computation as :meth:`Transformer.forward` (its modules, in its order), with two
    differences that packing needs: the mask is document-causal and K/V go to slot ``j`` of the row
    while rope uses the per-document position.

    Args:
        base: the frozen model.
        batch: ``B`` packed rows of ``S`` slots.
        cache: at least ``B`` rows and ``S`` slots.
    Returns:
        Final-normed hidden states ``[B, S, C]`` (teacher logits: ``base.logits`` of them).
    """
    b, s = batch.tokens.shape
    slots = torch.arange(s, device=batch.tokens.device).expand(b, s)
    mask = document_causal_mask(batch.doc)  # [B, 1, S, S]
    cos, sin = rope_cos_sin(batch.positions, base.inv_freq, base.dtype)
    h = base.model.embed_tokens(batch.tokens)
    for i, layer in enumerate(base.model.layers):
        attn = layer.self_attn
        q, k, v = attn.project(layer.input_layernorm(h), cos, sin)
        cache.write(i, slots, k, v)
        h = layer.ffn(h + attn.out(cached_attention(q, k, v, mask)))
    return base.model.norm(h)


class BlockDrafter(nn.Module):
    """The diffusion view plus its block inputs: what DDP wraps (everything with a gradient)."""

    def __init__(self, adapter: DiffusionAdapter) -> None:
        super().__init__()
        self.adapter = adapter

    def forward(self, base: Transformer, anchor_tokens: Tensor, positions: Tensor, cache: KVCache,
                kv_len: int, ctx_mask: Tensor | None, attn_fn: Any = None,
                masked: Tensor | None = None) -> Tensor:
        """``anchor_tokens [B, N]``, ``positions [B, N*K]`` -> hidden ``[B, N*K, C]``; ``masked
        [B, N]`` bool (None: none) marks ``masked`` blocks (slot 0 a mask, not the anchor token)."""
        b, n = anchor_tokens.shape
        k = positions.shape[1] // n
        flat = None if masked is None else masked.reshape(-1)
        embeds = self.adapter.block_embeds(base, anchor_tokens.reshape(-1), k, flat).view(b, n * k, -1)
        return self.adapter(base, embeds, positions, cache, kv_len, ctx_mask, k, attn_fn)


@dataclass
class BlockOutputs:
    """Per draft slot ``[B, N, K-1, ...]``: student and teacher hidden states, target tokens, validity."""

    student: Tensor  # [B, N, K-1, C]
    teacher: Tensor  # [B, N, K-1, C] teacher hidden at s+i (predicts s+i+1)
    target: Tensor   # [B, N, K-1] the actual token at s+i+1
    valid: Tensor    # [B, N, K-1] bool


def draft_blocks(drafter: nn.Module, base: Transformer, batch: Batch, cache: KVCache, teacher_hidden: Tensor,
                 anchors: Tensor, anchor_valid: Tensor, block_size: int, use_flex: bool = False,
                 masked: Tensor | None = None) -> BlockOutputs:
    """All blocks of a batch in one diffusion forward (``cache`` must hold the teacher's K/V).

    Args:
        drafter: a :class:`BlockDrafter` (or DDP around one).
        teacher_hidden: ``[B, S, C]`` from :func:`teacher_forward` on the same batch.
        anchors: ``[B, N]`` anchor slots; anchor_valid: ``[B, N]`` bool (False: padding anchor).
        masked: ``[B, N]`` bool, the ``masked`` blocks (None: all are ``anchor`` blocks). Both kinds
            see the same context and draft the same targets; a masked block does not see ``x_s``.
    """
    b, s = batch.tokens.shape
    n, k = anchors.shape[1], block_size
    positions = block_inputs(batch.positions, anchors, k)  # [B, N*K]
    if use_flex:
        attn_fn, ctx_mask = flex_block_attention(batch.doc, anchors, anchor_valid, k), None
    else:
        attn_fn, ctx_mask = None, block_context_mask(batch.doc, anchors, anchor_valid)  # [B, 1, N, S]
    hidden = drafter(base, batch.tokens.gather(1, anchors), positions, cache, s, ctx_mask, attn_fn, masked)
    student = hidden.view(b, n, k, -1)[:, :, : k - 1]  # slot K-1 would draft past the block
    src = anchors[:, :, None] + torch.arange(k - 1, device=anchors.device)  # [B, N, K-1]: s+i
    tgt = src + 1
    tgt_c = tgt.clamp(max=s - 1)
    same_doc = batch.doc.gather(1, tgt_c.flatten(1)).view_as(tgt) == batch.doc.gather(1, anchors)[:, :, None]
    valid = anchor_valid[:, :, None] & (tgt < s) & same_doc
    teacher = teacher_hidden.gather(1, src.clamp(max=s - 1).flatten(1)[..., None].expand(-1, -1, hidden.shape[-1]))
    return BlockOutputs(student, teacher.view(b, n, k - 1, -1),
                        batch.tokens.gather(1, tgt_c.flatten(1)).view_as(tgt), valid)


def masked_blocks(kind: str, anchors: Tensor) -> Tensor | None:
    """Which blocks at ``anchors [B, N]`` are ``masked`` ones for a ``--block-kind``: ``[B, N]``
    bool, or None (all ``anchor`` blocks). ``mix`` alternates along the row (anchors are sorted, so
    both kinds cover the whole row)."""
    if kind == "anchor":
        return None
    if kind == "masked":
        return torch.ones(anchors.shape, dtype=torch.bool, device=anchors.device)
    return (torch.arange(anchors.shape[1], device=anchors.device) % 2 == 1).expand(anchors.shape)


def train_anchors(batch: Batch, n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Sample up to ``n`` anchors per row: response tokens whose next slot is in the same document.

    Returns ``anchors [B, N]`` (slot indices, sorted) and ``valid [B, N]`` (rows with fewer
    candidates get padding anchors). ``batch`` and ``generator`` must be on the CPU (determinism).
    """
    ok = anchor_candidates(batch, 2)
    n = min(n, ok.shape[1])
    score = torch.rand(ok.shape, generator=generator).masked_fill(~ok, -1.0)
    top, idx = score.topk(n, dim=1)
    idx, order = idx.sort(dim=1)
    return idx, top.gather(1, order) >= 0


def anchor_candidates(batch: Batch, span: int) -> Tensor:
    """``[B, S]`` bool: slot s is a response token and slots s..s+span-1 are in its document."""
    resp, doc = batch.response, batch.doc
    s = doc.shape[1]
    ok = resp.clone()
    ok[:, s - span + 1:] = False
    if span > 1:
        ok[:, : s - span + 1] &= doc[:, span - 1:] == doc[:, : s - span + 1]
    return ok


def eval_anchor_chunks(batch: Batch, n: int, block_size: int, stride: int = 1) -> list[tuple[Tensor, Tensor]]:
    """Every ``stride``-th anchor whose whole block lies in its response, in chunks of ``n`` per row."""
    ok = anchor_candidates(batch, block_size)
    if stride > 1:
        ok &= (ok.cumsum(1) - 1) % stride == 0
    count = ok.sum(1)  # [B]
    order = torch.argsort((~ok).to(torch.int8), dim=1, stable=True)  # candidates first, in order
    chunks = []
    for c in range(0, int(count.max()), n):
        width = min(n, order.shape[1] - c)
        chunks.append((order[:, c: c + width], torch.arange(c, c + width) < count[:, None]))
    return chunks
