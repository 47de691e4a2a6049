"""Runtime helpers every module may use: device, precision, autocast, seeding, RNG state.

This module imports nothing of the package, so the towers, the data code, evaluation, the feature cache,
the training step and the trainer can all share one definition of "bf16 on this device" without importing
each other.
"""

from __future__ import annotations

import contextlib
import os
import random
from collections.abc import Callable

import numpy as np
import torch

PRECISION_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def resolve_device(name: str = "auto") -> torch.device:
    """`auto` -> the GPU when there is one, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_precision(precision: str, device: torch.device) -> str:
    """`auto` -> bf16 on a GPU; fp32 on a CPU, where half-precision 3D convolutions are emulated and slow."""
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return precision


def autocast_factory(device: torch.device, precision: str) -> Callable[[], contextlib.AbstractContextManager]:
    """A zero-argument context factory: autocast in bf16/fp16, or nothing in fp32."""
    dtype = PRECISION_DTYPES[resolve_precision(precision, device)]
    if dtype == torch.float32:
        return contextlib.nullcontext
    return lambda: torch.autocast(device_type=device.type, dtype=dtype)


def seed_everything(seed: int, deterministic: bool = False) -> None:
    """Seed Python, NumPy and torch; `deterministic` trades speed for bit-identical reruns on a GPU."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    elif torch.cuda.is_available():
        torch.backends.cudnn.benchmark = True


def rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    """This process's RNG states as uint8 tensors (what `weights_only` loading accepts)."""
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, torch.Tensor], device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)
