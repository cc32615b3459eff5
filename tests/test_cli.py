"""``orthrus generate``: its contract, its output formats and its errors.

Most tests call :func:`orthrus.cli.main` in-process (fast). Bad input is checked with model loading
forbidden, which proves that cheap errors come before the ~3 s model load. The output logic (input
order under continuous batching, live streaming) is checked against a scripted fake engine. The real
default model is used for: one subprocess run compared token for token with transformers'
``generate``, parallel == AR on uneven prompts, and the context-length error (these share one
engine through ``load_engine``'s in-process cache).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
import torch

from orthrus.cli import main
from orthrus.commands import common, generate
from orthrus.config import GenerationConfig
from orthrus.decoding.generator import Event, Row
from orthrus.errors import OrthrusError

REPO = Path(__file__).resolve().parents[1]
STAT_KEYS = {"forward_passes", "prefill_passes", "draft_passes", "verify_passes", "seconds",
             "tokens_per_second", "tpf", "acceptance_length"}
ROW_KEYS = {"id", "prompt", "text", "token_ids", "finish_reason", "stats"}
# every real in-process run uses these options, so that they share one cached engine
REAL = ["--adapter", "init", "--block-size", "8"]


def run_cli(argv: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    """``main(argv)`` in-process -> (exit code, stdout, stderr); argparse's exits count too."""
    try:
        rc = main(argv)
    except SystemExit as e:
        rc = int(e.code or 0)
    out, err = capsys.readouterr()
    return rc, out, err


def assert_one_line_error(rc: int, out: str, err: str, *needles: str) -> None:
    assert rc == 2, (rc, err)
    assert out == ""
    assert "Traceback" not in err
    lines = [ln for ln in err.splitlines() if ln.strip() and not ln.startswith("INFO ")]
    assert len(lines) == 1 and lines[0].startswith("orthrus: error: "), err
    for n in needles:
        assert n.lower() in lines[0].lower(), (n, lines[0])


def write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


# ---- bad input, rejected before any model is loaded --------------------------------------------

def _folder_with_config(tmp: Path) -> str:
    (tmp / "m").mkdir()
    write(tmp / "m" / "config.json", "{}")
    return str(tmp / "m")


