"""ChestCTCLIP: the two towers and the SigLIP loss, and the factory that builds them from a Config."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn

from . import checkpoint as ckpt
from .config import Config
from .loss import SigLIPLoss

log = logging.getLogger("ct_siglip")


class ChestCTCLIP(nn.Module):
    """Image tower + text tower + SigLIP loss; `forward(images, text_batch) -> (image_emb, text_emb, loss)`."""

    def __init__(self, image_encoder: nn.Module, text_encoder: nn.Module, loss_fn: SigLIPLoss):
        super().__init__()
        self.image_encoder = image_encoder
        self.text_encoder = text_encoder
        self.loss_fn = loss_fn

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return self.image_encoder(images)

    def encode_text(self, batch: dict) -> torch.Tensor:
        return self.text_encoder(batch)

    def encode_image_features(self, features: torch.Tensor) -> torch.Tensor:
        """The image head alone, on pooled backbone features (`image_encoder.embed`); the towers' own `project`,
        so a step on cached features equals a step on the volumes."""
        return self.image_encoder.project(features)

    def encode_text_features(self, pooled: torch.Tensor) -> torch.Tensor:
        """The text head alone, on pooled LLM embeddings (`text_encoder.embed`); see above."""
        return self.text_encoder.project(pooled)

    def forward(
        self, images: torch.Tensor, text_batch: dict | torch.Tensor, *, compute_loss: bool = True, pooled: bool = False
    ):
        """Embeddings and the SigLIP loss. The trainer passes `compute_loss=False` and scores the
        embeddings itself, so that a step can cover several micro-batches (and ranks) at once.
        With `pooled=True` the inputs are cached pooled features (`--cache_features`) and only the heads run;
        it goes through `forward` so that DDP sees it."""
        if pooled:
            image_emb, text_emb = self.encode_image_features(images), self.encode_text_features(text_batch)
        else:
            image_emb, text_emb = self.encode_image(images), self.encode_text(text_batch)
        return image_emb, text_emb, (self.loss_fn(image_emb, text_emb) if compute_loss else None)


def build_model(
    cfg, *, device: torch.device, rank: int = 0, world_size: int = 1, text_dtype: torch.dtype | None = None
) -> ChestCTCLIP:
    """Towers and loss as the config says (weights loaded, freezing and checkpointing applied)."""
    from .image_tower import ImageEncoder
    from .text_tower import TextEncoder

    weights = None if str(cfg.image_weights).lower() == "none" else cfg.image_weights
    image = ImageEncoder(
        in_channels=cfg.in_channels,
        depth=cfg.image_depth,
        width=cfg.image_width,
        pretrained=weights,
        freeze_backbone=cfg.freeze_image_backbone,
        freeze_stem=cfg.freeze_image_stem,
        embed_dim=cfg.embed_dim,
        proj_dropout=cfg.proj_dropout,
        checkpointing=cfg.image_checkpointing,
        channels_last=cfg.channels_last,
        compile=cfg.compile,
    )
    if image.load_report is not None:
        from .image_tower import format_load_report

        log.info(format_load_report(image.load_report))
    text = TextEncoder(
        cfg.text_model,
        text_model_path=cfg.text_model_path,
        pooling_mode=cfg.pooling_mode,
        max_length=cfg.max_text_length,
        instruction=cfg.text_instruction,
        train_mode=cfg.text_train,
        embed_dim=cfg.embed_dim,
        peft_path=cfg.text_peft_path,
        lora_r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        lora_target_modules=tuple(cfg.lora_target_modules),
        torch_dtype=text_dtype,
        gradient_checkpointing=cfg.text_checkpointing,
        chat_template=cfg.text_chat_template,
        cache_dir=cfg.text_cache_dir,
    )
    loss = SigLIPLoss(
        cfg.temperature,
        cfg.bias_init,
        learnable=not cfg.fixed_temperature,
        rank=rank,
        world_size=world_size,
        dist_impl=cfg.loss_dist_impl,
    )
    return ChestCTCLIP(image, text, loss).to(device)


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(total, trainable) parameter counts."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return total, trainable


def run_checkpoint(state: object, path: str | Path, flag: str) -> dict:
    """`state` if it is a checkpoint this package wrote (model, optimizer, config, trainer state), else one line."""
    keys = ("model", "optimizer", "config", "trainer", "step")
    if isinstance(state, Mapping) and all(k in state for k in keys) and isinstance(state["model"], Mapping):
        return dict(state)
    raise ckpt.CheckpointError(
        f"{path}: {flag} needs a checkpoint written by this package (step_*.pt or best.pt in a --save_dir); this "
        f"file holds {_describe(state)}. To start from another file's weights use --init_from (a model state dict)"
    )


def _describe(state: object) -> str:
    if isinstance(state, Mapping):
        keys = sorted(map(str, state))
        return f"a dict with keys {', '.join(keys[:4])}{' ...' if len(keys) > 4 else ''}" if keys else "an empty dict"
    return f"a {type(state).__name__}"


def load_weights(model: nn.Module, weights: Mapping[str, torch.Tensor], path: str | Path, flag: str) -> None:
    """`model.load_state_dict(weights)`, strict; what does not fit is one line naming the keys and shapes."""
    own = model.state_dict()
    missing = [k for k in own if k not in weights]
    unexpected = [k for k in weights if k not in own]
    wrong = [
        f"{k} {tuple(weights[k].shape)} vs {tuple(own[k].shape)}"
        for k in own
        if k in weights and hasattr(weights[k], "shape") and tuple(weights[k].shape) != tuple(own[k].shape)
    ]
    if missing or unexpected or wrong:
        parts = [
            f"{len(v)} {what} ({', '.join(v[:2])}{' ...' if len(v) > 2 else ''})"
            for v, what in ((missing, "missing"), (unexpected, "unexpected"), (wrong, "of another shape"))
            if v
        ]
        raise ckpt.CheckpointError(
            f"{path}: {flag}: the weights do not fit this model: {'; '.join(parts)}. Build the model with the "
            "settings the file was trained with (the config.json of its run)"
        )
    model.load_state_dict(weights)


def init_from(model: nn.Module, path: str | Path) -> None:
    """`--init_from`: the weights of a checkpoint of this package, or a state dict of a `ChestCTCLIP`."""
    state = ckpt.load_checkpoint(path)
    weights = state["model"] if isinstance(state, Mapping) and isinstance(state.get("model"), Mapping) else state
    if not isinstance(weights, Mapping) or not all(isinstance(v, torch.Tensor) for v in weights.values()):
        raise ckpt.CheckpointError(
            f"{path}: --init_from needs a checkpoint of this package or a state dict of its model; this file holds "
            f"{_describe(state)}"
        )
    load_weights(model, weights, path, "--init_from")


def load_model_from_checkpoint(path: str | Path, *, device: torch.device) -> tuple[ChestCTCLIP, dict, int]:
    """Rebuild the model a checkpoint was trained with and load its weights (strict)."""
    state = run_checkpoint(ckpt.load_checkpoint(path), path, "--checkpoint")
    cfg = Config.from_dict(state["config"])
    cfg_for_build = Config.from_dict(
        {**state["config"], "image_weights": "none", "text_model_path": None, "init_from": None}
    )
    model = build_model(cfg_for_build, device=device)
    load_weights(model, state["model"], path, "--checkpoint")
    return model, asdict(cfg), int(state.get("step", 0))
