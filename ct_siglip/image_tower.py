"""Image tower: Merlin's I3ResNet (a torchvision ResNet inflated to 3D), written natively, plus its loader.

The network is the same function as Merlin's `merlin.models.i3res.I3ResNet` with the same state-dict names,
so Merlin's released checkpoint loads strictly. Differences are only in how it runs: it takes the volume
already as `(B, C, D, H, W)` (Merlin permutes `(B, 1, H, W, D)` inside its forward), it accepts any C
(the first conv is adapted at load time instead of repeating the channel), and activation checkpointing
is a choice (`set_grad_checkpointing`) instead of Merlin's always-on, nested per-block checkpointing.

Import cost is torch only; `huggingface_hub` is imported when the Hub is actually asked for.
"""

from __future__ import annotations

import contextlib
import functools
import pickle
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .checkpoint import refused_reason
from .errors import ConfigError

__all__ = [
    "CHECKPOINT_MODES",
    "I3RESNET_LAYOUTS",
    "MERLIN_FILENAME",
    "MERLIN_PREFIX",
    "MERLIN_REPO_ID",
    "Bottleneck3d",
    "I3ResNet",
    "ImageEncoder",
    "MerlinWeightsError",
    "format_load_report",
    "load_merlin_weights",
    "resolve_merlin_checkpoint",
]

#: Blocks per stage of the bottleneck ResNets. 152/101/50 are torchvision's; 14 is a tiny layout for tests/demo.
I3RESNET_LAYOUTS: dict[int, tuple[int, int, int, int]] = {
    152: (3, 8, 36, 3),
    101: (3, 4, 23, 3),
    50: (3, 4, 6, 3),
    14: (1, 1, 1, 1),
}
CHECKPOINT_MODES = ("none", "stage", "block")

MERLIN_REPO_ID = "stanfordmimi/Merlin"
MERLIN_FILENAME = "i3_resnet_clinical_longformer_best_clip_04-02-2024_23-21-36_epoch_99.pt"
#: Where the image backbone sits inside Merlin's released checkpoint (`MerlinArchitecture.encode_image.i3_resnet`).
MERLIN_PREFIX = "encode_image.i3_resnet."
#: Prefixes tried, in order, to find the backbone in a state dict (Merlin's file, a DDP-wrapped copy, this package's).
_BACKBONE_PREFIXES = (MERLIN_PREFIX, "module." + MERLIN_PREFIX, "backbone.", "image_encoder.backbone.", "")
_HEAD_PREFIXES = ("classifier.", "contrastive_head.")
#: Channels Merlin's first conv was trained on: it repeats its one CT channel three times (`torch.cat((x, x, x))`).
_MERLIN_CONV1_CHANNELS = 3


class MerlinWeightsError(ConfigError):
    """Merlin weights cannot be found or do not fit the backbone; the one-line message says what to do."""


# --------------------------------------------------------------------------------------------------------------
# Network
# --------------------------------------------------------------------------------------------------------------


class Bottleneck3d(nn.Module):
    """ResNet v1.5 bottleneck inflated as Merlin does: 1x1x1 -> 3x3x3 (carries the stride, in depth too) -> 1x1x1.

    Attribute names and registration order (conv1, bn1, conv2, bn2, conv3, bn3, downsample) give Merlin's keys.
    """

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, **factory: Any) -> None:
        super().__init__()
        out = planes * self.expansion
        self.conv1 = nn.Conv3d(inplanes, planes, 1, bias=False, **factory)
        self.bn1 = nn.BatchNorm3d(planes, **factory)
        self.conv2 = nn.Conv3d(planes, planes, 3, stride=stride, padding=1, bias=False, **factory)
        self.bn2 = nn.BatchNorm3d(planes, **factory)
        self.conv3 = nn.Conv3d(planes, out, 1, bias=False, **factory)
        self.bn3 = nn.BatchNorm3d(out, **factory)
        self.relu = nn.ReLU(inplace=True)
        self.downsample: nn.Sequential | None = None
        if stride != 1 or inplanes != out:
            # Merlin strides the shortcut in depth like in-plane (inflate_downsample(time_stride=stride)).
            self.downsample = nn.Sequential(
                nn.Conv3d(inplanes, out, 1, stride=stride, bias=False, **factory), nn.BatchNorm3d(out, **factory)
            )

    def forward(self, x: Tensor) -> Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        out += shortcut  # same order of operations as Merlin (out + residual, then ReLU)
        return self.relu(out)


