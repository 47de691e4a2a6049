"""ChestCTCLIP: the two towers and the SigLIP loss, the factory that builds them from a Config, and loading a
trained model: from a checkpoint of a run, or from a folder `ct-siglip-export` wrote (`from_pretrained`).

    model = ChestCTCLIP.from_pretrained("exported/")        # or a hub id, or RUN/best.pt
    images = model.encode_images(["scan1.npz", "scan2.npz"])  # (2, 512), L2-normalised
    scores = model.zero_shot(images, {"Pleural effusion": ("There is pleural effusion.", "There is no pleural effusion.")})
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn

from . import checkpoint as ckpt
from .config import Config
from .errors import ConfigError
from .loss import SigLIPLoss
from .metrics import zero_shot_scores

EXPORT_CONFIG, EXPORT_WEIGHTS, EXPORT_TEXT_DIR = "config.json", "model.safetensors", "text_model"
EXPORT_FORMAT = 1

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

    # -- using a trained model ------------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls, source: str | Path, *, device: str | torch.device = "cpu", text_model: str | None = None
    ) -> ChestCTCLIP:
        """A trained model, in eval mode: a folder written by `ct-siglip-export` (or its Hugging Face Hub id), or a
        checkpoint of a run (`step_*.pt`, `best.pt`). `text_model` points to the text base model when the folder
        the run used has moved."""
        device = torch.device(device)
        path = Path(source).expanduser()
        if path.is_file():
            model, _, _ = load_model_from_checkpoint(path, device=device, text_model=text_model)
        else:
            model = _load_export(path if path.is_dir() else _hub_snapshot(str(source)), device, text_model)
        return model.eval()

    def _device(self) -> torch.device:
        return next(self.parameters()).device

    @torch.no_grad()
    def encode_images(
        self, volumes: torch.Tensor | Sequence[str | Path], *, batch_size: int = 4, npz_key: str = "image"
    ) -> torch.Tensor:
        """(N, embed_dim) L2-normalised embeddings of (N, C, D, H, W) volumes in [0, 1], or of NPZ files (read and
        checked as training reads them, one batch at a time: a long list never sits in memory whole)."""
        from .volume_io import load_volume

        channels = self.image_encoder.backbone.in_channels

        def batch(i: int) -> torch.Tensor:
            if isinstance(volumes, torch.Tensor):
                return volumes[i : i + batch_size]
            return torch.stack(
                [torch.from_numpy(load_volume(p, npz_key, channels)) for p in volumes[i : i + batch_size]]
            )

        was_training = self.training
        self.eval()
        try:
            out = [self.encode_image(batch(i).to(self._device(), torch.float32)).float().cpu()
                   for i in range(0, len(volumes), batch_size)]  # fmt: skip
        finally:
            self.train(was_training)
        return torch.cat(out)

    @torch.no_grad()
    def encode_reports(self, texts: Sequence[str], *, batch_size: int = 32) -> torch.Tensor:
        """(N, embed_dim) L2-normalised embeddings of report texts (or prompts)."""
        was_training = self.training
        self.eval()
        try:
            out = []
            for i in range(0, len(texts), batch_size):
                batch = self.text_encoder.tokenize(list(texts[i : i + batch_size]))
                out.append(self.encode_text({k: v.to(self._device()) for k, v in batch.items()}).float().cpu())
        finally:
            self.train(was_training)
        return torch.cat(out)

    def zero_shot(
        self, volumes: torch.Tensor | Sequence[str | Path], prompts: Mapping[str, tuple[str, str]]
    ) -> dict[str, torch.Tensor]:
        """Per label, the score cos(image, positive prompt) - cos(image, negative prompt) of each volume (> 0 leans
        positive): the score the evaluation's zero-shot AUROC ranks. `volumes` as for `encode_images`, or their
        embeddings (N, embed_dim)."""
        is_emb = isinstance(volumes, torch.Tensor) and volumes.ndim == 2
        images = volumes if is_emb else self.encode_images(volumes)
        texts = self.encode_reports([t for pair in prompts.values() for t in pair])
        return {name: zero_shot_scores(images, texts[2 * i], texts[2 * i + 1]) for i, name in enumerate(prompts)}

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


def load_model_from_checkpoint(
    path: str | Path, *, device: torch.device, text_model: str | None = None
) -> tuple[ChestCTCLIP, dict, int]:
    """Rebuild the model a checkpoint was trained with and load its weights (strict). `text_model` replaces the
    text base model's path recorded in the checkpoint (the folder moved, or another machine)."""
    state = run_checkpoint(ckpt.load_checkpoint(path), path, "--checkpoint")
    cfg = Config.from_dict(state["config"])
    model = build_model(_build_config(state["config"], text_model), device=device)
    load_weights(model, state["model"], path, "--checkpoint")
    return model, asdict(cfg), int(state.get("step", 0))


def _build_config(saved: dict, text_model: str | None) -> Config:
    """The config that rebuilds a trained model's architecture; its weights come from the saved state, so nothing
    else is loaded (no Merlin download, no fine-tuned text weights, no --init_from)."""
    values = {**saved, "image_weights": "none", "text_model_path": None, "text_peft_path": None, "init_from": None}
    values.update(resume=None, cache_dir=None, text_cache_dir=None, compile=False)
    if text_model is not None:
        values["text_model"] = str(text_model)
    return Config.from_dict(values)


def _load_export(folder: Path, device: torch.device, text_model: str | None) -> ChestCTCLIP:
    """A folder written by `ct-siglip-export`: its config rebuilds the towers, its safetensors hold every weight."""
    from safetensors.torch import load_file

    cfg_file, weights = folder / EXPORT_CONFIG, folder / EXPORT_WEIGHTS
    if not cfg_file.is_file() or not weights.is_file():
        raise ConfigError(
            f"{folder}: not a model folder written by ct-siglip-export (needs {EXPORT_CONFIG} and {EXPORT_WEIGHTS}); "
            "a checkpoint of a run loads by its file name (RUN/best.pt)"
        )
    saved = json.loads(cfg_file.read_text())["config"]
    if text_model is None:  # the base model shipped inside the folder, or its hub id
        text_model = str(folder / EXPORT_TEXT_DIR) if (folder / EXPORT_TEXT_DIR).is_dir() else saved["text_model"]
    model = build_model(_build_config(saved, text_model), device=device)
    load_weights(model, load_file(str(weights), device=str(device)), weights, "from_pretrained")
    return model


def _hub_snapshot(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id))
    except Exception as e:  # offline, unknown repo, no permission: all one line for the user
        raise ConfigError(
            f"{repo_id}: not a local folder or file, and it cannot be fetched from the Hugging Face Hub "
            f"({type(e).__name__}); pass the path of an exported folder or a checkpoint"
        ) from None
