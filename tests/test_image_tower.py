"""Image tower: parity with Merlin's I3ResNet (golden outputs), the weight loader, and the encoder's options.

The golden tests build Merlin's depth-152 weights by the fixture's rule (float64, ~1 GB) once per module and
write them as Merlin's released file is laid out; everything else runs on a tiny layout (depth 14, width 8).
"""

from __future__ import annotations

import json
import math
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from ct_siglip.errors import ConfigError
from ct_siglip.image_tower import (
    I3RESNET_LAYOUTS,
    MERLIN_PREFIX,
    I3ResNet,
    ImageEncoder,
    MerlinWeightsError,
    format_load_report,
    load_merlin_weights,
)

FIXTURES = Path(__file__).parent / "fixtures" / "merlin_i3resnet"
HEAD_KEYS = ("classifier.", "contrastive_head.")
TINY = {"depth": 14, "width": 8}


def manifest() -> list[tuple[str, tuple[int, ...]]]:
    data = json.loads((FIXTURES / "manifest.json").read_text())
    assert data["checkpoint_prefix"] == MERLIN_PREFIX
    return [(name, tuple(shape)) for name, shape in data["state_dict"]]


def golden_weight(name: str, shape: tuple[int, ...]) -> np.ndarray:
    """The fixture README's rule: a legacy RandomState seeded by crc32 of the un-prefixed key."""
    rng = np.random.RandomState(zlib.crc32(name.encode()))
    if name.endswith("running_mean"):
        return 0.1 * rng.standard_normal(shape)
    if name.endswith("running_var"):
        return rng.uniform(0.5, 1.5, shape)
    if len(shape) == 1 and name.endswith("weight"):
        return rng.uniform(0.2, 0.5, shape)
    if len(shape) == 1:
        return 0.05 * rng.standard_normal(shape)
    return rng.standard_normal(shape) / math.sqrt(math.prod(shape[1:]))


def assert_rel_close(actual: torch.Tensor, expected: np.ndarray, rel: float) -> None:
    """Max abs error relative to the largest reference value (pooled ReLU features contain exact zeros)."""
    ref = torch.from_numpy(expected)
    err = (actual.detach().to(ref.dtype) - ref).abs().max() / ref.abs().max()
    assert err < rel, f"relative error {err:.3g} >= {rel}"


@pytest.fixture(scope="module")
def golden() -> dict[str, np.ndarray]:
    with np.load(FIXTURES / "golden.npz") as npz:
        return {k: npz[k] for k in npz.files}


@pytest.fixture(scope="module")
def merlin_file(tmp_path_factory: pytest.TempPathFactory):
    """Golden weights saved as Merlin's checkpoint holds them: prefixed, beside its text tower and logit_scale."""
    state: dict[str, torch.Tensor] = {}
    for name, shape in manifest():
        value = (
            torch.tensor(0) if name.endswith("num_batches_tracked") else torch.from_numpy(golden_weight(name, shape))
        )
        state[MERLIN_PREFIX + name] = value
    state["encode_text.text_encoder.embeddings.word_embeddings.weight"] = torch.zeros(4, 3)
    state["encode_text.linear_layer.weight"] = torch.zeros(2, 3)
    state["logit_scale"] = torch.tensor(1.0)
    path = tmp_path_factory.mktemp("merlin") / "merlin_golden.pt"
    torch.save(state, path)
    del state
    yield path
    path.unlink()  # ~1 GB: do not leave it in pytest's kept temp folders


