"""The OpenAI wire format: request models (validated by pydantic), response and chunk builders,
and error objects.

Requests are validated strictly (a string where a number belongs is an error, never coerced), numbers
must be finite, and everything wrong comes back as an OpenAI error object::

    {"error": {"message": ..., "type": "invalid_request_error", "param": ..., "code": ...}}
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, field_validator

# a finite float: JSON numbers only (not booleans), NaN and infinities rejected
Number = Annotated[float, Field(strict=True, allow_inf_nan=False)]

MAX_STOP = 4  # as in the OpenAI API
class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: StrictBool | None = False


class GenerationRequest(BaseModel):
    """Fields shared by chat and raw completions (sampling, limits, streaming)."""

    # unknown fields (logit_bias, user, ...) are ignored, as most OpenAI-compatible servers do
    model_config = ConfigDict(extra="ignore")

    model: Annotated[str, Field(strict=True)]
    max_tokens: Annotated[StrictInt, Field(ge=1)] | None = None
    temperature: Annotated[Number, Field(ge=0, le=2)] | None = None
    top_p: Annotated[Number, Field(gt=0, le=1)] | None = None
    top_k: Annotated[StrictInt, Field(ge=0)] | None = None  # an extension (vLLM has it too)
    seed: Annotated[StrictInt, Field(ge=0, lt=2**63)] | None = None
    stop: Any = ()
    n: StrictInt | None = None
    stream: StrictBool | None = False
    stream_options: StreamOptions | None = None

    @field_validator("stop", mode="before")
    @classmethod
    def _stop(cls, v: Any) -> tuple[str, ...]:
        if v is None:
            return ()
        stops = [v] if isinstance(v, str) else v
        if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
            raise ValueError("stop must be a non-empty string or a list of non-empty strings")
        if len(stops) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop strings are allowed, got {len(stops)}")
        return tuple(stops)

    @field_validator("n")
    @classmethod
    def _n(cls, v: int | None) -> int | None:
        if v is not None and v != 1:
            raise ValueError(f"only n=1 is supported, got {v}")
        return v


class ChatMessage(BaseModel):
    """One chat turn. ``content`` is a string or a list of ``{"type": "text", "text": ...}`` parts."""

    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant"]
    content: Any

    @field_validator("content", mode="before")
    @classmethod
    def _content(cls, v: Any) -> str:
        if isinstance(v, str):
            return v
        if isinstance(v, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                       and isinstance(p.get("text"), str) for p in v):
            return "".join(p["text"] for p in v)
        raise ValueError("content must be a string or a list of {\"type\": \"text\", \"text\": ...} parts")


class ChatCompletionRequest(GenerationRequest):
    """POST /v1/chat/completions."""

    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: Annotated[StrictInt, Field(ge=1)] | None = None  # newer name of max_tokens

    def chat(self) -> list[dict[str, str]]:
        # "developer" is the newer name of "system"; chat templates only know the latter
        return [{"role": "system" if m.role == "developer" else m.role, "content": m.content}
                for m in self.messages]


class CompletionRequest(GenerationRequest):
    """POST /v1/completions: a raw prompt (no chat template): a string, a one-string list, or token ids."""

    prompt: Any

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt(cls, v: Any) -> str | list[int]:
        if isinstance(v, list) and len(v) == 1 and isinstance(v[0], str):
            v = v[0]
        if isinstance(v, str):
            if not v:
                raise ValueError("prompt is empty")
            return v
        if isinstance(v, list) and v and all(isinstance(t, int) and not isinstance(t, bool) for t in v):
            return v
        raise ValueError("prompt must be a non-empty string, a list of one string, or a list of token ids "
                         "(one prompt per request)")


# ---- errors ------------------------------------------------------------------------------------

def error_body(message: str, type_: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    """An OpenAI error object."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def _param(loc: tuple[Any, ...]) -> str | None:
    """``('body', 'messages', 0, 'role')`` -> ``messages[0].role``."""
    out = ""
    for part in loc[1:] if loc and loc[0] == "body" else loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or None


_CODES = {"missing": "missing_required_parameter", "json_invalid": "invalid_json",
          "extra_forbidden": "unknown_parameter"}


def validation_error_body(errors: list[dict[str, Any]]) -> dict[str, Any]:
    """Turn pydantic / FastAPI validation errors into one OpenAI error object (the first error)."""
    if not errors:
        return error_body("invalid request")
    e = errors[0]
    kind, param = e.get("type", ""), _param(tuple(e.get("loc", ())))
    msg = str(e.get("msg", "invalid value")).removeprefix("Value error, ")
    if kind == "json_invalid":
        ctx = (e.get("ctx") or {}).get("error", "")
        return error_body(f"the request body is not valid JSON ({ctx})" if ctx else
                          "the request body is not valid JSON", code="invalid_json")
    if param is None and kind in ("model_attributes_type", "dict_type", "model_type"):
        return error_body("the request body must be a JSON object", code="invalid_type")
    if kind == "missing":
        msg = f"'{param}' is required" if param else "a JSON request body is required"
    elif param:
        shown = repr(e.get("input"))
        shown = shown if len(shown) <= 60 else shown[:57] + "..."
        msg = f"invalid value {shown} for '{param}': {msg}"
    more = f" (and {len(errors) - 1} more error{'s' if len(errors) > 2 else ''})" if len(errors) > 1 else ""
    return error_body(msg + more, param=param, code=_CODES.get(kind, "invalid_value"))


# ---- responses ---------------------------------------------------------------------------------

def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def chat_response(rid: str, model: str, text: str, finish: str, use: dict, extra: dict) -> dict:
    return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "finish_reason": finish, "logprobs": None}],
            "usage": use, "orthrus": extra}


def chat_chunk(rid: str, model: str, created: int, delta: dict, finish: str | None) -> dict:
    return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]}


def completion_response(rid: str, model: str, text: str, finish: str, use: dict, extra: dict) -> dict:
    return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "text": text, "finish_reason": finish, "logprobs": None}],
            "usage": use, "orthrus": extra}


def completion_chunk(rid: str, model: str, created: int, text: str, finish: str | None) -> dict:
    return {"id": rid, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": 0, "text": text, "finish_reason": finish, "logprobs": None}]}


def usage_chunk(rid: str, model: str, created: int, obj: str, use: dict) -> dict:
    """The last chunk when ``stream_options.include_usage`` is set: no choices, only usage."""
    return {"id": rid, "object": obj, "created": created, "model": model, "choices": [], "usage": use}
