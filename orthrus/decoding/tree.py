"""Tree verification: one verify pass checks several candidate continuations of the draft block.

The diffusion view drafts a whole block in one pass, and for each slot it gives a distribution,
not only a token. When its top token at slot ``d`` is wrong, the frozen model's token is often its
second or third: on held-out ShareGPT answers the shipped adapter's slot 1 is right 89% of the
time, and its second guess another 8%. A chain verifies only the top tokens; a *tree* spends the
same verify rows on the likeliest paths through the slots' top tokens, so a miss at slot ``d``
can still be caught by a sibling, and the verify pass's token after it comes for free.

A tree is a static set of *nodes*, each a tuple of ranks ``(r_1, ..., r_d)``: the path that takes
the slot-1 draft of rank ``r_1``, then the slot-2 draft of rank ``r_2``, ... (rank 0 = the top
token). Its K rows are the anchor (the last emitted token, row 0) and ``K - 1`` nodes in
breadth-first order. Row ``i`` sits at cache slot ``t + i`` and rope position ``t + depth(i)``,
and attends to the committed cache and to its own ancestors only. Greedy verification keeps the
deepest node whose every token equals the frozen model's argmax at its parent, which is exactly
what token-by-token greedy decoding would have produced: the output stays exact. The accepted
path's K/V then moves to slots ``t + 1 .. t + depth`` (a few positions per layer), so the cache
holds the emitted tokens in order and rollback stays a length.

Sampled rows work the same way: the target after each row is the model's sample there, drawn with
the uniform AR decoding uses for that position, and the path follows a child equal to it. Each
emitted token is the model's own sample given the tokens before it, so the output has exactly the
model's distribution (a seeded row gives AR's tokens, up to the rounding of a K-row pass),
whatever the drafts.

Which nodes pay comes from the adapter's measured *rank rates* (``AdapterConfig.draft_ranks``:
at each slot, how often the frozen model's token has rank ``r`` among the drafts, given that the
slots before were right); :func:`build_tree` takes the ``K - 1`` likeliest nodes under them.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field

import torch
from torch import Tensor

from orthrus.cache import KVCache

RANK_WIDTH = 4  # ranks 0..3 are measured (AdapterConfig.draft_ranks' columns)
# Rank rates of a SmolLM2-135M adapter (K = 8; the one shipped on 2026-12-03) on 30 held-out
# distilled ShareGPT answers (every anchor, float32 drafts): row d is slot d+1, column r the rank.
# The tree of an adapter that records none of its own, when a tree is asked for explicitly.
DEFAULT_DRAFT_RANKS: tuple[tuple[float, ...], ...] = (
    (0.893, 0.08, 0.014, 0.007), (0.606, 0.122, 0.057, 0.029), (0.514, 0.16, 0.072, 0.04),
    (0.425, 0.226, 0.084, 0.037), (0.395, 0.238, 0.096, 0.048), (0.411, 0.182, 0.121, 0.07),
    (0.33, 0.307, 0.148, 0.045))


def build_tree(rates: tuple[tuple[float, ...], ...] | list[list[float]], nodes: int) -> tuple[tuple[int, ...], ...]:
    """The ``nodes`` likeliest rank paths, best-first, under independent per-slot rank rates.

    Args:
        rates: ``rates[d][r]``: how often the frozen model's token at slot ``d+1`` has rank ``r``
            among the drafts there (given slots ``1..d`` were right).
        nodes: how many nodes (verify rows besides the anchor).
    Returns:
        the nodes in breadth-first order (by depth, then by rank path): always prefix-closed,
        since a path is never likelier than its own prefix.
    """
    chosen: list[tuple[int, ...]] = []
    heap = [(-p, (r,)) for r, p in enumerate(rates[0])] if rates and nodes > 0 else []
    heapq.heapify(heap)
    while heap and len(chosen) < nodes:
        neg, node = heapq.heappop(heap)
        chosen.append(node)
        if len(node) < len(rates):
            for r, p in enumerate(rates[len(node)]):
                heapq.heappush(heap, (neg * p, node + (r,)))
    return tuple(sorted(chosen, key=lambda n: (len(n), n)))


def accepted_depth(ranks: tuple[int, ...] | list[int], nodes: set[tuple[int, ...]] | tuple[tuple[int, ...], ...]) -> int:
    """Drafts a tree keeps when the frozen model's tokens have ranks ``ranks`` (slot by slot) among
    one draft pass's: the longest prefix of ``ranks`` that is a node (for offline evaluation)."""
    d = 0
    while d < len(ranks) and tuple(ranks[: d + 1]) in nodes:
        d += 1
    return d


