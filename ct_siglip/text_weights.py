"""Reading text-tower weights: a weight file, a saved-model folder or a hub id -> one canonical state dict.

`read_text_weights` reads `--text_model_path` (safetensors, sharded or not, torch pickles read weights-only, a
checkpoint of this package); `canonical_text_state` renames the known layouts (llm2vec4cxr, bare Llama, DDP,
ChestCTCLIP) to `TextEncoder`'s keys; `latent_weights_in_base` finds latent-attention weights shipped inside the
base model folder. `TextEncoder` (in `text_tower`) is the only consumer.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import re
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch

from .checkpoint import refused_reason
from .errors import ConfigError

logger = logging.getLogger(__name__)

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")


def looks_like_hub_id(name: str) -> bool:
    return re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", name) is not None and not name.startswith((".", "~"))


def not_available(what: str, name: str, flag: str) -> ConfigError:
    return ConfigError(
        f"cannot load {what} '{name}': it is not a local folder and is not in the Hugging Face cache (offline, "
        f"or no network). Pass a local folder with {flag} /path/to/folder, or set HF_HOME to a cache that holds it."
    )


def _weight_files(folder: Path) -> list[Path]:
    """The weight files of a saved model folder: safetensors preferred, sharded or not; else pytorch_model*.bin."""
    for index_name, pattern in (
        ("model.safetensors.index.json", "*.safetensors"),
        ("pytorch_model.bin.index.json", "pytorch_model*.bin"),
    ):
        index = folder / index_name
        if index.is_file():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            return [folder / s for s in shards]
        files = sorted(f for f in folder.glob(pattern) if f.name != "adapter_model.safetensors")
        if files:
            return files
    return []


def _read_weight_file(path: Path) -> dict[str, torch.Tensor]:
    """One file -> flat state dict. A checkpoint of this package (`{"model": ..., "config": ...}`) gives its model."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    if path.suffix not in WEIGHT_SUFFIXES:
        raise ConfigError(f"--text_model_path {path}: unknown weight file type (use {', '.join(WEIGHT_SUFFIXES)})")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError) as err:
        raise ConfigError(f"--text_model_path {path}: cannot be read as weights only ({refused_reason(err)})") from None
    if isinstance(obj, Mapping) and isinstance(obj.get("model"), Mapping) and "config" in obj:
        obj = obj["model"]  # a checkpoint of this package
    elif isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise ConfigError(f"--text_model_path {path}: holds a {type(obj).__name__}, not a state dict")
    bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise ConfigError(f"--text_model_path {path}: entries that are not tensors: {few(bad)}")
    return dict(obj)


def _read_folder(folder: Path, flag: str) -> dict[str, torch.Tensor]:
    if (folder / "adapter_config.json").is_file():
        raise ConfigError(f"{flag} {folder} is a PEFT adapter: pass it with --text_peft_path instead")
    files = _weight_files(folder)
    if not files:
        raise ConfigError(f"{flag} {folder}: no *.safetensors or pytorch_model*.bin weight files in this folder")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(_read_weight_file(f))
    return state


def _hub_folder(repo_id: str, flag: str, patterns: Iterable[tuple[str, ...]]) -> Path:
    """Local snapshot of a hub repo (the HF cache when offline), trying each file-pattern set in turn."""
    from huggingface_hub import snapshot_download

    folder = None
    for allow in patterns:
        try:
            folder = Path(snapshot_download(repo_id, allow_patterns=[*allow, "*.json"]))
        except Exception as err:  # offline / unknown repo / no permission: all mean "not available here"
            raise not_available("text weights", repo_id, flag) from err
        if _weight_files(folder):
            break
    return folder


def read_text_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """`--text_model_path` -> flat state dict: a weight file, a saved-model folder, or a hub id (llm2vec4cxr)."""
    name = str(path)
    p = Path(name).expanduser()
    if p.is_file():
        return _read_weight_file(p)
    if p.is_dir():
        return _read_folder(p, "--text_model_path")
    if not looks_like_hub_id(name):
        raise ConfigError(f"--text_model_path {name}: no such file or folder")
    folder = _hub_folder(name, "--text_model_path", [("*.safetensors",), ("*.bin",)])
    return _read_folder(folder, "--text_model_path")


def latent_weights_in_base(name: str) -> dict[str, torch.Tensor]:
    """`latent_attn.*` tensors shipped inside the base model folder itself (the llm2vec4cxr hub layout).

    transformers drops them when it builds the LLM (they are not Llama weights); reading only those keys from
    the safetensors is cheap. Anything unreadable just means "none here".
    """
    p = Path(name).expanduser()
    try:
        folder = p if p.is_dir() else _hub_folder(name, "--text_model", [("*.safetensors",)])
    except ConfigError:
        return {}
    out: dict[str, torch.Tensor] = {}
    for f in _weight_files(folder):
        if f.suffix != ".safetensors":
            continue
        from safetensors import safe_open

        with safe_open(str(f), framework="pt") as sf:
            for key in sf.keys():  # noqa: SIM118 - safe_open is not a Mapping
                if key.startswith("latent_attn.") or key.startswith("model.latent_attn."):
                    out[key.removeprefix("model.")] = sf.get_tensor(key)
    return out


def few(keys: Iterable[str], n: int = 4) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:n]) + (f" (+{len(keys) - n} more)" if len(keys) > n else "")


_LLAMA_TOP = ("embed_tokens.", "layers.", "norm.")


def canonical_text_state(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename the known layouts to this encoder's keys: `model.*` (the LLM), `latent_attn.*`, `projection.*`.

    Accepted: llm2vec4cxr's LLM2Vec state dict (`model.*` + `latent_attn.*`), a bare Llama/LlamaBiModel state
    dict or hub folder (`embed_tokens.*`, `layers.*`, `norm.*`), DDP's `module.` prefix, and a ChestCTCLIP
    state dict (its `text_encoder.*` entries). Two kinds of key are dropped, each with a log line: rotary
    `inv_freq` buffers (recomputed, saved by old transformers) and `lm_head.weight` (an encoder has no LM head).
    """
    state = dict(state)
    if state and all(k.startswith("module.") for k in state):
        state = {k.removeprefix("module."): v for k, v in state.items()}
    text_keys = [k for k in state if k.startswith("text_encoder.")]
    if text_keys:
        others = len(state) - len(text_keys)
        if others:
            logger.info(
                "text weights: using the %d text_encoder.* tensors of a full model (%d others belong to "
                "the other towers)",
                len(text_keys),
                others,
            )
        state = {k.removeprefix("text_encoder."): state[k] for k in text_keys}
    out: dict[str, torch.Tensor] = {}
    dropped = []
    for key, value in state.items():
        if key.endswith("rotary_emb.inv_freq") or key in ("lm_head.weight", "model.lm_head.weight"):
            dropped.append(key)
            continue
        if key.startswith("model.latent_attn."):  # pooling head saved inside the LLM module
            key = key.removeprefix("model.")
        out["model." + key if key.startswith(_LLAMA_TOP) else key] = value
    if dropped:
        logger.info("text weights: not loading %d tensors an encoder does not use: %s", len(dropped), few(dropped))
    return out


def has_lora(keys: Iterable[str]) -> bool:
    return any(".lora_A." in k or ".lora_B." in k or ".base_layer." in k for k in keys)
