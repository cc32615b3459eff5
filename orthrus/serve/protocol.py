"""The OpenAI wire format: request models (validated by pydantic), response and chunk builders,
and error objects.

Requests are validated strictly (a string where a number belongs is an error, never coerced), numbers
must be finite, and everything wrong comes back as an OpenAI error object::

    {"error": {"message": ..., "type": "invalid_request_error", "param": ..., "code": ...}}
"""

from __future__ import annotations

import time
import uuid
from typing import TYPE_CHECKING, Annotated, Any, Callable, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, ValidationInfo, field_validator
from pydantic_core import PydanticCustomError

if TYPE_CHECKING:
    from orthrus.decoding.generator import TokenLogprobs

# a finite float: JSON numbers only (not booleans), NaN and infinities rejected
Number = Annotated[float, Field(strict=True, allow_inf_nan=False)]

MAX_STOP = 4  # as in the OpenAI API
MAX_CHOICES = 128  # choices per request (n x prompts), as OpenAI caps n
MAX_TOP_LOGPROBS = 20  # chat: top_logprobs in [0, 20], as OpenAI
MAX_COMPLETION_LOGPROBS = 5  # completions: logprobs in [0, 5], as OpenAI


def _none(v: Any) -> bool:
    return v is None


def _zero(v: Any) -> bool:
    return v is None or (type(v) in (int, float) and v == 0)


def _empty(v: Any) -> bool:
    return v is None or v == [] or v == {}


def _one_of(*defaults: Any) -> Any:
    """Accepts None or one of ``defaults`` (same type: ``False`` is not ``0``)."""
    return lambda v: v is None or any(type(v) is type(d) and v == d for d in defaults)


def _any(v: Any) -> bool:
    return True


# OpenAI fields we do not implement, each accepted only at a value that asks for nothing (its
# default, or a hint that changes no output): anything else is a 400 naming the field, never a
# silent ignore. Fields not listed here nor declared below are unknown: also a 400 naming them.
_SHARED_DEFAULTS: dict[str, tuple[Any, str]] = {
    "frequency_penalty": (_zero, "0"),
    "presence_penalty": (_zero, "0"),
    "logit_bias": (_empty, "null or {}"),
    "user": (_any, ""),   # an end-user id: nothing to do with it, accepted as OpenAI does
}
_CHAT_DEFAULTS: dict[str, tuple[Any, str]] = {
    **_SHARED_DEFAULTS,
    "response_format": (_one_of({"type": "text"}), '{"type": "text"}'),
    "tools": (_empty, "null or []"),
    "tool_choice": (_one_of("none", "auto"), '"none" (there are no tools)'),
    "functions": (_empty, "null or []"),
    "function_call": (_one_of("none", "auto"), '"none" (there are no functions)'),
    "parallel_tool_calls": (_any, ""),  # only acts with tools, which are refused
    "audio": (_none, "null"),
    "modalities": (_one_of(["text"]), '["text"]'),
    "prediction": (_none, "null"),
    "moderation": (_none, "null"),
    "reasoning_effort": (_none, "null"),
    "verbosity": (_none, "null"),
    "web_search_options": (_none, "null"),
    "store": (_one_of(False), "false (completions are not stored)"),
    "service_tier": (_one_of("auto", "default"), '"auto" or "default"'),
    # hints about caching, tracing and abuse detection: they change no output
    "metadata": (_any, ""),
    "safety_identifier": (_any, ""),
    "prompt_cache_key": (_any, ""),
    "prompt_cache_retention": (_any, ""),
    "prompt_cache_options": (_any, ""),
}
_COMPLETION_DEFAULTS: dict[str, tuple[Any, str]] = {
    **_SHARED_DEFAULTS,
    "suffix": (_one_of(""), 'null or ""'),
}
# fields of an assistant turn that a client copies back from an earlier reply
_MESSAGE_DEFAULTS: dict[str, tuple[Any, str]] = {
    "name": (_none, "null (names are not part of the chat template)"),
    "tool_calls": (_empty, "null or []"),
    "function_call": (_none, "null"),
    "refusal": (_none, "null"),
    "audio": (_none, "null"),
    "annotations": (_empty, "null or []"),
}


def _only_defaults(table: dict[str, tuple[Any, str]]) -> Any:
    """A field validator: the value of an unimplemented field must ask for nothing (see the tables)."""
    def check(cls: type, v: Any, info: ValidationInfo) -> Any:
        ok, shown = table[info.field_name]
        if not ok(v):
            raise PydanticCustomError("unsupported_parameter",
                                      "'{field}' is not supported by this server: only {shown} is accepted",
                                      {"field": info.field_name, "shown": shown})
        return v
    return field_validator(*table, mode="before")(classmethod(check))


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: StrictBool | None = False
    include_obfuscation: StrictBool | None = None  # no obfuscation padding is sent; harmless