def tiny_state_file(tmp_path: Path, **kwargs) -> tuple[Path, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    state = I3ResNet(in_channels=3, **{**TINY, **kwargs}).state_dict()
    path = tmp_path / "tiny.pt"
    torch.save({MERLIN_PREFIX + k: v for k, v in state.items()} | {"logit_scale": torch.tensor(1.0)}, path)
    return path, state


# ------------------------------------------------------------------------------------------- Merlin parity


def test_golden_merlin_weights_load_strictly_and_reproduce_merlin_outputs(merlin_file, golden):
    net = I3ResNet(152, in_channels=1, with_heads=True, init_weights=False, dtype=torch.float64).eval()
    report = load_merlin_weights(net, merlin_file, strict_backbone=True)
    assert len(report["loaded"]) == len(manifest())
    assert not report["missing"] and not report["mismatched"] and not report["unexpected"]
    assert sorted(report["ignored"]) == [
        "encode_text.linear_layer.weight",
        "encode_text.text_encoder.embeddings.word_embeddings.weight",
        "logit_scale",
    ]
    with torch.no_grad():
        pooled = net(torch.from_numpy(golden["input"]))
        contrastive, ehr_logits = net.forward_heads(pooled)
    assert pooled.shape == (2, 2048)
    assert_rel_close(pooled, golden["pooled"], 1e-9)
    assert_rel_close(contrastive, golden["contrastive"], 1e-9)
    assert_rel_close(ehr_logits, golden["ehr_logits"], 1e-9)


def test_two_identical_channels_reproduce_merlins_one_channel_output(merlin_file, golden):
    net = I3ResNet(152, in_channels=2, init_weights=False, dtype=torch.float64).eval()
    report = load_merlin_weights(net, merlin_file)
    assert "conv1.weight" in report["adapted"]
    assert sum(k.startswith(tuple(MERLIN_PREFIX + h for h in HEAD_KEYS)) for k in report["ignored"]) == 4
    assert "4 Merlin-head" in format_load_report(report)
    x = torch.from_numpy(golden["input"]).repeat(1, 2, 1, 1, 1)
    with torch.no_grad():
        assert_rel_close(net(x), golden["pooled"], 1e-9)


def test_state_dict_keys_and_shapes_equal_merlins_manifest():
    """With Merlin's 3 input channels and its heads the state dict is Merlin's, key for key and in order;
    the default trunk (no heads) is the manifest without `classifier`/`contrastive_head`, conv1 sized to C."""
    expected = manifest()
    full = I3ResNet(152, in_channels=3, with_heads=True, device="meta")
    assert [(k, tuple(v.shape)) for k, v in full.state_dict().items()] == expected
    trunk = I3ResNet(152, in_channels=2, device="meta")
    trunk_expected = [
        (k, (64, 2, 3, 7, 7) if k == "conv1.weight" else s) for k, s in expected if not k.startswith(HEAD_KEYS)
    ]
    assert [(k, tuple(v.shape)) for k, v in trunk.state_dict().items()] == trunk_expected
    assert trunk.out_features == 2048
    assert I3ResNet(**TINY, device="meta").out_features == 8 * 32


@pytest.mark.parametrize("depth", sorted(I3RESNET_LAYOUTS))
def test_layouts_have_the_documented_block_counts(depth):
    net = I3ResNet(depth, width=4, device="meta")
    assert tuple(len(stage) for stage in net.stages) == I3RESNET_LAYOUTS[depth]


def test_three_channel_backbone_keeps_merlins_conv1_kernel_unchanged(tmp_path):
    path, state = tiny_state_file(tmp_path)
    net = I3ResNet(in_channels=3, **TINY)
    report = load_merlin_weights(net, path)
    assert not report["adapted"]
    assert torch.equal(net.conv1.weight, state["conv1.weight"])


# ------------------------------------------------------------------------------------------- loader errors


def test_wrong_shape_backbone_key_raises_one_line_error(tmp_path):
    _, state = tiny_state_file(tmp_path)
    state["layer2.0.conv2.weight"] = torch.zeros(16, 16, 3, 3, 1)
    torch.save(state, tmp_path / "bad.pt")
    with pytest.raises(MerlinWeightsError, match=r"wrong shape 1: layer2\.0\.conv2\.weight") as info:
        load_merlin_weights(I3ResNet(**TINY), tmp_path / "bad.pt")
    assert "\n" not in str(info.value)


def test_missing_backbone_key_raises_and_non_strict_reports_it(tmp_path):
    _, state = tiny_state_file(tmp_path)
    del state["layer4.0.bn3.running_var"]
    torch.save(state, tmp_path / "partial.pt")  # un-prefixed state dicts are accepted too
    with pytest.raises(MerlinWeightsError, match=r"missing 1: layer4\.0\.bn3\.running_var"):
        load_merlin_weights(I3ResNet(**TINY), tmp_path / "partial.pt")
    report = load_merlin_weights(I3ResNet(**TINY), tmp_path / "partial.pt", strict_backbone=False)
    assert report["missing"] == ["layer4.0.bn3.running_var"] and report["prefix"] == ""


def test_deeper_checkpoint_into_shallower_backbone_raises_on_unknown_keys(tmp_path):
    path, _ = tiny_state_file(tmp_path, depth=50)
    with pytest.raises(MerlinWeightsError, match=r"unknown \d+: encode_image\.i3_resnet\.layer1\.1\."):
        load_merlin_weights(I3ResNet(**TINY), path)


def test_loader_reads_with_weights_only_and_refuses_pickled_objects(tmp_path):
    torch.save({"conv1.weight": torch.zeros(1), "payload": Path("x")}, tmp_path / "pickled.pt")
    with pytest.raises(MerlinWeightsError, match=r"weights_only=True\) \(Unsupported global") as info:
        load_merlin_weights(I3ResNet(**TINY), tmp_path / "pickled.pt")
    assert "\n" not in str(info.value)


def test_truncated_or_foreign_file_gives_a_one_line_error(tmp_path):
    path, _ = tiny_state_file(tmp_path)
    (tmp_path / "cut.pt").write_bytes(path.read_bytes()[:1000])
    (tmp_path / "text.pt").write_text("not a checkpoint")
    for name in ("cut.pt", "text.pt"):
        with pytest.raises(MerlinWeightsError, match=name) as info:
            load_merlin_weights(I3ResNet(**TINY), tmp_path / name)
        assert "\n" not in str(info.value)


def test_missing_local_file_says_which_flag_to_use(tmp_path):
    with pytest.raises(MerlinWeightsError, match="--image_weights") as info:
        load_merlin_weights(I3ResNet(**TINY), tmp_path / "nope.pt")
    assert isinstance(info.value, ConfigError)


def test_hub_offline_gives_one_clear_line_on_where_to_put_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(MerlinWeightsError) as info:
        load_merlin_weights(I3ResNet(**TINY), "merlin", cache_dir=tmp_path / "hub")
    msg = str(info.value)
    assert "\n" not in msg
    for needle in ("stanfordmimi/Merlin", "epoch_99.pt", str(tmp_path / "hub"), "--image_weights PATH"):
        assert needle in msg


# ------------------------------------------------------------------------------------------- encoder


def tiny_encoder(**kwargs) -> ImageEncoder:
    torch.manual_seed(0)
    return ImageEncoder(**{"proj_hidden": 32, "embed_dim": 16, **TINY, **kwargs})


def volume(dtype: torch.dtype = torch.float32, channels: int = 2) -> torch.Tensor:
    return torch.rand(2, channels, 16, 32, 32, generator=torch.Generator().manual_seed(1), dtype=dtype)


def test_image_encoder_returns_unit_norm_embeddings():
    enc = tiny_encoder()
    out = enc(volume())
    assert out.shape == (2, 16) and out.dtype == torch.float32
    torch.testing.assert_close(out.norm(dim=-1), torch.ones(2))
    assert enc.backbone(volume()).shape == (2, enc.backbone.out_features)


def test_image_encoder_loads_merlin_weights_from_a_path(tmp_path):
    path, state = tiny_state_file(tmp_path)
    enc = tiny_encoder(pretrained=str(path), in_channels=1)
    assert enc.load_report is not None and not enc.load_report["missing"]
    torch.testing.assert_close(enc.backbone.layer3[0].conv2.weight, state["layer3.0.conv2.weight"])


def test_frozen_backbone_keeps_weights_and_bn_statistics_while_projection_trains():
    enc = tiny_encoder(freeze_backbone=True).train()
    assert not any(p.requires_grad for p in enc.backbone.parameters())
    assert all(p.requires_grad for p in enc.projection.parameters())
    assert not enc.backbone.training and enc.projection.training
    before = {k: v.clone() for k, v in enc.backbone.state_dict().items()}
    enc(volume()).sum().backward()
    after = enc.backbone.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.grad is not None for p in enc.projection.parameters())
    enc.set_backbone_frozen(False)
    assert enc.backbone.training and all(p.requires_grad for p in enc.backbone.parameters())


