"""`ct-siglip-export RUN_DIR_OR_CHECKPOINT OUT_DIR`: a trained model as a self-contained folder others can load.

    model.safetensors   every weight (both towers, the projection heads, the loss's t' and b); no optimizer
    config.json         what rebuilds the model (the run's settings, no absolute paths)
    text_model/         the text base model's folder (config, tokenizer, weights), unless it is a hub id and
                        --include_base is not given (then config.json names the id)
    preprocessing.json  the input contract: NPZ key, channels, HU windows, spacing, size, orientation
    README.md           a model card: what it was trained on, the settings, the last evaluation, how to load it

`ChestCTCLIP.from_pretrained(OUT_DIR)` loads it anywhere; `--push_to_hub REPO_ID` uploads it.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

from . import __version__
from . import checkpoint as ckpt
from .config import OneLineParser
from .convert import STORED_AXES, PreprocessSettings
from .errors import ConfigError
from .model import EXPORT_CONFIG, EXPORT_FORMAT, EXPORT_TEXT_DIR, EXPORT_WEIGHTS, load_model_from_checkpoint
from .runlog import read_metrics

# Settings that name files of the machine a run was trained on: never exported as paths.
LOCAL_PATHS = ("text_model_path", "text_peft_path", "init_from", "resume", "cache_dir", "text_cache_dir")


def find_checkpoint(source: Path) -> Path:
    """A checkpoint file as given, or a run folder's best.pt (else its newest intact checkpoint)."""
    if source.is_file():
        return source
    if not source.is_dir():
        raise ConfigError(f"{source}: no such run folder or checkpoint")
    best = source / "best.pt"
    found = best if best.is_file() and ckpt.verify_checkpoint(best) is None else ckpt.find_latest(source)
    if found is None:
        raise ConfigError(f"{source}: no intact checkpoint (best.pt or step_*.pt) in this run folder")
    return found


def portable_config(cfg: dict[str, Any], text_model: str) -> dict[str, Any]:
    """The run's settings without the paths of its machine: file names only, the base model as shipped."""
    out = {k: (Path(v).name if isinstance(v, str) and os.path.isabs(v) else v) for k, v in cfg.items()}
    out.update({k: None for k in LOCAL_PATHS}, image_weights="none", text_model=text_model, save_dir="checkpoints")
    return out


def export(
    source: str | Path, out_dir: str | Path, *, include_base: bool = False, text_model: str | None = None
) -> Path:
    """Write the export folder of a run or checkpoint (see the module docstring); returns its path."""
    from safetensors.torch import save_file

    path, out_dir = find_checkpoint(Path(source).expanduser()), Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise ConfigError(f"{out_dir}: exists and is not empty; choose another folder or remove it")
    state = ckpt.load_checkpoint(path)
    model, cfg, step = load_model_from_checkpoint(path, device=torch.device("cpu"), text_model=text_model)
    base = text_model or cfg["text_model"]
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        weights = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
        save_file(weights, str(tmp / EXPORT_WEIGHTS), metadata={"format": "pt"})
        shipped = _copy_base_model(base, tmp / EXPORT_TEXT_DIR, include_base)
        config = portable_config(cfg, EXPORT_TEXT_DIR if shipped else base)
        info = {"format": EXPORT_FORMAT, "ct_siglip_version": __version__, "step": step, "config": config}
        (tmp / EXPORT_CONFIG).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
        (tmp / "preprocessing.json").write_text(json.dumps(preprocessing(cfg), indent=2) + "\n")
        (tmp / "README.md").write_text(model_card(cfg, step, state, path, shipped, base))
        if out_dir.exists():
            out_dir.rmdir()
        tmp.rename(out_dir)  # published whole: a folder that exists is complete
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def _copy_base_model(base: str, dest: Path, include_base: bool) -> bool:
    """Copy the text base model into the export when it is a local folder (or, with `include_base`, the hub
    snapshot in the local cache). False: the export names the hub id instead."""
    folder = Path(base).expanduser()
    if not folder.is_dir():
        if not include_base:
            return False
        from huggingface_hub import snapshot_download

        try:
            folder = Path(snapshot_download(base))
        except Exception as e:
            raise ConfigError(f"--include_base: cannot fetch {base} ({type(e).__name__}); pass --text_model") from None
    shutil.copytree(folder, dest, symlinks=False, ignore=shutil.ignore_patterns(".*"))
    return True


