"""orthrus: lossless parallel decoding of frozen LLMs with a trained diffusion view (dual-view)."""

import os as _os

# Inductor's caches (compiled decoding) live beside ours: $ORTHRUS_CACHE/inductor (default
# ~/.cache/orthrus/inductor), not in /tmp. Set before anything imports torch._dynamo, which fixes
# the directory for the process; an explicit $TORCHINDUCTOR_CACHE_DIR wins.
_os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", _os.path.join(
    _os.environ.get("ORTHRUS_CACHE") or _os.path.join(_os.path.expanduser("~"), ".cache", "orthrus"), "inductor"))

from orthrus.config import AdapterConfig, GenerationConfig, ModelConfig
from orthrus.engine import Completion, Orthrus
from orthrus.errors import OrthrusError

__version__ = "0.1.0"
__all__ = ["Orthrus", "Completion", "GenerationConfig", "ModelConfig", "AdapterConfig", "OrthrusError"]
