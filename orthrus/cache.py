"""Static KV cache: preallocated buffers, writes at explicit positions, rollback by moving a length.

One ``[B, Hkv, S, D]`` key and value buffer per layer, allocated once. A forward writes its K/V at
the absolute positions it is given (each row its own), so a verify pass writes K slots and the
decoder then commits only the accepted ones by moving that row's length: K/V written for rejected
positions is dead (never attended, see ``causal_mask``) and is overwritten by the next cycle. Nothing
is ever concatenated or cropped; the only copy moves a tree verify pass's accepted
path (a few slots per row, ``move``) to where a chain would have written it.

The committed lengths themselves are kept by the decoder (``orthrus.decoding``), not here: the
cache is pure storage, and batch-slices of it (``rows``) are views that share the buffers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class KVCache:
    """Per-layer key/value buffers.

    Attributes:
        k, v: lists (one per layer) of ``[B, Hkv, S, D]`` tensors.
    """

    k: list[Tensor]
    v: list[Tensor]

    @classmethod
    def empty(cls, layers: int, batch: int, kv_heads: int, max_len: int, head_dim: int,
              dtype: torch.dtype, device: torch.device | str) -> "KVCache":
        shape = (batch, kv_heads, max_len, head_dim)
        return cls([torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)],
                   [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)])

    @property
    def batch_size(self) -> int:
        return self.k[0].shape[0]

    @property
    def capacity(self) -> int:
        """S: the number of positions each row can hold."""
        return self.k[0].shape[2]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    def index(self, positions: Tensor) -> Tensor:
        """The scatter index ``[B, Hkv, T, D]`` (an expanded view) of writes at ``positions [B, T]``."""
        b, t = positions.shape
        _, h, _, d = self.k[0].shape
        return positions[:, None, :, None].expand(b, h, t, d)

    def write(self, layer: int, positions: Tensor, k: Tensor, v: Tensor) -> None:
        """Write ``k, v [B, Hkv, T, D]`` at ``positions [B, T]`` of ``layer`` (in place, no copy of the rest)."""
        self.write_at(layer, self.index(positions), k, v)

    def write_at(self, layer: int, idx: Tensor, k: Tensor, v: Tensor) -> None:
        """:meth:`write` with an index from :meth:`index` (built once per pass, used by every layer)."""
        self.k[layer].scatter_(2, idx, k)
        self.v[layer].scatter_(2, idx, v)

    def move(self, src: Tensor, dst: Tensor) -> None:
        """In every layer, copy the K/V at slots ``src [B, T]`` to slots ``dst [B, T]`` (all read
        before any is written; a few positions per row: a tree verify pass's accepted path)."""
        i, j = self.index(src), self.index(dst)
        for buf in self.k + self.v:
            buf.scatter_(2, j, buf.gather(2, i))

    def layer(self, layer: int, kv_len: int) -> tuple[Tensor, Tensor]:
        """Views ``[B, Hkv, kv_len, D]`` of the first ``kv_len`` slots (no copy)."""
        return self.k[layer][:, :, :kv_len], self.v[layer][:, :, :kv_len]

    def rows(self, start: int, stop: int) -> "KVCache":
        """A view of rows ``[start, stop)``: writes through it land in this cache."""
        return KVCache([t[start:stop] for t in self.k], [t[start:stop] for t in self.v])
