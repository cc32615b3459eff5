"""Tiny random models of every supported family, for fast CPU tests."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from orthrus.config import ModelConfig
from orthrus.models.llama import Transformer

FAMILIES = ("llama", "qwen2", "qwen3", "mistral")


def hf_config(arch: str, **over):
    """A tiny transformers config of ``arch`` (GQA, uneven head counts, untied unless asked)."""
    kw = dict(vocab_size=97, hidden_size=48, intermediate_size=80, num_hidden_layers=3,
              num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=256,
              rms_norm_eps=1e-6, tie_word_embeddings=False, head_dim=8,
              bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if arch == "llama":
        kw["rope_scaling"] = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                              "high_freq_factor": 4.0, "original_max_position_embeddings": 64,
                              "rope_theta": 500000.0}
        kw["rope_parameters"] = kw["rope_scaling"]
    if arch == "mistral":
        kw["sliding_window"] = None
    kw.update(over)
    return AutoConfig.for_model(arch, **kw)


def hf_model(arch: str, seed: int = 0, **over):
    torch.manual_seed(seed)
    m = AutoModelForCausalLM.from_config(hf_config(arch, **over), dtype=torch.float32)
    with torch.no_grad():  # random norms / biases so that every weight matters in parity tests
        for n, p in m.named_parameters():
            if n.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
            elif n.endswith("bias"):
                p.normal_(0, 0.1)
    return m.eval()


def ours_from_hf(hf) -> Transformer:
    cfg = ModelConfig.from_hf(hf.config)
    m = Transformer(cfg)
    sd = dict(hf.state_dict())
    m.load_state_dict(sd, strict=not cfg.tie_word_embeddings)
    return m.eval().requires_grad_(False)


def make_tiny_folder(folder: Path) -> Path:
    """A tiny llama as a Hugging Face folder with a word-level tokenizer and a chat template.

    Words ``w5..w96`` are tokens 5..96; the LM head is scaled up so the teacher's distributions are
    peaked (a near-uniform teacher would make every KL tiny).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    hf = hf_model("llama", seed=0)
    with torch.no_grad():
        hf.lm_head.weight.mul_(8)
    hf.save_pretrained(folder)
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "user": 3, "assistant": 4} | {f"w{i}": i for i in range(5, 97)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.chat_template = ("{% for m in messages %}<s> {{ m['role'] }} {{ m['content'] }} </s> {% endfor %}"
                          "{% if add_generation_prompt %}<s> assistant {% endif %}")
    fast.save_pretrained(folder)
    return folder
