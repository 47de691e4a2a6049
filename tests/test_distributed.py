"""Several processes on the CPU (gloo): the distributed SigLIP loss against the single-process loss over the
global batch, and torchrun runs of the trainer against a single-process run with the same global batch."""

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import children

from ct_siglip.loss import SigLIPLoss

# Spawned workers import this module: keep its top-level imports light (the trainer is imported in the tests).

ROOT = Path(__file__).resolve().parent.parent
LOCAL_B, DIM = 3, 8


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _global_batch(world: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised float64 embeddings of the global batch; every rank's slice of texts differs ("uneven")."""
    g = torch.Generator().manual_seed(world)
    img = torch.nn.functional.normalize(torch.randn(world * LOCAL_B, DIM, generator=g, dtype=torch.float64), dim=1)
    txt = torch.nn.functional.normalize(torch.randn(world * LOCAL_B, DIM, generator=g, dtype=torch.float64), dim=1)
    return img, txt


def _loss_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    img, txt = _global_batch(world)
    rows = slice(rank * LOCAL_B, (rank + 1) * LOCAL_B)
    results = {}
    for impl in ("gather", "bidir"):
        loss_fn = SigLIPLoss(temperature=0.3, bias_init=-2.0, rank=rank, world_size=world, dist_impl=impl).double()
        x, y = img[rows].clone().requires_grad_(), txt[rows].clone().requires_grad_()
        loss = loss_fn(x, y)
        loss.backward()
        grads = torch.stack([loss.detach(), loss_fn.t_prime.grad, loss_fn.bias.grad])
        dist.all_reduce(grads)  # what DDP does to a per-rank gradient, before its division by world size
        results[impl] = {
            "loss_sum": grads[0],
            "t_grad_sum": grads[1],
            "b_grad_sum": grads[2],
            "img_grad": x.grad,
            "txt_grad": y.grad,
        }
    torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.parametrize("world", [2, 3, 4, 5])
def test_distributed_loss_and_gradients_equal_the_global_batch_loss(world, tmp_path):
    """Each rank's loss / world_size, summed, is the global loss; each rank's embedding gradients / world_size
    (DDP's averaging) are the global loss's gradient rows for its samples; t' and b likewise."""
    mp.start_processes(_loss_worker, args=(world, _free_port(), str(tmp_path)), nprocs=world, start_method="fork")
    img, txt = _global_batch(world)
    img.requires_grad_()
    txt.requires_grad_()
    ref_fn = SigLIPLoss(temperature=0.3, bias_init=-2.0).double()
    ref = ref_fn(img, txt)
    ref.backward()
    parts = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(world)]
    for impl in ("gather", "bidir"):
        res = [p[impl] for p in parts]
        # float64 throughout; only the summation order differs, so 1e-12 relative.
        close = {"rtol": 1e-12, "atol": 1e-14}
        torch.testing.assert_close(res[0]["loss_sum"] / world, ref.detach(), **close)
        torch.testing.assert_close(res[0]["t_grad_sum"] / world, ref_fn.t_prime.grad, **close)
        torch.testing.assert_close(res[0]["b_grad_sum"] / world, ref_fn.bias.grad, **close)
        torch.testing.assert_close(torch.cat([r["img_grad"] for r in res]) / world, img.grad, **close)
        torch.testing.assert_close(torch.cat([r["txt_grad"] for r in res]) / world, txt.grad, **close)


