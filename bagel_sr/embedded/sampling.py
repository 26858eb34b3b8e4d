"""Inference and measurements for the embedded bench.

- :func:`euler_sample`: BAGEL's Euler flow sampler in one packed sequence per chunk: condition image (clean, t = 0),
  instruction, noisy target; timesteps ``linspace(1, 0, steps + 1)`` with BAGEL's inference shift
  ``s*t / (1 + (s-1)*t)``; ``z <- z - v_hat * dt`` (the velocity points from data to noise).  No CFG.
  ``start_t < 1`` starts from the condition (the degraded input at the output size) noised to the first grid time
  ``<= start_t`` (:mod:`bagel_sr.restoration`); ``one_step`` then takes one Euler step from there to 0 (the model's
  clean estimate ``z_t - t v_hat``).
- :func:`posterior_samples`: ``K`` samples (seeds ``seed .. seed + K - 1``, :func:`euler_runs`: the inputs encoded
  once for all K), their mean or median and per-pixel std.
- :func:`flow_loss`: the model's flow loss (per-token mean squared velocity error) on fixed samples at fixed flow
  times with fixed noise, identical for every arm.
- :func:`image_metrics`: PSNR, SSIM and the hallucination share of grayscale images in [0, 1] (channel mean of the
  [-1, 1] RGB, clipped), ``data_range = 1`` (scikit-image; the share as ``bagel_sr.eval.evaluate``'s, threshold 0.1).
"""
import math
from typing import Dict, List, Sequence

import numpy as np
import torch

from ..eval.metrics import hallucination_share
from ..flow import shift_timesteps, unshift_timesteps
from ..restoration import aggregate, check_start_t, start_latent, visited_times
from . import data
from .backbone import TinyBagel

EVAL_TIMES = (0.1, 0.3, 0.5, 0.7, 0.9)


def _chunks(items: Sequence, n: int):
    for i in range(0, len(items), n):
        yield items[i : i + n]


def _encode(vae, images: torch.Tensor) -> torch.Tensor:
    """Deterministic latents for evaluation: the posterior mean when the VAE offers it."""
    encode = getattr(vae, "encode_mean", None) or vae.encode
    return encode(images)


def sampler_grid(steps: int, timestep_shift: float = 1.0) -> List[float]:
    """The sampler's flow times: ``linspace(1, 0, steps + 1)`` (float32) with BAGEL's inference shift."""
    return shift_timesteps(torch.linspace(1.0, 0.0, steps + 1), timestep_shift).tolist()


@torch.no_grad()
def euler_sample(model: TinyBagel, vae, samples: Sequence[data.Sample], tokenizer: data.WordTokenizer,
                 steps: int = 25, timestep_shift: float = 1.0, seed: int = 0, chunk: int = 16,
                 start_t: float = 1.0, one_step: bool = False) -> torch.Tensor:
    """Generate the target of every sample from its condition and text; returns (N, 3, H, W) in [-1, 1].

    ``start_t < 1``: start from the condition's latent noised to the first grid time ``<= start_t``; ``one_step``:
    one Euler step from the start to 0 instead of the rest of the grid."""
    return euler_runs(model, vae, samples, tokenizer, seeds=[seed], steps=steps, timestep_shift=timestep_shift,
                      chunk=chunk, start_t=start_t, one_step=one_step)[0]


@torch.no_grad()
def euler_runs(model: TinyBagel, vae, samples: Sequence[data.Sample], tokenizer: data.WordTokenizer,
               seeds: Sequence[int], steps: int = 25, timestep_shift: float = 1.0, chunk: int = 16,
               start_t: float = 1.0, one_step: bool = False, clamp: bool = True) -> torch.Tensor:
    """:func:`euler_sample` for every seed of ``seeds`` -> (K, N, 3, H, W), each run equal to ``euler_sample`` with
    that seed; the condition and the input are encoded once per chunk for all seeds (the encoder is deterministic).
    ``clamp=False``: the decoder's output as it is, not clipped to [-1, 1]."""
    model.eval()
    generators = [torch.Generator().manual_seed(s) for s in seeds]
    ts = torch.tensor(visited_times(sampler_grid(steps, timestep_shift), check_start_t(start_t), one_step))
    outputs = []
    for part in _chunks(list(samples), chunk):
        # the target pixels are not needed (and must not leak): pack a blank of the same size
        blanks = [data.Sample(s.kind, s.text, torch.zeros_like(s.target), s.condition, s.meta) for s in part]
        batch = data.pack(blanks, tokenizer, vae_cond_dropout_prob=0.0, text_cond_dropout_prob=0.0,
                          vae_image_downsample=model.latent_downsample, max_latent_size=model.max_latent_size)
        shapes = batch["patchified_vae_latent_shapes"]
        clean = model.patchify(_encode(vae, batch["padded_images"]), shapes)
        is_target = torch.isfinite(batch["packed_timesteps"])
        z_input = None
        if float(ts[0]) < 1.0:  # the input at the output size in the target's place: its latent tokens, same layout
            inputs = [data.Sample(s.kind, s.text, s.condition, s.condition, s.meta) for s in part]
            packed = data.pack(inputs, tokenizer, vae_cond_dropout_prob=0.0, text_cond_dropout_prob=0.0,
                               vae_image_downsample=model.latent_downsample, max_latent_size=model.max_latent_size)
            z_input = model.patchify(_encode(vae, packed["padded_images"]), shapes)[is_target]
        runs = []
        for generator in generators:
            z = torch.randn(int(is_target.sum()), clean.shape[1], generator=generator)
            if z_input is not None:
                z = start_latent(z_input, z, float(ts[0]))
            for i in range(len(ts) - 1):
                z_all, t_all = clean.clone(), torch.zeros(len(clean))
                z_all[is_target], t_all[is_target] = z, float(ts[i])
                v = model.predict_velocity(z_all, t_all, batch)
                z = z - v * float(ts[i] - ts[i + 1])
            latents, row = [], 0
            for (h, w), start in zip(shapes, _image_starts(shapes)):
                if bool(is_target[start]):
                    latents.append(model.unpatchify(z[row : row + h * w], h, w))
                    row += h * w
            decoded = vae.decode(torch.stack(latents))
            runs.append(decoded.clamp(-1, 1) if clamp else decoded)
        outputs.append(torch.stack(runs))
    return torch.cat(outputs, dim=1)