class _KeepBatchNormStats:
    """Recompute-time context for activation checkpointing: undo the running-stat update of the replayed forward.

    A checkpointed segment runs its forward twice in training (once, then again during backward). Batch norm in
    train mode would update `running_mean/var` twice, i.e. with an effective momentum of 0.19 instead of 0.1, so
    checkpointing would change the model. Snapshotting the few BN buffers of the segment and putting them back
    after the replay keeps "stage"/"block" exactly equal to "none".
    """

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self._saved: list[tuple[Tensor, Tensor]] = []

    def __enter__(self) -> None:
        self._saved = [
            (buf, buf.clone())
            for m in self.module.modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training and m.track_running_stats
            for buf in (m.running_mean, m.running_var, m.num_batches_tracked)
            if buf is not None
        ]

    def __exit__(self, *exc: object) -> bool:
        with torch.no_grad():
            for buf, saved in self._saved:
                buf.copy_(saved)
        self._saved = []
        return False  # never swallow the early-stop signal or a real error


def _bn_guard_contexts(module: nn.Module) -> tuple[contextlib.AbstractContextManager, _KeepBatchNormStats]:
    return contextlib.nullcontext(), _KeepBatchNormStats(module)


class I3ResNet(nn.Module):
    """Merlin's I3ResNet trunk: `(B, C, D, H, W)` -> global-average-pooled layer4 features `(B, width * 32)`.

    Stem: conv 3x7x7 stride (1, 2, 2) padding (1, 3, 3), BN, ReLU, max-pool 3 stride 2 padding 1 in all axes;
    then four bottleneck stages with strides 1, 2, 2, 2 applied to depth as well as the plane. At depth 152,
    width 64 and `in_channels=3` its `state_dict()` equals Merlin's `I3ResNet` key for key (with
    `with_heads=True` also Merlin's `classifier` (1692) and `contrastive_head` (512) 1x1x1 convs).

    The heads are off by default: the CLIP model projects the pooled features with its own head, so Merlin's
    heads are dead weight; `load_merlin_weights` lists their keys as ignored. Build them only to reproduce
    Merlin's outputs (`forward_heads`).
    """

    def __init__(
        self,
        depth: int = 152,
        in_channels: int = 2,
        width: int = 64,
        *,
        with_heads: bool = False,
        num_classes: int = 1692,
        contrastive_dim: int = 512,
        checkpointing: str = "none",
        init_weights: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        """`init_weights=False` leaves parameters uninitialised, for callers that load every tensor right after
        (strict `load_merlin_weights`): at depth 152 initialising 117M parameters costs seconds."""
        super().__init__()
        if depth not in I3RESNET_LAYOUTS:
            raise ConfigError(f"image depth {depth} not supported (choose one of {sorted(I3RESNET_LAYOUTS)})")
        if in_channels < 1 or width < 1:
            raise ConfigError(f"in_channels and width must be positive (got {in_channels}, {width})")
        target = torch.device(device) if device is not None else torch.get_default_device()
        # Build on "meta" and materialise once: skips nn.Conv3d's own init, which _init_weights would redo.
        factory = {"device": "meta", "dtype": dtype}
        self.depth, self.in_channels, self.width, self.with_heads = depth, in_channels, width, with_heads
        self.layout = I3RESNET_LAYOUTS[depth]

        self.conv1 = nn.Conv3d(
            in_channels, width, (3, 7, 7), stride=(1, 2, 2), padding=(1, 3, 3), bias=False, **factory
        )
        self.bn1 = nn.BatchNorm3d(width, **factory)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool3d(3, stride=2, padding=1)
        inplanes = width
        for i, blocks in enumerate(self.layout):
            planes = width * 2**i
            stride = 1 if i == 0 else 2
            layer = [Bottleneck3d(inplanes, planes, stride, **factory)]
            inplanes = planes * Bottleneck3d.expansion
            layer += [Bottleneck3d(inplanes, planes, 1, **factory) for _ in range(blocks - 1)]
            self.add_module(f"layer{i + 1}", nn.Sequential(*layer))
        self.out_features: int = inplanes

        if with_heads:
            self.classifier = nn.Conv3d(inplanes, num_classes, 1, bias=True, **factory)
            self.contrastive_head = nn.Conv3d(inplanes, contrastive_dim, 1, bias=True, **factory)

        self.grad_checkpointing = "none"
        self.channels_last = False
        if target.type != "meta":
            self.to_empty(device=target)
            if init_weights:
                self._init_weights()
        self.set_grad_checkpointing(checkpointing)

    def _init_weights(self) -> None:
        """torchvision's ResNet init (He fan-out for convs, unit BN), used when training from scratch."""
        for m in self.modules():
            if isinstance(m, nn.Conv3d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm3d):
                m.reset_parameters()  # weight 1, bias 0, running stats reset

    @property
    def stages(self) -> tuple[nn.Sequential, nn.Sequential, nn.Sequential, nn.Sequential]:
        return (self.layer1, self.layer2, self.layer3, self.layer4)

    def set_grad_checkpointing(self, mode: str = "none") -> None:
        """Activation checkpointing: "none" (fastest), "stage" (stem + each stage), "block" (stem + each block).

        "block" stores only block inputs (least memory, one extra forward of everything); "stage" stores only
        the five segment inputs but replays a whole stage at once, so its peak during backward is one stage's
        activations. Both give the same outputs, gradients and BN statistics as "none".
        """
        if mode is True or mode is False:
            mode = "block" if mode else "none"
        if mode not in CHECKPOINT_MODES:
            raise ConfigError(f"image checkpointing '{mode}' unknown (choose one of {', '.join(CHECKPOINT_MODES)})")
        self.grad_checkpointing = mode

    def set_channels_last(self, enabled: bool = True) -> I3ResNet:
        """Store conv weights (and convert inputs) as `channels_last_3d`, the layout cuDNN's fast 3D kernels use."""
        self.channels_last = enabled
        return self.to(memory_format=torch.channels_last_3d if enabled else torch.contiguous_format)

    def _stem(self, x: Tensor) -> Tensor:
        return self.maxpool(self.relu(self.bn1(self.conv1(x))))

    def _segments(self) -> Iterator[tuple[Callable[[Tensor], Tensor], nn.Module]]:
        """(function, module owning its BN layers) per checkpoint segment for the current mode."""
        yield self._stem, self.bn1
        for stage in self.stages:
            if self.grad_checkpointing == "block":
                for block in stage:
                    yield block, block
            else:
                yield stage, stage

    def forward_features(self, x: Tensor) -> Tensor:
        """Layer4 feature map `(B, width * 32, D/16, H/32, W/32)` (sizes rounded up)."""
        if x.ndim != 5 or x.shape[1] != self.in_channels:
            raise ValueError(f"I3ResNet expects (B, {self.in_channels}, D, H, W), got {tuple(x.shape)}")
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last_3d)
        if self.grad_checkpointing == "none" or not torch.is_grad_enabled():
            x = self._stem(x)
            for stage in self.stages:
                x = stage(x)
            return x
        compiling = torch.compiler.is_compiling()  # Dynamo only accepts dispatch-mode contexts; AOT does not replay BN
        for fn, owner in self._segments():
            if compiling:
                x = checkpoint(fn, x, use_reentrant=False)
            else:
                x = checkpoint(fn, x, use_reentrant=False, context_fn=functools.partial(_bn_guard_contexts, owner))
        return x

    def forward_head(self, features: Tensor) -> Tensor:
        """Global average pool over (D, H, W): Merlin's `ImageEmbedding` output."""
        return features.mean(dim=(2, 3, 4))

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))

    def forward_heads(self, pooled: Tensor) -> tuple[Tensor, Tensor]:
        """Merlin's (contrastive `(B, 512)`, phenotype logits `(B, 1692)`) from pooled features; needs heads."""
        if not self.with_heads:
            raise RuntimeError("this I3ResNet was built without Merlin's heads (with_heads=False)")
        contrastive = F.linear(pooled, self.contrastive_head.weight.flatten(1), self.contrastive_head.bias)
        ehr = F.linear(pooled, self.classifier.weight.flatten(1), self.classifier.bias)
        return contrastive, ehr


