#!/usr/bin/env python3
"""Legacy directory mode: train on every *.npz of a folder, reports from a JSON {file stem: report}.

    python train_example.py --train_data_dir npz/train --val_data_dir npz/val --text_reports_path reports.json
    python train_example.py --train_data_dir npz/train --create_example_reports   # placeholder reports, then train

Flags this script does not know go to `siglip_trainer.main` unchanged. The CSV mode
(train_csv_example.py) is the recommended one: it carries splits and extra columns.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from train_csv_example import launch_trainer

# The example's training defaults (the original guide's phase 1), used unless the command line sets them.
EXAMPLE_DEFAULTS = [
    ("--batch_size", "2"),
    ("--max_steps", "10000"),
    ("--learning_rate", "1e-4"),
    ("--save_dir", "./checkpoints"),
    ("--log_interval", "50"),
    ("--save_interval", "1000"),
]
PLACEHOLDER_REPORTS = [
    "Placeholder report: normal chest CT, no acute findings.",
    "Placeholder report: small bilateral pleural effusions.",
    "Placeholder report: consolidation in the right lower lobe.",
    "Placeholder report: pulmonary edema and cardiomegaly.",
    "Placeholder report: mild emphysema in both upper lobes.",
    "Placeholder report: trace left pleural effusion.",
    "Placeholder report: ground-glass opacities at both lung bases.",
    "Placeholder report: subpleural nodules, follow-up recommended.",
]


def create_example_reports(npz_dirs: list[str | Path], output_path: str | Path) -> Path:
    """Write {file stem: placeholder report} for the NPZ files of `npz_dirs`, to try the legacy mode."""
    stems = sorted({f.stem for d in npz_dirs for f in Path(d).glob("*.npz")})
    reports = {stem: PLACEHOLDER_REPORTS[i % len(PLACEHOLDER_REPORTS)] for i, stem in enumerate(stems)}
    output_path = Path(output_path)
    output_path.write_text(json.dumps(reports, indent=2) + "\n")
    print(f"Created {output_path}: placeholder reports for {len(reports)} NPZ files (replace with real reports)")
    return output_path


def main(argv: list[str] | None = None) -> int:
    """Check the folders, optionally write example reports, then train; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], epilog="Any other flag is passed to siglip_trainer.py."
    )
    p.add_argument("--train_data_dir", required=True, help="folder of training *.npz files")
    p.add_argument("--val_data_dir", default=None, help="folder of validation *.npz files")
    p.add_argument("--text_reports_path", default=None, help="JSON {file stem: report}")
    p.add_argument(
        "--create_example_reports",
        action="store_true",
        help="write placeholder reports for the NPZ files (to --text_reports_path, else "
        "TRAIN_DATA_DIR/example_reports.json) and train with them",
    )
    p.add_argument(
        "--no_freeze_image_backbone",
        action="store_true",
        help="train the image backbone too (default: phase 1, frozen, as the guide's example)",
    )
    args, rest = p.parse_known_args(argv)

    dirs = [d for d in (args.train_data_dir, args.val_data_dir) if d]
    for d in dirs:
        if not Path(d).is_dir():
            print(f"error: {d}: folder not found", file=sys.stderr)
            return 2
        if not any(Path(d).glob("*.npz")):
            print(f"error: {d}: no *.npz files (make them with python -m ct_siglip.preprocess)", file=sys.stderr)
            return 2
    print(f"Found {sum(1 for _ in Path(args.train_data_dir).glob('*.npz'))} NPZ files in {args.train_data_dir}")

    reports = args.text_reports_path
    if args.create_example_reports:
        reports = str(create_example_reports(dirs, reports or Path(args.train_data_dir) / "example_reports.json"))

    trainer_argv = ["--train_data_dir", args.train_data_dir]
    if args.val_data_dir:
        trainer_argv += ["--val_data_dir", args.val_data_dir]
    if reports:
        trainer_argv += ["--text_reports_path", reports]
    return launch_trainer(trainer_argv, rest, EXAMPLE_DEFAULTS, freeze=not args.no_freeze_image_backbone)


if __name__ == "__main__":
    sys.exit(main())
