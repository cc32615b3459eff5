"""The benchmark harness: every mode runs on the same ids and the report has its fixed schema; the
exact-match arithmetic; the block-size decision (injected timings, nothing timed here); the CLI's
input checks and, on the real default model, one short end-to-end run."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import TINY_FP, tiny_adapter, tiny_base, token_text
from orthrus import cli
from orthrus.bench import (BenchSettings, BlockSizeChoice, PassTimes, acceptance_curve, blocksize, choose_block_size,
                           decide_block_size, exact_match, expected_tokens, measure_pass_times, parse_modes,
                           run_bench)
from orthrus.bench.report import markdown_table
from orthrus.decoding.stats import DecodeStats
from orthrus.engine import Orthrus
from orthrus.errors import OrthrusError
from orthrus.models.loading import LoadedModel

RESULT_KEYS = {
    "mode", "batch_size", "block_size", "prompts", "tokens", "seconds", "tokens_per_second", "tpf",
    "acceptance_length", "tpf_source", "forward_passes", "prefill_passes", "draft_passes", "verify_passes",
    "speedup_vs_ar", "speedup_vs_hf", "exact_match_vs_ar", "first_divergence", "accept_hist",
    "accept_hist_fraction", "slot_accept_rates", "finish_reasons", "memory",
}
TOP_KEYS = {"schema", "date", "command", "environment", "model", "adapter", "settings", "block_size_choice",
            "results", "per_prompt"}


class CharTokenizer:
    """A tokenizer for tiny models: one id per character (ids 3..92), no chat template."""

    chat_template = None
    pad_token_id = 0

    def __call__(self, text: str) -> dict:
        return {"input_ids": [3 + ord(c) % 90 for c in text]}

    def decode(self, ids, skip_special_tokens=True) -> str:
        return token_text(list(ids))


@pytest.fixture(scope="module")
def tiny_engine(tmp_path_factory):
    """A tiny random llama saved as a Hugging Face folder (for the transformers modes) plus our copy
    of it with a fresh adapter; EOS id 2 so that rows can end early."""
    hf, model = tiny_base("llama", seed=3)
    folder = tmp_path_factory.mktemp("tiny-llama")
    hf.save_pretrained(folder)
    base = LoadedModel(model, CharTokenizer(), (2,), TINY_FP, "tiny-llama", folder)
    return Orthrus(base, tiny_adapter(model, "full", block_size=8), max_draft_rows=None)  # batches draft too


PROMPTS = ["def add(a, b):", "Tell me about the sea.", "x = [1, 2, 3]", "Hello there"]


@pytest.mark.parametrize("batch_size", [1, 3])
def test_bench_report_schema_and_exactness(tiny_engine, tmp_path, batch_size):
    settings = BenchSettings(modes=("ar", "parallel", "hf", "hf-pld"), max_new_tokens=8, batch_size=batch_size,
                             warmup=1, block_size=4)
    report = run_bench(tiny_engine, PROMPTS, settings, out=tmp_path / "r", prompt_source="test", command="x")
    on_disk = json.loads((tmp_path / "r.json").read_text())
    assert on_disk == json.loads(json.dumps(report))
    assert (tmp_path / "r.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert TOP_KEYS <= set(report)
    assert {"device_name", "torch", "transformers", "cpu_threads", "load_average_start"} <= set(report["environment"])
    res = report["results"]
    assert list(res) == ["ar", "parallel", "hf", "hf-pld"]
    for mode, r in res.items():
        assert RESULT_KEYS <= set(r), mode
        assert r["prompts"] == len(PROMPTS) and r["seconds"] > 0 and r["tokens"] > 0
        # fp32: every mode, ours and transformers', gives AR's exact greedy tokens
        assert r["exact_match_vs_ar"] == 1.0 and r["first_divergence"] == [None] * len(PROMPTS), mode
        assert r["memory"]["kind"] == "cpu_weights_plus_kv_cache"
        assert r["memory"]["peak_bytes"] == r["memory"]["weights_bytes"] + r["memory"]["kv_cache_bytes"]
    assert res["ar"]["speedup_vs_ar"] == 1.0 and res["hf"]["speedup_vs_hf"] == 1.0
    assert res["hf-pld"]["batch_size"] == 1 and res["hf"]["batch_size"] == batch_size
    par = res["parallel"]
    assert par["block_size"] == 4 and len(par["slot_accept_rates"]) == 3
    assert par["draft_passes"] == par["verify_passes"] == sum(par["accept_hist"])
    assert par["memory"]["weights_bytes"] > res["ar"]["memory"]["weights_bytes"]  # + the adapter
    assert res["ar"]["tpf"] == res["ar"]["acceptance_length"] == 1.0
    assert res["hf"]["tpf"] == 1.0 and res["hf"]["forward_passes"] > 0
    # per prompt: the same token counts in every mode (the outputs are identical)
    for row in report["per_prompt"]:
        assert len(set(row["tokens"].values())) == 1
    assert report["settings"]["block_size"] == 4 and report["settings"]["n_prompts"] == len(PROMPTS)


def test_bench_without_ar_has_no_exactness(tiny_engine):
    report = run_bench(tiny_engine, PROMPTS[:2], BenchSettings(modes=("hf",), max_new_tokens=4, warmup=0))
    r = report["results"]["hf"]
    assert r["exact_match_vs_ar"] is None and r["speedup_vs_ar"] is None and r["speedup_vs_hf"] == 1.0


def test_exact_match():
    ref = [[1, 2, 3], [4, 5, 6], [7, 8], [9]]
    assert exact_match(ref, ref) == (1.0, [None] * 4)
    rate, div = exact_match(ref, [[1, 2, 3], [4, 0, 6], [7, 8, 2], []])
    assert rate == 0.25 and div == [None, 1, 2, 0]  # a differing token; a longer one; an empty one
    with pytest.raises(ValueError):
        exact_match(ref, ref[:2])


def test_parse_modes_and_settings():
    assert parse_modes("ar, parallel,hf,ar") == ("ar", "parallel", "hf")
    with pytest.raises(OrthrusError, match="unknown mode.*vllm.*use a comma list of ar, parallel, chain, onepass, hybrid, ngram, self, hybrid-self, hf, hf-pld"):
        parse_modes("ar,vllm")
    with pytest.raises(OrthrusError):
        parse_modes(" , ")
    assert BenchSettings(modes=("hf", "ar", "hf")).modes == ("hf", "ar")
    for bad in ({"batch_size": 0}, {"max_new_tokens": 0}, {"warmup": -1}, {"block_size": 0}, {"modes": ("x",)}):
        with pytest.raises(OrthrusError):
            BenchSettings(**{"modes": ("ar",), **bad})


# ---- block size: the decision, with injected timings -----------------------------------------------

def times_for(ar: float, per_token: float, candidates=(2, 4, 8, 16, 32)) -> PassTimes:
    """Cycle times that grow with K: ``ar + per_token * (K - 1)`` for each of draft and verify."""
    return PassTimes(ar=ar, cycle={k: 2 * (ar + per_token * (k - 1)) for k in candidates})


def test_gpu_like_costs_pick_a_large_block():
    """A K-token pass costs about a 1-token pass and acceptance is high: the largest useful K wins."""
    curve = [0.95 ** (i + 1) for i in range(31)]
    choice = decide_block_size(times_for(0.01, 0.0001), curve)
    assert choice.block_size == 32
    assert choice.predicted[32] > choice.predicted[16] > choice.predicted[1]


def test_cpu_like_costs_with_untrained_adapter_choose_ar():
    """Cost linear in K and the acceptance of an untrained adapter: nothing beats AR."""
    curve = [0.7, 0.1, 0.02] + [0.0] * 28
    choice = decide_block_size(times_for(0.02, 0.02), curve)
    assert choice.block_size == 1 and choice.reason.startswith("AR")
    assert all(choice.predicted[k] < choice.predicted[1] for k in (2, 4, 8, 16, 32))


def test_moderate_acceptance_picks_the_best_middle_block():
    # E[a+1](K) = 1 + 0.8 + 0.64 + ...; a cycle costs 2 * (1 + 0.05 (K - 1)) AR steps: gains
    # flatten past K = 8 while costs keep growing
    curve = [0.8 ** (i + 1) for i in range(31)]
    choice = decide_block_size(times_for(1.0, 0.05), curve)
    rates = {k: expected_tokens(curve, k) / (2 * (1 + 0.05 * (k - 1))) for k in (2, 4, 8, 16, 32)}
    assert max(rates, key=rates.get) == 8 and rates[8] > 1.05 > rates[32]
    assert choice.block_size == 8
    assert choice.predicted == pytest.approx({1: 1.0, **rates})


def test_margin_keeps_ar_when_the_gain_is_within_noise():
    # K=2 predicted 3% faster than AR: chosen with no margin, not with the default 5%
    times = PassTimes(ar=1.0, cycle={2: 1.0})
    assert decide_block_size(times, [0.03], [2], margin=0.0).block_size == 2
    assert decide_block_size(times, [0.03], [2]).block_size == 1


def test_ties_go_to_the_smaller_block():
    times = PassTimes(ar=1.0, cycle={2: 0.5, 4: 1.0})
    # K=2: 1.5 tokens / 0.5 s = 3; K=4: (1 + 0.5 + 0.75 + 0.75) / 1.0 s = 3
    choice = decide_block_size(times, [0.5, 0.75, 0.75], [2, 4])
    assert choice.predicted[2] == choice.predicted[4] == 3.0 and choice.block_size == 2


def test_one_pass_schedule_is_chosen_only_when_its_measured_rate_wins():
    # two-pass K=4: 2.0 tokens / 2.0 s = 1.0 (AR: 1.0); one-pass K=4: its own curve, one pass
    times = PassTimes(ar=1.0, cycle={4: 2.0}, onepass={4: 1.25})
    choice = decide_block_size(times, [0.5, 0.3, 0.2], [4], onepass_curve=[0.4, 0.1], onepass_candidates=2)
    assert choice.onepass_predicted[4] == pytest.approx(1.5 / 1.25)
    assert (choice.block_size, choice.schedule, choice.candidates) == (4, "one-pass", 2)
    assert "one-pass" in choice.reason and choice.to_dict()["schedule"] == "one-pass"
    # a weaker one-pass curve: two-pass wins; no one-pass curve: one-pass is not considered
    weak = decide_block_size(PassTimes(ar=0.8, cycle={4: 1.0}, onepass={4: 1.25}), [0.5, 0.3, 0.2], [4],
                             onepass_curve=[0.1], onepass_candidates=2)
    assert (weak.block_size, weak.schedule, weak.candidates) == (4, "two-pass", 0)
    assert decide_block_size(times, [0.5, 0.3, 0.2], [4]).block_size == 1
    assert acceptance_curve(DecodeStats(verify_passes=4, slot_accepts=[2, 1])) == [0.5, 0.25]  # one-pass stats


def test_tree_verified_cycles_are_decided_on_their_own_timings_and_acceptance():
    """tree_tokens: the two-pass rates are measured tokens per tree cycle over the tree cycle's
    time (``times.tree``); the chain's curve and cycle times are not used."""
    times = PassTimes(ar=1.0, cycle={4: 1.0, 8: 1.0}, tree={4: 2.0, 8: 2.5})
    chain = decide_block_size(times, [0.9, 0.9, 0.9, 0.9, 0.9, 0.9, 0.9], [4, 8])
    assert chain.block_size == 8 and chain.verify == "chain"
    tree = decide_block_size(times, [0.9] * 7, [4, 8], tree_tokens={4: 2.4, 8: 3.5})
    assert tree.predicted == pytest.approx({1: 1.0, 4: 1.2, 8: 1.4}) and tree.expected_tokens[8] == 3.5
    assert (tree.block_size, tree.verify, tree.curve) == (8, "tree", []) and "tree" in tree.reason
    assert tree.to_dict()["verify"] == "tree" and tree.to_dict()["pass_seconds"]["tree"] == {"4": 2.0, "8": 2.5}
    slow = decide_block_size(PassTimes(ar=1.0, cycle={4: 1.0}, tree={4: 2.4}), [0.9] * 3, [4], tree_tokens={4: 2.4})
    assert slow.block_size == 1  # 1.0 tok/s: not 5% faster than AR
    with pytest.raises(ValueError, match="no tree pass timing or tree acceptance for block size 8"):
        decide_block_size(times, [], [4, 8], tree_tokens={4: 2.4})


