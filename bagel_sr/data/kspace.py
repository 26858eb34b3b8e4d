"""The one k-space band: which lines of an axis a truncation keeps, shared by the degradation
(:func:`bagel_sr.data.operators.kspace_truncation`) and the evaluation's forward operator
(``bagel_sr.data.consistency``)."""
from __future__ import annotations

import numpy as np

WINDOWS = ("none", "hann")


def kspace_band(n: int, scale: float, window: str | None = "none") -> tuple[np.ndarray, int]:
    """``(weights, m)``: 1D weights over ``np.fft.fftfreq`` order (DC first) for an axis of ``n`` lines.

    Kept: the ``2 m + 1`` lines ``|k| <= m`` around DC, ``m = (round(n / scale) - 1) // 2``; 0 elsewhere (the null
    space).  Symmetric, so a real image stays real and the kept coefficients are reproduced exactly.
    ``window="hann"`` tapers the band by ``0.5 (1 + cos(pi k / (m + 1)))``.  ``np.fft.fftshift(weights)`` is the
    centered order (DC at ``n // 2``).
    """
    window = "none" if window is None else window
    if window not in WINDOWS:
        raise ValueError(f"unknown k-space window {window!r}; use 'hann' or 'none'")
    k = np.fft.fftfreq(n, d=1.0 / n)
    m = (int(round(n / scale)) - 1) // 2
    inside = np.abs(k) <= m
    if window == "hann":
        return np.where(inside, 0.5 * (1.0 + np.cos(np.pi * k / (m + 1))), 0.0), m
    return inside.astype(np.float64), m