def verifies_by_tree(verify: str, schedule: str, temperature: float, draft_ranks: object) -> bool:
    """Whether a row's adapter drafts are verified as a tree: ``verify='tree'``, or ``auto`` for a
    greedy row with an adapter that records its rank rates (``AdapterConfig.draft_ranks``, passed
    here; falsy without an adapter). Sampled rows verify trees only when asked: at temperature 1
    the top tokens are a poor guess of a sample, and the chain's rejection sampling kept more per
    pass. The one-pass schedule never does."""
    return schedule != "one-pass" and (verify == "tree" or (
        verify == "auto" and temperature == 0 and bool(draft_ranks)))


@dataclass(frozen=True)
class DraftTree:
    """A static verify tree of ``rows`` rows (row 0 the anchor, then ``nodes`` breadth-first).

    Tensors (built once per device, :meth:`on`): ``depth [R]``, ``parent [R]`` (the root its own),
    ``slot [R-1]`` and ``rank [R-1]`` (which draft slot and which of its top tokens each node takes),
    ``anc [R, R]`` bool (``anc[i, j]``: row ``j`` is row ``i`` or one of its ancestors) and
    ``path [R, D]`` (row ``i``'s ancestor at depths ``1..D``; past row ``i``'s own depth, row
    index ``d`` for depth ``d``, so that :meth:`commit_moves` moves that slot onto itself).
    """

    nodes: tuple[tuple[int, ...], ...]
    _tensors: dict = field(default_factory=dict, compare=False, repr=False)
    rows: int = field(init=False, compare=False)
    depth: int = field(init=False, compare=False)
    width: int = field(init=False, compare=False)

    def __post_init__(self) -> None:
        index = {n: i + 1 for i, n in enumerate(self.nodes)}
        if len(index) != len(self.nodes):
            raise ValueError(f"a tree's nodes must be distinct, got {self.nodes}")
        for i, n in enumerate(self.nodes):
            if not n or min(n) < 0 or (len(n) > 1 and index.get(n[:-1], len(self.nodes) + 1) > i):
                raise ValueError(f"tree node {n} needs its parent {n[:-1]} before it (breadth-first, "
                                 f"non-negative ranks)")

        # plain ints, computed once (compiled cycles read them as constants)
        object.__setattr__(self, "rows", len(self.nodes) + 1)
        # D: the deepest node's depth (the most drafts one cycle can accept)
        object.__setattr__(self, "depth", max((len(n) for n in self.nodes), default=0))
        # how many top tokens per slot the nodes read
        object.__setattr__(self, "width", 1 + max((max(n) for n in self.nodes), default=0))

    def on(self, device: torch.device) -> dict[str, Tensor]:
        """The tree's index tensors on ``device`` (built once, then cached)."""
        key = str(device)
        if key not in self._tensors:
            r, d = self.rows, max(1, self.depth)
            index = {n: i + 1 for i, n in enumerate(self.nodes)}
            depth = [0] + [len(n) for n in self.nodes]
            parent = [0] + [index.get(n[:-1], 0) for n in self.nodes]
            anc = torch.zeros(r, r, dtype=torch.bool)
            path = torch.arange(1, d + 1).repeat(r, 1)  # [R, D]
            for i in range(r):
                j = i
                while True:
                    anc[i, j] = True
                    if depth[j] > 0:
                        path[i, depth[j] - 1] = j
                    if j == 0:
                        break
                    j = parent[j]
            self._tensors[key] = {
                "depth": torch.tensor(depth, device=device), "parent": torch.tensor(parent, device=device),
                "slot": torch.tensor([len(n) - 1 for n in self.nodes], dtype=torch.long, device=device),
                "rank": torch.tensor([n[-1] for n in self.nodes], dtype=torch.long, device=device),
                "anc": anc.to(device), "ancf": anc.float().t().contiguous().to(device), "path": path.to(device)}
        return self._tensors[key]

    def tokens(self, x_t: Tensor, q_logits: Tensor) -> Tensor:
        """The verify pass's input ``[B, R]``: the anchor ``x_t [B]``, then each node's draft, the
        rank-``r`` token of its slot's logits ``q_logits [B, S, V]`` (slots ``1..S``, ``S >= D``)."""
        t = self.on(x_t.device)
        top = q_logits.topk(self.width, dim=-1).indices  # [B, S, W]
        return torch.cat((x_t[:, None], top[:, t["slot"], t["rank"]]), dim=1)

    def positions(self, lengths: Tensor) -> tuple[Tensor, Tensor]:
        """Rope positions ``t + depth`` and cache slots ``t + row``, each ``[B, R]``."""
        t = self.on(lengths.device)
        return lengths[:, None] + t["depth"], lengths[:, None] + torch.arange(self.rows, device=lengths.device)

    def mask(self, lengths: Tensor, kv_len: int) -> Tensor:
        """Boolean attention mask ``[B, 1, R, kv_len]``: the committed cache (slots ``< t``), then
        within the block each row's ancestors and itself."""
        anc = self.on(lengths.device)["anc"]
        rel = torch.arange(kv_len, device=lengths.device)[None] - lengths[:, None]  # [B, S]
        inside = (rel >= 0) & (rel < self.rows)
        blk = anc[:, rel.clamp(0, self.rows - 1)].permute(1, 0, 2)  # [B, R, S]
        return ((rel < 0)[:, None] | (inside[:, None] & blk))[:, None]

    def accept(self, tokens: Tensor, target: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Verification of a tree against the frozen model's own choices.

        Args:
            tokens: ``[B, R]`` the pass's input (:meth:`tokens`).
            target: ``[B, R]``: the frozen model's token after row ``i``'s path (its argmax, or its
                sample with that position's uniform).
        Returns:
            ``n_accepted [B]`` (the depth of the deepest node whose path follows the targets),
            ``next_token [B]`` (the target after it) and ``best [B]`` (its row).
        """
        t = self.on(tokens.device)
        right = tokens == target.gather(1, t["parent"].expand_as(tokens))
        right[:, 0] = True  # the anchor is emitted already
        wrong_above = (~right).float() @ t["ancf"]  # [B, R]: wrong rows among each row's path
        best = ((wrong_above == 0) * (t["depth"] + 1)).argmax(-1)  # deepest right path (unique)
        return t["depth"][best], target.gather(1, best[:, None])[:, 0], best

    def path_rows(self, best: Tensor) -> Tensor:
        """``[B, D]``: the rows of ``best``'s path at depths ``1..D`` (padding past its depth)."""
        return self.on(best.device)["path"][best]

    def commit_moves(self, cache: KVCache, lengths: Tensor, best: Tensor) -> None:
        """Move the accepted path's K/V (written at slots ``t + row``) to slots ``t + 1 .. t + D``,
        where a chain would have written them; rows past the path's depth move onto themselves."""
        d = max(1, self.depth)
        src = lengths[:, None] + self.path_rows(best)  # [B, D]
        dst = lengths[:, None] + torch.arange(1, d + 1, device=best.device)
        cache.move(src, dst)
