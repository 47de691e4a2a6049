"""Process plumbing: torch.distributed set-up from torchrun's (or SLURM's) environment, the few small
collectives the trainer uses to agree across ranks, and a watchdog that ends a hung process.

Every collective here runs on the training device (NCCL needs CUDA tensors; gloo takes CPU ones), so
the same code serves `torchrun` on GPUs and the gloo processes of the CPU tests.
"""

from __future__ import annotations

import contextlib
import faulthandler
import gc
import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from .errors import ConfigError

log = logging.getLogger("ct_siglip")

EXIT_HUNG = 124  # the exit status of `timeout(1)`: schedulers and users already read it as "hung"


def _env_int(*names: str, default: int) -> int:
    for name in names:
        if os.environ.get(name):
            return int(os.environ[name])
    return default


def init_distributed(device_type: str = "cpu", timeout_s: float = 1800.0) -> tuple[int, int, int]:
    """(rank, world_size, local_rank); initialises the process group when there is more than one process.

    torchrun sets RANK/WORLD_SIZE/LOCAL_RANK. Under `srun` without torchrun, SLURM's per-step variables
    are used (SLURM_STEP_NUM_TASKS, not SLURM_NTASKS: a plain `python` inside an allocation of many
    tasks is still one process and must not wait for peers that never start).
    """
    world_size = _env_int("WORLD_SIZE", "SLURM_STEP_NUM_TASKS", default=1)
    rank = _env_int("RANK", "SLURM_PROCID", default=0)
    local_rank = _env_int("LOCAL_RANK", "SLURM_LOCALID", default=0)
    if world_size > 1 and not dist.is_initialized():
        if not os.environ.get("MASTER_ADDR") or not os.environ.get("MASTER_PORT"):
            raise ConfigError(
                f"{world_size} processes but MASTER_ADDR/MASTER_PORT are not set: launch with torchrun, or export "
                "MASTER_ADDR=$(scontrol show hostnames $SLURM_JOB_NODELIST | head -n1) and MASTER_PORT=29500 "
                "in the job script (see README_SIGLIP_TRAINING.md, 'Several GPUs and nodes')"
            )
        os.environ.setdefault("RANK", str(rank))
        os.environ.setdefault("WORLD_SIZE", str(world_size))
        os.environ.setdefault("LOCAL_RANK", str(local_rank))
        # The backend follows the device actually used, not whether a GPU exists: `--device cpu` on a
        # GPU node still needs gloo. NCCL collectives run on the current device: set it first.
        backend = "nccl" if device_type == "cuda" else "gloo"
        if device_type == "cuda":
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s))
    return rank, world_size, local_rank


def shutdown_distributed() -> None:
    """Free what still holds the process group (DDP's reducer, in the trainer's reference cycles), then destroy it.

    Left to interpreter exit, gloo's worker threads can outlive Python's teardown and abort the process
    ("terminate called without an active exception", exit -6) after a run that had finished and saved.
    """
    if dist.is_available() and dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def all_gather_tensors(tensor: torch.Tensor) -> list[torch.Tensor]:
    """Every rank's `tensor` (same shape and dtype on each rank), in rank order."""
    if not is_distributed():
        return [tensor]
    out = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(out, tensor.contiguous())
    return out


def gather_ints(values: Sequence[int], device: torch.device) -> list[list[int]]:
    """Every rank's short list of ints, in rank order: one tiny all-gather that lets all ranks take the same
    decision (stop on a signal, stop on a fault, count bad samples) at the same step."""
    if not is_distributed():
        return [list(values)]
    parts = all_gather_tensors(torch.tensor(list(values), dtype=torch.int64, device=device))
    return [p.tolist() for p in parts]


def all_gather_rows(x: torch.Tensor, device: torch.device) -> list[torch.Tensor]:
    """Every rank's `x` of shape (n_r, ...), where n_r may differ by rank (padded for the all-gather)."""
    if not is_distributed():
        return [x]
    sizes = [n for (n,) in gather_ints([len(x)], device)]
    padded = x.new_zeros((max(sizes), *x.shape[1:]), device=device)
    padded[: len(x)] = x.to(device)
    return [p[:n].to(x.device) for p, n in zip(all_gather_tensors(padded), sizes)]


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's picklable `obj` (for rare, small messages: error texts, bad-sample notes)."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank `src`'s `obj` on every rank."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


class Watchdog:
    """Ends the process when the training loop stops making progress for `timeout_s` seconds.

    A hung NFS read, a stopped loader worker or a peer rank frozen inside a collective would otherwise
    hold the job (and its GPUs) until the scheduler's wall-clock limit. The loop calls `beat()` at every
    step; a daemon thread checks the time since the last beat and, past the limit, prints what the
    process was doing (the stack of every thread) and exits with `EXIT_HUNG`. Exiting (rather than
    raising in another thread, which Python cannot do) also breaks the collectives of the other ranks,
    so under torchrun the whole job stops and can be restarted with `--resume auto`.
    """

    def __init__(self, timeout_s: float, describe: Callable[[], str] = lambda: "", exit_code: int = EXIT_HUNG):
        self.timeout_s, self.describe, self.exit_code = timeout_s, describe, exit_code
        self._last = time.monotonic()
        self._paused = 0
        self._done = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> Watchdog:
        if self.timeout_s > 0:
            self._last = time.monotonic()
            self._thread = threading.Thread(target=self._run, name="ct_siglip-watchdog", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()

    def beat(self) -> None:
        self._last = time.monotonic()

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """For long phases with their own limits (validation has the loader timeout)."""
        self._paused += 1
        try:
            yield
        finally:
            self._paused -= 1
            self.beat()

    def _run(self) -> None:
        poll = max(0.05, min(self.timeout_s / 4, 10.0))
        while not self._done.wait(poll):
            idle = time.monotonic() - self._last
            if self._paused or idle <= self.timeout_s:
                continue
            sys.stderr.write(
                f"\nerror: no progress for {idle:.0f} s ({self.describe()}); --watchdog_timeout is "
                f"{self.timeout_s:g} s. A hung file system, loader worker or peer process is likely. Exiting with "
                f"{self.exit_code} so the job can be restarted with --resume auto. Stacks of all threads:\n"
            )
            faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
            sys.stderr.flush()
            os._exit(self.exit_code)
