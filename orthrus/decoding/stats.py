"""Decoding metrics, defined once (see METHOD.md, "Metrics").

* ``forward_passes`` = draft + verify passes (prefill reported apart).
* TPF = generated tokens / forward passes.
* acceptance length = generated tokens / verify passes (mean ``a + 1``, the bonus token counts).
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class DecodeStats:
    """Counters for one row (or, summed, for a run).

    ``tokens`` counts tokens kept from decode cycles; the first generated token comes from the
    prefill pass and, like that pass, is reported apart (so ``tokens == len(token_ids) - 1``).
    """

    tokens: int = 0
    prefill_passes: int = 0
    draft_passes: int = 0
    verify_passes: int = 0
    seconds: float = 0.0
    # slot_accepts[i]: cycles in which draft slot i was accepted; cycles: verify passes with drafts
    slot_accepts: list[int] = field(default_factory=list)
    # accept_hist[a]: cycles that emitted a + 1 tokens
    accept_hist: list[int] = field(default_factory=list)

    @property
    def forward_passes(self) -> int:
        return self.draft_passes + self.verify_passes

    @property
    def tpf(self) -> float:
        return self.tokens / self.forward_passes if self.forward_passes else 0.0

    @property
    def acceptance_length(self) -> float:
        return self.tokens / self.verify_passes if self.verify_passes else 0.0

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0

    def record_cycle(self, emitted: int, accepted: int, block_size: int, drafted: int) -> None:
        """One decode cycle that emitted ``emitted`` tokens after accepting ``accepted`` drafts and
        ran ``drafted`` draft passes (0: n-gram or one-pass drafts; 1: a diffusion draft pass; K-1:
        self-drafting's one-token steps)."""
        self.verify_passes += 1
        self.draft_passes += int(drafted)
        self.tokens += emitted
        if len(self.slot_accepts) < block_size - 1:
            self.slot_accepts += [0] * (block_size - 1 - len(self.slot_accepts))
        for i in range(accepted):
            self.slot_accepts[i] += 1
        if len(self.accept_hist) <= accepted:
            self.accept_hist += [0] * (accepted + 1 - len(self.accept_hist))
        self.accept_hist[accepted] += 1

    def merge(self, other: "DecodeStats") -> "DecodeStats":
        def add(a: list[int], b: list[int]) -> list[int]:
            n = max(len(a), len(b))
            return [(a[i] if i < len(a) else 0) + (b[i] if i < len(b) else 0) for i in range(n)]

        return DecodeStats(self.tokens + other.tokens, self.prefill_passes + other.prefill_passes,
                           self.draft_passes + other.draft_passes, self.verify_passes + other.verify_passes,
                           max(self.seconds, other.seconds), add(self.slot_accepts, other.slot_accepts),
                           add(self.accept_hist, other.accept_hist))

    def to_dict(self) -> dict:
        return {
            "tokens": self.tokens, "forward_passes": self.forward_passes,
            "prefill_passes": self.prefill_passes, "draft_passes": self.draft_passes,
            "verify_passes": self.verify_passes, "seconds": round(self.seconds, 6),
            "tokens_per_second": round(self.tokens_per_second, 3), "tpf": round(self.tpf, 4),
            "acceptance_length": round(self.acceptance_length, 4),
            "slot_accepts": list(self.slot_accepts), "accept_hist": list(self.accept_hist),
        }
