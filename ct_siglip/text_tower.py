"""Text tower: an LLM2Vec model (bidirectional decoder LLM) pooled over radiology reports, then projected.

Two pieces:
- `TextTokenizer` turns reports into what llm2vec's forward needs (`input_ids`, `attention_mask`, `embed_mask`)
  plus a stable `text_hash`. It is picklable and holds no model: it runs in DataLoader workers.
- `TextEncoder` loads the LLM with `llm2vec.LLM2Vec.from_pretrained`, optionally overlays fine-tuned weights
  (a state dict, the llm2vec4cxr release, or a checkpoint of this package), pools, and projects to `embed_dim`.
  It trains in one of three modes: `full`, `lora` (peft) or `frozen` (each distinct report embedded once, cached).

Moved out of this module: reading weight files and folders (`read_text_weights`, `canonical_text_state`) is
in `text_weights`, the frozen-mode embedding cache (`TextEmbeddingCache`) in `text_cache`, and the tiny
offline Llama for tests and demos (`build_tiny_llama`) in `tiny_models`.

Exactness: tokenization equals `LLM2Vec.tokenize`, and pooling equals llm2vec's `get_pooling` (tested); both are
vectorised over the batch where llm2vec loops per sample.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .errors import ConfigError
from .pooling import (
    POOLING_MODES,
    LatentAttentionPooling,
    first_token,
    last_token,
    masked_mean,
    weighted_mean,
)
from .text_cache import TextEmbeddingCache
from .text_weights import (
    WEIGHT_SUFFIXES,
    canonical_text_state,
    few,
    has_lora,
    latent_weights_in_base,
    looks_like_hub_id,
    not_available,
    read_text_weights,
)

logger = logging.getLogger(__name__)

SEPARATOR = "!@#$%^&*()"
"""llm2vec's instruction separator: only the tokens after it are pooled (they form the `embed_mask`)."""

DEFAULT_TEXT_MODEL = "microsoft/LLM2CLIP-Llama-3.2-1B-Instruct-CC-Finetuned"
TRAIN_MODES = ("full", "lora", "frozen")
DEFAULT_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# The Llama-3 user turn that the llm2vec4cxr wrapper puts around every text (its `prepare_for_tokenization`).
LLAMA3_USER_PREFIX = "<|start_header_id|>user<|end_header_id|>\n\n"
LLAMA3_USER_SUFFIX = "<|eot_id|>"


