"""Restoration with a trained embedded model: ``restore(image, instruction) -> image`` for ``bagel_sr.eval.infer``.

A run folder is what the embedded loop writes per arm (``config.json``, ``ema.safetensors``, ``model.safetensors``),
e.g. ``outputs/embedded/seed0/pixel``.  Images are treated as grayscale (the channel mean), cropped to a multiple of
16 pixels for the model and padded back to their size; the VAE is the shipped one unless ``vae_dir`` names another.
"""
from typing import Callable, Optional

import numpy as np
import torch
from PIL import Image

from . import data, sampling
from .train import load_checkpoint
from .vae import load_vae

TOKEN_PIXELS = 16


def _to_model(image: Image.Image, max_side: int) -> torch.Tensor:
    """PIL image -> (3, H', W') in [-1, 1], grayscale as RGB, H' and W' multiples of 16 at most ``max_side``."""
    gray = np.asarray(image.convert("L"), dtype=np.float32) / 255.0
    h = min(gray.shape[0] // TOKEN_PIXELS * TOKEN_PIXELS, max_side)
    w = min(gray.shape[1] // TOKEN_PIXELS * TOKEN_PIXELS, max_side)
    if h == 0 or w == 0:
        raise ValueError(f"image of {gray.shape[1]}x{gray.shape[0]} pixels is smaller than one 16x16 token")
    return data.to_model_range(torch.from_numpy(gray[:h, :w].copy()))


def _to_image(x: torch.Tensor, size) -> Image.Image:
    """(3, H, W) in [-1, 1] -> 8-bit RGB of ``size`` (W, H), the uncovered border filled by edge replication."""
    gray = ((x.float().mean(0).clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()
    pad = ((0, size[1] - gray.shape[0]), (0, size[0] - gray.shape[1]))
    gray = np.pad(gray, pad, mode="edge")
    return Image.fromarray(gray).convert("RGB")


def embedded_restorer(run_dir: str, num_timesteps: int = 25, timestep_shift: float = 1.0, seed: int = 0,
                      vae_dir: Optional[str] = None, start_t: float = 1.0,
                      one_step: bool = False) -> Callable[..., Image.Image]:
    """``restore(image, instruction[, seed])`` with the EMA weights of ``run_dir`` and the Euler sampler (no CFG),
    starting from the input noised to ``start_t`` when it is below 1, with one step to 0 when ``one_step``."""
    model = load_checkpoint(run_dir, "ema")
    vae = load_vae(vae_dir)
    tokenizer = data.WordTokenizer.default()
    max_side = int(model.max_latent_size) * TOKEN_PIXELS

    default_seed = seed

    def restore(image: Image.Image, instruction: str, seed: Optional[int] = None) -> Image.Image:
        condition = _to_model(image, max_side)
        sample = data.Sample("sr_pairs", instruction, torch.zeros_like(condition), condition)
        out = sampling.euler_sample(model, vae, [sample], tokenizer, steps=num_timesteps,
                                    timestep_shift=timestep_shift, seed=default_seed if seed is None else seed,
                                    start_t=start_t, one_step=one_step)[0]
        return _to_image(out, image.size)

    return restore
