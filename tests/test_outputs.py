"""The guide documents every flag; run folders turn into pictures."""

import json
from pathlib import Path

import numpy as np

from ct_siglip.config import build_parser
from ct_siglip.metrics import roc_auc
from ct_siglip.plots import main as plots_main
from ct_siglip.plots import roc_points

ROOT = Path(__file__).resolve().parents[1]


def test_the_guide_documents_every_trainer_flag():
    guide = (ROOT / "README_SIGLIP_TRAINING.md").read_text()
    flags = [a.option_strings[0] for a in build_parser()._actions if a.option_strings and a.dest != "help"]
    assert [f for f in flags if f"`{f}" not in guide] == []


def test_roc_points_trace_the_curve_whose_area_is_the_auroc():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 200)
    scores = np.round(labels + rng.normal(0, 1, 200), 1)  # rounding makes ties
    fpr, tpr = roc_points(scores, labels)
    assert (fpr[0], tpr[0], fpr[-1], tpr[-1]) == (0.0, 0.0, 1.0, 1.0)
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(tpr) >= 0)
    # Trapezoids through the tie groups give exactly the Mann-Whitney AUROC with midranks.
    assert abs(np.trapezoid(tpr, fpr) - roc_auc(scores, labels)) < 1e-12


def test_curve_panels_show_what_the_run_logged_and_the_pair_loss_beside_the_loss():
    from ct_siglip.plots import curve_panels

    plain = [{"step": 1, "train/loss": 4.0, "train/lr": 1e-4}, {"step": 2, "val/loss": 3.0}]
    assert curve_panels(plain) == [("loss", ["train/loss", "val/loss"]), ("learning rate", ["train/lr"])]
    paired = [{"step": 1, "train/loss": 4.0, "train/pair_loss": 2.5}]
    assert curve_panels(paired) == [("loss", ["train/loss", "train/pair_loss"])]


def test_plots_command_draws_curves_and_roc_from_a_run_folder(tmp_path):
    records = [
        {"step": s, "train/loss": 5.0 / s, "train/lr": 1e-4, "train/t": 10.0, "train/b": -10.0} for s in (1, 2, 3)
    ]
    records.append({"step": 3, "val/loss": 2.0, "val/i2t_R@1": 0.5, "val/zeroshot_auroc_mean": 0.8})
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    np.savez(
        tmp_path / "zeroshot_test.npz", score_Emphysema=np.array([0.1, 0.9, 0.4]), label_Emphysema=np.array([0, 1, -1])
    )
    assert plots_main([str(tmp_path)]) == 0
    for name in ("curves.png", "zeroshot_test.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert plots_main([str(tmp_path / "missing")]) == 2


def test_evaluate_command_scores_a_checkpoint_and_exports_embeddings(small_csv, tmp_path, tiny_llama_dir):
    import torch
    from conftest import tiny_args

    import siglip_trainer
    from ct_siglip.evaluate import main as evaluate_main
    from ct_siglip.runlog import read_metrics

    run = tmp_path / "run"
    assert (
        siglip_trainer.main(tiny_args(small_csv, run, tiny_llama_dir, "--max_steps", "3", "--save_interval", "3")) == 0
    )
    out = tmp_path / "eval"
    assert (
        evaluate_main(
            [
                "--checkpoint",
                str(run / "step_00000003.pt"),
                "--csv_file",
                str(small_csv),
                "--split",
                "val",
                "--label_columns",
                "auto",
                "--num_workers",
                "0",
                "--out_dir",
                str(out),
                "--save_embeddings",
            ]
        )
        == 0
    )
    (record,) = read_metrics(out / "metrics.jsonl")
    assert record["step"] == 3 and "val/zeroshot_auroc/Lung nodule" in record and "val/t2i_R@5" in record
    emb = torch.load(out / "embeddings_val.pt", weights_only=True)
    assert emb["image"].shape == emb["text"].shape == (4, 16) and emb["row"] == [13, 14, 15, 16]
    assert plots_main([str(out)]) == 0 and (out / "zeroshot_val.png").is_file()


def test_every_run_ends_with_its_pictures_and_eleven_curves_get_eleven_colours(small_csv, tiny_llama_dir, tmp_path):
    from conftest import tiny_args

    import siglip_trainer
    from ct_siglip.plots import distinct_colours

    run = tmp_path / "run"
    args = ("--max_steps", "2", "--eval_interval", "1", "--label_columns", "auto")
    assert siglip_trainer.main(tiny_args(small_csv, run, tiny_llama_dir, *args)) == 0
    assert (run / "curves.png").stat().st_size > 10_000 and (run / "zeroshot_val.png").stat().st_size > 10_000
    assert "Plot: " in (run / "train.log").read_text()
    assert len(set(distinct_colours(11))) == 11 and len(set(distinct_colours(4))) == 4