def test_unknown_slots_count_as_rejected_and_missing_timings_raise():
    assert expected_tokens([0.5, 0.5], 8) == 2.0  # slots beyond the calibration add nothing
    assert expected_tokens([0.5, 0.5], 2) == 1.5
    assert expected_tokens([], 4) == 1.0
    with pytest.raises(ValueError, match="no pass timing for block size 8"):
        decide_block_size(times_for(1.0, 0.1, (2, 4)), [0.5], [2, 4, 8])


def test_acceptance_curve_from_stats():
    st = DecodeStats()
    for a in (0, 1, 3, 3):  # accepted drafts per cycle, block size 4
        st.record_cycle(a + 1, a, 4, drafted=True)
    assert acceptance_curve(st) == [0.75, 0.5, 0.5]
    assert expected_tokens(acceptance_curve(st), 4) == pytest.approx(st.acceptance_length) == 2.75
    assert acceptance_curve(DecodeStats()) == []


def test_choose_block_size_wiring(tiny_engine, monkeypatch):
    """choose_block_size: no adapter -> AR; candidates capped at the adapter's block size; the
    calibration's measured curve and the (injected) timings reach the decision."""
    assert choose_block_size(Orthrus(tiny_engine.base, None)).block_size == 1
    seen = {}

    def fake_times(engine, candidates, **kw):
        seen["candidates"] = list(candidates)
        return times_for(1.0, 0.0, candidates)  # free blocks: any acceptance pays

    monkeypatch.setattr(blocksize, "measure_pass_times", fake_times)
    stats = DecodeStats()
    for a in (2, 7, 7, 0):
        stats.record_cycle(a + 1, a, 8, drafted=True)
    choice = choose_block_size(tiny_engine, stats=stats)
    assert seen["candidates"] == [2, 4, 8]  # the tiny adapter's block size is 8
    assert choice.curve == acceptance_curve(stats) and choice.block_size == 8
    # no stats: a short greedy calibration run at the largest candidate fills the curve
    choice = choose_block_size(tiny_engine, prompts=PROMPTS[:2], candidates=(2, 4), calibration_tokens=6)
    assert len(choice.curve) == 3 and all(0.0 <= p <= 1.0 for p in choice.curve)