@torch.no_grad()
def posterior_samples(model: TinyBagel, vae, samples: Sequence[data.Sample], tokenizer: data.WordTokenizer,
                      num_samples: int = 1, how: str = "mean", seed: int = 0, **sample_kw):
    """``num_samples`` Euler samples (seeds ``seed + j``) -> (their mean or median clipped to [-1, 1], their
    per-pixel std).  The samples are aggregated before clipping: clipping each sample first biases the mean where the
    truth lies at the range's end (a black background gets the positive half of the samples' noise)."""
    runs = euler_runs(model, vae, samples, tokenizer, seeds=range(seed, seed + num_samples), clamp=False, **sample_kw)
    center, spread = aggregate(runs, how)
    return center.clamp(-1, 1), spread


def back_project(images: torch.Tensor, samples: Sequence[data.Sample], steps: int = 10) -> torch.Tensor:
    """Data consistency on the bench: ``x <- x + c - up(down(x))`` (``c`` the condition, the bench's own operator,
    :func:`data.downsample` / :func:`data.upsample` at each pair's ``meta['scale']``); clipped to [-1, 1]."""
    out = []
    for x, s in zip(images, samples):
        x, c = x[None].float(), s.condition[None].float()
        for _ in range(steps):
            x = x + c - data.upsample(data.downsample(x, int(s.meta["scale"])), tuple(x.shape[-2:]))
        out.append(x[0].clamp(-1, 1))
    return torch.stack(out)


def _image_starts(shapes) -> List[int]:
    starts, acc = [], 0
    for h, w in shapes:
        starts.append(acc)
        acc += h * w
    return starts


@torch.no_grad()
def flow_loss(model: TinyBagel, vae, samples: Sequence[data.Sample], tokenizer: data.WordTokenizer,
              times: Sequence[float] = EVAL_TIMES, seed: int = 0, chunk: int = 16) -> Dict[str, float]:
    """Mean flow loss over samples and flow times ``times`` (noise from ``seed``), and the value per time."""
    model.eval()
    per_time = {}
    for t in times:
        raw = math.log(unshift_timesteps(t, model.timestep_shift) / (1 - unshift_timesteps(t, model.timestep_shift)))
        total, count = 0.0, 0
        for c, part in enumerate(_chunks(list(samples), chunk)):
            batch = data.pack(part, tokenizer, vae_cond_dropout_prob=0.0, text_cond_dropout_prob=0.0,
                              vae_image_downsample=model.latent_downsample, max_latent_size=model.max_latent_size)
            batch["packed_timesteps"] = torch.where(torch.isfinite(batch["packed_timesteps"]),
                                                    torch.full_like(batch["packed_timesteps"], raw),
                                                    batch["packed_timesteps"])
            batch["padded_latent"] = _encode(vae, batch.pop("padded_images"))
            batch.pop("batch_data_indexes")
            torch.manual_seed(seed * 1000 + c)
            mse = TinyBagel.forward(model, **batch)["mse"]  # the plain contract forward, no pixel term
            total += float(mse.mean(-1).sum())
            count += mse.shape[0]
        per_time[f"t={t:g}"] = total / max(count, 1)
    return dict(mean=float(np.mean(list(per_time.values()))), **per_time)


def image_metrics(pred: torch.Tensor, target: torch.Tensor) -> Dict[str, np.ndarray]:
    """Per-image PSNR (dB), SSIM and hallucination share (pixels with ``|error| > 0.1``) of (N, 3, H, W) images in
    [-1, 1], on grayscale [0, 1] with data_range 1."""
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    p = data.to_unit_gray(pred).numpy().astype(np.float64)
    t = data.to_unit_gray(target).numpy().astype(np.float64)
    psnr = np.array([peak_signal_noise_ratio(ti, pi, data_range=1.0) for pi, ti in zip(p, t)])
    ssim = np.array([structural_similarity(ti, pi, data_range=1.0) for pi, ti in zip(p, t)])
    halluc = np.array([hallucination_share(ti, pi, data_range=1.0) for pi, ti in zip(p, t)])
    return dict(psnr=psnr, ssim=ssim, halluc=halluc)


@torch.no_grad()
def vae_round_trip(vae, images: torch.Tensor) -> torch.Tensor:
    return vae.decode(_encode(vae, images)).clamp(-1, 1)
