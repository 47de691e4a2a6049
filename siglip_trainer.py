#!/usr/bin/env python
"""Train a chest-CT CLIP model (Merlin's I3ResNet-152 + an LLM2Vec text tower) with the SigLIP loss.

    python siglip_trainer.py --csv_file data.csv --batch_size 4 --max_steps 50000 --save_dir ./checkpoints
    python siglip_trainer.py --demo          # synthetic chest CT, tiny models, a few minutes on a CPU
    torchrun --nproc_per_node 8 siglip_trainer.py --csv_file data.csv ...

The implementation lives in the `ct_siglip` package; this file keeps the original entry point and names.
"""

from __future__ import annotations

import sys

from ct_siglip.config import Config, build_parser, parse_config
from ct_siglip.image_tower import ImageEncoder
from ct_siglip.loss import SigLIPLoss
from ct_siglip.model import ChestCTCLIP, build_model
from ct_siglip.text_tower import TextEncoder
from ct_siglip.train import main, run
from ct_siglip.trainer import SigLIPTrainer

__all__ = [
    "ChestCTCLIP",
    "Config",
    "ImageEncoder",
    "SigLIPLoss",
    "SigLIPTrainer",
    "TextEncoder",
    "build_model",
    "build_parser",
    "main",
    "parse_config",
    "run",
]

if __name__ == "__main__":
    sys.exit(main())
