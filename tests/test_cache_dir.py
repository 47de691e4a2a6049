"""`--cache_dir`: decoded volumes cached as .npy give the same bytes as decoding, are never stale, survive damage,
concurrent writers and an unwritable folder."""

import logging
import os
import threading

import numpy as np
import pytest
import torch
from conftest import tiny_args, write_npz

import ct_siglip.volume_io as volume_io
import siglip_trainer
from ct_siglip.data import CTReportDataset
from ct_siglip.runlog import read_metrics
from ct_siglip.tables import read_csv_table
from ct_siglip.volume_io import VolumeCache, load_volume


def _items(ds):
    return [ds[(i, e)] for e in (0, 1) for i in range(len(ds))]


@pytest.mark.parametrize("augment", ["none", "light"])
def test_items_are_bit_identical_with_and_without_the_cache_and_later_reads_skip_decoding(
    small_csv, tmp_path, monkeypatch, augment
):
    table = read_csv_table(small_csv, "train")
    plain = _items(CTReportDataset(table, augment=augment, seed=3))
    cache = tmp_path / "cache"
    cached_ds = CTReportDataset(table, augment=augment, seed=3, cache_dir=str(cache))
    first = _items(cached_ds)
    entries = sorted(cache.glob("*.npy"))
    assert len(entries) == len(table)
    assert isinstance(np.load(entries[0], mmap_mode="r"), np.memmap)  # plain, uncompressed, memory-mappable

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded an NPZ although its cache entry is valid")

    monkeypatch.setattr(volume_io, "load_volume", no_decoding)
    second = _items(cached_ds)
    for a, b, c in zip(plain, first, second):
        assert a["index"] == b["index"] == c["index"] and a["text"] == b["text"]
        assert a["image"].dtype == b["image"].dtype == c["image"].dtype == torch.float16
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["image"], c["image"])


def test_a_changed_source_file_is_never_served_stale(tmp_path):
    src = write_npz(tmp_path / "a.npz", seed=1)
    cache = VolumeCache(tmp_path / "cache")
    old = cache.load(src)
    write_npz(src, seed=2)
    st = os.stat(src)
    os.utime(src, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))  # same size; a coarse clock could tie mtimes
    new = cache.load(src)
    assert not np.array_equal(old, new)
    assert np.array_equal(new, load_volume(src))
    # Another key or channel count is another entry, never the first one's bytes.
    assert cache.entry(src, "image", 2) != cache.entry(src, "other", 2) != cache.entry(src, "image", 1)


@pytest.mark.parametrize("damage", ["truncated", "garbage", "wrong_shape"])
def test_a_damaged_entry_is_rebuilt_from_the_source(tmp_path, damage):
    src = write_npz(tmp_path / "a.npz", seed=1)
    cache = VolumeCache(tmp_path / "cache")
    expected = cache.load(src)
    entry = cache.entry(src, "image", 2)
    if damage == "truncated":
        entry.write_bytes(entry.read_bytes()[:-100])
    elif damage == "garbage":
        entry.write_bytes(b"\x00not an npy file" * 10)
    else:
        np.save(entry, np.zeros((3, 2, 2, 2), np.float16))  # a valid .npy that breaks the data contract
    got = cache.load(src)
    assert np.array_equal(got, expected) and got.dtype == expected.dtype
    assert np.array_equal(np.load(entry), expected)  # rewritten whole


def test_an_unwritable_or_full_cache_dir_warns_once_and_reads_the_source(tmp_path, monkeypatch, caplog):
    src = write_npz(tmp_path / "a.npz", seed=1)
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("x")
    with caplog.at_level(logging.WARNING):
        cache = VolumeCache(blocker / "cache")  # cannot be created
        assert np.array_equal(cache.load(src), load_volume(src))
    assert [r.getMessage() for r in caplog.records if "cannot be written" in r.getMessage()]
    caplog.clear()

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    sources = [write_npz(tmp_path / f"b{seed}.npz", seed=seed) for seed in range(3)]
    cache = VolumeCache(tmp_path / "full")
    monkeypatch.setattr(np.lib.format, "write_array", disk_full)  # fails half-way through writing the temp file
    with caplog.at_level(logging.WARNING):
        for other in sources:
            assert np.array_equal(cache.load(other), load_volume(other))
    warnings = [r.getMessage() for r in caplog.records if "cannot be written" in r.getMessage()]
    assert len(warnings) == 1 and "No space left on device" in warnings[0] and "--cache_dir" in warnings[0]
    assert list((tmp_path / "full").iterdir()) == []  # no temp file left behind


def test_concurrent_writers_of_one_entry_never_expose_a_partial_file(tmp_path):
    """Writers share a process id here (threads), as workers on two nodes may: temp names must still differ."""
    src = write_npz(tmp_path / "a.npz", shape=(2, 16, 32, 32), seed=1)
    cache = VolumeCache(tmp_path / "cache")
    expected = load_volume(src)
    entry = cache.entry(src, "image", 2)
    errors, reads = [], []

    def write():
        try:
            for _ in range(10):
                cache._write(entry, expected)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    def read():
        for _ in range(40):
            got = cache._read(entry, 2, True)
            if got is not None:
                reads.append(np.array_equal(got, expected))

    threads = [threading.Thread(target=write) for _ in range(3)] + [threading.Thread(target=read)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and cache.writable and all(reads)
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [entry.name]


def test_stale_temp_files_of_killed_writers_are_removed_fresh_ones_kept(tmp_path):
    folder = tmp_path / "cache"
    folder.mkdir()
    old, fresh = folder / ".x.npy.tmp-1-aa", folder / ".y.npy.tmp-2-bb"
    old.write_bytes(b"half")
    fresh.write_bytes(b"half")
    os.utime(old, (1, 1))
    VolumeCache(folder)
    assert not old.exists() and fresh.exists()


def test_training_with_cache_dir_and_workers_gives_the_same_losses(small_csv, tmp_path, tiny_llama_dir):
    args = ["--max_steps", "3", "--save_interval", "100", "--num_workers", "2"]
    assert siglip_trainer.main(tiny_args(small_csv, tmp_path / "plain", tiny_llama_dir, *args)) == 0
    cache = tmp_path / "cache"
    run = tmp_path / "cached"
    assert siglip_trainer.main(tiny_args(small_csv, run, tiny_llama_dir, *args, "--cache_dir", str(cache))) == 0

    def losses(d):
        return [r["train/loss"] for r in read_metrics(d / "metrics.jsonl") if "train/loss" in r]

    assert losses(run) == losses(tmp_path / "plain")
    assert len(list(cache.glob("*.npy"))) == 16  # train and validation volumes