class GenerationRequest(BaseModel):
    """Fields shared by chat and raw completions (sampling, limits, streaming)."""

    # unknown fields are refused by name (a field we silently dropped would answer another request)
    model_config = ConfigDict(extra="forbid")

    model: Annotated[str, Field(strict=True)]
    max_tokens: Annotated[StrictInt, Field(ge=1)] | None = None
    temperature: Annotated[Number, Field(ge=0, le=2)] | None = None
    top_p: Annotated[Number, Field(gt=0, le=1)] | None = None
    top_k: Annotated[StrictInt, Field(ge=0)] | None = None  # an extension (vLLM has it too)
    seed: Annotated[StrictInt, Field(ge=0, lt=2**63)] | None = None
    stop: Any = ()
    n: Annotated[StrictInt, Field(ge=1, le=MAX_CHOICES)] | None = None
    stream: StrictBool | None = False
    stream_options: StreamOptions | None = None
    frequency_penalty: Any = None
    presence_penalty: Any = None
    logit_bias: Any = None
    user: Any = None

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

    @property
    def choices_per_prompt(self) -> int:
        return self.n or 1


class ChatMessage(BaseModel):
    """One chat turn. ``content`` is a string or a list of ``{"type": "text", "text": ...}`` parts."""

    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "developer", "user", "assistant"]
    content: Any
    name: Any = None
    tool_calls: Any = None
    function_call: Any = None
    refusal: Any = None
    audio: Any = None
    annotations: Any = None

    _defaults = _only_defaults(_MESSAGE_DEFAULTS)

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
    logprobs: StrictBool | None = None
    top_logprobs: Any = None  # checked below (the message names the allowed range)
    response_format: Any = None
    tools: Any = None
    tool_choice: Any = None
    functions: Any = None
    function_call: Any = None
    parallel_tool_calls: Any = None
    audio: Any = None
    modalities: Any = None
    prediction: Any = None
    moderation: Any = None
    reasoning_effort: Any = None
    verbosity: Any = None
    web_search_options: Any = None
    store: Any = None
    service_tier: Any = None
    metadata: Any = None
    safety_identifier: Any = None
    prompt_cache_key: Any = None
    prompt_cache_retention: Any = None
    prompt_cache_options: Any = None

    _defaults = _only_defaults(_CHAT_DEFAULTS)

    @field_validator("top_logprobs", mode="before")
    @classmethod
    def _top_logprobs(cls, v: Any, info: ValidationInfo) -> int | None:
        if v is None:
            return None
        if type(v) is not int or not 0 <= v <= MAX_TOP_LOGPROBS:
            raise ValueError(f"top_logprobs must be an integer in [0, {MAX_TOP_LOGPROBS}]")
        if v and not info.data.get("logprobs"):
            raise ValueError("top_logprobs needs \"logprobs\": true")
        return v

    @property
    def logprobs_top(self) -> int | None:
        """The alternatives per token to return (None: no log-probs)."""
        return (self.top_logprobs or 0) if self.logprobs else None

    def chat(self) -> list[dict[str, str]]:
        # "developer" is the newer name of "system"; chat templates only know the latter
        return [{"role": "system" if m.role == "developer" else m.role, "content": m.content}
                for m in self.messages]


class CompletionRequest(GenerationRequest):
    """POST /v1/completions: a raw prompt (no chat template), or a list of them.

    ``prompt`` is a string, a list of strings, a list of token ids, or a list of token-id lists;
    it is normalised to a list of prompts (each a string or token ids). The reply has ``n`` choices
    per prompt, prompt-major (choice ``p * n + j`` is sample ``j`` of prompt ``p``), as OpenAI's.
    """

    prompt: Any
    echo: StrictBool | None = False
    best_of: Annotated[StrictInt, Field(ge=1)] | None = None
    logprobs: Any = None  # checked below (the message names the allowed range)
    suffix: Any = None

    _defaults = _only_defaults(_COMPLETION_DEFAULTS)

    @field_validator("logprobs", mode="before")
    @classmethod
    def _logprobs(cls, v: Any, info: ValidationInfo) -> int | None:
        if v is None:
            return None
        if type(v) is not int or not 0 <= v <= MAX_COMPLETION_LOGPROBS:
            raise ValueError(f"logprobs must be an integer in [0, {MAX_COMPLETION_LOGPROBS}] (the number of "
                             "alternatives per token)")
        if info.data.get("echo"):  # echo + logprobs asks for the prompt's log-probs as well
            raise PydanticCustomError("unsupported_parameter", "'logprobs' together with 'echo' (the "
                                      "prompt tokens' log-probs) is not supported by this server", {})
        return v

    @property
    def logprobs_top(self) -> int | None:
        return self.logprobs

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt(cls, v: Any) -> list[str | list[int]]:
        def ids(x: Any) -> bool:
            return isinstance(x, list) and bool(x) and all(isinstance(t, int) and not isinstance(t, bool)
                                                           for t in x)
        if isinstance(v, str) or ids(v):
            v = [v]
        if isinstance(v, list) and v and all(isinstance(p, str) or ids(p) for p in v):
            for i, p in enumerate(v):
                if isinstance(p, str) and not p:
                    raise ValueError(f"prompt {i} is empty")
            return v
        raise ValueError("prompt must be a non-empty string, a list of token ids, or a non-empty list of "
                         "either")

    @field_validator("best_of")
    @classmethod
    def _best_of(cls, v: int | None, info: ValidationInfo) -> int | None:
        # best_of > n ranks candidates by log probability, which is not implemented
        if v is not None and v != (info.data.get("n") or 1):
            raise PydanticCustomError("unsupported_parameter",
                                      "'best_of' is not supported by this server: only best_of = n is accepted",
                                      {})
        return v


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
          "extra_forbidden": "unknown_parameter", "unsupported_parameter": "unsupported_parameter"}


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
    elif kind == "extra_forbidden":
        msg = f"unknown parameter '{param}': this server does not implement it"
    elif kind == "unsupported_parameter":
        shown = repr(e.get("input"))
        shown = shown if len(shown) <= 60 else shown[:57] + "..."
        msg = f"{msg} (got {shown})"
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


