"""One JSON Lines reader for every input file (prompts, training data, prompt sets).

Errors are :class:`OrthrusError` s that name the file and line, so a bad row anywhere reads the same.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Callable, Iterator

from orthrus.errors import OrthrusError


def iter_jsonl(path: str | Path, what: str = "file", opener: Callable[..., Any] = open) -> Iterator[tuple[str, dict]]:
    """Yield ``(where, object)`` for every non-blank line; ``where`` is ``"path:line"``.

    Args:
        path: a file, or ``"-"`` for standard input.
        what: how errors name the file (e.g. ``"prompts file"``).
        opener: ``open`` or e.g. ``gzip.open`` (called as ``opener(path, "rt", encoding="utf-8")``).
    """
    try:
        if str(path) == "-":
            text = sys.stdin.read()
        else:
            with opener(Path(path).expanduser(), "rt", encoding="utf-8", newline="") as f:
                text = f.read()
    except FileNotFoundError:
        raise OrthrusError(f"{what} '{path}' does not exist") from None
    except IsADirectoryError:
        raise OrthrusError(f"{what} '{path}' is a folder, not a .jsonl file") from None
    except UnicodeDecodeError as e:
        raise OrthrusError(f"{what} '{path}' is not UTF-8 text: {e.reason}") from None
    except OSError as e:
        raise OrthrusError(f"cannot read {what} '{path}': {e.strerror or e}") from None
    # JSON Lines are separated by "\n" (or "\r\n") only: str.splitlines() would also split inside
    # strings holding U+2028, U+0085, form feeds... which json.dumps(ensure_ascii=False) writes raw
    for n, line in enumerate(text.split("\n"), start=1):
        line = line.removesuffix("\r")
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise OrthrusError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(obj, dict):
            raise OrthrusError(f"{where}: not a JSON object (each line must be an object like {{\"prompt\": \"...\"}})")
        yield where, obj
