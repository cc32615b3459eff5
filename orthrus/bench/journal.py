"""A benchmark journal: every finished round appended to a JSONL file, so that a long run resumes.

A full prompt set at 256 new tokens takes hours on a CPU (HumanEval's 164 prompts through four
modes: ~2 h on two cores), longer than a quiet stretch of a shared machine lasts. With a journal,
``orthrus bench --journal PATH`` writes one line per finished round (every mode's ids, finish
reasons, counters and seconds for that round) and, run again with the same arguments, skips the
rounds already there: a run killed at any point loses at most the round in progress.

The first line is a header naming everything that makes rounds comparable: the machine (CPU or GPU
name, cores, threads, torch), the model fingerprint, the adapter's weights digest, the settings and
a digest of the prompts' token ids. A journal from anything else is refused with the keys that
differ, never mixed in. Each round is timed within one process (its modes interleaved), so
ratios between modes stay those of interleaved runs; the report lists how many processes wrote it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

import torch

from orthrus.decoding.stats import DecodeStats
from orthrus.errors import OrthrusError

JOURNAL_SCHEMA = "orthrus-bench-journal/1"


def check_journal_path(path: str | Path) -> Path:
    """``path`` as a journal path, or a clear error where it cannot be one (checked before any run)."""
    p = Path(path)
    if p.is_dir():
        raise OrthrusError(f"--journal {path} is a directory: pass a file path (FILE.jsonl)")
    if p.exists():
        with open(p, "rb") as f:
            first = f.readline()
        try:
            ok = not first.strip() or json.loads(first).get("schema") == JOURNAL_SCHEMA
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            ok = False
        if not ok:
            raise OrthrusError(f"{path} is not a bench journal of schema {JOURNAL_SCHEMA}; pass another --journal path")
    elif not p.parent.is_dir():
        raise OrthrusError(f"--journal {path}: its folder {p.parent} does not exist")
    return p


def tensors_digest(module: torch.nn.Module | None) -> str | None:
    """sha256 (16 hex digits) of a module's state dict, names and bytes in name order."""
    if module is None:
        return None
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def ids_digest(prompt_ids: list[list[int]]) -> str:
    """sha256 (16 hex digits) of the prompts' token ids."""
    return hashlib.sha256(json.dumps(prompt_ids, separators=(",", ":")).encode()).hexdigest()[:16]


def _differences(a: Any, b: Any, prefix: str = "") -> list[tuple[str, Any, Any]]:
    """``(dotted key, a's value, b's value)`` wherever two JSON-like dicts differ (nested dicts by key)."""
    if not (isinstance(a, dict) and isinstance(b, dict)):
        return [] if a == b else [(prefix or "header", a, b)]
    return [d for k in sorted(set(a) | set(b))
            for d in _differences(a.get(k), b.get(k), f"{prefix}.{k}" if prefix else k)]


@dataclasses.dataclass
class RoundRecord:
    """One mode's output for one round, as journaled."""

    ids: list[list[int]]
    finish: list[str]
    stats: DecodeStats
    seconds: float
    forward_calls: int

    def to_dict(self) -> dict[str, Any]:
        return {"ids": self.ids, "finish": self.finish, "stats": dataclasses.asdict(self.stats),
                "seconds": self.seconds, "forward_calls": self.forward_calls}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "RoundRecord":
        return cls(d["ids"], d["finish"], DecodeStats(**d["stats"]), float(d["seconds"]), int(d["forward_calls"]))


class BenchJournal:
    """The journal at ``path`` for a run described by ``header`` (a JSON-able dict).

    Opening reads the rounds already journaled (a torn last line, from a process killed while
    writing, is dropped) after checking that the file's header equals ``header``; a new file gets
    the header as its first line.
    """

    def __init__(self, path: str | Path, header: dict[str, Any]) -> None:
        self.path = check_journal_path(path)
        self.header = {"schema": JOURNAL_SCHEMA, **header}
        self.done: dict[int, dict[str, RoundRecord]] = {}
        self.writers: set[str] = set()  # process starts that wrote rounds
        self.started = f"{time.time():.3f}-{os.getpid()}"
        if self.path.exists() and self.path.stat().st_size > 0:
            self._read()
        else:
            self._append(self.header)
        self.resumed = len(self.done)

    def _read(self) -> None:
        # bytes, so that the offsets below are file offsets whatever the lines hold
        lines = self.path.read_bytes().split(b"\n")
        found = json.loads(lines[0])  # check_journal_path read it
        diff = _differences(found, self.header)
        if diff:
            shown = "; ".join(f"{k}: journal {json.dumps(a)} vs now {json.dumps(b)}" for k, a, b in diff)
            raise OrthrusError(f"{self.path} was written by another run ({shown}). Rounds timed under other "
                               "conditions would be mixed into one report: rerun with the journal's settings "
                               "on its machine, or pass a new --journal path")
        good = len(lines[0]) + 1
        for line in lines[1:]:
            if not line.strip():
                good += len(line) + 1
                continue
            try:
                rec = json.loads(line)
                results = {m: RoundRecord.from_dict(d) for m, d in rec["results"].items()}
            except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
                break  # a torn last line: the round it held is run again
            self.done[int(rec["round"])] = results
            self.writers.add(str(rec.get("writer")))
            good += len(line) + 1
        if good < self.path.stat().st_size:  # drop the torn tail, so appends start on a clean line
            with open(self.path, "r+b") as f:
                f.truncate(good)

    def _append(self, obj: dict[str, Any]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(obj, separators=(",", ":")) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def record(self, round_index: int, results: dict[str, RoundRecord], load: list[float] | None) -> None:
        """Journal one finished round (every mode's result), in one line."""
        self._append({"round": round_index, "writer": self.started, "load_average": load,
                      "results": {m: r.to_dict() for m, r in results.items()}})
        self.done[round_index] = results
        self.writers.add(self.started)

    def summary(self) -> dict[str, Any]:
        """For the report: where the journal is and how the rounds came together."""
        return {"path": str(self.path), "rounds": len(self.done), "resumed_rounds": self.resumed,
                "processes": len(self.writers)}
