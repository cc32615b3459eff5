"""OpenAI-compatible HTTP serving with continuous batching: ``orthrus serve``.

``app.py``: the FastAPI app (``create_app``); ``scheduler.py``: the thread that owns the decoder;
``protocol.py``: the OpenAI request/response/error shapes. FastAPI and uvicorn are optional
dependencies (``pip install orthrus-lm[serve]``), so nothing here is imported eagerly.
"""

from __future__ import annotations

from typing import Any

__all__ = ["create_app"]


def __getattr__(name: str) -> Any:
    if name == "create_app":
        from orthrus.serve.app import create_app

        return create_app
    raise AttributeError(name)
