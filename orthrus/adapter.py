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
from orthrus.models.llama import (Attention, Transformer, cached_attend, causal_mask, joint_attention,
                                  packing_available)

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

    def prepare_inference(self, pack: bool | None = None) -> None:
        """Merge LoRA deltas into dense weights and (fp32 on a CPU) prepack them, for decoding;
        the frozen model's :meth:`~orthrus.models.llama.Transformer.prepare_inference` explains why."""
        if pack is None:
            w = self.mask_embedding
            pack = w.device.type == "cpu" and w.dtype == torch.float32 and packing_available()
        with torch.no_grad():
            for attn in self.layers:
                attn.prepare_inference(pack)

    def forward(self, base: Transformer, embeds: Tensor, positions: Tensor, cache: KVCache, kv_len: int,
                ctx_mask: Tensor | None, block_mask: Tensor | None,
                attn_fn: Callable[[Tensor, Tensor, Tensor, Tensor, Tensor], Tensor] | None = None) -> Tensor:
        """Run the diffusion view over a set of blocks without writing the cache (training).

        Args:
            base: the frozen model whose norms, MLPs and K/V cache are shared.
            embeds: ``[B, Q, C]`` input embeddings (anchor tokens and mask embeddings).
            positions: ``[B, Q]`` absolute positions (rope).
            cache: the AR cache; read only, slots ``[0, kv_len)``.
            ctx_mask: ``[B, 1, Q|1, kv_len]`` bool: which cache slots each query may see.
            block_mask: ``[B|1, 1, Q, Q]`` bool among the blocks' own queries/keys, None: all.
            attn_fn: optional replacement for the dense :func:`joint_attention` (training on CUDA
                uses flex attention, see ``orthrus.train.masks``): ``attn_fn(q, k_cache, v_cache,
                k_block, v_block) -> [B, H, Q, D]`` with its own mask; ``ctx_mask`` and
                ``block_mask`` are then unused.
        Returns:
            Final-normed hidden states ``[B, Q, C]``.
        """
        def attend(i: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
            kc, vc = cache.layer(i, kv_len)
            if attn_fn is None:
                return joint_attention(q, kc, vc, ctx_mask, k, v, block_mask)
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
        return base.run_layers(embeds, positions, list(self.layers), cached_attend(cache, positions, kv_len, mask))

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

    # ---- persistence -------------------------------------------------------------------------

    def trainable_state_dict(self) -> dict[str, Tensor]:
        return {k: v.detach() for k, v in self.named_parameters()}

    def save(self, folder: str | Path, dtype: torch.dtype | None = None) -> None:
        """Write weights then config into ``folder`` atomically (temp files renamed into place)."""
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        sd = {k: (v.to(dtype) if dtype else v).contiguous().cpu() for k, v in self.trainable_state_dict().items()}
        tmp_w, tmp_c = folder / f".{WEIGHTS}.tmp", folder / f".{CONFIG}.tmp"
        save_file(sd, tmp_w, metadata={"orthrus_adapter": json.dumps(self.config.to_dict())})
        tmp_c.write_text(json.dumps(self.config.to_dict(), indent=1))
        os.replace(tmp_w, folder / WEIGHTS)
        os.replace(tmp_c, folder / CONFIG)

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