def test_choose_block_size_for_tree_verification_calibrates_each_k(tiny_engine, monkeypatch):
    """tree=True: one tree-verified calibration run per candidate K gives its tokens per cycle, and
    the tree cycles' timings decide."""
    seen = {}

    def fake_times(engine, candidates, **kw):
        seen.update(kw, candidates=list(candidates))
        return PassTimes(ar=1.0, cycle={k: 100.0 for k in candidates}, tree={k: 0.001 for k in candidates})

    monkeypatch.setattr(blocksize, "measure_pass_times", fake_times)
    verifies = []
    generate = tiny_engine.generate
    monkeypatch.setattr(tiny_engine, "generate", lambda *a, **kw: verifies.append((kw["block_size"], kw["verify"]))
                        or generate(*a, **kw))
    choice = choose_block_size(tiny_engine, prompts=PROMPTS[:2], candidates=(2, 4), calibration_tokens=6, tree=True)
    assert verifies == [(2, "tree"), (4, "tree")] and seen["trees"] is True and seen["candidates"] == [2, 4]
    assert choice.verify == "tree" and set(choice.expected_tokens) == {1, 2, 4}
    assert all(1.0 <= choice.expected_tokens[k] <= k for k in (2, 4))
    assert choice.block_size > 1  # free tree cycles: any acceptance pays (the chain's slow cycles are ignored)


