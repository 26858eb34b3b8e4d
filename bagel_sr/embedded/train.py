"""A short single-process training loop for ``TinyBagel``, shaped like BAGEL's ``main()`` loop.

Per micro-step: pack a batch (``data.pack``), encode ``padded_images`` with the frozen VAE under ``no_grad`` into
``padded_latent``, run the (wrapped) model with ``padded_images`` and ``batch_data_indexes`` as well, and form
``loss = mse.mean(-1).sum() / num_mse_tokens * mse_weight (+ ce) + weight * pixel`` (:func:`micro_step_loss`, the
weight from :mod:`bagel_sr.weighting`), divided by the accumulation steps.  Per optimizer step: gradient clipping,
AdamW, the LR schedule (``transformers``' cosine with a minimum LR, or constant, both with warm-up), an EMA update.  Checkpoints are ``model.safetensors`` and
``ema.safetensors`` (plus ``config.json``).  The logit-normal timesteps with shift come from the packer (raw
``N(0, 1)`` per target) and the model (``shift(sigmoid(raw))``), as in BAGEL.
"""
import copy
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional

from . import _compat  # noqa: F401

import numpy as np
import torch

from ..config import TERM_NAMES, PixelLossConfig
from ..extension import with_pixel_loss
from ..names import check_names
from . import data
from .backbone import TinyBagel, TinyBagelConfig
from ..errors import BadInput

#: ``with_pixel_loss(TinyBagel)``: the embedded model, extended exactly as ``Bagel`` is.
TinyBagelWithPixelLoss = with_pixel_loss(TinyBagel)


@dataclass
class TrainConfig:
    steps: int = field(default=2000, metadata={"help": "Optimizer steps per training run."})
    batch_size: int = field(default=16, metadata={"help": "Samples packed into one micro-batch."})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "Micro-batches per optimizer step."})
    lr: float = field(default=3e-3, metadata={"help": "Peak learning rate of AdamW."})
    min_lr: float = field(default=1e-5, metadata={"help": "Final learning rate of the cosine schedule."})
    lr_scheduler: str = field(default="cosine", metadata={"help": "'cosine' (to min_lr) or 'constant'."})
    warmup_steps: int = field(default=100, metadata={"help": "Linear LR warm-up steps."})
    beta1: float = field(default=0.9, metadata={"help": "AdamW beta1."})
    beta2: float = field(default=0.95, metadata={"help": "AdamW beta2."})
    eps: float = field(default=1e-8, metadata={"help": "AdamW epsilon."})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping norm."})
    ema: float = field(default=0.99, metadata={"help": "EMA decay per optimizer step."})
    timestep_shift: float = field(default=1.0, metadata={"help": "Training timestep shift s: t = s*t/(1+(s-1)*t)."})
    mse_weight: float = field(default=1.0, metadata={"help": "Weight of the flow (mse) loss."})
    ce_weight: float = field(default=1.0, metadata={"help": "Weight of the text CE loss (no text loss in this data)."})
    t2i_ratio: float = field(default=0.25, metadata={"help": "Share of unpaired text-to-image samples in a batch."})
    vae_cond_dropout_prob: float = field(default=0.1, metadata={"help": "Drop the condition image (as BAGEL)."})
    text_cond_dropout_prob: float = field(default=0.1, metadata={"help": "Drop the instruction text (as BAGEL)."})
    pool_size: int = field(
        default=2048,
        metadata={"help": "Training samples drawn once and VAE-encoded once (posterior mean/std cached, a fresh "
                  "sample per use; std 0 for a deterministic encoder such as the shipped one); 0 = a fresh "
                  "sample and a VAE encode every step, as BAGEL's loop."},
    )
    log_every: int = field(default=50, metadata={"help": "Record the losses every N optimizer steps."})
    save_every: int = field(default=0, metadata={"help": "Checkpoint every N steps (0 = only at the end)."})
    num_threads: int = field(default=0, metadata={"help": "torch CPU threads (0 = torch's default)."})


