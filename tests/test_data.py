"""Data tables, the dataset's error handling, and the resumable global-batch sampler."""

import json
import pickle

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import write_npz
from torch.utils.data import DataLoader

from ct_siglip.data import Collator, CTReportDataset, EvalSampler, GlobalBatchSampler
from ct_siglip.errors import DataError
from ct_siglip.tables import read_csv_table, read_directory_table, table_fingerprint


def test_csv_paths_resolve_against_the_csv_folder_and_split_filters(small_csv, tmp_path):
    table = read_csv_table(small_csv, "train")
    assert len(table) == 12
    assert table.frame["path"][0] == str(tmp_path / "vols" / "case00.npz")
    assert table.frame["row"].tolist() == list(range(1, 13))  # data rows counted from 1
    val = read_csv_table(small_csv, "val", label_columns=["auto"])
    assert len(val) == 4 and val.label_columns == ["Lung nodule"]


def test_renamed_columns_and_placeholder_for_missing_reports(tmp_path):
    write_npz(tmp_path / "a.npz")
    write_npz(tmp_path / "b.npz")
    pd.DataFrame(
        {
            "image_file": ["a.npz", "b.npz"],
            "report_text": ["Effusion.", None],
            "data_split": ["train", "train"],
            "extra": [1, 2],
        }
    ).to_csv(tmp_path / "d.csv", index=False)
    table = read_csv_table(
        tmp_path / "d.csv",
        "train",
        img_path_column="image_file",
        findings_column="report_text",
        split_column="data_split",
        missing_report_text="N/A",
    )
    assert table.frame["text"].tolist() == ["Effusion.", "N/A"]
    assert table.missing_reports == 1


def test_missing_column_and_empty_split_are_one_line_errors(small_csv):
    with pytest.raises(DataError, match=r"column 'report' missing .*--findings_column"):
        read_csv_table(small_csv, "train", findings_column="report")
    with pytest.raises(DataError, match=r"split 'test' has no rows \(splits present: train, val\)"):
        read_csv_table(small_csv, "test")


def test_legacy_directory_mode_reads_reports_by_file_stem(tmp_path):
    for name in ("x1", "x2"):
        write_npz(tmp_path / f"{name}.npz")
    (tmp_path / "r.json").write_text(json.dumps({"x1": "Normal chest CT."}))
    table = read_directory_table(tmp_path, tmp_path / "r.json", missing_report_text="none given")
    assert table.frame["text"].tolist() == ["Normal chest CT.", "none given"]
    assert table.missing_reports == 1


def _toy_tokenize(texts):
    return {"input_ids": torch.tensor([[len(t)] for t in texts])}


def test_bad_file_is_reported_with_file_and_row_or_replaced(small_csv, tmp_path):
    (tmp_path / "vols" / "case03.npz").write_bytes(b"not a zip")
    table = read_csv_table(small_csv, "train")
    strict = CTReportDataset(table, on_bad_sample="error")
    item = strict[(3, 0)]
    assert "case03.npz" in item["error"] and "row 4" in item["error"] and "corrupt" in item["error"]
    lenient = CTReportDataset(table, on_bad_sample="skip", seed=1)
    item = lenient[(3, 0)]
    assert item["index"] != 3 and item["image"].shape == (2, 8, 16, 16) and len(item["bad"]) == 1
    assert lenient[(3, 0)]["index"] == item["index"]  # replacement is deterministic


def test_wrong_channel_count_names_the_fix(tmp_path):
    write_npz(tmp_path / "a.npz", shape=(1, 4, 8, 8))
    pd.DataFrame({"img_path": ["a.npz"], "findings": ["x"], "split": ["train"]}).to_csv(tmp_path / "d.csv", index=False)
    item = CTReportDataset(read_csv_table(tmp_path / "d.csv", "train"))[(0, 0)]
    assert "expected 2 channels, got 1" in item["error"] and "--in_channels" in item["error"]


def test_loader_tokenizes_in_workers_and_batches_are_independent_of_worker_count(small_csv):
    table = read_csv_table(small_csv, "train")
    ds = CTReportDataset(table, augment="light", seed=3)
    pickle.dumps(Collator(_toy_tokenize))  # workers receive the collate function by pickling

    def run(workers):
        sampler = GlobalBatchSampler(len(ds), 4, seed=0)
        loader = DataLoader(ds, batch_size=4, sampler=sampler, num_workers=workers, collate_fn=Collator(_toy_tokenize))
        return [
            (b["index"].tolist(), b["images"].float().sum().item(), b["text"]["input_ids"].tolist()) for b in loader
        ]

    assert run(0) == run(2)