BAD: dict[str, tuple[Callable[[Path], list[str]], tuple[str, ...]]] = {
    "unknown model": (lambda t: ["hi", "--model", "no-such-model"], ("unknown model", "smollm2-135m")),
    "missing gguf": (lambda t: ["hi", "--model", str(t / "x.gguf")], ("does not exist",)),
    "no prompt": (lambda t: [], ("no prompt",)),
    "empty prompt": (lambda t: ["  "], ("empty",)),
    "zero max tokens": (lambda t: ["hi", "--max-new-tokens", "0"], ("max-new-tokens",)),
    "negative max tokens": (lambda t: ["hi", "--max-new-tokens", "-3"], ("max-new-tokens",)),
    "negative temperature": (lambda t: ["hi", "--temperature", "-1"], ("temperature",)),
    "bad top-p": (lambda t: ["hi", "--top-p", "0"], ("top_p",)),
    "zero batch": (lambda t: ["hi", "--batch-size", "0"], ("batch-size",)),
    "zero block": (lambda t: ["hi", "--adapter", "init", "--block-size", "0"], ("block",)),
    "missing file": (lambda t: ["--prompts-file", str(t / "none.jsonl")], ("does not exist",)),
    "folder as file": (lambda t: ["--prompts-file", str(t)], ("folder",)),
    "invalid json": (lambda t: ["--prompts-file", write(t / "p.jsonl", '{"prompt": "a"}\n{"prompt": \n')],
                     (":2:", "invalid JSON")),
    "no prompt key": (lambda t: ["--prompts-file", write(t / "p.jsonl", '{"prompt": "a"}\n\n{"id": 3}\n')],
                      (":3:", "'prompt'", "missing")),
    "prompt not str": (lambda t: ["--prompts-file", write(t / "p.jsonl", '{"prompt": 5}\n')],
                       (":1:", "string")),
    "row not object": (lambda t: ["--prompts-file", write(t / "p.jsonl", '["a"]\n')], (":1:", "object")),
    "empty row prompt": (lambda t: ["--prompts-file", write(t / "p.jsonl", '{"prompt": ""}\n')],
                         (":1:", "empty")),
    "bad id": (lambda t: ["--prompts-file", write(t / "p.jsonl", '{"prompt": "a", "id": [1]}\n')],
               (":1:", "id")),
    "empty file": (lambda t: ["--prompts-file", write(t / "p.jsonl", "\n\n")], ("no prompts",)),
    "not utf-8": (lambda t: ["--prompts-file", str(t / "b.jsonl")], ("UTF-8",)),
    "parallel without adapter": (lambda t: ["hi", "--mode", "parallel", "--draft", "diffusion", "--model",
                                            _folder_with_config(t)], ("parallel", "--adapter")),
    "missing adapter": (lambda t: ["hi", "--adapter", str(t / "nope")], ("adapter", "init")),
    "adapter without weights": (lambda t: ["hi", "--adapter", str(t)], ("adapter.safetensors",)),
    "bad adapter kind": (lambda t: ["hi", "--adapter", "init", "--adapter-kind", "lora:0"], ("lora:R",)),
    "kind without init": (lambda t: ["hi", "--adapter-kind", "lora:4"], ("--adapter init",)),
    "bad dtype": (lambda t: ["hi", "--dtype", "int8"], ("--dtype",)),
    "bad mode": (lambda t: ["hi", "--mode", "fast"], ("--mode",)),
    "bad verify": (lambda t: ["hi", "--verify", "forest"], ("--verify",)),
    "tree of n-gram drafts": (lambda t: ["hi", "--draft", "ngram", "--verify", "tree"],
                              ("verify 'tree'", "'ngram'", "chain")),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_fails_fast_with_one_line(case: str, tmp_path: Path, monkeypatch, capsys) -> None:
    def no_load(*a: Any, **k: Any) -> None:
        raise AssertionError("the model was loaded before the input was checked")

    monkeypatch.setattr(common.Orthrus, "from_pretrained", no_load)
    (tmp_path / "b.jsonl").write_bytes(b'{"prompt": "\xff\xfe"}\n')
    argv, needles = BAD[case]
    rc, out, err = run_cli(["generate", *argv(tmp_path)], capsys)
    assert_one_line_error(rc, out, err, *needles)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error where there is no CUDA")
def test_cuda_where_there_is_none(monkeypatch, capsys) -> None:
    monkeypatch.setattr(common.Orthrus, "from_pretrained", lambda *a, **k: 1 / 0)
    assert_one_line_error(*run_cli(["generate", "hi", "--device", "cuda"], capsys), "CUDA")


def test_corrupt_model_files(tmp_path: Path, monkeypatch, capsys) -> None:
    """A garbage .gguf and a folder with a broken config.json: one line, exit 2, nothing cached."""
    monkeypatch.setenv("ORTHRUS_CACHE", str(tmp_path / "cache"))
    gguf = write(tmp_path / "bad.gguf", "not a gguf file")
    assert_one_line_error(*run_cli(["generate", "hi", "--model", gguf, "--mode", "ar"], capsys), "bad.gguf")
    folder = tmp_path / "hf"
    folder.mkdir()
    write(folder / "config.json", "{ broken")
    assert_one_line_error(*run_cli(["generate", "hi", "--model", str(folder)], capsys), "config.json")


def test_read_prompts_jsonl(tmp_path: Path) -> None:
    path = write(tmp_path / "p.jsonl", '{"prompt": "a", "id": "x"}\n\n{"prompt": "b"}\n{"id": 7, "prompt": "c"}\n')
    assert common.read_prompts_jsonl(path) == [("x", "a"), (1, "b"), (7, "c")]
    assert common.read_prompts_jsonl(path, start=2) == [("x", "a"), (3, "b"), (7, "c")]
    with pytest.raises(OrthrusError, match="does not exist"):
        common.read_prompts_jsonl(str(tmp_path / "missing.jsonl"))


def test_default_mode(tmp_path: Path, monkeypatch) -> None:
    """Parallel when the drafts have a source (an adapter, given or shipped for the model, or
    self-drafting: float32 on a CPU), else AR."""
    from orthrus.cli import build_parser
    from orthrus.models.quant import fp16_available

    def mode(*argv: str) -> str:
        return common.resolve_mode(build_parser().parse_args(["generate", "hi", *argv]))

    monkeypatch.setitem(common.DEFAULT_ADAPTERS, "smollm2-135m", tmp_path / "none")
    assert mode() == ("parallel" if fp16_available() else "ar")  # hybrid-self needs no adapter
    assert mode("--dtype", "bfloat16") == "ar"
    assert mode("--adapter", "init") == "parallel"
    assert mode("--adapter", "init", "--mode", "ar") == "ar"
    (tmp_path / "none").mkdir()
    (tmp_path / "none" / "adapter.safetensors").write_bytes(b"")
    assert mode() == "parallel"


# ---- output logic, against a scripted engine ----------------------------------------------------

class ScriptedEngine:
    """Plays back events in a given order; ``check`` runs between events (e.g. to read stdout)."""

    def __init__(self, script: list[tuple[int, str, str | None]], check: Callable[[int], None]) -> None:
        self.script, self.check = script, check

    def stream(self, prompts: list[str], config: GenerationConfig, batch_size: int = 8,
               chat_template: bool = True, stream_text: bool = True) -> Iterator[Event]:
        rows = [Row(i, i, [1, 2, 3], config, 1) for i in range(len(prompts))]
        for step, (i, text, finish) in enumerate(self.script):
            r = rows[i]
            tok = len(r.tokens) + 10
            r.tokens.append(tok)
            r.text += text
            r.stats.verify_passes += 1
            r.stats.tokens += 1
            r.finish_reason = finish
            yield Event(i, [tok], text, finish, r)
            self.check(step)


def test_json_rows_in_input_order_as_soon_as_possible(monkeypatch, capsys) -> None:
    # row 2 finishes first, then 0, then 1: rows print only once every earlier row has
    script = [(0, "a", None), (2, "c", "stop"), (0, "b", "length"), (1, "d", "stop")]
    printed: list[list[int]] = []

    def check(step: int) -> None:
        printed.append([json.loads(ln)["id"] for ln in capsys.readouterr().out.splitlines()])

    monkeypatch.setattr(generate, "load_engine", lambda args, **kw: ScriptedEngine(script, check))
    rc = main(["generate", "p0", "p1", "p2", "--json", "--mode", "ar"])
    assert rc == 0
    assert printed == [[], [], [0], [1, 2]]


def test_json_ids_from_file_and_arguments(tmp_path: Path, monkeypatch, capsys) -> None:
    script = [(2, "z", "stop"), (1, "y", "stop"), (0, "x", "length")]
    monkeypatch.setattr(generate, "load_engine", lambda args, **kw: ScriptedEngine(script, lambda s: None))
    path = write(tmp_path / "p.jsonl", '{"prompt": "from file", "id": "q1"}\n{"prompt": "no id"}\n')
    rc, out, err = run_cli(["generate", "arg", "--prompts-file", path, "--json", "--mode", "ar"], capsys)
    assert rc == 0
    rows = [json.loads(ln) for ln in out.splitlines()]
    assert [(r["id"], r["prompt"], r["text"]) for r in rows] == [(0, "arg", "x"), ("q1", "from file", "y"),
                                                                  (2, "no id", "z")]
    assert all(set(r) == ROW_KEYS and STAT_KEYS <= set(r["stats"]) for r in rows)
    assert rows[0]["finish_reason"] == "length" and rows[1]["finish_reason"] == "stop"
    assert err.strip().splitlines()[-1].startswith("orthrus: 3 prompt(s), 3 tokens")


def test_plain_output_streams_live(monkeypatch, capsys) -> None:
    seen: list[str] = []
    script = [(0, "Hel", None), (0, "lo", None), (0, "!", "stop")]
    engine = ScriptedEngine(script, lambda s: seen.append(capsys.readouterr().out))
    monkeypatch.setattr(generate, "load_engine", lambda args, **kw: engine)
    assert main(["generate", "hi", "--mode", "ar"]) == 0
    assert seen == ["Hel", "lo", "!\n"]  # each delta is on stdout before the next is generated


def test_plain_output_several_prompts(monkeypatch, capsys) -> None:
    script = [(1, "one", None), (0, "zero", "stop"), (1, " more", "length")]
    monkeypatch.setattr(generate, "load_engine", lambda args, **kw: ScriptedEngine(script, lambda s: None))
    rc, out, _ = run_cli(["generate", "a", "b", "--mode", "ar"], capsys)
    assert rc == 0
    assert out == "=== 0 ===\nzero\n=== 1 ===\none more\n"  # each under its header, as it finishes


# ---- the real default model ---------------------------------------------------------------------

PROMPTS = ["What is 2+2?", "Write one sentence about the sea.",
           "List three prime numbers, then explain in two sentences why each of them is prime.", "Hi"]


def test_cli_matches_transformers_generate(real_hf) -> None:
    """A real ``python -m orthrus.cli`` process, greedy AR in fp32 == transformers' own generate."""
    argv = [sys.executable, "-m", "orthrus.cli", "generate", "--json", "--mode", "ar", "--dtype", "float32",
            "--max-new-tokens", "16", PROMPTS[0], PROMPTS[2]]
    # one thread: spinning OpenMP workers on a busy 2-core machine cost far more than they gain here
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=300, cwd=REPO, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    rows = [json.loads(ln) for ln in proc.stdout.splitlines()]
    assert [r["id"] for r in rows] == [0, 1]
    summary = proc.stderr.strip().splitlines()[-1]
    assert summary.startswith("orthrus: 2 prompt(s)") and "tok/s" in summary and "TPF" in summary

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(real_hf.name_or_path)
    for row, prompt in zip(rows, [PROMPTS[0], PROMPTS[2]]):
        assert set(row) == ROW_KEYS and row["prompt"] == prompt
        ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                      tokenize=True, return_dict=True)["input_ids"]
        x = torch.tensor([ids])
        with torch.no_grad():
            ref = real_hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=16, do_sample=False,
                                   pad_token_id=tok.eos_token_id)[0, len(ids):].tolist()
        assert row["token_ids"] == ref
        assert row["text"] == tok.decode(ref, skip_special_tokens=True)
        assert row["finish_reason"] == ("stop" if len(ref) < 16 else "length")
        st = row["stats"]
        assert STAT_KEYS <= set(st)
        assert st["draft_passes"] == 0 and st["forward_passes"] == st["verify_passes"] > 0
        assert st["prefill_passes"] >= 1


