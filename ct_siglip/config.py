"""One resolved configuration per run: a dataclass whose fields are the CLI flags.

The parser is built from the fields (name, type, default, help, group), so the schema is written
once; `config.json` in the run folder and every checkpoint hold `asdict(cfg)`.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError

GROUPS = (
    ("CSV data (recommended)", "Read img_path, findings and split from one CSV."),
    ("Legacy data (directory mode)", "A directory of *.npz with reports in a JSON file."),
    ("Data loading", None),
    ("Model", None),
    ("Text tower", None),
    ("Image tower", None),
    ("Training", None),
    ("Evaluation", None),
    ("Logging and saving", None),
    ("Run", None),
)


def arg(default: Any, help: str, group: str, **kw: Any) -> Any:
    """A config field that is also a CLI flag (`kw` goes to argparse: choices, nargs, action...)."""
    meta = {"help": help, "group": group, **kw}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=meta)
    return field(default=default, metadata=meta)


CSV, LEGACY, LOAD, MODEL, TEXT, IMAGE, TRAIN, EVAL, SAVE, RUN = (g for g, _ in GROUPS)
DEFAULT_TEXT_MODEL = "microsoft/LLM2CLIP-Llama-3.2-1B-Instruct-CC-Finetuned"
REPORTERS = ("tensorboard", "jsonl", "wandb")


@dataclass
class Config:
    """Every setting of a training run; field names are the CLI flags."""

    # CSV data
    csv_file: str | None = arg(
        None, "CSV with image paths, reports and splits (relative paths resolve against its folder)", CSV
    )
    train_split: str = arg("train", "value of the split column used for training", CSV)
    val_split: str = arg("val", "value of the split column used for validation ('' to skip validation)", CSV)
    findings_column: str = arg("findings", "column holding the report text", CSV)
    img_path_column: str = arg("img_path", "column holding the NPZ path", CSV)
    split_column: str = arg("split", "column holding the split name", CSV)
    text_pair_column: str | None = arg(
        None, "column with a second text of each study (a paraphrase, or the impression) for --text_pair_weight", CSV
    )
    label_columns: list[str] = arg(
        [], "binary label columns (0/1, -1 = unknown) for zero-shot AUROC; 'auto' finds them", CSV, nargs="*"
    )
    # Legacy
    train_data_dir: str | None = arg(None, "directory of training *.npz files", LEGACY)
    val_data_dir: str | None = arg(None, "directory of validation *.npz files (optional)", LEGACY)
    text_reports_path: str | None = arg(None, "JSON file mapping NPZ file stem -> report (optional)", LEGACY)
    # Data loading
    npz_key: str = arg("image", "array key inside each NPZ", LOAD)
    in_channels: int = arg(2, "channels per volume (HU windows); the first conv adapts to it", LOAD)
    missing_report_text: str = arg(
        "No report available.", "text used for a missing or empty report (counted in the log)", LOAD
    )
    augment: str = arg(
        "none",
        "random augmentation: none, or light (small shifts and intensity jitter)",
        LOAD,
        choices=["none", "light"],
    )
    sentence_sampling: float = arg(
        0.0,
        "probability that a training report is replaced by a random subset of its sentences (1 to all, shuffled), "
        "drawn anew each epoch; short texts in training make short zero-shot prompts in-distribution",
        LOAD,
    )
    max_missing_reports: float = arg(
        0.1,
        "stop when more than this fraction of a split's rows has no report (1 = never): a wrong reports file or "
        "column would otherwise train on the placeholder text alone",
        LOAD,
    )
    on_bad_sample: str = arg(
        "error",
        "a bad NPZ or report: stop with its file and row (error) or replace it (skip)",
        LOAD,
        choices=["error", "skip"],
    )
    max_bad_fraction: float = arg(
        0.01, "with --on_bad_sample skip, abort when more than this fraction of samples is bad (1 = never)", LOAD
    )
    preflight: bool = arg(
        True,
        "check every volume of the train and val splits before step 1 (parallel, cached by file size and mtime)",
        LOAD,
        action=argparse.BooleanOptionalAction,
    )
    loader_timeout: float = arg(
        600.0, "seconds to wait for one batch from the loader workers before failing (0 = forever)", LOAD
    )
    cache_dir: str | None = arg(
        None, "keep decoded volumes here as uncompressed .npy (memory-mapped), so NPZ is decoded once per file", LOAD
    )
    cache_features: bool = arg(
        False,
        "phase 1 with both towers frozen: compute pooled image/text features once (kept in <save_dir>/feature_cache) "
        "and train only the heads",
        LOAD,
    )
    # Model
    embed_dim: int = arg(512, "shared embedding size", MODEL)
    temperature: float = arg(0.1, "initial SigLIP temperature tau (t = 1/tau; the paper's t = 10)", MODEL)
    bias_init: float = arg(-10.0, "initial SigLIP bias b (the paper's -10)", MODEL)
    fixed_temperature: bool = arg(False, "keep t and b fixed instead of learning them", MODEL)
    loss_dist_impl: str = arg(
        "gather",
        "cross-process SigLIP loss: all-gather of texts, or bidir neighbour exchange",
        MODEL,
        choices=["gather", "bidir"],
    )
    init_from: str | None = arg(
        None, "start a new run from this checkpoint's model weights (fresh optimizer and schedule)", MODEL
    )
    # Text tower
    text_model: str = arg(DEFAULT_TEXT_MODEL, "LLM2Vec base model: Hugging Face id or local folder", TEXT)
    text_model_path: str | None = arg(
        None, "fine-tuned text weights: state dict, llm2vec4cxr folder/id, or a checkpoint of this package", TEXT
    )
    text_peft_path: str | None = arg(None, "LLM2Vec PEFT adapter to load on the base model", TEXT)
    pooling_mode: str = arg(
        "mean", "text pooling", TEXT, choices=["mean", "weighted_mean", "eos_token", "bos_token", "latent_attention"]
    )
    max_text_length: int = arg(512, "maximum report tokens", TEXT)
    text_instruction: str | None = arg(
        None, "instruction prepended to every report (only report tokens are pooled)", TEXT
    )
    text_chat_template: bool = arg(False, "wrap texts in the Llama-3 chat format (llm2vec4cxr models)", TEXT)
    text_train: str = arg(
        "full",
        "text tower training: full fine-tune, LoRA, or frozen (embeddings cached)",
        TEXT,
        choices=["full", "lora", "frozen"],
    )
    lora_r: int = arg(16, "LoRA rank", TEXT)
    lora_alpha: int = arg(32, "LoRA alpha", TEXT)
    lora_dropout: float = arg(0.05, "LoRA dropout", TEXT)
    lora_target_modules: list[str] = arg(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        "LoRA target modules",
        TEXT,
        nargs="+",
    )
    text_checkpointing: bool = arg(
        True, "gradient checkpointing in the text tower", TEXT, action=argparse.BooleanOptionalAction
    )
    text_cache_dir: str | None = arg(
        None, "disk cache of frozen text embeddings (default: <save_dir>/text_cache)", TEXT
    )
    # Image tower
    image_depth: int = arg(152, "I3ResNet depth (152 = Merlin; 50; 14 = tiny)", IMAGE, choices=[14, 50, 101, 152])
    image_width: int = arg(64, "I3ResNet base width (64 = Merlin)", IMAGE)
    image_weights: str = arg(
        "merlin", "image weights: merlin (Hugging Face download), a path to Merlin's checkpoint, or none", IMAGE
    )
    freeze_image_backbone: bool = arg(False, "freeze the I3ResNet (batch norm statistics too); train the heads", IMAGE)
    freeze_image_stem: bool = arg(
        False,
        "keep the first convolution fixed: its weight gradient over the full-resolution input is the image step's "
        "costliest (40 %% of the demo tower's image step on a CPU)",
        IMAGE,
    )
    image_checkpointing: str = arg(
        "none", "activation checkpointing in the image tower", IMAGE, choices=["none", "stage", "block"]
    )
    channels_last: bool = arg(False, "channels_last_3d memory format (faster convolutions on GPUs)", IMAGE)
    proj_dropout: float = arg(0.0, "dropout in the image projection head", IMAGE)
    compile: bool = arg(False, "torch.compile the image backbone", IMAGE)
    # Training
    batch_size: int = arg(4, "batch size per process (global batch = batch_size x processes x grad_accum_steps)", TRAIN)
    learning_rate: float = arg(1e-4, "peak learning rate", TRAIN)
    text_learning_rate: float | None = arg(
        None,
        "peak learning rate of the pretrained LLM's weights (LoRA weights in lora mode); its projection and "
        "the image tower keep --learning_rate (default: --learning_rate for all)",
        TRAIN,
    )
    text_pair_weight: float = arg(
        0.0,
        "weight of the report-pair loss added to the SigLIP loss: each training report's embedding must find its "
        "--text_pair_column partner among the batch's (symmetric InfoNCE); keeps every finding in the text "
        "embedding while the towers co-adapt (0 = off)",
        TRAIN,
    )
    text_pair_temperature: float = arg(0.05, "temperature of the report-pair loss (LLM2Vec's 0.05)", TRAIN)
    weight_decay: float = arg(1e-4, "AdamW weight decay (not applied to biases, norms, t' and b)", TRAIN)
    warmup_steps: int = arg(1000, "linear warm-up steps, then cosine decay to --min_lr_ratio", TRAIN)
    min_lr_ratio: float = arg(0.0, "final learning rate as a fraction of the peak", TRAIN)
    max_steps: int = arg(100000, "optimizer steps to train", TRAIN)
    num_workers: int = arg(8, "data-loader worker processes", TRAIN)
    grad_accum_steps: int = arg(
        1, "micro-batches per step; the loss still covers the whole global batch (embeddings cached)", TRAIN
    )
    grad_clip: float = arg(1.0, "gradient norm clip (0 = off)", TRAIN)
    precision: str = arg(
        "auto", "autocast precision (auto: bf16 on GPU, fp32 on CPU)", TRAIN, choices=["auto", "bf16", "fp16", "fp32"]
    )
    seed: int = arg(42, "random seed (each process uses seed + rank)", TRAIN)
    deterministic: bool = arg(False, "deterministic algorithms (slower; exact repeatability on GPU)", TRAIN)
    max_bad_steps: int = arg(20, "stop (with a checkpoint) after this many non-finite steps in a row", TRAIN)
    watchdog_timeout: float = arg(
        1800.0, "exit with status 124 when no step completes for this many seconds (0 = off)", TRAIN
    )
    dist_timeout: float = arg(
        1800.0, "seconds a collective operation may wait for the other processes (torchrun)", TRAIN
    )
    # Evaluation
    eval_interval: int = arg(1000, "validate every N steps (0 = only at the end)", EVAL)
    eval_batch_size: int | None = arg(None, "validation batch size (default: --batch_size)", EVAL)
    best_metric: str = arg("val/loss", "metric that selects the 'best' checkpoint", EVAL)
    best_mode: str = arg(
        "auto", "min or max for --best_metric (auto: min for losses)", EVAL, choices=["auto", "min", "max"]
    )
    # Logging and saving
    save_dir: str = arg("./checkpoints", "run folder: config, metrics, TensorBoard events and checkpoints", SAVE)
    log_interval: int = arg(100, "log train metrics every N steps", SAVE)
    save_interval: int = arg(5000, "save a checkpoint every N steps", SAVE)
    keep_last_n: int = arg(3, "keep the newest N periodic checkpoints (0 = keep all)", SAVE)
    report_to: str = arg(
        "tensorboard,jsonl", "where metrics go: any of tensorboard, jsonl, wandb (comma-separated), or none", SAVE
    )
    use_wandb: bool = arg(False, "the original trainer's switch: adds wandb to --report_to", SAVE)
    wandb_project: str = arg("ct-siglip", "Weights & Biases project", SAVE)
    wandb_entity: str | None = arg(None, "Weights & Biases entity (team or user; default: yours)", SAVE)
    run_name: str | None = arg(None, "the run's name in Weights & Biases (default: the --save_dir folder's name)", SAVE)
    resume: str | None = arg(
        None, "continue a run: a checkpoint path, or 'auto' for the newest complete one in --save_dir", SAVE
    )
    allow_config_change: bool = arg(
        False, "resume even if model, data or batch settings differ from the checkpoint's (logged)", SAVE
    )
    log_sample_ids: bool = arg(
        False, "debug: log the data-set indices of every step's global batch (train/sample_ids)", SAVE
    )
    # Run
    device: str = arg("auto", "cuda, cpu or auto", RUN)
    progress: str = arg(
        "auto",
        "progress display: bar (tqdm), lines (a plain line per --log_interval or 60 s, for batch-job logs), none; "
        "auto: bar on a terminal, lines otherwise",
        RUN,
        choices=["auto", "bar", "lines", "none"],
    )
    demo: bool = arg(
        False, "run the whole job on a generated synthetic chest-CT set with tiny models (no download)", RUN
    )

    def __post_init__(self) -> None:
        if self.csv_file is None and self.train_data_dir is None and not self.demo:
            raise ConfigError("no data: pass --csv_file data.csv (or --train_data_dir DIR, or --demo)")
        if self.csv_file and self.train_data_dir:
            raise ConfigError("pass either --csv_file or --train_data_dir, not both")
        positive = (
            "batch_size",
            "max_steps",
            "grad_accum_steps",
            "log_interval",
            "save_interval",
            "in_channels",
            "max_text_length",
        )
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name} must be >= 1, got {getattr(self, name)}")
        for name in (
            "warmup_steps",
            "num_workers",
            "eval_interval",
            "keep_last_n",
            "loader_timeout",
            "watchdog_timeout",
        ):
            if getattr(self, name) < 0:
                raise ConfigError(f"--{name} must be >= 0, got {getattr(self, name)}")
        if self.max_bad_steps < 1 or self.dist_timeout <= 0:
            raise ConfigError("--max_bad_steps must be >= 1 and --dist_timeout > 0")
        if self.temperature <= 0:
            raise ConfigError(f"--temperature is tau (t = 1/tau) and must be > 0, got {self.temperature}")
        if not 0.0 <= self.max_bad_fraction <= 1.0:
            raise ConfigError(f"--max_bad_fraction must be in [0, 1], got {self.max_bad_fraction}")
        if not 0.0 <= self.max_missing_reports <= 1.0:
            raise ConfigError(f"--max_missing_reports must be in [0, 1], got {self.max_missing_reports}")
        if self.cache_features and not (self.freeze_image_backbone and self.text_train == "frozen"):
            raise ConfigError(
                "--cache_features needs both towers frozen: add --freeze_image_backbone and --text_train frozen"
            )
        if not 0.0 <= self.sentence_sampling <= 1.0:
            raise ConfigError(f"--sentence_sampling must be a probability in [0, 1], got {self.sentence_sampling}")
        if self.cache_features and self.sentence_sampling > 0:
            raise ConfigError(
                "--cache_features cannot be used with --sentence_sampling: sampled reports change every epoch, so "
                "their embeddings cannot be cached; use --sentence_sampling 0"
            )
        if self.text_pair_weight < 0 or self.text_pair_temperature <= 0:
            raise ConfigError("--text_pair_weight must be >= 0 and --text_pair_temperature > 0")
        if self.text_pair_weight > 0:
            demo_fills_in = self.demo and self.csv_file is None  # --demo sets its CSV and pair column later
            if self.train_data_dir or not (self.text_pair_column or demo_fills_in):
                raise ConfigError(
                    "--text_pair_weight needs --text_pair_column (a CSV column with a second text of each study); "
                    "the directory + JSON mode has none"
                )
            if self.text_train == "frozen":
                raise ConfigError("--text_pair_weight trains the text tower: use --text_train full or lora")
        unknown = {r.strip() for r in self.report_to.split(",") if r.strip()} - {*REPORTERS, "none"}
        if unknown:
            raise ConfigError(
                f"--report_to: unknown {', '.join(sorted(unknown))} (choose from {', '.join(REPORTERS)}, none)"
            )
        if self.cache_features and self.augment != "none":
            raise ConfigError(
                f"--cache_features cannot be used with --augment {self.augment}: augmented volumes change every "
                "epoch, so their features cannot be cached; use --augment none"
            )

    def reporters(self) -> set[str]:
        """The metric sinks of `--report_to` (and `--use_wandb`)."""
        named = {r.strip() for r in self.report_to.split(",") if r.strip()} - {"none"}
        return named | ({"wandb"} if self.use_wandb else set())

    @property
    def best_is_max(self) -> bool:
        if self.best_mode != "auto":
            return self.best_mode == "max"
        return "loss" not in self.best_metric

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Config:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown config keys {unknown}: this checkpoint comes from another version")
        return cls(**d)


class OneLineParser(argparse.ArgumentParser):
    """An error is one line, not the 70-line usage; an unknown flag names the nearest valid one."""

    def error(self, message: str):
        unknown = re.match(r"unrecognized arguments: (\S+)", message)
        if unknown:
            flags = [o for a in self._actions for o in a.option_strings]
            near = difflib.get_close_matches(unknown.group(1).split("=")[0], flags, n=1)
            if near:
                message += f" (did you mean {near[0]}?)"
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    """The trainer's argparse parser, grouped like the original guide."""
    parser = OneLineParser(
        prog=prog,
        description="Train a chest-CT CLIP model (Merlin I3ResNet-152 + LLM2Vec) with the SigLIP loss.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    groups = {name: parser.add_argument_group(name, desc) for name, desc in GROUPS}
    for f in dataclasses.fields(Config):
        meta = dict(f.metadata)
        group = groups[meta.pop("group")]
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        kw: dict[str, Any] = {"default": default, **meta}
        if "action" not in kw:
            if isinstance(default, bool):  # --X and --no-X: a setting the demo turns on can be turned off
                kw["action"] = argparse.BooleanOptionalAction
            elif "nargs" not in kw:
                kw["type"] = _field_type(f)
        group.add_argument(f"--{f.name}", **kw)
    groups[RUN].add_argument(
        "--config",
        metavar="FILE",
        help="settings from a YAML or JSON file (the config.json of an earlier run replays it); flags given too win",
    )
    return parser


def read_config_file(path: str | Path) -> dict[str, Any]:
    """`--config FILE`: a mapping of setting -> value; an unknown key is one error naming the nearest valid one."""
    path = Path(path)
    try:
        text = path.read_text()
        if path.suffix.lower() in (".yaml", ".yml"):
            import yaml

            values = yaml.safe_load(text)
        else:
            values = json.loads(text)
    except (OSError, ValueError) as e:  # a missing file, or JSON that does not parse
        raise ConfigError(f"--config {path}: cannot read it ({type(e).__name__}: {str(e).splitlines()[0]})") from None
    except Exception as e:  # yaml.YAMLError, which is no ValueError
        raise ConfigError(f"--config {path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(values, dict):
        raise ConfigError(f"--config {path}: expected a mapping of setting: value, found {type(values).__name__}")
    known = {f.name for f in dataclasses.fields(Config)}
    for key in values:
        if key not in known:
            near = difflib.get_close_matches(str(key), known, n=1)
            hint = f"; did you mean '{near[0]}'?" if near else ""
            raise ConfigError(f"--config {path}: unknown setting '{key}'{hint}")
    return values


def _field_type(f: dataclasses.Field) -> Any:
    text = str(f.type)
    if text.startswith("int"):
        return int
    if text.startswith("float"):
        return float
    return str


def parse_config(argv: list[str] | None = None) -> Config:
    """CLI -> validated Config; a bad combination exits with one line naming the flag."""
    parser = build_parser()
    ns = parser.parse_args(argv)
    try:
        if ns.config:  # the file's values become the defaults, so every flag given on the command line wins
            parser.set_defaults(**read_config_file(ns.config))
            ns = parser.parse_args(argv)
        values = vars(ns)
        values.pop("config")
        return Config(**values)
    except ConfigError as e:
        parser.error(str(e))
        raise  # unreachable; parser.error exits
