"""A trained model leaves the machine it was trained on: `ct-siglip-export` writes a self-contained folder that
loads in a fresh process after the run, its cache and its text base model are gone, and gives the original
model's embeddings bit for bit (float32 on a CPU: the same weights through the same code)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_args, write_npz

import siglip_trainer
from ct_siglip.export import main as export_main
from ct_siglip.model import ChestCTCLIP

ROOT = Path(__file__).resolve().parents[1]
REPORTS = ["Small left pleural effusion.", "No effusion.", "Report number 3."]
PROMPTS = {"Lung nodule": ("There is a lung nodule.", "There is no lung nodule.")}

EMBED = """
import json, sys, torch
torch.set_num_threads(1)  # as the test process: the same reduction order, so the same bits
from ct_siglip.model import ChestCTCLIP
folder, out, reports, prompts, *volumes = sys.argv[1:]
model = ChestCTCLIP.from_pretrained(folder)
prompts = {k: tuple(v) for k, v in json.loads(prompts).items()}
torch.save({"images": model.encode_images(volumes), "reports": model.encode_reports(json.loads(reports)),
            "zero_shot": model.zero_shot(volumes, prompts)}, out)
"""


@pytest.fixture
def trained_run(small_csv, tiny_llama_dir, tmp_path):
    """A short run whose text base model is a copy that the test can move away afterwards."""
    base = tmp_path / "base_llama"
    shutil.copytree(tiny_llama_dir, base)
    run = tmp_path / "run"
    args = ("--max_steps", "3", "--save_interval", "3", "--eval_interval", "3", "--label_columns", "auto")
    assert siglip_trainer.main(tiny_args(small_csv, run, base, *args)) == 0
    return run, base


def test_an_export_loads_in_a_fresh_process_after_the_run_is_gone_and_embeds_bit_for_bit(
    trained_run, small_csv, tmp_path
):
    run, base = trained_run
    volumes = sorted(str(p) for p in (small_csv.parent / "vols").glob("case0[0-2].npz"))
    model = ChestCTCLIP.from_pretrained(run / "step_00000003.pt")
    expected = {"images": model.encode_images(volumes), "reports": model.encode_reports(REPORTS),
                "zero_shot": model.zero_shot(volumes, PROMPTS)}  # fmt: skip
    assert export_main([str(run), str(tmp_path / "export")]) == 0
    moved = tmp_path / "elsewhere" / "chest_ct_model"
    moved.parent.mkdir()
    shutil.move(tmp_path / "export", moved)
    shutil.rmtree(run)
    shutil.rmtree(base)
    out = tmp_path / "emb.pt"
    argv = [sys.executable, "-c", EMBED, str(moved), str(out), json.dumps(REPORTS), json.dumps(PROMPTS), *volumes]
    proc = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = torch.load(out, weights_only=True)
    assert torch.equal(got["images"], expected["images"]) and torch.equal(got["reports"], expected["reports"])
    assert torch.equal(got["zero_shot"]["Lung nodule"], expected["zero_shot"]["Lung nodule"])
    assert got["images"].shape == (3, 16)
    torch.testing.assert_close(got["images"].norm(dim=1), torch.ones(3))


def test_the_export_folder_holds_weights_only_and_no_paths_of_the_training_machine(trained_run, tmp_path):
    run, _ = trained_run
    out = tmp_path / "export"
    assert export_main([str(run / "best.pt") if (run / "best.pt").exists() else str(run), str(out)]) == 0
    names = {p.name for p in out.iterdir()}
    assert names == {"model.safetensors", "config.json", "text_model", "preprocessing.json", "README.md"}
    text = (out / "config.json").read_text()
    assert str(tmp_path) not in text and json.loads(text)["config"]["text_model"] == "text_model"
    from safetensors.torch import load_file

    weights = load_file(str(out / "model.safetensors"))
    assert "loss_fn.t_prime" in weights and not any(k.startswith("optimizer") for k in weights)
    assert (out / "model.safetensors").stat().st_size < (run / "step_00000003.pt").stat().st_size  # no AdamW state
    contract = json.loads((out / "preprocessing.json").read_text())
    assert contract["channels"] == 2 and contract["npz_key"] == "image" and contract["layout"] == "CDHW"
    card = (out / "README.md").read_text()
    assert "ChestCTCLIP.from_pretrained" in card and "val/i2t_R@1" in card and "data.csv" in card


def test_a_checkpoint_whose_text_base_moved_loads_with_text_model(trained_run, tmp_path, capsys):
    """Before: rename the base model's folder and a run's checkpoint could not be loaded or evaluated."""
    run, base = trained_run
    moved = tmp_path / "models" / "llama"
    moved.parent.mkdir()
    shutil.move(base, moved)
    with pytest.raises(Exception, match="no such folder"):
        ChestCTCLIP.from_pretrained(run / "step_00000003.pt")
    model = ChestCTCLIP.from_pretrained(run / "step_00000003.pt", text_model=str(moved))
    assert not model.training
    assert export_main([str(run), str(tmp_path / "e"), "--text_model", str(moved)]) == 0
    assert export_main([str(run), str(tmp_path / "e")]) == 2  # exists, not empty: one line
    assert "exists and is not empty" in capsys.readouterr().err
    push = ["--text_model", str(moved), "--push_to_hub", "someone/model"]
    assert export_main([str(run), str(tmp_path / "e2"), *push]) == 2  # offline
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "upload failed" in err and "is complete" in err
    assert (tmp_path / "e2" / "model.safetensors").is_file()


def test_encode_images_reads_npz_files_as_training_does(tmp_path, small_csv, trained_run):
    run, _ = trained_run
    model = ChestCTCLIP.from_pretrained(run / "step_00000003.pt")
    path = small_csv.parent / "vols" / "case00.npz"
    volume = torch.from_numpy(np.load(path)["image"]).float()[None]
    assert torch.equal(model.encode_images([path]), model.encode_images(volume))
    write_npz(tmp_path / "one_channel.npz", shape=(1, 8, 16, 16))
    with pytest.raises(Exception, match="expected 2 channels, got 1"):
        model.encode_images([tmp_path / "one_channel.npz"])