def test_parallel_equals_ar_on_uneven_prompts(tmp_path: Path, capsys) -> None:
    """--mode parallel (untrained adapter, continuous batching of 4) gives AR's tokens exactly."""
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps({"id": f"r{i}", "prompt": p}) + "\n" for i, p in enumerate(PROMPTS)))
    common_args = ["generate", "--prompts-file", str(path), "--json", "--max-new-tokens", "24", *REAL]
    rc, out_ar, _ = run_cli([*common_args, "--mode", "ar", "--batch-size", "1"], capsys)
    assert rc == 0
    # every cycle drafts (on a CPU, auto would stop adapter drafts beyond 2 rows)
    rc, out_par, err = run_cli([*common_args, "--mode", "parallel", "--batch-size", "4", "--max-draft-rows", "all"],
                               capsys)
    assert rc == 0
    ar = [json.loads(ln) for ln in out_ar.splitlines()]
    par = [json.loads(ln) for ln in out_par.splitlines()]
    assert [r["id"] for r in par] == [r["id"] for r in ar] == ["r0", "r1", "r2", "r3"]
    for a, p in zip(ar, par):
        assert p["token_ids"] == a["token_ids"] and p["text"] == a["text"]
        assert p["finish_reason"] == a["finish_reason"]
        s = p["stats"]
        assert s["forward_passes"] == s["draft_passes"] + s["verify_passes"]
        assert 0 < s["draft_passes"] <= s["verify_passes"]  # at most one draft per verify
        assert s["acceptance_length"] >= 1.0
    assert "acceptance length" in err.strip().splitlines()[-1]
    # the drafts verified as a tree (rates of the shipped adapter's kind: an untrained one has none)
    rc, out_tree, _ = run_cli([*common_args, "--mode", "parallel", "--batch-size", "4", "--max-draft-rows", "all",
                               "--verify", "tree"], capsys)
    assert rc == 0 and [json.loads(ln)["token_ids"] for ln in out_tree.splitlines()] == [r["token_ids"] for r in ar]

    # plain output of the same request is the JSON row's text, streamed
    rc, out, _ = run_cli(["generate", PROMPTS[1], "--max-new-tokens", "24", "--mode", "ar", *REAL], capsys)
    assert rc == 0 and out == ar[1]["text"] + "\n"