# --------------------------------------------------------------------------------------------------------------
# Merlin weights
# --------------------------------------------------------------------------------------------------------------


def resolve_merlin_checkpoint(source: str | Path, *, cache_dir: str | Path | None = None) -> Path:
    """Path of Merlin's checkpoint: `source` itself, or for "merlin" the file in the Hugging Face cache.

    "merlin" goes through `hf_hub_download`, so a file already cached is used without network and a download
    lands in the shared cache (`HF_HOME`/`HF_HUB_CACHE`, or `cache_dir`).
    """
    if str(source).lower() != "merlin":
        path = Path(source).expanduser()
        if not path.is_file():
            raise MerlinWeightsError(
                f"{path}: Merlin checkpoint not found (pass --image_weights with the path of {MERLIN_FILENAME}, "
                "'merlin' to fetch it from the Hugging Face Hub, or 'none' to start from random weights)"
            )
        return path
    try:
        from huggingface_hub import constants, hf_hub_download
        from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError
    except ImportError:  # pragma: no cover - huggingface_hub is a requirement, but say what to do if absent
        raise MerlinWeightsError(
            "--image_weights merlin needs the huggingface_hub package (pip install huggingface_hub), "
            f"or pass the local path of {MERLIN_FILENAME}"
        ) from None
    cache = Path(cache_dir) if cache_dir is not None else Path(constants.HF_HUB_CACHE)
    try:
        return Path(hf_hub_download(MERLIN_REPO_ID, MERLIN_FILENAME, cache_dir=cache_dir))
    except LocalEntryNotFoundError:
        raise MerlinWeightsError(
            f"Merlin weights are not in the Hugging Face cache ({cache}) and the Hub cannot be reached"
            f"{' (HF_HUB_OFFLINE is set)' if constants.HF_HUB_OFFLINE else ''}: on a machine with network run "
            f"`hf download {MERLIN_REPO_ID} {MERLIN_FILENAME}` and copy its cache folder "
            f"models--{MERLIN_REPO_ID.replace('/', '--')} into {cache}, or pass --image_weights PATH to the "
            "downloaded .pt file (or --image_weights none)"
        ) from None
    except (HfHubHTTPError, OSError) as e:
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise MerlinWeightsError(
            f"cannot download {MERLIN_FILENAME} from {MERLIN_REPO_ID} ({type(e).__name__}: {first_line}); "
            "pass --image_weights PATH to a local copy"
        ) from None