def _pair_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    from ct_siglip.loss import text_pair_loss

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    first, second = _global_batch(world)
    rows = slice(rank * LOCAL_B, (rank + 1) * LOCAL_B)
    x, y = first[rows].clone().requires_grad_(), second[rows].clone().requires_grad_()
    loss = text_pair_loss(x, y, temperature=0.2, rank=rank, world_size=world)
    loss.backward()
    total = loss.detach().clone()
    dist.all_reduce(total)
    torch.save({"loss_sum": total, "x_grad": x.grad, "y_grad": y.grad}, Path(out_dir) / f"rank{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.parametrize("world", [2, 3])
def test_the_report_pair_loss_across_ranks_is_the_global_batch_loss(world, tmp_path):
    """Like the SigLIP loss: the mean of the ranks' pair losses is the loss over the global batch, and the
    ranks' gradients averaged (as DDP does) are its gradient. float64: only the summation order differs."""
    from ct_siglip.loss import text_pair_loss

    mp.start_processes(_pair_worker, args=(world, _free_port(), str(tmp_path)), nprocs=world, start_method="fork")
    first, second = _global_batch(world)
    first.requires_grad_()
    second.requires_grad_()
    ref = text_pair_loss(first, second, temperature=0.2)
    ref.backward()
    parts = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(world)]
    close = {"rtol": 1e-12, "atol": 1e-14}
    torch.testing.assert_close(parts[0]["loss_sum"] / world, ref.detach(), **close)
    torch.testing.assert_close(torch.cat([p["x_grad"] for p in parts]) / world, first.grad, **close)
    torch.testing.assert_close(torch.cat([p["y_grad"] for p in parts]) / world, second.grad, **close)


# ----------------------------------------------------------------------------------------- torchrun
def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def torchrun(nproc: int, args: list[str], log: Path) -> subprocess.Popen:
    """`torchrun --standalone` (a free port) on gloo; its own session, so a failed test can kill it all."""
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        "siglip_trainer.py",
        *args,
    ]
    return subprocess.Popen(
        cmd, cwd=ROOT, env=_env(), stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True
    )


def finish(proc: subprocess.Popen, timeout: float = 300) -> int:
    try:
        return proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def rank_pid(torchrun_pid: int, rank: int) -> int:
    for pid in children(torchrun_pid):
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        if f"RANK={rank}".encode() in env:
            return pid
    raise AssertionError(f"rank {rank} not found")


def wait_for_steps(run: Path, n: int, proc: subprocess.Popen, timeout: float = 180) -> None:
    from ct_siglip.runlog import read_metrics

    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, f"ended early with {proc.returncode}"
        try:
            if sum("train/loss" in r for r in read_metrics(run / "metrics.jsonl")) >= n:
                return
        except (OSError, ValueError):
            pass
        time.sleep(0.02)
    raise AssertionError("timed out")


@pytest.fixture(scope="module")
def ddp_data(tmp_path_factory):
    """16 train rows (2 steps per epoch at a global batch of 8), 5 validation rows (3 + 2 on two ranks)."""
    from conftest import write_npz

    folder = tmp_path_factory.mktemp("ddp_data")
    (folder / "vols").mkdir()
    rows = []
    for i in range(21):
        write_npz(folder / "vols" / f"c{i:02d}.npz", seed=100 + i)
        rows.append(
            {
                "img_path": f"vols/c{i:02d}.npz",
                "findings": f"Report number {i}.",
                "split": "train" if i < 16 else "val",
                "Lung nodule": i % 2,
            }
        )
    pd.DataFrame(rows).to_csv(folder / "data.csv", index=False)
    return folder / "data.csv"


def ddp_args(csv: Path, run: Path, text_dir: Path, *extra: str) -> list[str]:
    """A frozen image backbone (batch norm in eval mode: per-rank batch statistics would differ from the
    global batch's) and no gradient clipping; validation at steps 3 and 6."""
    from conftest import tiny_args

    return tiny_args(
        csv,
        run,
        text_dir,
        "--freeze_image_backbone",
        "--grad_clip",
        "0",
        "--max_steps",
        "6",
        "--eval_interval",
        "3",
        "--eval_batch_size",
        "4",
        "--label_columns",
        "auto",
        *extra,
    )


@pytest.fixture(scope="module")
def single_run(ddp_data, tiny_llama_dir, tmp_path_factory):
    """The reference: one process with the whole global batch of 8."""
    import siglip_trainer

    run = tmp_path_factory.mktemp("single") / "run"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert (
            siglip_trainer.main(ddp_args(ddp_data, run, tiny_llama_dir, "--batch_size", "8", "--save_interval", "6"))
            == 0
        )
    finally:
        torch.set_num_threads(threads)
    return run


