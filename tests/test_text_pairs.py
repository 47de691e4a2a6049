"""The report-pair loss (`--text_pair_column`, `--text_pair_weight`): its value, its data and where its gradient goes."""

import math

import pandas as pd
import pytest
import torch
from conftest import tiny_args

import siglip_trainer
from ct_siglip.config import Config, parse_config
from ct_siglip.data import Collator, CTReportDataset
from ct_siglip.errors import ConfigError, DataError
from ct_siglip.loss import text_pair_loss
from ct_siglip.runlog import read_metrics
from ct_siglip.tables import read_csv_table


def test_pair_loss_matches_a_hand_computed_two_pair_case():
    # float64: the check is of the formula, not of rounding
    a = torch.tensor([[1.0, 0.0], [0.0, 2.0]], dtype=torch.float64)  # normalised: e1, e2
    b = torch.tensor([[3.0, 4.0], [0.0, 1.0]], dtype=torch.float64)  # normalised: (0.6, 0.8), e2
    cos = torch.tensor([[0.6, 0.0], [0.8, 1.0]], dtype=torch.float64)  # cos[i, j] = <a_i, b_j>
    logits = cos / 0.5
    row = -(logits[0, 0] - torch.logsumexp(logits[0], 0) + logits[1, 1] - torch.logsumexp(logits[1], 0)) / 2
    col = -(logits[0, 0] - torch.logsumexp(logits[:, 0], 0) + logits[1, 1] - torch.logsumexp(logits[:, 1], 0)) / 2
    assert float(text_pair_loss(a, b, temperature=0.5)) == pytest.approx(float(row + col) / 2, rel=1e-6)
    # symmetric in its two arguments; texts that match only their partner (orthogonal otherwise) cost ~0
    assert float(text_pair_loss(b, a, 0.5)) == pytest.approx(float(text_pair_loss(a, b, 0.5)), rel=1e-6)
    eye = torch.eye(4)
    assert float(text_pair_loss(eye, eye, 0.01)) < 1e-6  # log(1 + 3 exp(-100))


@pytest.fixture
def pair_csv(small_csv):
    """small_csv plus an 'impression' column; train row 4 (data row 4) has an empty one."""
    df = pd.read_csv(small_csv)
    df["impression"] = [f"Impression {i}." for i in range(len(df))]
    df.loc[3, "impression"] = ""
    df.to_csv(small_csv, index=False)
    return small_csv


def test_pair_column_is_read_and_an_empty_partner_falls_back_to_the_report(pair_csv, caplog):
    table = read_csv_table(pair_csv, "train", pair_column="impression", label_columns=["auto"])
    assert table.frame["pair_text"][0] == "Impression 0."
    assert table.frame["pair_text"][3] == table.frame["text"][3] == "Report number 3."
    assert "row 4" in caplog.text and "impression" in caplog.text
    assert table.label_columns == ["Lung nodule"]  # the text column is not taken for a label
    with pytest.raises(DataError, match=r"column 'impresion' missing.*--text_pair_column"):
        read_csv_table(pair_csv, "train", pair_column="impresion")


def test_partners_ride_in_the_text_batch_after_the_reports(pair_csv):
    table = read_csv_table(pair_csv, "train", pair_column="impression")
    ds = CTReportDataset(table, pair_texts=True)
    seen = []
    batch = Collator(lambda texts: seen.extend(texts) or {"n": torch.tensor(len(texts))})([ds[0], ds[1]])
    assert seen == ["Report number 0.", "Report number 1.", "Impression 0.", "Impression 1."] and batch["pairs"]
    plain = Collator(lambda texts: {"n": torch.tensor(len(texts))})([CTReportDataset(table)[0]])
    assert not plain["pairs"] and int(plain["text"]["n"]) == 1