def test_measure_pass_times_covers_every_candidate(tiny_engine):
    times = measure_pass_times(tiny_engine, (2, 4), batch_size=2, context=20, repeats=1, warmup=0)
    assert set(times.cycle) == {2, 4} and times.tree == {}
    assert times.ar > 0 and all(v > 0 for v in times.cycle.values())
    trees = measure_pass_times(tiny_engine, (4,), batch_size=2, context=20, repeats=1, warmup=0, trees=True)
    assert set(trees.tree) == {4} and trees.tree[4] > 0


def test_pass_costs_of_a_compiling_engine_put_the_eager_ones_beside(tiny_engine, monkeypatch):
    """--pass-costs under compiling: the compiled graphs' figures (compiled even under 'auto',
    whose trial might keep eager), and the eager ones under "eager"."""
    import orthrus.bench as bench_mod
    from orthrus.bench.blocksize import PassTimes

    seen = []

    def fake(engine, ks, **kw):
        seen.append((kw["compiled"], kw["trees"]))
        return PassTimes(ar=0.01 if kw["compiled"] else 0.02, cycle={k: 0.03 for k in ks},
                         tree={k: 0.025 for k in ks} if kw["trees"] else {})

    monkeypatch.setattr(bench_mod, "measure_pass_times", fake)
    monkeypatch.setattr(tiny_engine, "compile", "auto")
    bench = type("B", (), {"block": 4})()
    settings = type("S", (), {"max_new_tokens": 8, "candidates": None, "batch_size": 1})()
    out = bench_mod._pass_costs(tiny_engine, bench, settings, [[1, 2, 3]])
    assert seen == [(True, True), (False, True)] and tiny_engine.compile == "auto"
    assert out["compile"] == "auto" and out["ar_ms"] == 10.0 and out["eager"]["ar_ms"] == 20.0
    assert out["tree_k4_x_ar"] == 2.5 and out["eager"]["two_pass_k4_x_ar"] == 1.5


