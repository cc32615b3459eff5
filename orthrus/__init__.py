"""orthrus: lossless parallel decoding of frozen LLMs with a trained diffusion view (dual-view)."""

from orthrus.paths import inductor_cache

inductor_cache()  # compiled decoding's caches beside ours ($ORTHRUS_CACHE/inductor), not in /tmp

from orthrus.config import AdapterConfig, GenerationConfig, ModelConfig
from orthrus.engine import Completion, Orthrus
from orthrus.errors import OrthrusError

__version__ = "0.1.0"
__all__ = ["Orthrus", "Completion", "GenerationConfig", "ModelConfig", "AdapterConfig", "OrthrusError"]