def _read_state_dict(path: Path) -> dict[str, Any]:
    """`torch.load(weights_only=True)`: a checkpoint is data, never code. Memory-mapped when the format allows."""
    try:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # legacy (pre-zip) serialisation cannot be memory-mapped
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        reason = refused_reason(e)  # torch's message is a page long and suggests weights_only=False
        raise MerlinWeightsError(
            f"{path}: not a plain state dict of tensors, refused by torch.load(weights_only=True) ({reason})"
        ) from None
    except (RuntimeError, OSError, EOFError) as e:
        reason = str(e).strip().split("\n")[0].split(". ")[0]
        raise MerlinWeightsError(
            f"{path}: cannot read checkpoint ({type(e).__name__}: {reason}); re-download it"
        ) from None
    for wrapper in ("state_dict", "model"):  # accept {"state_dict": sd} / {"model": sd} wrappers too
        if isinstance(obj, Mapping) and isinstance(obj.get(wrapper), Mapping):
            obj = obj[wrapper]
            break
    if not isinstance(obj, Mapping):
        raise MerlinWeightsError(f"{path}: expected a state dict, found {type(obj).__name__}")
    return dict(obj)


def _adapt_conv1(weight: Tensor, channels: int) -> Tensor:
    """Merlin's first-conv kernel for `channels` inputs so that identical channels give Merlin's output exactly.

    Merlin feeds its one channel three times, so its conv computes (sum_c W_c) * x. Giving each of C channels
    the kernel (sum_c W_c) / C makes C identical channels compute the same (sum_c W_c) * x. Computed in float64;
    the copy into the parameter rounds once.
    """
    summed = weight.double().sum(dim=1, keepdim=True) / channels
    return summed.expand(-1, channels, *weight.shape[2:]).contiguous()


def _is_known_non_backbone(key: str) -> bool:
    return key.startswith("encode_text.") or key.rsplit(".", 1)[-1] == "logit_scale"