def preprocessing(cfg: dict[str, Any]) -> dict[str, Any]:
    """The input contract the model was trained with (the preprocessor's defaults produce it)."""
    s = PreprocessSettings()
    return {
        "npz_key": cfg["npz_key"],
        "channels": cfg["in_channels"],
        "layout": "CDHW",
        "axes": STORED_AXES,
        "orientation": "RAS, depth first",
        "dtype": "float16 or float32, values in [0, 1]",
        "windows_hu": [list(w) for w in s.windows][: cfg["in_channels"]],
        "spacing_mm_hwd": list(s.spacing),
        "size_hwd": list(s.size),
        "made_by": "python -m ct_siglip.preprocess (its default settings)",
    }


def model_card(cfg: dict, step: int, state: dict, path: Path, shipped: bool, base: str) -> str:
    evaluation = _last_evaluation(path.parent / "metrics.jsonl")
    rows = "\n".join(f"| {k} | {v:.4f} |" for k, v in evaluation.items()) or "| (no evaluation logged) | |"
    settings = ["in_channels", "image_depth", "image_width", "embed_dim", "text_train", "pooling_mode",
                "max_text_length", "batch_size", "learning_rate", "max_steps", "temperature"]  # fmt: skip
    text = f"`{EXPORT_TEXT_DIR}/` (shipped in this folder)" if shipped else f"`{base}` (Hugging Face Hub)"
    return f"""# Chest-CT SigLIP model

A chest-CT CLIP model trained with the SigLIP sigmoid loss: an I3ResNet-{cfg["image_depth"]} image tower (Merlin's
architecture) and an LLM2Vec text tower over radiology reports, both projected to {cfg["embed_dim"]} dimensions.

- Trained on: `{Path(cfg.get("csv_file") or cfg.get("train_data_dir") or "?").name}`, split
  `{cfg["train_split"]}`, {step} steps of a global batch of {state["trainer"].get("global_batch")}
- Text base model: {text}
- Exported from `{path.name}` by ct-siglip {__version__}

## Settings

| setting | value |
|---|---|
{chr(10).join(f"| `--{k}` | {cfg[k]} |" for k in settings)}

## Last evaluation

| metric | value |
|---|---|
{rows}

## Use

```python
from ct_siglip.model import ChestCTCLIP

model = ChestCTCLIP.from_pretrained("path/to/this/folder")
images = model.encode_images(["scan.npz"])            # (C, D, H, W) volumes as in preprocessing.json
reports = model.encode_reports(["Small left pleural effusion."])
scores = model.zero_shot(images, {{"Pleural effusion": ("There is pleural effusion.", "There is no pleural effusion.")}})
```

Inputs: NPZ volumes as `python -m ct_siglip.preprocess` writes them (see `preprocessing.json`).
"""


def _last_evaluation(metrics: Path) -> dict[str, float]:
    try:
        records = [r for r in read_metrics(metrics) if any(k.startswith("val/") for k in r)]
    except (OSError, ValueError):
        return {}
    if not records:
        return {}
    return {k: float(v) for k, v in records[-1].items() if k.startswith("val/") and isinstance(v, (int, float))}


def push_to_hub(folder: Path, repo_id: str) -> str:
    """Upload the export folder to a (new or existing) Hub model repository; returns its URL."""
    from huggingface_hub import HfApi

    try:
        api = HfApi()
        api.create_repo(repo_id, exist_ok=True)
        api.upload_folder(folder_path=str(folder), repo_id=repo_id)
    except Exception as e:  # offline, no token, no permission
        raise ConfigError(
            f"--push_to_hub {repo_id}: upload failed ({type(e).__name__}: {str(e).splitlines()[0][:200]}); the "
            f"export in {folder} is complete: upload it later with huggingface-cli upload {repo_id} {folder}"
        ) from None
    return f"https://huggingface.co/{repo_id}"


def main(argv: list[str] | None = None) -> int:
    p = OneLineParser(prog="ct-siglip-export", description=__doc__.split("\n\n")[0])
    p.add_argument("source", help="a run folder (its best.pt, else its newest checkpoint) or a checkpoint file")
    p.add_argument("out_dir", help="the folder to write (must not exist, or be empty)")
    p.add_argument("--include_base", action="store_true", help="ship a hub text base model's weights too")
    p.add_argument("--text_model", help="the text base model, when the folder the run used has moved")
    p.add_argument("--push_to_hub", metavar="REPO_ID", help="upload the folder to this Hugging Face model repo")
    args = p.parse_args(argv)
    try:
        out = export(args.source, args.out_dir, include_base=args.include_base, text_model=args.text_model)
        print(f"Exported to {out}: load it with ChestCTCLIP.from_pretrained({str(out)!r})")
        if args.push_to_hub:
            print(f"Uploaded: {push_to_hub(out, args.push_to_hub)}")
    except (ConfigError, ckpt.CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
