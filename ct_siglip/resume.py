"""Continuing a run: which settings a checkpoint must share with the run that resumes it, and the log
records to drop when a killed run had logged steps it never saved.

The checkpoint file itself (atomic writes, hashes, finding the newest) is `ct_siglip.checkpoint`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path

from .errors import ConfigError

log = logging.getLogger("ct_siglip")

# Settings that change what a checkpoint means (with the global batch and the training rows, checked
# separately); resuming with other values is refused. `--batch_size` alone may change: on another
# number of processes the same global batch needs another per-process batch.
RESUME_MUST_MATCH = (
    "in_channels",
    "npz_key",
    "embed_dim",
    "image_depth",
    "image_width",
    "freeze_image_backbone",
    "freeze_image_stem",
    "text_model",
    "pooling_mode",
    "text_train",
    "lora_r",
    "lora_alpha",
    "lora_target_modules",
    "fixed_temperature",
    "text_learning_rate",  # None or a value: two or four optimizer groups (a new value is applied, see below)
    "seed",
    "max_text_length",
    "text_instruction",
    "text_chat_template",
)
# Of those, the ones that decide which tensors the model and the optimizer hold: not even --allow_config_change
# can change them (the saved weights and AdamW state would not fit); --init_from starts a new run instead.
STRUCTURE = (
    "in_channels",
    "embed_dim",
    "image_depth",
    "image_width",
    "freeze_image_backbone",
    "freeze_image_stem",
    "pooling_mode",
    "text_train",
    "lora_r",
    "lora_target_modules",
    "fixed_temperature",
)
# Settings of the optimizer and the schedule: a resumed run applies the new value from its first step (one log
# line says so), so config.json stays true. The step count and the data position do not depend on them.
APPLIED_ON_RESUME = (
    "learning_rate",
    "text_learning_rate",
    "weight_decay",
    "warmup_steps",
    "min_lr_ratio",
    "max_steps",
    "grad_clip",
)


def check_config_drift(state: dict, current: dict, *, allow: bool = False) -> None:
    """Refuse to continue a checkpoint whose model settings, global batch or training rows differ from this
    run's (its steps would not mean the same thing); with `allow`, only log the differences, except for the
    settings that shape the saved tensors (`STRUCTURE`), which are always refused."""
    saved_cfg, t = state["config"], state["trainer"]

    def differs(key: str) -> bool:
        old, new = saved_cfg.get(key), current["config"][key]
        if key == "text_learning_rate":  # its value is applied on resume; on or off changes the optimizer groups
            return (old is None) != (new is None)
        return old != new

    changed = [k for k in current["config"] if differs(k)]
    described = [f"--{k} {saved_cfg.get(k)!r} -> {current['config'][k]!r}" for k in changed]
    structural = [d for k, d in zip(changed, described) if k in STRUCTURE or k == "text_learning_rate"]
    if structural:
        raise ConfigError(
            f"cannot resume: the checkpoint's weights and optimizer state do not fit this run's model "
            f"({'; '.join(structural)}), and not even --allow_config_change can change that. Restore the "
            "settings, or start a new run from its weights with --init_from CHECKPOINT"
        )
    if t.get("global_batch") != current["global_batch"]:
        described.append(
            f"global batch (batch_size x processes x grad_accum_steps) {t.get('global_batch')} -> "
            f"{current['global_batch']}"
        )
    if t.get("data_sha256") != current["data_sha256"]:
        described.append("the training rows (image paths or reports of the split) changed")
    if described and allow:
        log.warning("resuming with changed settings (--allow_config_change): %s", "; ".join(described))
    elif described:
        raise ConfigError(
            f"cannot resume: this run differs from the checkpoint's: {'; '.join(described)}. Use a new "
            "--save_dir, restore the settings, or pass --allow_config_change"
        )


# Settings that only decide how a new model starts: a resumed run's weights already hold what they set, so a new
# value cannot apply; the saved one is kept (and config.json says so).
INIT_ONLY = ("temperature", "bias_init", "image_weights", "text_model_path", "text_peft_path", "init_from")


def resumed_config(saved_cfg: dict, cfg):
    """(the config a resumed run uses, the optimizer and schedule changes it applies, the start-only settings it
    cannot apply and keeps at the checkpoint's values), for one log line each."""
    applied = schedule_changes(saved_cfg, dataclasses.asdict(cfg))
    kept = {k: saved_cfg[k] for k in INIT_ONLY if k in saved_cfg and saved_cfg[k] != getattr(cfg, k)}
    ignored = [f"--{k} {getattr(cfg, k)!r} (kept {v!r})" for k, v in kept.items()]
    return dataclasses.replace(cfg, **kept), applied, ignored


def schedule_changes(saved_cfg: dict, cfg: dict) -> list[str]:
    """`--flag old -> new` for each optimizer or schedule setting that a resumed run changes (and applies)."""
    return [
        f"--{k} {saved_cfg.get(k)!r} -> {cfg[k]!r}" for k in APPLIED_ON_RESUME if saved_cfg.get(k, cfg[k]) != cfg[k]
    ]


def truncate_log(path: Path, step: int, step_of: Callable[[str], int | None]) -> None:
    """Drop the records of steps after `step` (logged by a run killed before it could save them), so a
    resumed run logs each step once. Rewritten through a temp file: a kill now leaves the old file."""
    if not path.is_file():
        return
    lines = path.read_bytes().splitlines(keepends=True)
    kept = []
    for raw in lines:
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:  # a torn or damaged line (a disk that filled up mid-write): dropped
            continue
        s = step_of(line)
        if s is not None and s <= step:
            kept.append(line if line.endswith("\n") else line + "\n")
    if len(kept) != len(lines):
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        tmp.write_text("".join(kept))
        os.replace(tmp, path)


def jsonl_step(line: str) -> int | None:
    """The step of a `metrics.jsonl` line (None: a torn last line, or not a record)."""
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):  # a torn last line, or not a record
        return None


def csv_step(line: str) -> int | None:
    """The step of a `bad_samples.csv` line (-1 for the header, which is kept)."""
    head = line.split(",", 1)[0]
    return int(head) if head.isdigit() else (-1 if head == "step" else None)  # keep the header
