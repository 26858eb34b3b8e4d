"""Rectified-flow conventions of BAGEL, written down once.

Time runs from data to noise: ``t = 0`` is the clean latent, ``t = 1`` pure noise.
``z_t = (1 - t) z0 + t * noise`` and the regression target is the velocity ``v = noise - z0``.
Raw timesteps in a packed batch are logit-normal draws (``-inf`` for clean condition images); the model maps them
with ``t = shift(sigmoid(raw))``.
"""
import math
from typing import Union

import torch

Number = Union[float, torch.Tensor]


def shift_timesteps(t: Number, shift: float) -> Number:
    """BAGEL's timestep shift ``s*t / (1 + (s-1)*t)``; ``shift = 1`` is the identity, ``shift > 1`` moves t to noise."""
    return shift * t / (1 + (shift - 1) * t)


def unshift_timesteps(t: Number, shift: float) -> Number:
    """Inverse of :func:`shift_timesteps`: ``u = t / (s - (s-1)*t)``."""
    return t / (shift - (shift - 1) * t)


def raw_to_t(raw: torch.Tensor, shift: float) -> torch.Tensor:
    """Packed raw timesteps (logits, ``-inf`` = clean) to flow time t in [0, 1]."""
    return shift_timesteps(torch.sigmoid(raw), shift)


def interpolate(z0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``z_t = (1 - t) z0 + t noise``; ``t`` broadcasts over the last dimension (tokens, features)."""
    return (1 - t) * z0 + t * noise


def velocity(z0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The regression target ``v = noise - z0`` (points from data to noise)."""
    return noise - z0


def z0_from_velocity(z_t: torch.Tensor, t: torch.Tensor, v_hat: torch.Tensor) -> torch.Tensor:
    """The clean latent a predicted velocity implies: ``z0_hat = z_t - t * v_hat`` (exact when ``v_hat = v``)."""
    return z_t - t * v_hat


def gate_weight(t: torch.Tensor, max_t: float, schedule: str = "hard") -> torch.Tensor:
    """Per-image weight ``w(t)`` of the pixel term.

    ``hard``: 1 for ``t <= max_t`` else 0.  ``ramp``: ``max(0, (max_t - t) / max_t)``.
    """
    if schedule == "hard":
        return (t <= max_t).to(t.dtype if t.is_floating_point() else torch.float32)
    if schedule == "ramp":
        return torch.clamp((max_t - t) / max_t, min=0.0)
    raise ValueError(f"unknown schedule {schedule!r}; allowed: 'hard', 'ramp'")


def _normal_cdf(x: float) -> float:
    return 0.5 * (1.0 + math.erf(x / math.sqrt(2.0)))


def admitted_share(max_t: float, shift: float = 1.0) -> float:
    """Share of target images with ``t <= max_t`` when ``raw ~ N(0, 1)`` and ``t = shift(sigmoid(raw))``."""
    if max_t >= 1:
        return 1.0
    u = unshift_timesteps(max_t, shift)
    return _normal_cdf(math.log(u / (1 - u)))


def mean_gate_weight(max_t: float, shift: float = 1.0, schedule: str = "hard", n: int = 20001) -> float:
    """``E[w(t)]`` over the logit-normal t of the training loop (numerical integration over raw ~ N(0, 1))."""
    raw = torch.linspace(-8, 8, n, dtype=torch.float64)
    density = torch.exp(-0.5 * raw**2) / math.sqrt(2 * math.pi)
    w = gate_weight(raw_to_t(raw, shift), max_t, schedule)
    return float(torch.trapezoid(w * density, raw))