def test_global_batches_are_the_same_set_for_any_world_size_and_resume_mid_epoch():
    n, b = 50, 3

    def steps(world, accum, start=0):
        per_rank = []
        for r in range(world):
            s = GlobalBatchSampler(n, b, world_size=world, rank=r, accum=accum, seed=7)
            s.set_start(start)
            per_rank.append([i for i, _ in s])
        g = b * accum
        return [sorted(i for p in per_rank for i in p[k * g : (k + 1) * g]) for k in range(len(per_rank[0]) // g)]

    one = steps(1, 6)
    assert one == steps(2, 3) == steps(3, 2) == steps(6, 1)
    assert all(len(set(s)) == 18 for s in one) and len(one) == 50 // 18
    assert steps(2, 3, start=1) == one[1:]  # resuming at step 1 continues the same epoch


def test_sampler_crosses_epochs_with_a_new_permutation_and_no_repeats_within_one():
    s = GlobalBatchSampler(10, 2, seed=0)
    first = [k for k in s]
    second = [k for k in s]
    assert {e for _, e in first} == {0} and {e for _, e in second} == {1}
    assert sorted(i for i, _ in first) == list(range(10))
    assert [i for i, _ in first] != [i for i, _ in second]
    with pytest.raises(DataError, match="fewer than one global batch"):
        GlobalBatchSampler(3, 4)


def test_light_augmentation_never_flips_sides():
    from ct_siglip.data import light_augment

    img = torch.zeros(2, 4, 16, 16)
    img[..., :, 12:] = 1.0  # bright on one side of W
    out = light_augment(img, np.random.default_rng(0))
    assert out[..., :, 8:].mean() > 0.3 > 0.1 > out[..., :, :8].mean()


@pytest.mark.parametrize(("n", "world"), [(5, 2), (4, 3), (2, 3), (7, 1)])
def test_eval_shards_are_contiguous_blocks_in_rank_order(n, world):
    shards = [[i for i, _ in EvalSampler(n, world, r)] for r in range(world)]
    assert [i for s in shards for i in s] == list(range(n))  # concatenated in rank order: data-set order
    assert max(map(len, shards)) - min(map(len, shards)) <= 1


def test_fingerprint_follows_the_rows_not_where_the_data_set_lives(small_csv, tmp_path):
    before = table_fingerprint(read_csv_table(small_csv, "train"))
    moved = tmp_path.parent / (tmp_path.name + "_moved")
    tmp_path.rename(moved)
    assert table_fingerprint(read_csv_table(moved / "data.csv", "train")) == before
    df = pd.read_csv(moved / "data.csv")
    df.loc[0, "findings"] = "Another report."
    df.to_csv(moved / "data.csv", index=False)
    assert table_fingerprint(read_csv_table(moved / "data.csv", "train")) != before


def test_sentence_sampling_draws_subsets_of_whole_sentences_per_epoch_and_leaves_images_alone(tmp_path):
    from ct_siglip.data import sample_sentences

    report = (
        "No pleural effusion. Heart size is normal (ratio 0.45). Consolidation in the right lower lobe! Mild change."
    )
    sentences = {
        "No pleural effusion.",
        "Heart size is normal (ratio 0.45).",
        "Consolidation in the right lower lobe!",
        "Mild change.",
    }
    assert sample_sentences(report, np.random.default_rng(0), 0.0) == report
    sizes = set()
    for seed in range(200):
        out = sample_sentences(report, np.random.default_rng(seed), 1.0)
        parts = [
            p if p.endswith((".", "!")) else p + "." for p in out.replace("! ", "!|").replace(". ", ".|").split("|")
        ]
        assert set(parts) <= sentences and len(parts) == len(set(parts))  # whole sentences, none repeated
        sizes.add(len(parts))
    assert sizes == {1, 2, 3, 4}  # from one sentence (a prompt's length) to the whole report
    assert sample_sentences("One sentence only.", np.random.default_rng(0), 1.0) == "One sentence only."

    write_npz(tmp_path / "a.npz", seed=1)
    pd.DataFrame([{"img_path": "a.npz", "findings": report, "split": "train"}]).to_csv(tmp_path / "d.csv", index=False)
    table = read_csv_table(tmp_path / "d.csv", split="train")
    plain, sampled = CTReportDataset(table, seed=3), CTReportDataset(table, seed=3, sentence_sampling=1.0)
    texts = {sampled[(0, epoch)]["text"] for epoch in range(12)}
    assert len(texts) > 3 and sampled[(0, 5)]["text"] == sampled[(0, 5)]["text"]  # new per epoch, reproducible
    assert torch.equal(plain[(0, 2)]["image"], sampled[(0, 2)]["image"]) and plain[(0, 2)]["text"] == report


def test_sentence_sampling_is_a_probability_and_excludes_cached_features():
    from ct_siglip.config import Config
    from ct_siglip.errors import ConfigError

    with pytest.raises(ConfigError, match="--sentence_sampling must be a probability"):
        Config(demo=True, sentence_sampling=1.5)
    with pytest.raises(ConfigError, match="cannot be used with --sentence_sampling"):
        Config(demo=True, sentence_sampling=0.5, cache_features=True, freeze_image_backbone=True, text_train="frozen")