def test_rows_of_one_call_draw_independent_samples(capsys) -> None:
    """Three identical sampled prompts give three samples (row i uses seed SEED + i), and each row
    is reproduced by its prompt alone with that seed; --seed still makes the whole run repeatable."""
    prompt = "Name a fruit."
    args = ["generate", prompt, prompt, prompt, "--json", "--temperature", "1", "--max-new-tokens", "12",
            "--mode", "ar", *REAL]
    rc, out, _ = run_cli([*args, "--seed", "5"], capsys)
    assert rc == 0
    rows = [json.loads(ln)["token_ids"] for ln in out.splitlines()]
    assert len(rows) == 3 and len({tuple(r) for r in rows}) == 3, rows  # was: the same sample 3 times
    rc, again, _ = run_cli([*args, "--seed", "5"], capsys)
    assert rc == 0 and [json.loads(ln)["token_ids"] for ln in again.splitlines()] == rows
    rc, solo, _ = run_cli(["generate", prompt, "--json", "--temperature", "1", "--max-new-tokens", "12",
                           "--mode", "ar", *REAL, "--seed", "7"], capsys)
    assert rc == 0 and json.loads(solo)["token_ids"] == rows[2]


def test_context_length_error(capsys) -> None:
    rc, out, err = run_cli(["generate", "hi", "--max-new-tokens", "100000", "--mode", "ar", *REAL], capsys)
    assert_one_line_error(rc, out, err, "context")