def text_hash(text: str) -> int:
    """Stable non-negative 63-bit id of a string (Python's `hash` differs between processes)."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little") >> 1


# ----------------------------------------------------------------------------------------------------------------
# Tokenizer
# ----------------------------------------------------------------------------------------------------------------


class TextTokenizer:
    """Reports -> llm2vec inputs. Picklable, holds no model: it is sent to DataLoader worker processes.

    Each report becomes `"<instruction> !@#$%^&*()<report>"` (llm2vec's own `_convert_to_str` format; with no
    instruction just `"!@#$%^&*()<report>"`), so the separator is always present and only report tokens are
    pooled: without it llm2vec's `embed_mask` is all zeros and its mean pools the whole row, padding included.
    With `chat_template` the text is wrapped in the Llama-3 user turn that the llm2vec4cxr wrapper applies.
    The output equals `LLM2Vec.tokenize` on the same strings; tokenization is two batched calls instead of B + 1.
    """

    def __init__(
        self,
        tokenizer,
        max_length: int = 512,
        instruction: str | None = None,
        chat_template: bool = False,
        append_eos: bool = False,
    ):
        self.tokenizer = tokenizer
        # What llm2vec's from_pretrained sets; pooling relies on it (the last position is each row's last token).
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token != self.tokenizer.eos_token:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.max_length = int(max_length)
        self.instruction = instruction.strip() if instruction and instruction.strip() else None
        self.chat_template = bool(chat_template)
        self.append_eos = bool(append_eos)

    def format(self, report: str) -> str:
        """The full string fed to the tokenizer (and hashed) for one report."""
        report = str(report).replace(SEPARATOR, "")  # a second separator would cut the report short
        if self.instruction is not None:
            text = f"{self.instruction.replace(SEPARATOR, '')} {SEPARATOR}{report}"
        else:
            text = f"{SEPARATOR}{report}"
        if self.chat_template:
            text = LLAMA3_USER_PREFIX + text.strip() + LLAMA3_USER_SUFFIX
        eos = self.tokenizer.eos_token
        if self.append_eos and eos and not text.endswith(eos):
            text += eos  # eos_token pooling reads the last token: make it the real EOS
        return text

    def __call__(self, texts: list[str] | str) -> dict[str, torch.Tensor]:
        if isinstance(texts, str):
            texts = [texts]
        full = [self.format(t) for t in texts]
        originals, reports = [], []
        for text in full:
            parts = text.split(SEPARATOR)
            originals.append("".join(parts))
            reports.append(parts[1] if len(parts) > 1 else "")
        enc = self.tokenizer(originals, return_tensors="pt", padding=True, truncation=True, max_length=self.max_length)
        report_ids = self.tokenizer(
            reports, padding=False, truncation=True, max_length=self.max_length, add_special_tokens=False
        )["input_ids"]
        attention_mask = enc["attention_mask"]
        width = attention_mask.shape[1]
        # llm2vec marks the last len(report tokens) positions of each row (rows are left-padded). When the text
        # is cut at max_length this can reach into the instruction; kept as is, to stay equal to llm2vec.
        n_report = torch.tensor([len(ids) for ids in report_ids], dtype=torch.long).clamp_max(width)
        embed_mask = (torch.arange(width) >= (width - n_report).unsqueeze(1)).to(attention_mask.dtype)
        return {
            "input_ids": enc["input_ids"],
            "attention_mask": attention_mask,
            "embed_mask": embed_mask,
            "text_hash": torch.tensor([text_hash(t) for t in full], dtype=torch.int64),
        }


# ----------------------------------------------------------------------------------------------------------------
# Encoder
# ----------------------------------------------------------------------------------------------------------------


def resolve_attn_implementation(name: str, torch_dtype: torch.dtype | None) -> str:
    """`auto` -> flash_attention_2 when installed and usable (CUDA, half precision), else sdpa."""
    if name != "auto":
        return name
    from transformers.utils import is_flash_attn_2_available

    half = torch_dtype in (torch.float16, torch.bfloat16)
    return "flash_attention_2" if half and torch.cuda.is_available() and is_flash_attn_2_available() else "sdpa"


def load_llm2vec(
    model_name_or_path: str,
    *,
    peft_path: str | None = None,
    pooling_mode: str = "mean",
    max_length: int = 512,
    torch_dtype: torch.dtype | None = None,
    attn_implementation: str = "sdpa",
):
    """`LLM2Vec.from_pretrained` (bidirectional, PEFT adapter merged), with one-line errors when offline."""
    from llm2vec import LLM2Vec

    local = Path(model_name_or_path).expanduser()
    if not local.is_dir() and not looks_like_hub_id(model_name_or_path):
        raise ConfigError(f"--text_model {model_name_or_path}: no such folder (and not a Hugging Face id)")
    kwargs = {
        "peft_model_name_or_path": peft_path,
        # Merge the adapter into the base weights: LoRA training then adds its own fresh adapter on top, and
        # the encoder's key layout is the same with or without --text_peft_path.
        "merge_peft": True,
        "enable_bidirectional": True,
        # Passed for llm2vec's own bookkeeping only: pooling happens in TextEncoder, which knows latent_attention.
        "pooling_mode": "mean" if pooling_mode == "latent_attention" else pooling_mode,
        "max_length": max_length,
        "attn_implementation": resolve_attn_implementation(attn_implementation, torch_dtype),
    }
    if torch_dtype is not None:
        kwargs["torch_dtype"] = torch_dtype
    try:
        return LLM2Vec.from_pretrained(str(local) if local.is_dir() else model_name_or_path, **kwargs)
    except (OSError, ValueError) as err:
        if not local.is_dir() and isinstance(err, OSError):
            raise not_available("text model", model_name_or_path, "--text_model") from err
        if peft_path is not None and not Path(peft_path).expanduser().is_dir():
            raise not_available("PEFT adapter", peft_path, "--text_peft_path") from err
        raise


class TextEncoder(nn.Module):
    """LLM2Vec text tower: reports -> pooled LLM states (B, hidden) -> projection -> L2-normalised (B, embed_dim).

    `train_mode`:
    - `full`: every LLM weight trains (gradient checkpointing on by default: activations, not weights, are what
      a 1B model at 512 tokens runs out of memory on).
    - `lora`: a fresh peft LoRA adapter on `lora_target_modules`; only the LoRA weights, the latent-attention
      pooling (if used) and the projection train.
    - `frozen`: LLM and pooling frozen and in eval mode; each distinct report (by `text_hash`) is embedded once
      under no_grad and cached in memory, and in `cache_dir` when given, so after the first pass the tower costs
      one small matmul per step.
    The projection always trains.

    State-dict layout: `model.*` (the LlamaBiModel, or its PeftModel in lora mode), `latent_attn.*`,
    `projection.*`, i.e. llm2vec4cxr's LLM2Vec layout plus the projection.
    """

    def __init__(
        self,
        model_name_or_path: str = DEFAULT_TEXT_MODEL,
        text_model_path: str | None = None,
        pooling_mode: str = "mean",
        max_length: int = 512,
        instruction: str | None = None,
        train_mode: str = "full",
        embed_dim: int = 512,
        peft_path: str | None = None,
        lora_r: int = 16,
        lora_alpha: int = 32,
        lora_dropout: float = 0.05,
        lora_target_modules: tuple[str, ...] = DEFAULT_LORA_TARGETS,
        torch_dtype: torch.dtype | None = None,
        attn_implementation: str = "sdpa",
        gradient_checkpointing: bool = True,
        chat_template: bool = False,
        cache_dir: str | None = None,
        num_latents: int = 512,
        latent_heads: int = 8,
    ):
        super().__init__()
        if pooling_mode not in POOLING_MODES:
            raise ConfigError(f"--pooling_mode {pooling_mode!r}: choose one of {', '.join(POOLING_MODES)}")
        if train_mode not in TRAIN_MODES:
            raise ConfigError(f"--text_train {train_mode!r}: choose one of {', '.join(TRAIN_MODES)}")
        self.pooling_mode, self.train_mode = pooling_mode, train_mode
        l2v = load_llm2vec(
            model_name_or_path, peft_path=peft_path, pooling_mode=pooling_mode, max_length=max_length,
            torch_dtype=torch_dtype, attn_implementation=attn_implementation,
        )  # fmt: skip
        self.model = l2v.model
        self.hidden_size = int(self.model.config.hidden_size)
        self.tokenizer = TextTokenizer(
            l2v.tokenizer, max_length, instruction, chat_template, append_eos=pooling_mode == "eos_token"
        )
        # Pooling head and projection stay float32 whatever the LLM dtype: they are tiny next to the LLM, and
        # pooling up to 512 bf16 token states in bf16 would keep only ~3 significant digits of the mean.
        self.latent_attn = (
            LatentAttentionPooling(self.hidden_size, num_latents, latent_heads)
            if pooling_mode == "latent_attention"
            else None
        )
        self.projection = nn.Linear(self.hidden_size, embed_dim)

        state = read_text_weights(text_model_path) if text_model_path else None
        source = str(text_model_path)
        if state is None and self.latent_attn is not None:
            state = latent_weights_in_base(model_name_or_path) or None
            source = f"{model_name_or_path} (latent_attn.* in the base model)"
        state = canonical_text_state(state) if state is not None else None
        lora_state = state is not None and has_lora(state)
        if lora_state and train_mode != "lora":
            raise ConfigError(
                f"--text_model_path {source} holds a LoRA-trained text tower: load it with --text_train lora "
                f"and the same --lora_r/--lora_alpha/--lora_target_modules"
            )
        # Plain weights load before a LoRA adapter is added, a LoRA checkpoint after (its keys name the adapter).
        if state is not None and not lora_state:
            self.load_text_state(state, source, require_llm=text_model_path is not None)
        self._apply_train_mode(lora_r, lora_alpha, lora_dropout, tuple(lora_target_modules), gradient_checkpointing)
        if lora_state:
            self.load_text_state(state, source)
        latent_loaded = state is not None and any(k.startswith("latent_attn.") for k in state)
        if train_mode == "frozen" and self.latent_attn is not None and not latent_loaded:
            logger.warning("text tower: frozen with latent_attention pooling at its random initialisation")

        self._cache: TextEmbeddingCache | None = None
        if train_mode == "frozen":
            folder = None
            if cache_dir is not None:
                fingerprint = self._fingerprint(model_name_or_path, text_model_path, peft_path, max_length)
                folder = Path(cache_dir) / f"text-emb-{fingerprint}"
            self._cache = TextEmbeddingCache(folder, self.hidden_size)

    # -- set-up ------------------------------------------------------------------------------------------------

    def _apply_train_mode(self, r: int, alpha: int, dropout: float, targets: tuple[str, ...], checkpointing: bool):
        if self.train_mode == "lora":
            from peft import LoraConfig, get_peft_model

            config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(targets), bias="none")
            try:
                # Freezes every LLM weight and adds trainable lora_A/lora_B; pooling and projection are outside.
                self.model = get_peft_model(self.model, config)
            except ValueError as err:
                raise ConfigError(f"--lora_target_modules {' '.join(targets)}: {err}") from err
        elif self.train_mode == "frozen":
            self.model.requires_grad_(False)
            if self.latent_attn is not None:
                self.latent_attn.requires_grad_(False)
            self.model.eval()
        if self.train_mode != "frozen":
            self.set_grad_checkpointing(checkpointing)

    def _fingerprint(self, model: str, weights: str | None, peft: str | None, max_length: int) -> str:
        """Names the disk cache: everything that changes an embedding except the text (which the hash covers)."""

        def ident(name: str | None):
            if name is None:
                return None
            p = Path(name).expanduser()
            if not p.exists():
                return name
            files = [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.suffix in WEIGHT_SUFFIXES)
            return [str(p.resolve())] + [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in files]

        dtype = str(next(self.model.parameters()).dtype)
        key = [ident(model), ident(weights), ident(peft), self.pooling_mode, max_length, dtype, self.hidden_size]
        return hashlib.blake2b(json.dumps(key).encode(), digest_size=8).hexdigest()

    def load_text_state(
        self, state: Mapping[str, torch.Tensor], source: str = "state dict", *, require_llm: bool = True
    ):
        """Load canonical weights (see `canonical_text_state`), strictly per component.

        A component (`model`, `latent_attn`, `projection`) absent from `state` keeps its current weights (logged):
        llm2vec4cxr ships no projection. A component that is present must match key for key and shape for shape;
        anything else raises one line naming the keys.
        """
        own = self.state_dict()
        present = {k.split(".", 1)[0] for k in state}
        unexpected = [k for k in state if k not in own]
        missing = [k for k in own if k.split(".", 1)[0] in present and k not in state]
        where = f"--text_model_path {source}"
        if require_llm and "model" not in present:
            raise ConfigError(f"{where} holds no LLM weights (model.* / layers.*); found: {few(state)}")
        if unexpected and self.latent_attn is None and all(k.startswith("latent_attn.") for k in unexpected):
            raise ConfigError(
                f"{where} holds latent-attention pooling weights (latent_attn.*): use --pooling_mode latent_attention"
            )
        if unexpected or missing:
            parts = [f"unexpected keys: {few(unexpected)}"] if unexpected else []
            parts += [f"missing keys: {few(missing)}"] if missing else []
            hint = " (the llm2vec4cxr layout is model.* + latent_attn.*)"
            raise ConfigError(f"{where} does not fit this text tower: {'; '.join(parts)}{hint}")
        bad_shapes = [
            f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in state.items() if v.shape != own[k].shape
        ]
        if bad_shapes:
            raise ConfigError(f"{where} has tensors of the wrong shape (file vs model): {few(bad_shapes, 3)}")
        result = self.load_state_dict(state, strict=False)
        assert not result.unexpected_keys  # checked above
        kept = sorted({k.split(".", 1)[0] for k in own} - present)
        logger.info("text weights: loaded %d tensors from %s%s", len(state), source,
                    f"; kept the initial {', '.join(kept)}" if kept else "")  # fmt: skip

    # -- interface ---------------------------------------------------------------------------------------------

    def set_grad_checkpointing(self, enabled: bool = True) -> None:
        """Recompute LLM activations in backward (non-reentrant: works with LoRA's frozen embeddings)."""
        if self.train_mode == "frozen":
            return  # no backward through the LLM
        base = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        if enabled:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        else:
            base.gradient_checkpointing_disable()

    def train(self, mode: bool = True) -> TextEncoder:
        super().train(mode)
        if self.train_mode == "frozen":  # a frozen LLM stays in eval mode (no dropout), whatever the trainer does
            self.model.eval()
            if self.latent_attn is not None:
                self.latent_attn.eval()
        return self

    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        return self.tokenizer(texts)

    def embed(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """(B, hidden) pooled float32 embeddings; extra keys (e.g. text_hash outside frozen mode) are ignored."""
        if self.train_mode == "frozen":
            return self._embed_frozen(batch)
        return self._embed_tokens(batch["input_ids"], batch["attention_mask"], batch.get("embed_mask"))

    def project(self, pooled: torch.Tensor) -> torch.Tensor:
        """The head on pooled embeddings (`embed`): also the whole step on cached features (`--cache_features`)."""
        z = self.projection(pooled.to(self.projection.weight.dtype))
        return F.normalize(z.float(), dim=-1)

    def forward(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return self.project(self.embed(batch))

    def flush_cache(self) -> None:
        """Write frozen-mode embeddings not yet on disk (also done automatically; call before a planned exit)."""
        if self._cache is not None:
            self._cache.flush()

    # -- internals ---------------------------------------------------------------------------------------------

    def _embed_tokens(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, embed_mask: torch.Tensor | None):
        device = self.projection.weight.device
        input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
        mask = attention_mask if embed_mask is None else embed_mask.to(device)
        # A text with no report tokens (empty report) pools the whole text rather than nothing.
        mask = torch.where(mask.sum(dim=1, keepdim=True) > 0, mask, attention_mask)
        if self.pooling_mode == "mean":
            return masked_mean(hidden.float(), mask)
        if self.pooling_mode == "weighted_mean":
            return weighted_mean(hidden.float(), mask)
        if self.pooling_mode == "eos_token":
            return last_token(hidden).float()
        if self.pooling_mode == "bos_token":
            return first_token(hidden, attention_mask).float()
        return self.latent_attn(hidden.to(self.latent_attn.latents.dtype), mask).float()

    def _embed_frozen(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        if "text_hash" not in batch:
            raise ConfigError("--text_train frozen needs batches from TextEncoder.tokenize (they carry text_hash)")
        keys = batch["text_hash"].tolist()
        todo: dict[int, int] = {}  # hash -> first row holding it
        for row, key in enumerate(keys):
            if key not in self._cache and key not in todo:
                todo[key] = row
        if todo:
            rows = torch.tensor(list(todo.values()), device=batch["input_ids"].device)
            ids, attn = batch["input_ids"][rows], batch["attention_mask"][rows]
            emb = batch["embed_mask"][rows] if "embed_mask" in batch else None
            start = int((attn.sum(dim=0) > 0).nonzero()[0])  # drop columns that are padding in every kept row
            with torch.no_grad():
                pooled = self._embed_tokens(ids[:, start:], attn[:, start:], None if emb is None else emb[:, start:])
            self._cache.put(list(todo), pooled)
        elif self._cache.pending:
            self._cache.flush()  # a batch fully served from memory: the first pass is over, persist its tail
        return self._cache.get(keys).to(self.projection.weight.device)
