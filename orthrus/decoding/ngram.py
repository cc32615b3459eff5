"""Training-free n-gram drafts (prompt lookup): propose what followed the row's latest n tokens the
last time they occurred in its prompt or output.

The lookup runs on the host, where every row's tokens already are after the cycle's one sync. Each
row keeps an :class:`NgramIndex` that is updated with the new tokens only (O(new tokens x n_max)
dictionary writes per cycle), never by rescanning the row. :func:`ngram_drafts` turns the indexes of
all rows into one ``[rows, K-1]`` tensor, uploaded to the device once per cycle.

Any draft is valid for exactness: the verify pass scores every drafted token with the frozen model
and keeps only the agreeing prefix (greedy) or applies rejection sampling with the draft's one-hot
distribution, so a wrong or padded draft only costs acceptance, never changes the output.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import Tensor

NGRAM_MAX = 4  # default longest suffix tried
NGRAM_BLOCK_SIZE = 8  # default block size (1 + 7 drafts) when drafting by n-gram


class NgramIndex:
    """Incremental index of one row's tokens (prompt + generated): for every n in ``1..n_max``, the
    latest position that *followed* each n-gram.

    ``last[n-1][g] = p`` means ``tokens[p-n:p] == g`` with ``p`` the largest such index that is
    still inside the sequence (so ``tokens[p]`` exists). The row's own current suffix is therefore
    only found at an *earlier* occurrence that has a continuation, which is what a lookup wants.

    Args:
        tokens: the initial tokens (the prompt).
        n_max: the longest n-gram tried (>= 1).
    """

    def __init__(self, tokens: Iterable[int] = (), n_max: int = NGRAM_MAX) -> None:
        if n_max < 1:
            raise ValueError(f"n_max must be >= 1, got {n_max}")
        self.n_max = n_max
        self.tokens: list[int] = []
        self.last: list[dict[tuple[int, ...], int]] = [{} for _ in range(n_max)]
        self.extend(tokens)

    def __len__(self) -> int:
        return len(self.tokens)

    def extend(self, new: Iterable[int]) -> None:
        """Append ``new`` tokens; only the n-grams that end just before each new token are written."""
        seq, last = self.tokens, self.last
        for tok in new:
            p = len(seq)  # index of the token being appended: it follows seq[p-n:p]
            for n in range(1, min(self.n_max, p) + 1):
                last[n - 1][tuple(seq[p - n:p])] = p  # later occurrences overwrite: most recent wins
            seq.append(int(tok))

    def match(self) -> tuple[int, int]:
        """``(n, p)``: the longest suffix length ``n`` (``n_max`` down to 1) that occurred earlier
        with a continuation, and the position ``p`` that followed its latest earlier occurrence;
        ``(0, -1)`` when no suffix occurred before."""
        seq = self.tokens
        for n in range(min(self.n_max, len(seq)), 0, -1):
            p = self.last[n - 1].get(tuple(seq[len(seq) - n:]))
            if p is not None:
                return n, p
        return 0, -1

    def propose(self, count: int) -> list[int] | None:
        """Up to ``count`` tokens that followed the longest matching suffix, or None (no match).

        A match close to the end runs out of continuation after ``L - p`` tokens; the sequence then
        continues periodically (the match says it repeats with period ``L - p``), so a repetitive
        row always gets a full draft.
        """
        n, p = self.match()
        if n == 0:
            return None
        seq, L = self.tokens, len(self.tokens)
        out: list[int] = []
        for i in range(count):
            j = p + i
            out.append(seq[j] if j < L else out[j - L])
        return out


def ngram_drafts(indexes: Sequence[NgramIndex | None], count: int) -> Tensor:
    """Drafts of every row as one CPU tensor, ``[len(indexes), count]`` int64.

    A row with no index (not drafting by n-gram, or no live request) or with no match is padded by
    repeating its last token (0 without one): any draft is exact (see the module docstring), and
    repetition is the one cheap guess that sometimes hits.
    """
    if count == 0:
        return torch.zeros(len(indexes), 0, dtype=torch.long)
    rows: list[list[int]] = []
    for ix in indexes:
        d = ix.propose(count) if ix is not None else None
        if d is None:
            pad = ix.tokens[-1] if ix is not None and ix.tokens else 0
            d = [pad] * count
        rows.append(d)
    return torch.tensor(rows, dtype=torch.long)


def brute_force_propose(tokens: Sequence[int], count: int, n_max: int = NGRAM_MAX) -> list[int] | None:
    """Reference for :meth:`NgramIndex.propose` by a full scan (tests; O(L * n_max) per call)."""
    L = len(tokens)
    for n in range(min(n_max, L), 0, -1):
        suffix = list(tokens[L - n:])
        for p in range(L - 1, n - 1, -1):  # p: the position after an earlier occurrence
            if list(tokens[p - n:p]) == suffix:
                out: list[int] = []
                for i in range(count):
                    j = p + i
                    out.append(tokens[j] if j < L else out[j - L])
                return out
    return None
