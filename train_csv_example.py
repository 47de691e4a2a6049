#!/usr/bin/env python3
"""Train from a CSV (img_path, findings, split), make an example CSV, or check a CSV before training.

    python train_csv_example.py --csv_file data.csv                      # train (phase 1: frozen backbone)
    python train_csv_example.py --csv_file data.csv --validate_csv       # check every row, exit 1 if any is bad
    python train_csv_example.py --create_example_csv --npz_directory npz/ --batch_size 2 --max_steps 5000
    python train_csv_example.py --create_example_csv --validate_csv      # synthetic volumes, checked, no training

Flags this script does not know (--learning_rate, --demo, ...) go to `siglip_trainer.main` unchanged.
Turn scans into NPZ files and a CSV first with `python -m ct_siglip.preprocess` (see the guide).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np
import pandas as pd

# The example's training defaults (the original guide's phase 1), used unless the command line sets them.
EXAMPLE_DEFAULTS = [
    ("--batch_size", "2"),
    ("--max_steps", "5000"),
    ("--learning_rate", "1e-4"),
    ("--save_dir", "./checkpoints_csv"),
    ("--log_interval", "50"),
    ("--save_interval", "1000"),
]
PLACEHOLDER_FINDINGS = [
    "Placeholder report: no acute cardiopulmonary findings.",
    "Placeholder report: small bilateral pleural effusions.",
    "Placeholder report: consolidation in the right lower lobe.",
    "Placeholder report: mild centrilobular emphysema in the upper lobes.",
    "Placeholder report: a 6 mm nodule in the left upper lobe.",
    "Placeholder report: cardiomegaly without pericardial effusion.",
    "Placeholder report: ground-glass opacities at both lung bases.",
    "Placeholder report: mediastinal lymphadenopathy.",
]


def _given(argv: list[str], flag: str) -> bool:
    return any(a == flag or a.startswith(flag + "=") for a in argv)


def seeded_splits(n: int, seed: int = 0, fractions: tuple[float, float] = (0.8, 0.1)) -> list[str]:
    """train/val/test labels in a seeded random order; at least one val row whenever n >= 2."""
    n_train = round(n * fractions[0])
    n_val = round(n * fractions[1])
    if n >= 2 and n_val == 0:
        n_val, n_train = 1, min(n_train, n - 1)
    labels = ["train"] * n_train + ["val"] * n_val + ["test"] * (n - n_train - n_val)
    order = np.random.default_rng(seed).permutation(n)
    return [labels[k] for k in np.argsort(order)]


def create_example_csv(
    output_csv: str | Path,
    npz_directory: str | Path | None = None,
    *,
    num_samples: int = 32,
    seed: int = 0,
    example_dir: str | Path = "example_data",
    reports_json: str | Path | None = None,
) -> Path:
    """A CSV to try the pipeline with: one row per NPZ of `npz_directory`, or generated volumes.

    Findings come from `reports_json` ({file stem: report}, the legacy format) where it has the stem,
    else from placeholders that say so, since a model trained on them learns nothing real. The
    synthetic set's reports describe what was drawn into each volume.
    """
    if npz_directory is None:
        from ct_siglip.synthetic import generate_dataset  # lazy: only this path needs it

        csv = Path(generate_dataset(example_dir, n=num_samples, shape=(32, 64, 64), seed=seed))
        print(f"Generated {num_samples} synthetic volumes; CSV: {csv}")
        return csv
    npz_dir = Path(npz_directory)
    files = sorted(npz_dir.glob("*.npz"))
    if not files:
        raise FileNotFoundError(f"no *.npz files in {npz_dir} (check --npz_directory)")
    output_csv = Path(output_csv)
    output_csv.parent.mkdir(parents=True, exist_ok=True)
    base = output_csv.resolve().parent
    paths = [Path(os.path.relpath(f.resolve(), base)).as_posix() for f in files]  # relative to the CSV
    reports = json.loads(Path(reports_json).read_text()) if reports_json else {}
    findings = [reports.get(f.stem) or PLACEHOLDER_FINDINGS[i % len(PLACEHOLDER_FINDINGS)] for i, f in enumerate(files)]
    n_real = sum(f.stem in reports and bool(reports[f.stem]) for f in files)
    df = pd.DataFrame({"img_path": paths, "findings": findings, "split": seeded_splits(len(files), seed)})
    df.to_csv(output_csv, index=False)
    counts = df["split"].value_counts()
    source = f"; {n_real} reports from {reports_json}" if reports_json else ""
    print(
        f"Created {output_csv}: {len(df)} rows from {npz_dir} (train {counts.get('train', 0)}, "
        f"val {counts.get('val', 0)}, test {counts.get('test', 0)}){source}"
    )
    if n_real < len(df):
        print(f"{len(df) - n_real} findings are placeholders: replace them with the real reports")
    return output_csv


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], epilog="Any other flag is passed to siglip_trainer.py."
    )
    p.add_argument("--csv_file", help="CSV with img_path, findings and split columns")
    p.add_argument(
        "--create_example_csv",
        action="store_true",
        help="write an example CSV (from --npz_directory, else synthetic volumes) and use it",
    )
    p.add_argument("--npz_directory", help="NPZ folder for --create_example_csv")
    p.add_argument("--text_reports_path", help="JSON {file stem: report} giving --create_example_csv real findings")
    p.add_argument(
        "--output_csv", help="where --create_example_csv writes (default: --csv_file or example_training_data.csv)"
    )
    p.add_argument("--example_dir", default="example_data", help="folder for synthetic example volumes")
    p.add_argument("--num_samples", type=int, default=32, help="synthetic example volumes")
    p.add_argument("--seed", type=int, default=0, help="seed of the example splits / synthetic volumes")
    p.add_argument("--validate_csv", action="store_true", help="check every row and exit (non-zero if any is bad)")
    p.add_argument("--findings_column", default=None)
    p.add_argument("--img_path_column", default=None)
    p.add_argument("--split_column", default=None)
    p.add_argument("--train_split", default=None)
    p.add_argument("--val_split", default=None)
    p.add_argument("--npz_key", default=None)
    p.add_argument("--in_channels", type=int, default=None)
    p.add_argument("--validate_workers", type=int, default=None, help="parallel readers for --validate_csv")
    p.add_argument(
        "--no_freeze_image_backbone",
        action="store_true",
        help="train the image backbone too (default: phase 1, frozen, as the guide's example)",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    """Create and/or validate a CSV, or train on it; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args, rest = build_parser().parse_known_args(argv)

    if args.create_example_csv:
        target = args.output_csv or args.csv_file or "example_training_data.csv"
        try:
            args.csv_file = str(
                create_example_csv(
                    target,
                    args.npz_directory,
                    num_samples=args.num_samples,
                    seed=args.seed,
                    example_dir=args.example_dir,
                    reports_json=args.text_reports_path,
                )
            )
        except (OSError, ValueError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    if not args.csv_file:
        print("error: give --csv_file, or --create_example_csv to make one", file=sys.stderr)
        return 2

    passthrough = {
        "--findings_column": args.findings_column,
        "--img_path_column": args.img_path_column,
        "--split_column": args.split_column,
        "--train_split": args.train_split,
        "--val_split": args.val_split,
        "--npz_key": args.npz_key,
        "--in_channels": args.in_channels,
    }
    if args.validate_csv:
        from ct_siglip.validate import run

        return run(
            args.csv_file,
            img_path_column=args.img_path_column or "img_path",
            findings_column=args.findings_column or "findings",
            split_column=args.split_column or "split",
            train_split=args.train_split or "train",
            val_split="val" if args.val_split is None else args.val_split,
            npz_key=args.npz_key or "image",
            channels=2 if args.in_channels is None else args.in_channels,
            workers=args.validate_workers,
        )

    trainer_argv = ["--csv_file", args.csv_file]
    for flag, value in passthrough.items():
        if value is not None:
            trainer_argv += [flag, str(value)]
    return launch_trainer(trainer_argv, rest, EXAMPLE_DEFAULTS, freeze=not args.no_freeze_image_backbone)


def launch_trainer(trainer_argv: list[str], rest: list[str], defaults: list[tuple[str, str]], *, freeze: bool) -> int:
    """Run the trainer with the example's phase-1 defaults wherever the user's own flags (`rest`) set none."""
    trainer_argv = list(trainer_argv)
    for flag, value in defaults:
        if not _given(rest, flag):
            trainer_argv += [flag, value]
    if freeze and not _given(rest, "--freeze_image_backbone"):
        trainer_argv.append("--freeze_image_backbone")
    trainer_argv += rest
    print("Training: python siglip_trainer.py " + " ".join(trainer_argv), flush=True)
    import siglip_trainer  # lazy: creating or checking a CSV must not need the model stack

    code = siglip_trainer.main(trainer_argv)
    return code if isinstance(code, int) else 0


if __name__ == "__main__":
    sys.exit(main())