def records(run: Path, key: str) -> dict[int, dict]:
    from ct_siglip.runlog import read_metrics

    return {r["step"]: r for r in read_metrics(run / "metrics.jsonl") if key in r}


def assert_same_run(run: Path, ref: Path) -> None:
    """Per-step losses and validation metrics, and the weights after the last step, equal the reference's up
    to float32 rounding. The two compute the same sums in another order (DDP adds per-rank gradients, the
    loss adds blocks of pairs), ~1e-7 relative per operation; six Adam steps, which divide by sqrt(v), let
    that grow to ~1e-5 on the weights. Any real difference (a pair scored twice or missed, a wrong
    normalisation, a rank out of order) is of the order of the loss itself."""
    from ct_siglip.checkpoint import load_checkpoint

    train, ref_train = records(run, "train/loss"), records(ref, "train/loss")
    assert sorted(train) == sorted(ref_train) == list(range(1, 7))
    for s in ref_train:
        assert train[s]["train/loss"] == pytest.approx(ref_train[s]["train/loss"], rel=1e-5), s
    val, ref_val = records(run, "val/loss"), records(ref, "val/loss")
    assert sorted(val) == sorted(ref_val) == [3, 6]
    for s in ref_val:
        for k, v in ref_val[s].items():
            if k.startswith("val/"):
                assert val[s][k] == pytest.approx(v, rel=1e-5, abs=1e-6), (s, k)
    a, b = load_checkpoint(run / "step_00000006.pt"), load_checkpoint(ref / "step_00000006.pt")
    for k in b["model"]:
        torch.testing.assert_close(a["model"][k], b["model"][k], rtol=1e-4, atol=1e-5, msg=k)


@pytest.mark.parametrize(
    ("per_rank", "impl"),
    [(["--batch_size", "4"], "gather"), (["--batch_size", "2", "--grad_accum_steps", "2"], "bidir")],
)
def test_two_gloo_processes_train_like_one_process_with_the_same_global_batch(
    per_rank, impl, ddp_data, tiny_llama_dir, single_run, tmp_path
):
    run = tmp_path / "run"
    proc = torchrun(
        2,
        ddp_args(ddp_data, run, tiny_llama_dir, *per_rank, "--loss_dist_impl", impl, "--save_interval", "6"),
        tmp_path / "log",
    )
    assert finish(proc) == 0, (tmp_path / "log").read_text()[-3000:]
    assert_same_run(run, single_run)
    assert "Step 6: Loss" in (tmp_path / "log").read_text()  # rank 0's console


def test_sigterm_to_one_rank_saves_the_same_step_everywhere_then_resumes_on_one_process(
    ddp_data, tiny_llama_dir, single_run, tmp_path
):
    import siglip_trainer
    from ct_siglip.checkpoint import list_checkpoints, load_checkpoint

    run, log = tmp_path / "run", tmp_path / "log"
    proc = torchrun(2, ddp_args(ddp_data, run, tiny_llama_dir, "--batch_size", "4", "--save_interval", "6"), log)
    wait_for_steps(run, 2, proc)
    os.kill(rank_pid(proc.pid, 1), signal.SIGTERM)  # rank 1 only: rank 0 learns of it at the next step
    assert finish(proc) != 0  # both ranks exit with 143; torchrun reports the failure
    stops = re.findall(r"signal 15 \(SIGTERM\): saving step (\d+), then exiting with 143", log.read_text())
    assert len(stops) == 2 and len(set(stops)) == 1, log.read_text()[-3000:]
    step = int(stops[0])
    assert [p.name for p in list_checkpoints(run)] == [f"step_{step:08d}.pt"]
    assert len(load_checkpoint(run / f"step_{step:08d}.pt")["rng"]) == 2  # every rank's RNG state
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:  # the same global batch on one process
        assert (
            siglip_trainer.main(
                ddp_args(ddp_data, run, tiny_llama_dir, "--batch_size", "8", "--save_interval", "6", "--resume", "auto")
            )
            == 0
        )
    finally:
        torch.set_num_threads(threads)
    assert_same_run(run, single_run)