def test_frozen_stem_gets_no_gradient_through_freeze_and_unfreeze_while_the_rest_trains():
    enc = tiny_encoder(freeze_stem=True).train()
    plain = tiny_encoder().train()
    plain.load_state_dict(enc.state_dict())
    x = volume()
    enc(x).sum().backward()
    plain(x).sum().backward()
    assert enc.backbone.conv1.weight.grad is None and plain.backbone.conv1.weight.grad is not None
    for (name, p), q in zip(enc.named_parameters(), plain.parameters()):
        if name != "backbone.conv1.weight":  # every other gradient is the one of the unfrozen tower
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7)
    enc.set_backbone_frozen(True)
    enc.set_backbone_frozen(False)
    assert not enc.backbone.conv1.weight.requires_grad and enc.backbone.bn1.weight.requires_grad


@pytest.mark.parametrize("mode", ["stage", "block"])
def test_grad_checkpointing_matches_no_checkpointing_in_output_gradients_and_bn_stats(mode):
    ref, ckpt = tiny_encoder().double().train(), tiny_encoder(checkpointing=mode).double().train()
    x = volume(torch.float64)
    out_ref, out = ref(x), ckpt(x)
    torch.testing.assert_close(out, out_ref, rtol=1e-12, atol=1e-12)
    (out_ref * torch.arange(16.0, dtype=torch.float64)).sum().backward()
    (out * torch.arange(16.0, dtype=torch.float64)).sum().backward()
    for (name, p_ref), p in zip(ref.named_parameters(), ckpt.parameters()):
        torch.testing.assert_close(p.grad, p_ref.grad, rtol=1e-10, atol=1e-12, msg=name)
    for (name, b_ref), b in zip(ref.named_buffers(), ckpt.buffers()):
        assert torch.equal(b, b_ref), f"{name} moved differently under checkpointing"


