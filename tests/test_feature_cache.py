"""`--cache_features`: heads-only steps on cached pooled features equal frozen-tower steps; features are reused
by a resumed run and never served stale; the flag refuses settings where caching would be wrong."""

import shutil

import numpy as np
import pytest
import torch
from conftest import tiny_args, write_npz

import ct_siglip.feature_cache as fc
import siglip_trainer
from ct_siglip.checkpoint import find_latest, load_checkpoint
from ct_siglip.config import Config, parse_config
from ct_siglip.data import Collator, CTReportDataset
from ct_siglip.errors import ConfigError
from ct_siglip.model import build_model
from ct_siglip.runlog import read_metrics
from ct_siglip.tables import read_csv_table

FROZEN = ["--freeze_image_backbone", "--text_train", "frozen"]


def _losses(run_dir):
    return {r["step"]: r["train/loss"] for r in read_metrics(run_dir / "metrics.jsonl") if "train/loss" in r}


@pytest.mark.parametrize(
    "extra, problem",
    [
        (["--text_train", "frozen"], "needs both towers frozen"),
        (["--freeze_image_backbone"], "needs both towers frozen"),
        ([*FROZEN, "--augment", "light"], "cannot be used with --augment light"),
    ],
)
def test_cache_features_refuses_trainable_towers_and_augmentation(small_csv, extra, problem, capsys):
    with pytest.raises(ConfigError, match=problem):
        Config(csv_file=str(small_csv), cache_features=True, **{
            "freeze_image_backbone": "--freeze_image_backbone" in extra,
            "text_train": "frozen" if "frozen" in extra else "full",
            "augment": "light" if "light" in extra else "none",
        })  # fmt: skip
    with pytest.raises(SystemExit):
        parse_config(["--csv_file", str(small_csv), "--cache_features", *extra])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert problem in err and "--cache_features" in err


@pytest.fixture
def frozen_model(small_csv, tmp_path, tiny_llama_dir):
    cfg = parse_config(tiny_args(small_csv, tmp_path / "run", tiny_llama_dir, *FROZEN, "--cache_features"))
    torch.manual_seed(0)
    model = build_model(cfg, device=torch.device("cpu"))
    model.train()
    return cfg, model


def test_heads_step_on_cached_features_has_the_loss_and_gradients_of_the_frozen_tower_step(
    small_csv, frozen_model, tmp_path
):
    _, model = frozen_model
    ds = CTReportDataset(read_csv_table(small_csv, "train"))
    batch_keys = [(i, 0) for i in (7, 2, 11, 4, 0, 9)]

    def step(images, text, pooled):
        model.zero_grad(set_to_none=True)
        _, _, loss = model(images, text, pooled=pooled)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        return loss.detach(), grads

    batch = Collator(model.text_encoder.tokenize)([ds[k] for k in batch_keys])
    ref_loss, ref_grads = step(batch["images"].float(), batch["text"], pooled=False)
    image, text, failures = fc.build_feature_table(model, ds, tmp_path / "features", device=torch.device("cpu"),
                                                   precision="fp32", batch_size=4, num_workers=0)  # fmt: skip
    assert not failures and image.shape == (12, model.image_encoder.backbone.out_features)
    cached = fc.collate_features([fc.CachedFeatureDataset(ds, image, text, failures)[k] for k in batch_keys])
    loss, grads = step(cached["image_features"], cached["text_features"], pooled=True)
    # Both sides run the same float32 operations on the same inputs; only the backbone's batch differs (4 rows in
    # index order vs the 6 of the step), and in eval mode a row's features do not depend on the others, so the
    # kernels' blocking can change the last bits of the pooled features (~1e-7 relative), nothing more.
    assert grads.keys() == ref_grads.keys() and {"loss_fn.t_prime", "loss_fn.bias"} <= grads.keys()
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-6)
    for name, g in grads.items():
        torch.testing.assert_close(g, ref_grads[name], rtol=1e-5, atol=1e-7, msg=name)
    # The frozen towers received no gradient and the step did not need them at all.
    assert all(p.grad is None for p in model.image_encoder.backbone.parameters())


def test_changed_sources_or_weights_are_recomputed_damaged_shards_skipped(
    small_csv, frozen_model, tmp_path, monkeypatch
):
    cfg, model = frozen_model
    ds = CTReportDataset(read_csv_table(small_csv, "train"))
    computed = []
    real = fc.compute_features
    monkeypatch.setattr(fc, "compute_features", lambda m, d, idx, *a, **k: computed.append(list(idx)) or real(
        m, d, idx, *a, **k))  # fmt: skip
    kw = {"device": torch.device("cpu"), "precision": "fp32", "batch_size": 4, "num_workers": 0}
    folder = tmp_path / "fc" / fc.model_identity(model, vars(cfg), "fp32")
    image, _, _ = fc.build_feature_table(model, ds, folder, **kw)
    again, _, _ = fc.build_feature_table(model, ds, folder, **kw)
    assert computed[-2:] == [[], []] and torch.equal(again, image)  # all read back from the shards

    write_npz(ds.paths[5], seed=99)  # same size, new content and mtime
    changed, _, _ = fc.build_feature_table(model, ds, folder, **kw)
    assert computed[-2] == [5] and not torch.equal(changed[5], image[5]) and torch.equal(changed[4], image[4])

    max(folder.glob("shard-*.safetensors"), key=lambda p: p.stat().st_size).write_bytes(b"garbage")
    fc.build_feature_table(model, ds, folder, **kw)
    assert computed[-2] == [i for i in range(12) if i != 5]  # the damaged first shard's rows, computed again

    with torch.no_grad():
        model.image_encoder.backbone.conv1.weight.mul_(1.01)
    assert fc.model_identity(model, vars(cfg), "fp32") != folder.name
    assert fc.model_identity(model, vars(cfg), "bf16") != fc.model_identity(model, vars(cfg), "fp32")


