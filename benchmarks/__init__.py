"""Benchmarks of ct_siglip (not installed with the package): `python benchmarks/bench_train.py --help`.

`bench_train` is the command (arguments, the plan of rows, main); `bench_core` runs and records rows;
`bench_models` writes the random real-size text model; `bench_steps` builds the tower, whole-step and heads rows
on the trainer's own `ct_siglip.step.TrainStep`; `bench_data` times volume decoding; `bench_report` prints tables.
"""