def test_block_size_auto_applies_the_measured_choice(monkeypatch: pytest.MonkeyPatch) -> None:
    """``--block-size auto``: K = 1 means plain AR; another K becomes the parallel block size."""
    import argparse
    import dataclasses
    from types import SimpleNamespace

    from orthrus.bench import blocksize
    from orthrus.commands.common import apply_auto_block_size

    gen = GenerationConfig(mode="parallel", max_new_tokens=8)
    args = argparse.Namespace(block_size="auto", batch_size=2)
    seen = []
    for k, mode, block in ((1, "ar", None), (4, "parallel", 4)):
        monkeypatch.setattr(blocksize, "cached_block_size", lambda engine, batch_size, candidates, k=k, **kw:
                            seen.append(batch_size) or blocksize.BlockSizeChoice(k, reason="test"))
        out = apply_auto_block_size(args, object(), gen)
        assert (out.mode, out.block_size) == (mode, block)
    assert apply_auto_block_size(args, object(), gen, n_prompts=1).block_size == 4
    assert seen == [2, 2, 1]  # timed at the batch the run will have: --batch-size, at most the prompts
    assert apply_auto_block_size(argparse.Namespace(block_size=8), object(), gen) is gen
    # the run's verification is what gets measured: trees for greedy rows with an adapter's rank rates
    trees = []
    monkeypatch.setattr(blocksize, "cached_block_size", lambda engine, batch_size, candidates, tree:
                        trees.append(tree) or blocksize.BlockSizeChoice(4, reason="test"))
    ranked = SimpleNamespace(adapter=SimpleNamespace(config=SimpleNamespace(draft_ranks=((0.9, 0.1),))))
    for g in (gen, dataclasses.replace(gen, temperature=0.7), dataclasses.replace(gen, verify="chain")):
        apply_auto_block_size(args, ranked, g)
    apply_auto_block_size(args, SimpleNamespace(adapter=None), gen)
    assert trees == [True, False, False, False]
    # the measured schedule: taken with --schedule auto only; an explicit K is kept (only its schedule measured)
    asked = []
    monkeypatch.setattr(blocksize, "cached_block_size", lambda engine, batch_size, candidates, **kw:
                        asked.append(tuple(candidates)) or blocksize.BlockSizeChoice(4, "one-pass", 2, reason="t"))
    out = apply_auto_block_size(args, object(), gen)
    assert (out.block_size, out.schedule) == (4, "two-pass")
    out = apply_auto_block_size(argparse.Namespace(block_size="auto", schedule="auto"), object(), gen)
    assert (out.block_size, out.schedule, out.candidates) == (4, "one-pass", 2)
    fixed = GenerationConfig(mode="parallel", block_size=8)
    out = apply_auto_block_size(argparse.Namespace(block_size=8, schedule="auto"), object(), fixed)
    assert (out.block_size, out.schedule, out.candidates) == (8, "one-pass", 2) and asked[-1] == (8,)


