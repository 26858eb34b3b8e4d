"""Fidelity-aware sampling, written once for the embedded sampler and the checkout patch.

- Start from the input ("come closer, diffuse faster", SDEdit): on the sampler's own (shifted) time grid, start at
  the first grid time ``t_k <= T0`` from ``z_{t_k} = (1 - t_k) z_input + t_k noise`` (the flow's interpolation,
  :func:`bagel_sr.flow.interpolate`) and integrate the remaining steps to 0.  ``T0 = 1`` is the stock sampler;
  ``T0 = 0`` takes no step and returns the latent of the input (its VAE round trip once decoded).
- One step (``one_step``): from ``z_{t_k}`` a single Euler step to 0, ``z0_hat = z_{t_k} - t_k v_hat``: the model's
  clean estimate, the quantity the pixel term trains at ``t <= max_t``; averaged over K noises, an estimate of the
  posterior mean at the cost of K model evaluations.
- Posterior mean / median of K samples and their per-pixel standard deviation (the uncertainty map).
"""
from typing import List, Sequence, Tuple

import torch

from .flow import interpolate

AGGREGATES = ("mean", "median")


def check_start_t(start_t: float) -> float:
    """``T0`` in [0, 1] or a ``ValueError``."""
    start_t = float(start_t)
    if not 0.0 <= start_t <= 1.0:
        raise ValueError(f"start_t {start_t:g}: expected a flow time in [0, 1] (1 = sample from pure noise)")
    return start_t


def start_index(timesteps: Sequence[float], start_t: float) -> int:
    """Index of the first time of a decreasing grid that is ``<= start_t`` (0 when ``start_t >= timesteps[0]``)."""
    ts = [float(t) for t in timesteps]
    for i, t in enumerate(ts):
        if t <= start_t + 1e-9:
            return i
    return len(ts) - 1


def visited_times(timesteps: Sequence[float], start_t: float, one_step: bool = False) -> List[float]:
    """The times a sampler started at ``start_t`` visits: the grid from its first time ``<= start_t`` on, or with
    ``one_step`` that time and the grid's last (one Euler step to the end)."""
    ts = [float(t) for t in timesteps][start_index(timesteps, start_t):]
    return [ts[0], ts[-1]] if one_step and len(ts) > 1 else ts


def start_latent(z_input: torch.Tensor, noise: torch.Tensor, t: float) -> torch.Tensor:
    """``z_t`` of the input at flow time ``t``; exactly ``noise`` at ``t = 1`` (the stock start)."""
    if t >= 1.0:
        return noise
    return interpolate(z_input.to(noise.dtype), noise, torch.tensor(float(t), dtype=noise.dtype))


def aggregate(samples: torch.Tensor, how: str = "mean") -> Tuple[torch.Tensor, torch.Tensor]:
    """``(K, ...)`` samples -> (their mean or median, their per-element standard deviation, 0 for K = 1)."""
    if how not in AGGREGATES:
        raise ValueError(f"aggregate {how!r}: allowed {AGGREGATES}")
    center = samples.mean(0) if how == "mean" else samples.median(0).values
    std = samples.std(0, unbiased=False) if samples.shape[0] > 1 else torch.zeros_like(samples[0])
    return center, std


#: The one-step mode's start ``T0`` (the embedded demo's one-step sample mode, the pixel term's default ``max_t``):
#: close enough to the input that one Euler step is the model's clean estimate of it.
ONE_STEP_START_T = 0.3