#: (flag, lowest allowed value) of every count and size of :class:`TrainConfig`.
_MINIMUM = {"steps": 1, "batch_size": 1, "gradient_accumulation_steps": 1, "warmup_steps": 0, "pool_size": 0,
            "log_every": 1, "save_every": 0, "num_threads": 0}
_FRACTIONS = ("t2i_ratio", "vae_cond_dropout_prob", "text_cond_dropout_prob", "ema")


def validate_train_config(cfg: TrainConfig) -> None:
    """One line naming the flag for a count/size out of range (``--steps 0``, ``--batch_size -1`` ...)."""

    for name, low in _MINIMUM.items():
        value = getattr(cfg, name)
        if not isinstance(value, int) or value < low:
            raise BadInput(f"--{name} {value}: expected an integer >= {low}")
    for name in _FRACTIONS:
        value = getattr(cfg, name)
        if not 0.0 <= value <= 1.0:
            raise BadInput(f"--{name} {value}: expected a number in [0, 1]")
    for name in ("lr", "max_grad_norm"):
        value = getattr(cfg, name)
        if not (math.isfinite(value) and value > 0):
            raise BadInput(f"--{name} {value}: expected a finite number > 0")


class LatentPool:
    """A fixed pool of training samples whose VAE posteriors are computed once.

    BAGEL's loop encodes every batch (``vae.encode`` samples the posterior).  On a CPU that encode costs more than
    the tiny model's step, so the pool keeps each image's posterior mean and std and draws a fresh posterior
    sample ``scale * (mean + std * eps - shift)`` whenever the image is used: the same distribution of latents,
    on a finite set of ``size`` samples (both arms of the experiment share one pool).
    """

    def __init__(self, samples: List[data.Sample], vae, batch: int = 64):
        self.samples = samples
        self.scale, self.shift = float(vae.scale_factor), float(vae.shift_factor)
        self.index: Dict = {}
        images = []
        for k, s in enumerate(samples):
            for role, image in (("condition", s.condition), ("target", s.target)):
                if image is not None:
                    self.index[(k, role)] = len(images)
                    images.append(image)
        means, stds = [], []
        with torch.no_grad():
            for i in range(0, len(images), batch):
                mean, std = vae.posterior(torch.stack(images[i : i + batch]))
                means.append(mean)
                stds.append(std)
        self.mean, self.std = torch.cat(means), torch.cat(stds)

    @classmethod
    def build(cls, seed: int, size: int, vae, t2i_ratio: float) -> "LatentPool":
        return cls(data.TrainStream(seed, "train", t2i_ratio=t2i_ratio).take(size), vae)

    def __len__(self) -> int:
        return len(self.samples)

    def latents(self, keys: List) -> torch.Tensor:
        rows = torch.tensor([self.index[k] for k in keys], dtype=torch.long)
        z = self.mean[rows] + self.std[rows] * torch.randn_like(self.mean[rows])
        return self.scale * (z - self.shift)


class _PoolBatches:
    """Batches of pool indices: shuffled epochs over the pool, from a seeded generator."""

    def __init__(self, pool: LatentPool, batch_size: int, rng: np.random.Generator):
        self.pool, self.batch_size, self.rng, self.order = pool, batch_size, rng, []

    def next(self) -> List[int]:
        while len(self.order) < self.batch_size:
            self.order += self.rng.permutation(len(self.pool)).tolist()
        out, self.order = self.order[: self.batch_size], self.order[self.batch_size :]
        return out


@dataclass
class TrainResult:
    model: torch.nn.Module
    ema_model: torch.nn.Module
    history: List[Dict] = field(default_factory=list)
    seconds: float = 0.0


def build_model(model_config: TinyBagelConfig, seed: int) -> torch.nn.Module:
    """``with_pixel_loss(TinyBagel)`` with weights drawn from ``seed`` (the same for every arm)."""
    torch.manual_seed(seed)
    return TinyBagelWithPixelLoss(model_config)