@pytest.mark.filterwarnings(
    "ignore:`torch.jit.script_method` is deprecated:DeprecationWarning"
)  # torch-internal import
def test_grad_checkpointing_traces_under_torch_compile():
    net, ref = I3ResNet(**TINY, checkpointing="block"), I3ResNet(**TINY)
    ref.load_state_dict(net.state_dict())
    x = volume()
    compiled = torch.compile(net, backend="aot_eager")
    compiled(x).sum().backward()
    ref(x).sum().backward()
    torch.testing.assert_close(net.conv1.weight.grad, ref.conv1.weight.grad)
    torch.testing.assert_close(net.layer2[0].bn2.running_var, ref.layer2[0].bn2.running_var)


def test_channels_last_gives_the_same_output():
    ref, fast = tiny_encoder().eval(), tiny_encoder(channels_last=True).eval()
    assert fast.backbone.conv1.weight.is_contiguous(memory_format=torch.channels_last_3d)
    with torch.no_grad():
        torch.testing.assert_close(fast(volume()), ref(volume()), rtol=1e-5, atol=1e-5)


@pytest.mark.filterwarnings(
    "ignore:`torch.jit.script_method` is deprecated:DeprecationWarning"
)  # torch-internal import
def test_compile_option_keeps_parameter_names():
    enc = tiny_encoder(compile=True)
    assert list(enc.state_dict()) == list(tiny_encoder().state_dict())


def test_bad_settings_raise_config_errors():
    with pytest.raises(ConfigError, match="depth 18"):
        I3ResNet(18, device="meta")
    with pytest.raises(ConfigError, match="checkpointing 'all'"):
        I3ResNet(**TINY, device="meta").set_grad_checkpointing("all")
    with pytest.raises(ValueError, match=r"expects \(B, 2, D, H, W\)"):
        I3ResNet(**TINY)(volume(channels=1))