def test_bad_rows_are_replaced_by_the_same_samples_as_the_volume_loader(tmp_path):
    vols = tmp_path / "v"
    vols.mkdir()
    for i in range(8):
        write_npz(vols / f"c{i}.npz", seed=i)
    (vols / "c3.npz").write_bytes(b"not a zip")
    csv = tmp_path / "d.csv"
    csv.write_text("img_path,findings,split\n" + "".join(f"v/c{i}.npz,report {i},train\n" for i in range(8)))
    ds = CTReportDataset(read_csv_table(csv, "train"), on_bad_sample="skip", seed=5)
    failures = {}
    for i in range(len(ds)):
        try:
            ds.load_sample(i)
        except Exception as e:
            failures[i] = e
    assert list(failures) == [3]
    image = torch.arange(8.0)[:, None].repeat(1, 4)
    cached = fc.CachedFeatureDataset(ds, image, image.clone(), failures)
    for epoch in range(3):
        a, b = ds[(3, epoch)], cached[(3, epoch)]
        assert a["index"] == b["index"] != 3 and b["image_features"][0] == b["index"]
        assert [n["row"] for n in a["bad"]] == [n["row"] for n in b["bad"]] == [4]
    strict = fc.CachedFeatureDataset(CTReportDataset(read_csv_table(csv, "train")), image, image, failures)
    assert "c3.npz" in strict[(3, 0)]["error"]


def test_resumed_run_reuses_the_features_and_continues_like_the_uninterrupted_one(
    small_csv, tmp_path, tiny_llama_dir, monkeypatch
):
    args = [*FROZEN, "--cache_features", "--max_steps", "8", "--save_interval", "4", "--keep_last_n", "0"]
    full = tmp_path / "full"
    assert siglip_trainer.main(tiny_args(small_csv, full, tiny_llama_dir, *args)) == 0
    plain = tmp_path / "plain"  # the same run on the volumes: the same per-step losses, to float32 rounding
    volumes = [a for a in args if a != "--cache_features"]
    assert siglip_trainer.main(tiny_args(small_csv, plain, tiny_llama_dir, *volumes)) == 0
    assert _losses(full).keys() == _losses(plain).keys() == set(range(1, 9))
    np.testing.assert_allclose(list(_losses(full).values()), list(_losses(plain).values()), rtol=1e-5)

    part = tmp_path / "part"  # a run killed after saving step 4
    shutil.copytree(full, part)
    for f in part.glob("step_00000008.*"):
        f.unlink()
    computed = []
    real = fc.compute_features
    monkeypatch.setattr(fc, "compute_features", lambda m, d, idx, *a, **k: computed.append(len(idx)) or real(
        m, d, idx, *a, **k))  # fmt: skip
    assert siglip_trainer.main(tiny_args(small_csv, part, tiny_llama_dir, *args, "--resume", "auto")) == 0
    assert sum(computed) == 0  # no volume decoded, no backbone run: every feature came from the shards
    assert _losses(part) == _losses(full)
    a, b = load_checkpoint(find_latest(full)), load_checkpoint(find_latest(part))
    assert a["step"] == b["step"] == 8
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_two_ranks_share_the_feature_work_and_train_like_one_process(small_csv, tmp_path, tiny_llama_dir):
    """Each rank computes half of the features into its own shard and reads the other's; the heads-only steps
    then go through DDP like the normal ones (same losses as one process with the global batch, to float32
    rounding: the ranks add their gradients in another order)."""
    from safetensors.torch import load_file
    from test_distributed import finish, torchrun

    args = [*FROZEN, "--cache_features", "--grad_clip", "0", "--max_steps", "4", "--save_interval", "4"]
    single = tmp_path / "single"
    assert siglip_trainer.main(tiny_args(small_csv, single, tiny_llama_dir, *args, "--batch_size", "8")) == 0
    run = tmp_path / "ddp"
    proc = torchrun(2, tiny_args(small_csv, run, tiny_llama_dir, *args, "--batch_size", "4"), tmp_path / "log")
    assert finish(proc) == 0, (tmp_path / "log").read_text()[-3000:]
    np.testing.assert_allclose(list(_losses(run).values()), list(_losses(single).values()), rtol=1e-5)
    shards = sorted((run / "feature_cache").glob("*/shard-*.safetensors"))
    assert [len(load_file(str(s))["keys"]) for s in shards] == [6, 6]