def _scheduler(optimizer, cfg: TrainConfig):
    from transformers.optimization import get_constant_schedule_with_warmup, get_cosine_with_min_lr_schedule_with_warmup

    if cfg.lr_scheduler == "cosine":
        return get_cosine_with_min_lr_schedule_with_warmup(
            optimizer, num_warmup_steps=cfg.warmup_steps, num_training_steps=cfg.steps, min_lr=cfg.min_lr
        )
    if cfg.lr_scheduler == "constant":
        return get_constant_schedule_with_warmup(optimizer, num_warmup_steps=cfg.warmup_steps)
    raise ValueError(f"--lr_scheduler: got {cfg.lr_scheduler!r}; allowed: 'cosine', 'constant'")


@torch.no_grad()
def ema_update(ema_model: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    for e, p in zip(ema_model.parameters(), model.parameters()):
        e.mul_(decay).add_(p.detach(), alpha=1 - decay)


def save_checkpoint(directory: str, model: torch.nn.Module, ema_model: torch.nn.Module, meta: Dict) -> None:
    from safetensors.torch import save_model

    os.makedirs(directory, exist_ok=True)
    save_model(model, os.path.join(directory, "model.safetensors"))
    save_model(ema_model, os.path.join(directory, "ema.safetensors"))
    with open(os.path.join(directory, "config.json"), "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=2, default=str)


def load_checkpoint(directory: str, which: str = "ema") -> TinyBagel:
    """A plain ``TinyBagel`` from a checkpoint directory (``which`` = 'ema' or 'model')."""
    from safetensors.torch import load_model

    with open(os.path.join(directory, "config.json"), encoding="utf-8") as f:
        meta = json.load(f)
    model = TinyBagel(TinyBagelConfig(**meta["model"]))
    load_model(model, os.path.join(directory, f"{which}.safetensors"))
    return model.eval()


def micro_step_loss(model: torch.nn.Module, out: Dict, batch: Dict, cfg: TrainConfig):
    """``(loss, logs)`` of one micro-step, before the division by the accumulation steps:
    ``mse.mean(-1).sum() / N_mse_tokens * mse_weight (+ ce * ce_weight) + weight * pixel``, ``weight`` from
    :mod:`bagel_sr.weighting` (warm-up, adaptive factor, gradient-norm logs) when the model returned ``pixel``."""
    mse = out["mse"].mean(-1).sum() / max(len(batch["mse_loss_indexes"]), 1)
    flow_loss = mse * cfg.mse_weight
    loss = flow_loss
    logs = dict(mse=mse.detach())
    if out.get("ce") is not None:
        ce = out["ce"].sum() / max(len(batch["ce_loss_indexes"]), 1)
        loss = loss + ce * cfg.ce_weight
        logs["ce"] = ce.detach()
    if "pixel" in out:
        step_weight = model.next_pixel_weight(flow_loss, cfg.gradient_accumulation_steps)
        loss = loss + step_weight.weight * out["pixel"]
        logs.update(step_weight.logs)
        logs["pixel"] = out["pixel"].detach()
        logs["pixel_images"] = out["pixel_images"].detach()
        logs.update({k: v.detach() for k, v in out.items() if k.startswith("pixel_") and k[6:] in TERM_NAMES})
        logs["pixel_weight"] = torch.as_tensor(float(step_weight.weight))
    return loss, logs


def train(model_config: TinyBagelConfig, cfg: TrainConfig, pixel: PixelLossConfig, vae, seed: int = 0,
          output_dir: Optional[str] = None, progress: bool = True, desc: str = "train",
          tokenizer: Optional[data.WordTokenizer] = None, pool: Optional[LatentPool] = None) -> TrainResult:
    """Train one arm from ``seed`` (model init, data order, noise); ``pixel.weight == 0`` is the flow-only arm.

    ``pool``: a :class:`LatentPool` to draw from (built here when ``cfg.pool_size > 0`` and none is given).
    """
    from tqdm import tqdm

    validate_train_config(cfg)
    if pixel.enabled:
        check_names("--pixel_loss_datasets", pixel.dataset_names, data.DATASET_NAMES)
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    tokenizer = tokenizer or data.WordTokenizer.default()
    model_config.timestep_shift = cfg.timestep_shift
    model = build_model(model_config, seed).train()
    if pixel.enabled:
        model.attach_pixel_loss(pixel, vae)
    ema_model = copy.deepcopy(model).eval()
    for p in ema_model.parameters():
        p.requires_grad_(False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                                  weight_decay=cfg.weight_decay)
    scheduler = _scheduler(optimizer, cfg)
    if pool is None and cfg.pool_size > 0:
        pool = LatentPool.build(seed, cfg.pool_size, vae, cfg.t2i_ratio)
    stream = data.TrainStream(seed, "train", t2i_ratio=cfg.t2i_ratio) if pool is None else None
    batches = _PoolBatches(pool, cfg.batch_size, np.random.default_rng(seed + 3)) if pool is not None else None
    pack_rng = np.random.default_rng(seed + 1)
    torch.manual_seed(seed + 2)  # forward noise and posterior samples: the same stream in every arm
    meta = dict(model=model_config.to_dict(), train=asdict(cfg), pixel_loss=pixel.to_flags(), seed=seed)

    history, window = [], {}
    start = time.time()
    bar = tqdm(total=cfg.steps, desc=desc, disable=not progress, dynamic_ncols=True, leave=False)
    optimizer.zero_grad(set_to_none=True)
    micro_steps = cfg.steps * cfg.gradient_accumulation_steps
    for micro in range(micro_steps):
        step = micro // cfg.gradient_accumulation_steps
        chosen = batches.next() if pool is not None else None
        samples = [pool.samples[i] for i in chosen] if pool is not None else stream.take(cfg.batch_size)
        batch = data.pack(samples, tokenizer, pack_rng,
                          vae_cond_dropout_prob=cfg.vae_cond_dropout_prob,
                          text_cond_dropout_prob=cfg.text_cond_dropout_prob,
                          vae_image_downsample=model.latent_downsample, max_latent_size=model.max_latent_size,
                          return_refs=True)
        padded_images = batch.pop("padded_images")
        batch_data_indexes = batch.pop("batch_data_indexes")
        refs = batch.pop("vae_image_refs")
        with torch.no_grad():
            if pool is not None:  # cached posteriors, a fresh sample (all images share one size here)
                batch["padded_latent"] = pool.latents([(chosen[k], role) for k, role in refs])
            else:
                batch["padded_latent"] = vae.encode(padded_images)
        out = model(**batch, padded_images=padded_images, batch_data_indexes=batch_data_indexes)

        loss, logs = micro_step_loss(model, out, batch, cfg)
        (loss / cfg.gradient_accumulation_steps).backward()
        for k, v in logs.items():
            window.setdefault(k, []).append(float(v))

        if (micro + 1) % cfg.gradient_accumulation_steps:
            continue
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
        optimizer.step()
        scheduler.step()
        ema_update(ema_model, model, cfg.ema)
        optimizer.zero_grad(set_to_none=True)
        window.setdefault("grad_norm", []).append(float(grad_norm))
        bar.update(1)
        bar.set_postfix({k: f"{np.mean(v):.4f}" for k, v in window.items() if k != "pixel_images"})
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
            record = {k: float(np.mean(v)) for k, v in window.items()}
            record.update(step=step + 1, lr=scheduler.get_last_lr()[0], seconds=round(time.time() - start, 1))
            history.append(record)
            window = {}
        if output_dir and cfg.save_every and (step + 1) % cfg.save_every == 0 and step + 1 < cfg.steps:
            save_checkpoint(os.path.join(output_dir, f"{step + 1:07d}"), model, ema_model, meta)
    bar.close()
    seconds = time.time() - start
    if output_dir:
        save_checkpoint(output_dir, model, ema_model, dict(meta, history=history, seconds=round(seconds, 1)))
    model.eval()
    return TrainResult(model=model, ema_model=ema_model, history=history, seconds=seconds)
