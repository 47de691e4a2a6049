"""ChestCTCLIP: the two towers and the SigLIP loss, and the factory that builds them from a Config."""

from __future__ import annotations

import logging
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


def load_model_from_checkpoint(path: str | Path, *, device: torch.device) -> tuple[ChestCTCLIP, dict, int]:
    """Rebuild the model a checkpoint was trained with and load its weights (strict)."""
    state = ckpt.load_checkpoint(path)
    cfg = Config.from_dict(state["config"])
    cfg_for_build = Config.from_dict(
        {**state["config"], "image_weights": "none", "text_model_path": None, "init_from": None}
    )
    model = build_model(cfg_for_build, device=device)
    model.load_state_dict(state["model"])
    return model, asdict(cfg), int(state.get("step", 0))