def test_a_hung_loader_worker_on_one_rank_stops_every_rank(ddp_data, tiny_llama_dir, tmp_path):
    """A loader worker of rank 1 is frozen (SIGSTOP, like a read on a dead NFS mount). If it froze before
    announcing a batch, rank 1's --loader_timeout fires and all ranks save and stop together; if it froze
    after (the main process then waits, without a timeout, for the batch's shared-memory handles from the
    worker), the watchdog ends the process. Either way the whole job stops instead of hanging."""
    from ct_siglip.checkpoint import find_latest, load_checkpoint

    run, log = tmp_path / "run", tmp_path / "log"
    flags = "--batch_size 4 --max_steps 100000 --save_interval 100000 --eval_interval 0 --num_workers 1"
    timeouts = "--loader_timeout 3 --watchdog_timeout 10"
    proc = torchrun(2, ddp_args(ddp_data, run, tiny_llama_dir, *flags.split(), *timeouts.split()), log)
    wait_for_steps(run, 2, proc)
    (worker,) = children(rank_pid(proc.pid, 1))
    os.kill(worker, signal.SIGSTOP)
    t0 = time.time()
    try:
        code = finish(proc, timeout=120)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(worker, signal.SIGKILL)
    out = log.read_text()
    assert code != 0 and time.time() - t0 < 60, out[-3000:]
    if "no progress for" in out:  # the watchdog: exit status 124, the last periodic checkpoint stands
        assert "--watchdog_timeout is 10 s" in out
    else:  # the loader timeout: both ranks saved the step they had reached
        assert "no batch from the data loader workers for 3 s (--loader_timeout)" in out
        assert "rank 1 stopped the run" in out
        assert load_checkpoint(find_latest(run))["step"] >= 2


@pytest.fixture(scope="module")
def pair_data(ddp_data):
    """ddp_data with a second text per study, for the report-pair loss."""
    df = pd.read_csv(ddp_data)
    df["impression"] = [f"Impression {i}: nothing else." for i in range(len(df))]
    out = ddp_data.with_name("pairs.csv")
    df.to_csv(out, index=False)
    return out


def test_report_pairs_train_on_the_global_batch_across_ranks_and_micro_batches(pair_data, tiny_llama_dir, tmp_path):
    """1 process x 8 = 2 processes x 4 = 1 process x 4 x 2 micro-batches, step by step, with the report-pair
    loss on. Before, the pair loss paired texts within each rank's and each micro-batch's rows only, and the
    runs drifted apart from step 2 (2.6e-3 relative by step 6 on the demo)."""
    import siglip_trainer

    pairs = ("--text_pair_column", "impression", "--text_pair_weight", "0.5", "--save_interval", "6")
    single, accum, ddp = tmp_path / "single", tmp_path / "accum", tmp_path / "ddp"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert siglip_trainer.main(ddp_args(pair_data, single, tiny_llama_dir, "--batch_size", "8", *pairs)) == 0
        accum_args = ("--batch_size", "4", "--grad_accum_steps", "2", *pairs)
        assert siglip_trainer.main(ddp_args(pair_data, accum, tiny_llama_dir, *accum_args)) == 0
    finally:
        torch.set_num_threads(threads)
    proc = torchrun(2, ddp_args(pair_data, ddp, tiny_llama_dir, "--batch_size", "4", *pairs), tmp_path / "log")
    assert finish(proc) == 0, (tmp_path / "log").read_text()[-3000:]
    assert_same_run(accum, single)
    assert_same_run(ddp, single)
    pair, ref = records(accum, "train/pair_loss"), records(single, "train/pair_loss")
    for s in ref:  # one process: the whole global batch's pair loss, with or without micro-batches
        assert pair[s]["train/pair_loss"] == pytest.approx(ref[s]["train/pair_loss"], rel=1e-5), s
