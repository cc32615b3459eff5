"""The diffusion view: per-layer attention projections of its own plus a learned mask embedding.

Everything else (embeddings, norms, MLPs, final norm, LM head) is the frozen model's. Kinds:

* ``full``: copies of each layer's q/k/v/o projections (and q/k norms), as in the paper.
* ``lora``: the frozen projections plus a rank-R delta ``B @ A`` (``B`` zero-initialised, so a fresh
  adapter drafts exactly like ``full`` does at init); q/k norms are trainable copies. A small file.

Saved as ``adapter.safetensors`` + ``adapter_config.json`` (the :class:`AdapterConfig`, which
records the block size, the shape and the base model's fingerprint). Loading onto another base, or
a corrupt file, is refused with a clear message.
"""

from __future__ import annotations

import copy
import json
import math
import os
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor, nn

from orthrus.cache import KVCache
from orthrus.config import AdapterConfig
from orthrus.errors import OrthrusError
from orthrus.models.llama import (Attention, InferenceLinear, Transformer, cached_attend, causal_mask,
                                  block_attention, merge_heads, packing_available)
from orthrus.models.quant import int8_linear

WEIGHTS = "adapter.safetensors"
CONFIG = "adapter_config.json"


class LoRALinear(nn.Module):
    """``base(x) + (alpha / r) * B(A(x))`` with ``base`` frozen and shared with the AR view."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float) -> None:
        super().__init__()
        self.base = [base]  # a list keeps the frozen layer out of this module's parameters/state dict
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, device=base.weight.device,
                                               dtype=base.weight.dtype))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, device=base.weight.device,
                                               dtype=base.weight.dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.scale = alpha / rank

    def forward(self, x: Tensor) -> Tensor:
        return self.base[0](x) + (x @ self.lora_A.t() @ self.lora_B.t()) * self.scale

    @property
    def weight(self) -> Tensor:
        """The merged dense weight ``W + scale * B @ A`` ``[out, in]`` (a new tensor; decoding
        merges once, see ``DiffusionAdapter.prepare_inference``): a draft pass then costs what a
        frozen pass costs."""
        return self.base[0].weight + self.scale * (self.lora_B @ self.lora_A)

    @property
    def bias(self) -> Tensor | None:
        return self.base[0].bias


def _diffusion_attention(base_attn: Attention, cfg: AdapterConfig) -> Attention:
    attn = copy.deepcopy(base_attn)  # full: own copies of every projection (and q/k norms)
    if cfg.kind == "lora":
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            setattr(attn, name, LoRALinear(getattr(base_attn, name), cfg.lora_rank, cfg.lora_alpha))
    return attn.requires_grad_(True)


class SplitAttention:
    """The attention projections of one layer for a pass whose first ``n`` rows are AR-view
    queries (the frozen projections) and whose other rows are diffusion-view queries (the
    adapter's), as the one-pass cycle needs (:meth:`DiffusionAdapter.verify_and_draft`).

    A LoRA adapter (deltas on the frozen projections) runs the frozen q/k/v and o GEMMs once over
    all rows and adds the rank-R delta to the diffusion rows only: each frozen weight is read once
    per pass, and the delta costs two thin GEMMs. A ``full`` adapter has weights of its own: its
    rows get their own GEMMs. Built by the adapter for decoding (not a module; weights detached).
    """

    PROJ = ("q_proj", "k_proj", "v_proj", "o_proj")

    def __init__(self, frozen: Attention, diff: Attention, pack: bool = False) -> None:
        self.frozen, self.diff, self.n = frozen, diff, 0
        mods = [getattr(diff, name) for name in self.PROJ]
        self.delta = all(isinstance(m, LoRALinear) and m.base[0] is getattr(frozen, name)
                         for m, name in zip(mods, self.PROJ))
        if self.delta:
            with torch.no_grad():
                # A_q, A_k, A_v stacked [3R, C]; B_q, B_k, B_v as one block-diagonal
                # [N_q + N_k + N_v, 3R] with the scale folded in: two GEMMs for the q/k/v deltas,
                # prepacked like the frozen weights (a small GEMM re-packs its weight every call)
                a_qkv = torch.cat([m.lora_A for m in mods[:3]])
                b_qkv = torch.block_diag(*[m.lora_B * m.scale for m in mods[:3]])
                self.a_qkv, self.b_qkv = (InferenceLinear([w], [None], pack) for w in (a_qkv, b_qkv))
                self.a_o, self.b_o = (InferenceLinear([w], [None], pack)
                                      for w in (mods[3].lora_A, mods[3].lora_B * mods[3].scale))

    def at(self, n: int) -> "SplitAttention":
        """This layer's projections with the first ``n`` rows on the AR view (a shallow copy)."""
        view = copy.copy(self)
        view.n = n
        return view

    def _norm(self, q: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
        if self.frozen.q_norm is None:
            return q, k
        n = self.n
        q1, k1 = self.frozen.qk_norm(q[:, :n], k[:, :n])
        q2, k2 = self.diff.qk_norm(q[:, n:], k[:, n:])
        return torch.cat((q1, q2), 1), torch.cat((k1, k2), 1)

    def project(self, x: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``x [B, T, C]`` -> q ``[B, H, T, D]``, k, v ``[B, Hkv, T, D]``; rows ``>= n`` diffusion."""
        n = self.n
        if self.delta:
            y = self.frozen.fused_qkv(x)  # every row through the frozen weights, once
            y[:, n:] += self.b_qkv.fused(self.a_qkv.fused(x[:, n:]))
            q, k, v = self.frozen.split_qkv(y)
        else:
            parts = zip(self.frozen.linear_qkv(x[:, :n]), self.diff.linear_qkv(x[:, n:]))
            q, k, v = (torch.cat(p, dim=1) for p in parts)
        return self.frozen.heads(q, k, v, cos, sin, self._norm)

    def out(self, y: Tensor) -> Tensor:
        """``y [B, H, T, D]`` -> ``[B, T, C]`` (the rows' own output projections)."""
        n = self.n
        y = merge_heads(y)
        if self.delta:
            o = self.frozen.linear_o(y)
            o[:, n:] += self.b_o.fused(self.a_o.fused(y[:, n:]))
            return o
        return torch.cat((self.frozen.linear_o(y[:, :n]), self.diff.linear_o(y[:, n:])), dim=1)


class DiffusionAdapter(nn.Module):
    """The trainable diffusion view of one frozen :class:`Transformer`."""

    def __init__(self, base: Transformer, cfg: AdapterConfig) -> None:
        super().__init__()
        if cfg.num_layers != base.config.num_layers or cfg.hidden_size != base.config.hidden_size:
            raise OrthrusError(
                f"adapter shape (layers={cfg.num_layers}, hidden={cfg.hidden_size}) does not match the "
                f"base model (layers={base.config.num_layers}, hidden={base.config.hidden_size})")
        self.config = cfg
        self.layers = nn.ModuleList(_diffusion_attention(layer.self_attn, cfg) for layer in base.model.layers)
        # a not-yet-known token; starts at the mean token embedding
        self.mask_embedding = nn.Parameter(base.model.embed_tokens.weight.detach().mean(0).clone())

    @classmethod
    def init(cls, base: Transformer, fingerprint: str, kind: str = "full", block_size: int = 32,
             lora_rank: int = 0, lora_alpha: float | None = None) -> "DiffusionAdapter":
        """A fresh adapter whose projections equal the frozen model's."""
        cfg = AdapterConfig(kind=kind, block_size=block_size, lora_rank=lora_rank,
                            lora_alpha=float(lora_alpha if lora_alpha is not None else lora_rank),
                            base_fingerprint=fingerprint, base_arch=base.config.arch,
                            num_layers=base.config.num_layers, hidden_size=base.config.hidden_size)
        return cls(base, cfg)

    def prepare_inference(self, pack: bool | None = None, int8: bool = False) -> None:
        """Merge LoRA deltas into dense weights and (fp32 on a CPU) prepack them, for decoding;
        the frozen model's :meth:`~orthrus.models.llama.Transformer.prepare_inference` explains why.

        ``int8``: the merged projections as int8 weights instead (``orthrus.models.quant``; drafts
        only, so outputs stay exact), to go with the base's
        :meth:`~orthrus.models.llama.Transformer.prepare_draft`.
        """
        if pack is None:
            w = self.mask_embedding
            pack = w.device.type == "cpu" and w.dtype == torch.float32 and packing_available()
        with torch.no_grad():
            for attn in self.layers:
                if int8:
                    attn.qkv = int8_linear([attn.q_proj, attn.k_proj, attn.v_proj])
                    attn.o = int8_linear([attn.o_proj])
                else:
                    attn.prepare_inference(pack)
        self._split = None  # rebuilt from the current weights by the next one-pass cycle

    def __getstate__(self) -> dict:  # copies leave the decoding-only split projections behind
        state = self.__dict__.copy()
        state["_split"] = None
        return state

    def split_attentions(self, base: Transformer) -> list[SplitAttention]:
        """The per-layer :class:`SplitAttention` of a one-pass cycle (built once per prepare)."""
        split = self.__dict__.get("_split")
        if split is None or split[0].frozen is not base.model.layers[0].self_attn:
            w = self.mask_embedding
            pack = w.device.type == "cpu" and w.dtype == torch.float32 and packing_available()
            split = [SplitAttention(layer.self_attn, attn, pack) for layer, attn in zip(base.model.layers, self.layers)]
            self.__dict__["_split"] = split
        return split

    def forward(self, base: Transformer, embeds: Tensor, positions: Tensor, cache: KVCache, kv_len: int,
                ctx_mask: Tensor | None, block_size: int,
                attn_fn: Callable[[Tensor, Tensor, Tensor, Tensor, Tensor], Tensor] | None = None) -> Tensor:
        """Run the diffusion view over ``N`` blocks of ``K`` tokens without writing the cache (training).

        Args:
            base: the frozen model whose norms, MLPs and K/V cache are shared.
            embeds: ``[B, N*K, C]`` input embeddings (anchor tokens and mask embeddings), block by block.
            positions: ``[B, N*K]`` absolute positions (rope).
            cache: the AR cache; read only, slots ``[0, kv_len)``.
            ctx_mask: ``[B, 1, N, kv_len]`` bool: which cache slots each block may see. Each block
                also sees its own ``K`` keys, bidirectionally, and no other block's
                (:func:`block_attention`).
            block_size: ``K``.
            attn_fn: optional replacement for :func:`block_attention` (training on CUDA uses flex
                attention, see ``orthrus.train.masks``): ``attn_fn(q, k_cache, v_cache, k_block,
                v_block) -> [B, H, N*K, D]`` with its own mask; ``ctx_mask`` is then unused.
        Returns:
            Final-normed hidden states ``[B, N*K, C]``.
        """
        def attend(i: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
            kc, vc = cache.layer(i, kv_len)
            if attn_fn is None:
                return block_attention(q, kc, vc, ctx_mask, k, v, block_size)
            return attn_fn(q, kc, vc, k, v)

        return base.run_layers(embeds, positions, list(self.layers), attend)

    def draft(self, base: Transformer, anchors: Tensor, positions: Tensor, cache: KVCache, kv_len: int) -> Tensor:
        """The draft pass of decoding: block ``[x_t, MASK x (K-1)]`` at ``positions [B, K]``
        (``t..t+K-1``) -> final-normed hidden ``[B, K, C]``.

        The block's K/V is written into the cache slots ``t..t+K-1``, which the verify pass of the
        same cycle overwrites anyway, so each layer is one SDPA over the cache (slots ``< t``) and
        the block (bidirectionally), with one mask built once, and no concatenation. Nothing below
        ``t`` is touched; the committed length does not move.

        Args:
            anchors: ``[B]`` the last committed tokens ``x_t``; cache: the AR cache (rows ``[0, B)``);
            kv_len: attend over slots ``[0, kv_len)`` (must exceed ``t + K - 1``).
        """
        k = positions.shape[1]
        last = positions[:, -1:]  # [B, 1]: every block query sees slots <= t + K - 1
        mask = causal_mask(last.expand(-1, k), kv_len)  # [B, 1, K, S]
        embeds = self.block_embeds(base, anchors, k)
        return base.run_layers(embeds, positions, list(self.layers),
                               cached_attend(cache, positions, kv_len, mask, base.own_attention(k)), base.draft_mlps)

    def verify_and_draft(self, base: Transformer, tokens: Tensor, positions: Tensor, offsets: Tensor,
                         cache: KVCache, kv_len: int) -> tuple[Tensor, Tensor]:
        """The one-pass cycle's forward: verify ``tokens`` and draft the candidate next blocks in it.

        Rows ``[0, K)`` are the verify segment ``[x_t, d_1..d_{K-1}]`` at ``positions`` ``t..t+K-1``
        on the AR view: causal, writing their K/V at ``t..t+K-1`` as a verify pass does. Then, for
        each candidate acceptance ``j`` in ``offsets``, a ``masked`` block ``[MASK x K]`` at
        ``t+j+1..t+j+K`` on the diffusion view: it sees the cache up to ``t+j`` (including the
        verify segment's K/V of this very layer) and itself, bidirectionally, as a training block
        of the ``masked`` kind does. Its K/V go to scratch slots ``[kv_len, kv_len + C*K)`` above
        every row's live slots, written and read within the layer (nothing committed moves).
        Norms, MLPs and the LM head are shared, so every frozen weight is read once per cycle.

        Args:
            tokens: ``[B, K]``; positions: ``[B, K]`` (``t + 0..K-1``).
            offsets: ``[C]`` int64, the candidate acceptances ``j`` (each in ``[0, K-1]``).
            cache: the AR cache (``B`` rows); slots ``[0, kv_len + C*K)`` must exist.
            kv_len: the verify segment's attention bound (exceeds ``t + K - 1`` in every row).
        Returns:
            Final-normed hidden ``[B, K, C]`` of the verify segment and ``[B, C, K, C]`` of the
            candidate blocks (block ``c``'s slot ``i`` drafts position ``t + offsets[c] + i + 2``).
        """
        b, k = tokens.shape
        c = offsets.shape[0]
        dev = tokens.device
        steps = torch.arange(k, device=dev)
        ctx = positions[:, :1] + offsets  # [B, C]: block j sees the cache up to t + j
        cand_pos = (ctx + 1)[:, :, None] + steps  # [B, C, K]
        scratch = (kv_len + torch.arange(c * k, device=dev)).expand(b, -1)  # [B, C*K] write slots
        seen = torch.cat((positions, ctx.repeat_interleave(k, dim=1)), dim=1)  # [B, T] last main slot seen
        blk = torch.arange(c, device=dev).repeat_interleave(k)  # [C*K] block of each scratch slot
        own = torch.cat((blk.new_full((k,), -1), blk))[:, None] == blk  # [T, C*K]
        mask = torch.cat((causal_mask(seen, kv_len),
                          own.expand(b, 1, -1, -1)), dim=-1)  # [B, 1, T, kv_len + C*K]
        embeds = torch.cat((base.model.embed_tokens(tokens),
                            self.mask_embedding.to(base.dtype).expand(b, c * k, -1)), dim=1)
        attns = [a.at(k) for a in self.split_attentions(base)]
        h = base.run_layers(embeds, torch.cat((positions, cand_pos.flatten(1)), dim=1), attns,
                            cached_attend(cache, torch.cat((positions, scratch), dim=1), kv_len + c * k, mask,
                                          base.own_attention(k + c * k)))
        return h[:, :k], h[:, k:].view(b, c, k, -1)

    def block_embeds(self, base: Transformer, anchors: Tensor, block_size: int,
                     masked: Tensor | None = None) -> Tensor:
        """``[x_t, MASK x (K-1)]`` embeddings ``[B, K, C]`` for anchor tokens ``[B]``; rows where
        ``masked [B]`` (bool) is True get ``[MASK x K]`` (a ``masked`` block, see ``BLOCK_KINDS``)."""
        b = anchors.shape[0]
        first = base.model.embed_tokens(anchors)[:, None]  # [B, 1, C]
        mask = self.mask_embedding.to(first.dtype)
        if masked is not None:
            first = torch.where(masked[:, None, None], mask, first)
        return torch.cat((first, mask.expand(b, block_size - 1, -1)), dim=1)

    def bound_to(self, base: Transformer) -> "DiffusionAdapter":
        """A float32 copy of this adapter's weights on another copy of the same frozen model (for
        example the bf16 copy a CPU run trains with, or the float32 model it evaluates with): a
        LoRA adapter wraps its base's own linears, so it cannot simply be moved."""
        new = DiffusionAdapter(base, self.config).to(device=base.device, dtype=torch.float32)
        new.load_state_dict(self.state_dict())
        return new

    # ---- persistence -------------------------------------------------------------------------

    def trainable_state_dict(self) -> dict[str, Tensor]:
        return {k: v.detach() for k, v in self.named_parameters()}

    def save(self, folder: str | Path, dtype: torch.dtype | None = None) -> None:
        """Write weights then config into ``folder`` atomically (temp files renamed into place)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        sd = {k: (v.to(dtype) if dtype else v).contiguous().cpu() for k, v in self.trainable_state_dict().items()}
        _write(folder, sd, self.config)

    @staticmethod
    def rewrite_config(folder: str | Path, config: AdapterConfig) -> None:
        """Give a saved adapter a new config (e.g. measured ``draft_ranks``), its tensors byte for
        byte as they are; atomically, as :meth:`save`."""
        from safetensors import safe_open

        folder = Path(folder)
        with safe_open(folder / WEIGHTS, "pt") as f:
            sd = {k: f.get_tensor(k) for k in f.keys()}
        _write(folder, sd, config)

    @classmethod
    def load(cls, folder: str | Path, base: Transformer, fingerprint: str) -> "DiffusionAdapter":
        """Load an adapter saved by :meth:`save`, refusing a mismatched base or a corrupt file."""
        from safetensors import safe_open

        folder = Path(folder)
        wpath = folder / WEIGHTS
        if not wpath.is_file():
            raise OrthrusError(f"no adapter at '{folder}': expected {WEIGHTS} and {CONFIG} (or use 'init')")
        try:
            with safe_open(wpath, "pt") as f:
                meta = json.loads((f.metadata() or {})["orthrus_adapter"])
                sd = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:
            raise OrthrusError(f"adapter file '{wpath}' is corrupt or not an orthrus adapter: {e}") from e
        cfg = AdapterConfig.from_dict(meta)
        if cfg.base_fingerprint != fingerprint:
            raise OrthrusError(
                f"adapter '{folder}' was made for another base model (fingerprint {cfg.base_fingerprint}, "
                f"this model is {fingerprint}): train one for this model or use --adapter init")
        adapter = cls(base, cfg)
        own = dict(adapter.named_parameters())
        if set(own) != set(sd) or any(own[k].shape != sd[k].shape for k in sd):
            raise OrthrusError(f"adapter '{wpath}' does not have the tensors its config describes")
        with torch.no_grad():
            for k, v in sd.items():
                own[k].copy_(v)
        return adapter


def _write(folder: Path, sd: dict[str, torch.Tensor], config: AdapterConfig) -> None:
    """Write an adapter's tensors (with its config as metadata) then its config JSON into
    ``folder``, each to a temp file renamed into place."""
    from safetensors.torch import save_file

    tmp_w, tmp_c = folder / f".{WEIGHTS}.tmp", folder / f".{CONFIG}.tmp"
    save_file(sd, tmp_w, metadata={"orthrus_adapter": json.dumps(config.to_dict())})
    tmp_c.write_text(json.dumps(config.to_dict(), indent=1))
    os.replace(tmp_w, folder / WEIGHTS)
    os.replace(tmp_c, folder / CONFIG)
