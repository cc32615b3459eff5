"""Training masks: who may attend to whom in a packed row, for the teacher and for the blocks.

A packed row holds several documents back to back (slot ``j`` belongs to document ``doc[j]``,
``-1`` for padding; positions restart at 0 in every document, as in decoding). Two masks follow:

* **teacher** (AR view, one forward over the row): query slot ``i`` sees key slot ``j`` iff they are
  in the same document and ``j <= i`` -- the *document-causal* mask. With per-document positions this
  is exactly the forward each document would get on its own (tested), so packing changes nothing.
* **blocks** (diffusion view, all anchors of a row in one forward): the block at anchor slot ``s`` is
  ``[x_s, MASK x (K-1)]``; its K queries see the cached AR K/V of slots ``j < s`` of ``s``'s own
  document (``ctx_mask``, one row per block) and, bidirectionally, the K keys of their own block and
  no other. That is exactly what one decoding draft sees (tested against a per-block loop).

On the CPU, :func:`orthrus.models.llama.block_attention` computes this with ``[N, K, S]`` context
scores and ``[N, K, K]`` block scores. On CUDA the same rule is a flex-attention ``mask_mod`` over
the keys ``[cache slots | block keys]`` (:func:`flex_block_attention`), which never materialises
the ``[B, N*K, S]`` score tensor.
"""

from __future__ import annotations

import functools
from typing import Callable

import torch
from torch import Tensor

AttnFn = Callable[[Tensor, Tensor, Tensor, Tensor, Tensor], Tensor]


def document_positions(doc: Tensor) -> Tensor:
    """Positions that restart at 0 in every document: ``doc [B, S]`` -> ``[B, S]`` int64.

    Documents are contiguous runs of equal ``doc`` ids (padding, ``-1``, counts as one run).
    """
    b, s = doc.shape
    idx = torch.arange(s, device=doc.device).expand(b, s)
    starts = torch.ones_like(doc, dtype=torch.bool)
    starts[:, 1:] = doc[:, 1:] != doc[:, :-1]
    first = torch.where(starts, idx, torch.zeros_like(idx)).cummax(dim=1).values  # slot of the run's start
    return idx - first


def document_causal_mask(doc: Tensor) -> Tensor:
    """Teacher mask ``[B, 1, S, S]`` bool: slot i sees slot j iff same document and j <= i.

    Padding slots (``doc == -1``) see each other causally, so no query row is empty (no NaN); no
    real token ever sees them. No sliding window: a row is at most the model's context long (the
    trainer checks), which a sliding-window model caps at its window.
    """
    s = doc.shape[1]
    i = torch.arange(s, device=doc.device)
    mask = (doc[:, :, None] == doc[:, None, :]) & (i[None, None, :] <= i[None, :, None])  # [B, S, S]
    return mask[:, None]


def block_inputs(positions: Tensor, anchors: Tensor, block_size: int) -> Tensor:
    """Positions ``[B, N*K]`` of the blocks at ``anchors [B, N]`` (slot indices): ``pos[s] + 0..K-1``."""
    k = torch.arange(block_size, device=anchors.device)
    return (positions.gather(1, anchors)[:, :, None] + k).flatten(1)


def block_context_mask(doc: Tensor, anchors: Tensor, anchor_valid: Tensor) -> Tensor:
    """``ctx_mask [B, 1, N, S]`` bool: block n (all its queries) sees cache slots ``j < anchors[n]``
    of its document.

    Invalid (padding) anchors see no cache slot at all; their block still sees itself, so softmax
    is defined, and their outputs are ignored by the loss.
    """
    s = doc.shape[1]
    j = torch.arange(s, device=doc.device)
    a_doc = doc.gather(1, anchors)  # [B, N]
    return ((j < anchors[:, :, None]) & (doc[:, None, :] == a_doc[:, :, None]) & anchor_valid[:, :, None])[:, None]


# ---- flex attention (CUDA) ---------------------------------------------------------------------

def block_mask_mod(doc: Tensor, anchors: Tensor, anchor_valid: Tensor, block_size: int):
    """The flex-attention ``mask_mod`` for the keys ``[S cache slots | N*K block keys]``.

    ``mask_mod(b, h, q, kv)`` is True iff query ``q`` (block ``q // K``) may see key ``kv``: a cache
    slot before its anchor in the anchor's document, or a key of its own block. It equals
    the rule :func:`orthrus.models.llama.block_attention` applies (tested against dense masks).
    """
    s = doc.shape[1]
    k = block_size
    a_doc = doc.gather(1, anchors)  # [B, N]

    def mask_mod(b: Tensor, h: Tensor, q: Tensor, kv: Tensor) -> Tensor:
        n = q // k
        a = anchors[b, n]
        in_ctx = (kv < a) & (doc[b, torch.clamp(kv, max=s - 1)] == a_doc[b, n]) & anchor_valid[b, n]
        in_block = (kv >= s) & ((kv - s) // k == n)
        return in_ctx | in_block

    return mask_mod


def flex_block_attention(doc: Tensor, anchors: Tensor, anchor_valid: Tensor, block_size: int,
                         compiled: bool | None = None) -> AttnFn:
    """An attention function for :meth:`DiffusionAdapter.forward` (``attn_fn=``) using flex attention.

    The block-sparse mask is built once per batch and shared by every layer. Keys are the cache
    slots followed by the block's own keys (one ``cat`` per layer: a training-time copy of the
    cache layer, never done in decoding).

    Args:
        doc: ``[B, S]`` document id per slot (-1: padding).
        anchors: ``[B, N]`` anchor slots; anchor_valid: ``[B, N]`` bool.
        block_size: K.
        compiled: use ``torch.compile(flex_attention)`` (the fast kernel); default: on CUDA only
            (on CPU the eager reference path is used, slow but exact -- for tests).
    Returns:
        ``attn(q [B,H,Q,D], k1, v1 [B,Hkv,S,D], k2, v2 [B,Hkv,Q,D]) -> [B, H, Q, D]``.
    """
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    b, s = doc.shape
    q_len = anchors.shape[1] * block_size
    on_cuda = doc.device.type == "cuda"
    compiled = on_cuda if compiled is None else compiled
    mask = create_block_mask(block_mask_mod(doc, anchors, anchor_valid, block_size), B=b, H=None,
                             Q_LEN=q_len, KV_LEN=s + q_len, device=doc.device, _compile=compiled)
    kernel = _compiled_flex() if compiled else flex_attention

    def attn(q: Tensor, k1: Tensor, v1: Tensor, k2: Tensor, v2: Tensor) -> Tensor:
        # one dtype for the kernel: under autocast the cache is bf16 while fp32 q/k norms (the
        # adapter's master weights) can promote q and the block keys to fp32
        dt = k1.dtype
        k = torch.cat((k1, k2.to(dt)), dim=2)  # [B, Hkv, S + Q, D]
        v = torch.cat((v1, v2.to(dt)), dim=2)
        return kernel(q.to(dt), k, v, block_mask=mask, enable_gqa=q.shape[1] != k.shape[1])

    return attn


@functools.lru_cache(maxsize=1)
def _compiled_flex() -> Callable[..., Tensor]:
    """``torch.compile(flex_attention)``, built once per process (compiling is the slow part)."""
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)