def load_merlin_weights(
    backbone: I3ResNet,
    source: str | Path,
    *,
    strict_backbone: bool = True,
    cache_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Load Merlin's released image weights (a local file, or "merlin" = the Hub) into `backbone`.

    Takes the keys under `encode_image.i3_resnet.` (or an un-prefixed / `backbone.`-prefixed state dict),
    adapts `conv1` to the backbone's channel count (see `_adapt_conv1`), and loads them. Everything outside the
    backbone (Merlin's text tower, `logit_scale`, Merlin's heads when the backbone has none) is listed under
    "ignored", never silently dropped. With `strict_backbone` any missing, wrong-shape or unknown backbone key
    raises `MerlinWeightsError`; otherwise the loadable tensors load and the rest is reported.

    Returns {"source", "prefix", "loaded", "adapted", "missing", "mismatched", "unexpected", "ignored"}.
    """
    path = resolve_merlin_checkpoint(source, cache_dir=cache_dir)
    state = _read_state_dict(path)
    prefix = next((p for p in _BACKBONE_PREFIXES if p + "conv1.weight" in state), None)
    if prefix is None:
        raise MerlinWeightsError(
            f"{path}: no I3ResNet weights found (looked for '{MERLIN_PREFIX}conv1.weight' or 'conv1.weight'); "
            "is this Merlin's checkpoint?"
        )

    target = backbone.state_dict()
    report: dict[str, Any] = {
        "source": str(path),
        "prefix": prefix,
        "loaded": [],
        "adapted": {},
        "missing": [],
        "mismatched": {},
        "unexpected": [],
        "ignored": [],
    }
    to_load: dict[str, Tensor] = {}
    for key, value in state.items():
        if (
            not isinstance(value, Tensor)
            or not key.startswith(prefix)
            or (prefix == "" and _is_known_non_backbone(key))
        ):
            report["ignored"].append(key)
            continue
        name = key[len(prefix) :]
        if name not in target:
            bucket = "ignored" if name.startswith(_HEAD_PREFIXES) and not backbone.with_heads else "unexpected"
            report[bucket].append(key)
            continue
        want = tuple(target[name].shape)
        if name == "conv1.weight" and value.ndim == 5 and value.shape[1] != want[1] and value.shape[2:] == want[2:]:
            value = _adapt_conv1(value, want[1])
            report["adapted"][name] = (
                f"{tuple(state[key].shape)} -> {want}: summed over input channels, divided by {want[1]}"
            )
        if tuple(value.shape) != want:
            report["mismatched"][name] = (tuple(value.shape), want)
            continue
        to_load[name] = value
    report["missing"] = [k for k in target if k not in to_load and k not in report["mismatched"]]

    problems = []
    if report["missing"]:
        problems.append(f"missing {_preview(report['missing'])}")
    if report["mismatched"]:
        problems.append(
            "wrong shape "
            + _preview([f"{k} (file {a}, model {b})" for k, (a, b) in report["mismatched"].items()], limit=2)
        )
    if report["unexpected"]:
        problems.append(f"unknown {_preview(report['unexpected'])}")
    if strict_backbone and problems:
        raise MerlinWeightsError(
            f"{path}: weights do not fit I3ResNet(depth={backbone.depth}, width={backbone.width}, "
            f"in_channels={backbone.in_channels}): {'; '.join(problems)} (check --image_depth, or use "
            "--image_weights none)"
        )
    backbone.load_state_dict(to_load, strict=strict_backbone)
    report["loaded"] = list(to_load)
    return report


def _preview(keys: list[str], limit: int = 3) -> str:
    more = f" and {len(keys) - limit} more" if len(keys) > limit else ""
    return f"{len(keys)}: " + ", ".join(keys[:limit]) + more


def format_load_report(report: Mapping[str, Any]) -> str:
    """One console line: what loaded, what was adapted, what was ignored (and why it is safe)."""
    parts = [f"Image weights from {report['source']}: {len(report['loaded'])} backbone tensors loaded"]
    parts += [f"{k} adapted {v}" for k, v in report["adapted"].items()]
    ignored = report["ignored"]
    if ignored:
        text = sum(_is_known_non_backbone(k) for k in ignored)
        prefix = report.get("prefix", "")
        heads = sum(k.startswith(prefix) and k[len(prefix) :].startswith(_HEAD_PREFIXES) for k in ignored)
        other = len(ignored) - text - heads
        parts.append(f"ignored {text} text-tower/logit_scale, {heads} Merlin-head and {other} other tensors")
    for bucket in ("missing", "mismatched", "unexpected"):
        if report[bucket]:
            parts.append(f"{len(report[bucket])} {bucket} (not loaded)")
    return "; ".join(parts)


# --------------------------------------------------------------------------------------------------------------
# Encoder = backbone + projection
# --------------------------------------------------------------------------------------------------------------


class ImageEncoder(nn.Module):
    """I3ResNet backbone + MLP projection (out_features -> proj_hidden -> embed_dim); L2-normalised output.

    `freeze_backbone=True` is phase 1 of the training guide: backbone weights get no gradient, it runs under
    `no_grad` (no graph, so no activation memory) and its batch norms stay in eval mode whatever `train()`
    says, so Merlin's statistics are kept rather than re-estimated from small CT batches.
    `freeze_stem=True` keeps only `conv1` fixed (its batch norm trains): the weight gradient of a 7x7x3 kernel
    over the full-resolution input is the image step's costliest single gradient, and a stem's edge filters
    transfer as they are (from Merlin's weights, or even at random initialisation for the demo's tiny tower).
    """

    def __init__(
        self,
        in_channels: int = 2,
        depth: int = 152,
        pretrained: str | Path | None = None,
        freeze_backbone: bool = False,
        freeze_stem: bool = False,
        embed_dim: int = 512,
        width: int = 64,
        proj_hidden: int = 1024,
        proj_activation: str = "gelu",
        proj_dropout: float = 0.0,
        checkpointing: str = "none",
        channels_last: bool = False,
        compile: bool = False,
    ) -> None:
        super().__init__()
        activations: dict[str, type[nn.Module]] = {"gelu": nn.GELU, "relu": nn.ReLU}
        if proj_activation not in activations:
            raise ConfigError(f"projection activation '{proj_activation}' unknown (choose gelu or relu)")
        load = pretrained is not None and str(pretrained).lower() != "none"
        # Strict loading overwrites every backbone tensor, so random init would be wasted work.
        self.backbone = I3ResNet(depth, in_channels, width, checkpointing=checkpointing, init_weights=not load)
        self.load_report: dict[str, Any] | None = None
        if load:
            self.load_report = load_merlin_weights(self.backbone, pretrained, strict_backbone=True)
        self.projection = nn.Sequential(
            nn.Linear(self.backbone.out_features, proj_hidden),
            activations[proj_activation](),
            nn.Dropout(proj_dropout),
            nn.Linear(proj_hidden, embed_dim),
        )
        self.embed_dim = embed_dim
        self.freeze_backbone, self.freeze_stem = False, freeze_stem
        self.set_backbone_frozen(freeze_backbone)
        if channels_last:
            self.backbone.set_channels_last(True)
        if compile:
            # nn.Module.compile keeps parameter names (no `_orig_mod.` prefix), so checkpoints stay loadable.
            self.backbone.compile()

    def set_backbone_frozen(self, frozen: bool = True) -> None:
        """Freeze (or unfreeze) the backbone: no gradients, no graph, batch norm statistics fixed."""
        self.freeze_backbone = frozen
        self.backbone.requires_grad_(not frozen)
        if self.freeze_stem:  # `freeze_stem`: conv1 stays fixed even when the rest is unfrozen (bn1 still trains)
            self.backbone.conv1.weight.requires_grad_(False)
        self.train(self.training)

    def set_grad_checkpointing(self, mode: str = "none") -> None:
        self.backbone.set_grad_checkpointing(mode)

    def train(self, mode: bool = True) -> ImageEncoder:
        super().train(mode)
        if self.freeze_backbone:
            self.backbone.eval()
        return self

    def embed(self, x: Tensor) -> Tensor:
        """Pooled backbone features `(B, out_features)` before the projection."""
        if self.freeze_backbone:
            with torch.no_grad():
                return self.backbone(x)
        return self.backbone(x)

    def project(self, pooled: Tensor) -> Tensor:
        """The head on pooled features (`embed`): also the whole step on cached features (`--cache_features`)."""
        z = self.projection(pooled)
        return F.normalize(z.float(), dim=-1)  # normalise in float32 even under bf16 autocast; the loss is fp32

    def forward(self, x: Tensor) -> Tensor:
        return self.project(self.embed(x))
