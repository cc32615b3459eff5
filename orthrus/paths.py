"""Where orthrus keeps what it derives on disk (no heavy imports: ``orthrus/__init__`` reads it first)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """``$ORTHRUS_CACHE``, default ``~/.cache/orthrus``: converted models, measured kernel choices,
    evaluations, Inductor's compiled graphs."""
    return Path(os.environ.get("ORTHRUS_CACHE") or Path.home() / ".cache" / "orthrus")


def inductor_cache() -> str:
    """Where Inductor keeps its caches: ``$TORCHINDUCTOR_CACHE_DIR``, set here to
    ``$ORTHRUS_CACHE/inductor`` unless it was set already. Importing orthrus calls this before
    anything imports ``torch._dynamo``, which fixes the directory for the process."""
    return os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache_root() / "inductor"))