def test_default_draft_is_hybrid_self_on_a_cpu_else_hybrid_with_an_adapter(monkeypatch: pytest.MonkeyPatch) -> None:
    """--draft defaults to hybrid-self where the model can self-draft (float32 on a CPU: needs no
    adapter, so parallel mode becomes the default for every model there), to hybrid with an
    explicit --adapter or elsewhere with an adapter (not with --schedule one-pass, which drafts by
    diffusion only); with --block-size auto, a machine where no diffusion K pays drafts by n-gram
    alone instead of falling back to AR."""
    import argparse

    from orthrus.bench import blocksize
    from orthrus.commands import common
    from orthrus.models.quant import fp16_available

    monkeypatch.setattr(common, "has_adapter", lambda a: a.model == "with")
    ns = lambda **kw: argparse.Namespace(**{"draft": None, "schedule": "two-pass", "model": "with", "adapter": None,  # noqa: E731
                                            "device": "cpu", "dtype": "float32", "mode": None, **kw})
    cpu = "hybrid-self" if fp16_available() else "hybrid"
    assert common.resolve_draft(ns()) == cpu
    assert common.resolve_draft(ns(dtype="bfloat16")) == "hybrid"
    assert common.resolve_draft(ns(adapter="runs/a")) == "hybrid"
    assert common.resolve_draft(ns(compile="on")) == cpu  # compiled cycles self-draft too
    assert common.resolve_draft(ns(model="without", dtype="bfloat16")) == "diffusion"
    assert common.resolve_draft(ns(schedule="one-pass")) == "diffusion"
    assert common.resolve_draft(ns(draft="ngram")) == "ngram"
    if fp16_available():  # no adapter: parallel by default all the same, AR when asked
        assert common.resolve_mode(ns(model="without")) == "parallel"
        assert common.resolve_mode(ns(model="without", mode="ar")) == "ar"
        assert common.resolve_mode(ns(model="without", dtype="bfloat16")) == "ar"
    hyb = GenerationConfig(mode="parallel", draft="hybrid", max_new_tokens=8)
    for k, want in ((1, ("ngram", None)), (4, ("hybrid", 4))):
        monkeypatch.setattr(blocksize, "cached_block_size", lambda engine, batch_size, candidates, k=k, **kw:
                            blocksize.BlockSizeChoice(k, reason="test"))
        out = common.apply_auto_block_size(argparse.Namespace(block_size="auto"), object(), hyb)
        assert (out.mode, out.draft, out.block_size) == ("parallel", *want)


