"""The optimizer step: `TrainStep(micro_batches)` is the one function every training step of the package runs.

`SigLIPTrainer.train_step` calls it, and so does `benchmarks/bench_train.py`, so the benchmark times the code
users run (optimizer settings included) rather than a copy of it. It owns what a step changes: the AdamW
optimizer, the warm-up + cosine schedule and the fp16 gradient scaler.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
from torch import nn

from .config import Config
from .data import move_batch
from .loss import text_pair_loss
from .runtime import PRECISION_DTYPES, autocast_factory, resolve_precision, rng_state, set_rng_state


def build_optimizer(
    model: nn.Module, cfg: Config, device: torch.device, *, fused: bool | None = None
) -> torch.optim.Optimizer:
    """AdamW; weight decay only on matrices and kernels (not on biases, norms, t' and b).

    With `--text_learning_rate` the pretrained LLM (`text_encoder.model.*`, LoRA weights included) gets its own
    two groups at that rate: a tower that already separates reports by their findings should move slower than
    the randomly initialised image tower and heads, which chase it. `fused` (default: on a GPU) picks the
    single-kernel update.
    """
    split_text = cfg.text_learning_rate is not None
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        is_text = split_text and name.removeprefix("module.").startswith("text_encoder.model.")
        decays = not (p.ndim < 2 or name.startswith("loss_fn."))
        groups.setdefault((is_text, decays), []).append(p)
    ordered = [(False, True), (False, False), (True, True), (True, False)]
    param_groups = [
        {
            "params": groups.get(key, []),
            "weight_decay": cfg.weight_decay if key[1] else 0.0,
            "lr": cfg.text_learning_rate if key[0] else cfg.learning_rate,
        }
        for key in ordered[: 4 if split_text else 2]
    ]
    fused = device.type == "cuda" if fused is None else fused
    return torch.optim.AdamW(param_groups, lr=cfg.learning_rate, betas=(0.9, 0.98), eps=1e-6, fused=fused)


def lr_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warm-up to 1, then cosine decay to `min_ratio` at `total`."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


@contextlib.contextmanager
def frozen_norm_stats(model: nn.Module) -> Iterator[None]:
    """Batch norms normalise with batch statistics as usual but leave their running statistics
    untouched: the no-grad pass of a cached-embedding step must not count a batch twice."""
    saved = []
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training and m.track_running_stats:
            saved.append((m, m.momentum, m.num_batches_tracked.clone()))
            m.momentum = 0.0
    try:
        yield
    finally:
        for m, momentum, count in saved:
            m.momentum = momentum
            m.num_batches_tracked.copy_(count)


class TrainStep:
    """One optimizer step of a `ChestCTCLIP` over a global batch (a list of collated micro-batches).

    `model` is the module whose parameters train (its `loss_fn` is the SigLIP loss); `forward_model` is what
    runs the forward pass (the DDP wrapper under torchrun, else `model`). Returns, per step, the global batch's
    loss, the gradient norm, whether the step was applied (`finite`) and, with report pairs, the pair loss.
    """

    def __init__(
        self,
        model: nn.Module,
        cfg: Config,
        *,
        device: torch.device,
        world_size: int = 1,
        forward_model: nn.Module | None = None,
        fused: bool | None = None,
    ):
        self.model, self.forward_model = model, forward_model or model
        self.device, self.world_size = device, world_size
        self.grad_clip = cfg.grad_clip
        self.pair_weight, self.pair_temperature = cfg.text_pair_weight, cfg.text_pair_temperature
        self.precision = resolve_precision(cfg.precision, device)
        self.autocast = autocast_factory(device, self.precision)
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.precision == "fp16")
        self.optimizer = build_optimizer(model, cfg, device, fused=fused)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, cfg.warmup_steps, cfg.max_steps, cfg.min_lr_ratio)
        )
        self.bad_steps_in_row = 0
        self.pair_losses: list[torch.Tensor] = []

    def __call__(self, micro_batches: list[dict]) -> dict[str, float]:
        """Forward and backward over every micro-batch, then clip and step; a non-finite step is undone."""
        self.model.train()
        # Batch-norm statistics change in the forward pass; a skipped (non-finite) step must not keep them,
        # or one NaN batch would poison every later step. Buffers are small next to the weights.
        buffers = [b.clone() for b in self.model.buffers()]
        self.pair_losses = []
        if len(micro_batches) == 1:
            img, txt, partner = self.embed(micro_batches[0])
            loss = self.model.loss_fn(img, txt)
            pair = self._pair_term(txt, partner)
            self.scaler.scale(loss if pair is None else loss + pair).backward()
        else:
            loss = self._accumulate(micro_batches)
        loss_value = self._average_loss_and_scalar_grads(loss)
        self.scaler.unscale_(self.optimizer)
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        clip = self.grad_clip if self.grad_clip > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(params, clip)
        # With fp16 an overflowing gradient is the scaler's business (it skips the step and lowers
        # the scale); anything else non-finite is a numerical fault that skips the step here. Loss and
        # norm are the same on every rank (averaged), so every rank takes the same decision.
        finite = bool(torch.isfinite(loss_value)) and (self.scaler.is_enabled() or bool(torch.isfinite(grad_norm)))
        if finite:
            self.scaler.step(self.optimizer)
            self.bad_steps_in_row = 0
        else:
            self.bad_steps_in_row += 1
            with torch.no_grad():
                for b, saved in zip(self.model.buffers(), buffers):
                    b.copy_(saved)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        out = {"loss": float(loss_value), "grad_norm": float(grad_norm), "finite": finite}
        if self.pair_losses:  # this rank's own value (not averaged over ranks: it is logged, never compared)
            out["pair_loss"] = float(sum(self.pair_losses))
        return out

    def embed(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Image and report embeddings, and the partner texts' embeddings when the batch carries them."""
        if "image_features" in batch:  # --cache_features: the heads on cached pooled features
            images, text = (batch[k].to(self.device, non_blocking=True) for k in ("image_features", "text_features"))
            with self.autocast():
                img, txt, _ = self.forward_model(images, text, compute_loss=False, pooled=True)
            return img, txt, None
        images, text = move_batch(batch, self.device, PRECISION_DTYPES[self.precision])
        with self.autocast():
            img, txt, _ = self.forward_model(images, text, compute_loss=False)
        if batch.get("pairs"):  # rows B..2B-1 of the text batch are the partners (see `Collator`)
            return img, txt[: len(img)], txt[len(img) :]
        return img, txt, None

    def _accumulate(self, micro_batches: list[dict]) -> torch.Tensor:
        """Backward over several micro-batches (`--grad_accum_steps`); returns the global batch's loss.

        The SigLIP loss must still pair every image with every text of the global batch, so this first embeds
        all micro-batches without a graph, computes the loss and its gradient w.r.t. the embeddings, then re-runs
        each micro-batch with a graph (same RNG state, so the same dropout) and back-propagates those embedding
        gradients: exact, at the cost of one more forward. Under DDP only the last of those backward passes
        all-reduces the towers' gradients.
        """
        states, imgs, txts, partners = [], [], [], []
        with torch.no_grad(), frozen_norm_stats(self.model):
            for mb in micro_batches:
                states.append(rng_state(self.device))
                img, txt, partner = self.embed(mb)
                imgs.append(img.float())
                txts.append(txt.float())
                partners.append(None if partner is None else partner.float())
        img_all = torch.cat(imgs).requires_grad_()
        txt_all = torch.cat(txts).requires_grad_()
        loss = self.model.loss_fn(img_all, txt_all)
        # The report pairs, like the SigLIP pairs, are scored over the whole global batch: their gradient too
        # reaches each micro-batch through its embeddings.
        part_all = None if partners[0] is None else torch.cat(partners).requires_grad_()
        pair = self._pair_term(txt_all, part_all)
        self.scaler.scale(loss if pair is None else loss + pair).backward()
        sizes = [len(x) for x in imgs]
        part_grads = part_all.grad.split(sizes) if part_all is not None else [None] * len(sizes)
        last = len(micro_batches) - 1
        for k, (mb, state, g_img, g_txt, g_part) in enumerate(
            zip(micro_batches, states, img_all.grad.split(sizes), txt_all.grad.split(sizes), part_grads)
        ):
            set_rng_state(state, self.device)
            with self._no_sync(k < last):
                img, txt, partner = self.embed(mb)
                outputs, grads = [img.float(), txt.float()], [g_img, g_txt]
                if g_part is not None:
                    outputs.append(partner.float())
                    grads.append(g_part)
                torch.autograd.backward(outputs, grads)
        return loss

    def _pair_term(self, txt: torch.Tensor, partner: torch.Tensor | None) -> torch.Tensor | None:
        """`--text_pair_weight` x the report-pair loss over the global batch (all ranks), or None without pairs."""
        if partner is None:
            return None
        lf = self.model.loss_fn
        loss = text_pair_loss(txt, partner, self.pair_temperature, rank=lf.rank, world_size=lf.world_size)
        self.pair_losses.append(loss.detach())  # read after the step: no device sync before backward
        return self.pair_weight * loss

    def _no_sync(self, skip: bool) -> contextlib.AbstractContextManager:
        """DDP's `no_sync` (gradients accumulate locally, no all-reduce) when `skip`, else nothing."""
        if skip and hasattr(self.forward_model, "no_sync"):
            return self.forward_model.no_sync()
        return contextlib.nullcontext()

    def _average_loss_and_scalar_grads(self, loss: torch.Tensor) -> torch.Tensor:
        """The loss value and the gradients of t' and b, averaged over ranks in one all-reduce.

        DDP averages the towers' gradients, but t' and b are used outside its forward (the loss scores
        embeddings of several micro-batches and ranks), so it is told to ignore them and this does
        its job for them: same arithmetic, one message of three numbers.
        """
        if self.world_size == 1:
            return loss.detach()
        lf = self.model.loss_fn
        params = [p for p in (lf.t_prime, lf.bias) if p.requires_grad and p.grad is not None]
        buf = torch.stack([loss.detach().float(), *(p.grad.float() for p in params)])
        torch.distributed.all_reduce(buf)
        buf /= self.world_size
        for p, v in zip(params, buf[1:]):
            p.grad.copy_(v)
        return buf[0]

    def apply_schedule(self, cfg: Config) -> None:
        """After loading a checkpoint: the learning rates and weight decay of `cfg` (a resumed run may change them),
        at the loaded step of its warm-up + cosine schedule. Groups as `build_optimizer` orders them."""
        self.grad_clip = cfg.grad_clip
        factor = lr_factor(self.scheduler.last_epoch, cfg.warmup_steps, cfg.max_steps, cfg.min_lr_ratio)
        for i, group in enumerate(self.optimizer.param_groups):
            base = cfg.text_learning_rate if cfg.text_learning_rate is not None and i >= 2 else cfg.learning_rate
            group["initial_lr"], group["lr"] = base, base * factor
            group["weight_decay"] = cfg.weight_decay if i % 2 == 0 else 0.0
            self.scheduler.base_lrs[i] = base
        self.scheduler._last_lr = [g["lr"] for g in self.optimizer.param_groups]

    def state_dict(self) -> dict:
        return {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