def test_auto_block_size_in_the_report(tiny_engine, monkeypatch):
    monkeypatch.setattr(blocksize, "measure_pass_times", lambda e, c, **kw: times_for(1.0, 1.0, c))
    report = run_bench(tiny_engine, PROMPTS[:2], BenchSettings(modes=("ar", "parallel"), max_new_tokens=6,
                                                               warmup=0), block_size_auto=True)
    # costly passes: auto falls back to K = 1, i.e. the AR loop, which is exact
    assert report["block_size_choice"]["block_size"] == 1 and report["settings"]["block_size"] == 1
    assert report["results"]["parallel"]["exact_match_vs_ar"] == 1.0


# ---- the command --------------------------------------------------------------------------------------

@pytest.mark.parametrize("argv, message", [
    (["--modes", "ar,fast"], "unknown mode"),
    (["--modes", "ar", "--block-size", "four"], "--block-size must be a positive integer or 'auto'"),
    (["--modes", "ar", "--block-size", "0"], "--block-size must be a positive integer or 'auto'"),
    (["--modes", "ar", "--prompts", "nope"], "unknown prompt set 'nope'"),
    (["--modes", "ar", "--max-new-tokens", "0"], "--max-new-tokens must be >= 1"),
    (["--modes", "ar,parallel", "--model", "/nowhere/model-without-adapter"], "mode 'parallel' needs an adapter"),
    (["--modes", "ar", "--device", "tpu"], "unknown device 'tpu'"),
    (["--modes", "ar", "--max-minutes", "0"], "--max-minutes must be a positive number, got 0.0"),
    (["--modes", "ar", "--max-minutes", "nan"], "--max-minutes must be a positive number, got nan"),
    (["--modes", "ar", "--journal", "/"], "--journal / is a directory"),
    (["--modes", "ar", "--journal", "/nowhere/j.jsonl"], "its folder /nowhere does not exist"),
    (["--modes", "ar", "--journal", "/etc/hostname"], "/etc/hostname is not a bench journal"),
])
def test_cli_rejects_bad_input_before_loading(capsys, argv, message):
    assert cli.main(["bench", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_cli_end_to_end_on_the_real_model(real_engine, monkeypatch, tmp_path, capsys):
    """--limit 2 --max-new-tokens 8 on HumanEval: the table, JSON and PNG; greedy fp32 is exact."""
    import orthrus.commands.bench as bench_cmd

    monkeypatch.setattr(bench_cmd, "load_engine", lambda args, **kw: real_engine)  # the session's loaded model
    out = tmp_path / "e2e"
    threads = torch.get_num_threads()
    try:  # one thread: on a busy 2-core machine spinning OpenMP threads make this 10x slower
        code = cli.main(["bench", "--prompts", "humaneval", "--limit", "2", "--max-new-tokens", "8", "--modes",
                         "ar,parallel,onepass,hybrid,hf", "--adapter", "init", "--block-size", "4", "--warmup",
                         "0", "--threads", "1", "--pass-costs", "--out", str(out)])
    finally:
        torch.set_num_threads(threads)
    assert code == 0
    text = capsys.readouterr().out
    assert "mode" in text and "tok/s" in text and "parallel" in text
    report = json.loads(out.with_suffix(".json").read_text())
    assert report["command"].startswith("orthrus bench --prompts humaneval --limit 2")
    assert out.with_suffix(".png").is_file()
    for mode in ("ar", "parallel", "onepass", "hybrid", "hf"):
        assert report["results"][mode]["exact_match_vs_ar"] == 1.0
        assert report["results"][mode]["tokens"] == 16
    assert report["results"]["onepass"]["draft_passes"] == 0  # one forward per cycle
    pc = report["pass_costs"]
    assert pc["block_size"] == 4 and pc["ar_ms"] > 0
    assert pc["two_pass_k4_ms"] > 0 and pc["one_pass_k4_ms"] > 0 and pc["one_pass_k4_x_ar"] > 0
    assert "pass costs" in text
    assert report["environment"]["torch"] == torch.__version__ and report["environment"]["cpu_threads"] == 1


def test_auto_block_size_is_measured_once_per_setup(tiny_engine, monkeypatch, tmp_path):
    """cached_block_size: the first call measures and stores the answer; the same setup reuses it;
    another batch size or other adapter weights measure again; a damaged file is measured over."""
    calls = []

    def fake_choose(engine, batch_size=1, **kw):
        calls.append(batch_size)
        return BlockSizeChoice(4, reason=f"K=4 measured at batch {batch_size}",
                               verify="tree" if kw.get("tree") else "chain")

    monkeypatch.setattr(blocksize, "choose_block_size", fake_choose)
    path = tmp_path / "bs.json"
    assert blocksize.cached_block_size(tiny_engine, 2, path).block_size == 4 and calls == [2]
    again = blocksize.cached_block_size(tiny_engine, 2, path)
    assert again.block_size == 4 and "cached" in again.reason and calls == [2]
    blocksize.cached_block_size(tiny_engine, 3, path)
    assert calls == [2, 3] and len(json.loads(path.read_text())) == 2
    tree = blocksize.cached_block_size(tiny_engine, 3, path, tree=True)  # tree-verified runs: their own entry
    assert calls == [2, 3, 3] and tree.verify == "tree" and len(json.loads(path.read_text())) == 3
    assert blocksize.cached_block_size(tiny_engine, 3, path, tree=True).verify == "tree" and calls == [2, 3, 3]
    with torch.no_grad():
        tiny_engine.adapter.mask_embedding.add_(1.0)
    try:
        blocksize.cached_block_size(tiny_engine, 2, path)
        assert calls == [2, 3, 3, 2]
    finally:
        with torch.no_grad():
            tiny_engine.adapter.mask_embedding.sub_(1.0)
    path.write_text("{not json")
    assert blocksize.cached_block_size(tiny_engine, 2, path).block_size == 4 and calls == [2, 3, 3, 2, 2]
    assert len(json.loads(path.read_text())) == 1
    assert blocksize.cached_block_size(Orthrus(tiny_engine.base, None), 2, path).block_size == 1


def test_journal_resumes_a_killed_run_and_refuses_another_runs(tiny_engine, tmp_path, monkeypatch):
    from orthrus.bench.runner import Bench

    settings = BenchSettings(modes=("ar", "parallel", "hf"), max_new_tokens=6, warmup=1, block_size=4)
    whole = run_bench(tiny_engine, PROMPTS, settings)
    path = tmp_path / "j.jsonl"
    real_round, calls = Bench._round, []

    def dies_after_two(self, r, chunk):
        if len(calls) == 2:
            raise KeyboardInterrupt  # the process is killed in its third round
        calls.append(r)
        return real_round(self, r, chunk)

    monkeypatch.setattr(Bench, "_round", dies_after_two)
    with pytest.raises(KeyboardInterrupt):
        run_bench(tiny_engine, PROMPTS, settings, journal=path)
    lines = path.read_text().splitlines()
    assert len(lines) == 3 and json.loads(lines[0])["schema"] == "orthrus-bench-journal/1"
    with open(path, "a") as f:  # a write torn by the kill
        f.write('{"round": 2, "results": {"ar"')
    calls.clear()
    monkeypatch.setattr(Bench, "_round", lambda self, r, chunk: (calls.append(r), real_round(self, r, chunk))[1])
    report = run_bench(tiny_engine, PROMPTS, settings, journal=path)
    assert calls == [2, 3]  # only the rounds not journaled ran
    assert report["journal"] == {"path": str(path), "rounds": 4, "resumed_rounds": 2, "processes": 2}
    for mode, r in report["results"].items():
        assert r["tokens"] == whole["results"][mode]["tokens"] and r["exact_match_vs_ar"] == 1.0, mode
    assert [json.loads(x)["round"] for x in path.read_text().splitlines()[1:]] == [0, 1, 2, 3]

    # everything journaled: nothing runs, not even the warm-up
    ran = []
    monkeypatch.setattr(Bench, "_run", lambda self, mode, chunk: ran.append(mode))
    again = run_bench(tiny_engine, PROMPTS, settings, journal=path)
    assert ran == [] and again["journal"]["resumed_rounds"] == 4
    assert again["results"]["parallel"]["tokens"] == report["results"]["parallel"]["tokens"]

    # another run's settings or prompts are refused by name, and the journal is left as it was
    before = path.read_bytes()
    other = BenchSettings(modes=("ar", "parallel", "hf"), max_new_tokens=7, warmup=1, block_size=4)
    with pytest.raises(OrthrusError, match=r"settings\.max_new_tokens: journal 6 vs now 7"):
        run_bench(tiny_engine, PROMPTS, other, journal=path)
    with pytest.raises(OrthrusError, match=r"prompts\.ids_sha256.*prompts\.n: journal 4 vs now 3"):
        run_bench(tiny_engine, PROMPTS[:3], settings, journal=path)
    assert path.read_bytes() == before
    (tmp_path / "notes.txt").write_text("hello\n")
    with pytest.raises(OrthrusError, match="not a bench journal"):
        run_bench(tiny_engine, PROMPTS, settings, journal=tmp_path / "notes.txt")


def test_time_budget_reports_the_rounds_done_and_a_journal_goes_on(tiny_engine, tmp_path, monkeypatch):
    import orthrus.bench.runner as runner

    settings = BenchSettings(modes=("ar", "parallel"), max_new_tokens=5, warmup=0, block_size=4)
    clock = iter(range(0, 10_000, 60))  # each reading a minute later: the budget ends after 2 rounds
    monkeypatch.setattr(runner, "now", lambda: next(clock))
    path = tmp_path / "j.jsonl"
    part = run_bench(tiny_engine, PROMPTS, settings, journal=path, max_minutes=2.5)
    st = part["settings"]
    assert (st["n_prompts"], st["n_prompts_planned"], st["complete"]) == (2, 4, False)
    assert [r["prompts"] for r in part["results"].values()] == [2, 2] and len(part["per_prompt"]) == 2
    assert part["journal"]["rounds"] == 2
    monkeypatch.setattr(runner, "now", lambda: 0)  # a later call with time to spare
    whole = run_bench(tiny_engine, PROMPTS, settings, journal=path, max_minutes=2.5)
    assert whole["settings"]["complete"] and whole["journal"]["resumed_rounds"] == 2
    assert [r["prompts"] for r in whole["results"].values()] == [4, 4]
    assert whole["results"]["parallel"]["exact_match_vs_ar"] == 1.0
    # the README's table (scripts/bench_table.py) says which run stopped early, and what each holds
    table = markdown_table({"part": json.loads(json.dumps(part)), "whole": whole}).split("\n")
    assert len(table) == 2 + 4
    assert "x 2 of 4, INCOMPLETE, 5 tokens, float32, K = 4)" in table[2]
    assert "x 4, 5 tokens, float32, K = 4)" in table[4] and "INCOMPLETE" not in table[4]
    cells = table[5].strip("|").split(" | ")
    r = whole["results"]["parallel"]
    assert [c.strip() for c in cells[1:]] == [
        "parallel", f"{r['tokens_per_second']:.2f}", f"{r['speedup_vs_ar']:.2f}x", "-", f"{r['tpf']:.2f}",
        f"{r['acceptance_length']:.2f}", "100%", f"{r['memory']['peak_bytes'] / 2**20:.0f} MiB"]
