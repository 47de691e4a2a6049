"""Chest-CT SigLIP: Merlin's I3ResNet image tower + an LLM2Vec text tower, trained with the sigmoid loss.

Imports go one way, from the commands down to the helpers:
- commands: `train` (the training CLI), `evaluate`, `export`, `preprocess`, `validate`, `plots`, `demo`, `mntp`,
  `simcse`;
- training: `trainer` (SigLIPTrainer: loop, validation, checkpoints), `step` (TrainStep: the optimizer step),
  `resume`, `checkpoint`, `distributed`, `feature_cache`, `runlog`;
- data: `loaders` (a run's DataLoaders), `tables`, `data`, `volume_io`, `preflight`, `synthetic/`;
  scans to volumes: `preprocess` (the command), `convert`, `scan_checks`;
- models (import without the trainer): `model`, `image_tower`, `text_tower`, `text_weights`, `text_cache`,
  `pooling`, `loss`, `tiny_models`;
- below everything: `config`, `runtime` (device, precision, seeding), `errors`, `metrics`.
"""

__version__ = "0.1.0"