def test_cpu_default_with_the_shipped_adapter_measures_the_block_size(monkeypatch: pytest.MonkeyPatch) -> None:
    """No --block-size, no --adapter, a shipped adapter, a CPU: measured (auto), not the adapter's K;
    an explicit K, an explicit adapter or AR mode keep what was asked for."""
    import argparse

    from orthrus.commands import common

    parallel, ar = GenerationConfig(mode="parallel"), GenerationConfig(mode="ar")
    args = dict(block_size=None, adapter=None, device="cpu", model="smollm2-135m")
    monkeypatch.setattr(common, "has_adapter", lambda a: False)
    assert not common.auto_block_size_wanted(argparse.Namespace(**args), parallel)  # nothing shipped
    monkeypatch.setattr(common, "has_adapter", lambda a: True)
    assert common.auto_block_size_wanted(argparse.Namespace(**args), parallel)
    assert not common.auto_block_size_wanted(argparse.Namespace(**args), ar)
    assert not common.auto_block_size_wanted(argparse.Namespace(**{**args, "block_size": 8}), parallel)
    assert not common.auto_block_size_wanted(argparse.Namespace(**{**args, "adapter": "runs/a"}), parallel)
    assert common.auto_block_size_wanted(argparse.Namespace(**{**args, "adapter": "runs/a", "block_size": "auto"}),
                                         parallel)


def test_compile_defaults_to_a_timed_trial_for_long_cpu_jobs_only(monkeypatch):
    """--compile auto (the default, or $ORTHRUS_COMPILE): long float32 CPU jobs compile with a
    timing trial per cycle shape ("auto"); short generate jobs, chat (0 tokens), GPUs and other
    dtypes stay eager; on/off and --no-compile are obeyed; a bad $ORTHRUS_COMPILE is refused."""
    import argparse

    from orthrus.commands import common

    monkeypatch.delenv(common.COMPILE_ENV, raising=False)
    ns = lambda **kw: argparse.Namespace(**{"device": "cpu", "dtype": "float32", "compile": None, **kw})  # noqa: E731
    big, small = common.COMPILE_MIN_TOKENS, common.COMPILE_MIN_TOKENS - 1
    assert common.resolve_compile(ns(), None) == "auto"  # serve, bench, distill
    assert common.resolve_compile(ns(), big) == "auto"
    assert common.resolve_compile(ns(), small) is False
    assert common.resolve_compile(ns(), 0) is False  # chat
    assert common.resolve_compile(ns(dtype="bfloat16"), None) is False
    assert common.resolve_compile(ns(device="cuda"), None) is False
    assert common.resolve_compile(ns(compile="on"), 0) is True
    assert common.resolve_compile(ns(compile="off"), None) is False
    monkeypatch.setenv(common.COMPILE_ENV, "on")
    assert common.resolve_compile(ns(), 0) is True
    assert common.resolve_compile(ns(compile="off"), None) is False  # the flag beats the variable
    monkeypatch.setenv(common.COMPILE_ENV, "sometimes")
    with pytest.raises(OrthrusError, match="ORTHRUS_COMPILE must be one of auto, on, off"):
        common.resolve_compile(ns(), None)
    parser = argparse.ArgumentParser()
    common.add_compile_arg(parser)
    assert parser.parse_args([]).compile is None
    assert parser.parse_args(["--compile"]).compile == "on"
    assert parser.parse_args(["--no-compile"]).compile == "off"
    assert parser.parse_args(["--compile", "auto"]).compile == "auto"


def test_bench_compiles_only_a_long_job(monkeypatch, tmp_path):
    """`orthrus bench` tells --compile auto its job size: prompts x new tokens x modes (the setup
    script's two-prompt bench stays eager; a full prompt set compiles)."""
    from orthrus.commands import bench as bench_cmd

    seen = []

    def fake_load(args, **kw):
        seen.append(kw.get("job_tokens"))
        raise SystemExit(0)  # stop before loading anything

    monkeypatch.setattr(bench_cmd, "load_engine", fake_load)
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "a"}\n{"prompt": "b"}\n')
    with pytest.raises(SystemExit):
        main(["bench", "--prompts", str(prompts), "--limit", "0", "--modes", "ar,ngram", "--max-new-tokens", "64"])
    assert seen == [2 * 64 * 2]