def test_pair_weight_needs_a_column_and_a_trained_text_tower(pair_csv):
    with pytest.raises(ConfigError, match="--text_pair_column"):
        Config(csv_file=str(pair_csv), text_pair_weight=0.5)
    with pytest.raises(ConfigError, match="--text_pair_column"):
        Config(train_data_dir="vols", text_pair_weight=0.5, text_pair_column="impression")
    with pytest.raises(ConfigError, match="--text_train full or lora"):
        Config(csv_file=str(pair_csv), text_pair_weight=0.5, text_pair_column="impression", text_train="frozen")
    Config(csv_file=str(pair_csv), text_pair_weight=0.5, text_pair_column="impression", text_train="lora")


def _step_gradients(cfg):
    """The gradients of one training step on the first batch (the optimizer's step and zeroing disabled)."""
    from ct_siglip.loaders import load_table
    from ct_siglip.model import build_model
    from ct_siglip.trainer import SigLIPTrainer

    torch.manual_seed(0)
    model = build_model(cfg, device=torch.device("cpu"))
    trainer = SigLIPTrainer(cfg, model, load_table(cfg, cfg.train_split, train=True), None, device=torch.device("cpu"))
    trainer.optimizer.step = lambda *a, **k: None
    trainer.optimizer.zero_grad = lambda *a, **k: None
    batch = trainer.train_loader.collate_fn([trainer.train_set[(i, 0)] for i in range(4)])
    out = trainer.train_step([batch])
    return model, batch, out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_pair_loss_gradient_reaches_the_text_tower_only_and_equals_its_own_gradient(pair_csv, tmp_path, tiny_llama_dir):
    common = ("--grad_clip", "0")  # unclipped: the two runs' gradients must differ by the pair term alone
    off_cfg = parse_config(tiny_args(pair_csv, tmp_path / "off", tiny_llama_dir, *common))
    on_cfg = parse_config(tiny_args(pair_csv, tmp_path / "on", tiny_llama_dir, *common, "--text_pair_column",
                                    "impression", "--text_pair_weight", "0.7", "--text_pair_temperature", "0.1"))  # fmt: skip
    _, _, off, g_off = _step_gradients(off_cfg)
    model, batch, on, g_on = _step_gradients(on_cfg)
    # the reports embed alike whether or not their partners share the text batch (float32, padding differs)
    assert on["loss"] == pytest.approx(off["loss"], rel=1e-5)
    # the pair term's own gradient, from the reports and partners encoded in separate calls
    model.zero_grad()
    n = len(batch["images"])
    reports, partners = ({k: v[rows] for k, v in batch["text"].items()} for rows in (slice(0, n), slice(n, None)))
    pair = text_pair_loss(model.encode_text(reports), model.encode_text(partners), 0.1)
    assert on["pair_loss"] == pytest.approx(pair.item(), rel=1e-5)
    (0.7 * pair).backward()
    own = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    assert own and all(name.startswith("text_encoder.") for name in own)
    for name, g in g_on.items():
        expected = g_off[name] + own[name] if name in own else g_off[name]
        # float32: the reports' embeddings differ in the last bits (other padding length) and some gradients sum
        # ~1e5 terms, so the tolerance is relative to each tensor's largest entry
        torch.testing.assert_close(g, expected, rtol=1e-4, atol=1e-5 * float(expected.abs().max()), msg=name)
    assert any((own[k].abs() > 1e-4).any() for k in own)  # the check above is not vacuous


def test_pair_loss_with_accumulated_micro_batches_trains_and_is_logged(pair_csv, tmp_path, tiny_llama_dir):
    run = tmp_path / "accum"
    args = tiny_args(pair_csv, run, tiny_llama_dir, "--max_steps", "2", "--batch_size", "2", "--grad_accum_steps",
                     "2", "--text_pair_column", "impression", "--text_pair_weight", "0.5", "--save_interval", "2")  # fmt: skip
    assert siglip_trainer.main(args) == 0
    rows = [r for r in read_metrics(run / "metrics.jsonl") if "train/pair_loss" in r]
    assert [r["step"] for r in rows] == [1, 2] and all(math.isfinite(r["train/pair_loss"]) for r in rows)