Choice = tuple[str, str, "dict | None"]  # (text, finish_reason, logprobs object or None)


def chat_response(rid: str, model: str, choices: list[Choice], use: dict, extra: dict) -> dict:
    """A chat reply; ``choices``: (text, finish_reason, logprobs) in index order."""
    return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": i, "message": {"role": "assistant", "content": text},
                         "finish_reason": finish, "logprobs": lp} for i, (text, finish, lp) in enumerate(choices)],
            "usage": use, "orthrus": extra}


def chat_chunk(rid: str, model: str, created: int, index: int, delta: dict, finish: str | None,
               logprobs: dict | None = None) -> dict:
    return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": index, "delta": delta, "finish_reason": finish, "logprobs": logprobs}]}


def completion_response(rid: str, model: str, choices: list[Choice], use: dict, extra: dict) -> dict:
    """A completions reply; ``choices``: (text, finish_reason, logprobs) in index order."""
    return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [{"index": i, "text": text, "finish_reason": finish, "logprobs": lp}
                        for i, (text, finish, lp) in enumerate(choices)],
            "usage": use, "orthrus": extra}


def completion_chunk(rid: str, model: str, created: int, index: int, text: str, finish: str | None,
                     logprobs: dict | None = None) -> dict:
    return {"id": rid, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": index, "text": text, "finish_reason": finish, "logprobs": logprobs}]}


# ---- log-probs -----------------------------------------------------------------------------------

def _entry(text: str, logprob: float) -> dict[str, Any]:
    return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}


def chat_logprobs(tokens: list[int], lp: "TokenLogprobs", text: Callable[[int], str]) -> dict[str, Any]:
    """The chat ``logprobs`` object of ``tokens``: ``{"content": [{token, logprob, bytes,
    top_logprobs: [{token, logprob, bytes}, ...]}, ...], "refusal": None}``; ``text(id)`` is a
    token's text."""
    content = []
    for tok, value, ids, values in zip(tokens, lp.logprobs, lp.top_ids, lp.top_logprobs):
        content.append({**_entry(text(tok), value), "top_logprobs": [_entry(text(t), v) for t, v in zip(ids, values)]})
    return {"content": content, "refusal": None}


def completion_logprobs(tokens: list[int], lp: "TokenLogprobs", text: Callable[[int], str],
                        offset: int = 0) -> dict[str, Any]:
    """The completions ``logprobs`` object of ``tokens``: ``tokens``, ``token_logprobs``,
    ``top_logprobs`` (per token a dict of the N most likely tokens' texts and, as OpenAI, the chosen
    token's: up to N + 1 entries) and ``text_offset`` (each token's character offset, counted from
    ``offset``, by the lengths of the token texts)."""
    texts = [text(t) for t in tokens]
    tops = []
    for tok_text, value, ids, values in zip(texts, lp.logprobs, lp.top_ids, lp.top_logprobs):
        top: dict[str, float] = {}
        for t, v in zip(ids, values):
            top.setdefault(text(t), v)  # two ids with one text: the likelier one's
        top.setdefault(tok_text, value)
        tops.append(top)
    offsets = []
    for t in texts:
        offsets.append(offset)
        offset += len(t)
    return {"tokens": texts, "token_logprobs": list(lp.logprobs), "top_logprobs": tops, "text_offset": offsets}


def usage_chunk(rid: str, model: str, created: int, obj: str, use: dict) -> dict:
    """The last chunk when ``stream_options.include_usage`` is set: no choices, only usage."""
    return {"id": rid, "object": obj, "created": created, "model": model, "choices": [], "usage": use}
