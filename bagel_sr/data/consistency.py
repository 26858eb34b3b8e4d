"""Data consistency: the forward operators ``A`` of the recorded degradations (for the evaluation's
data-consistency metrics) and the back-projection of a restored image onto what its input measured.

A manifest row records its degradation as a list of steps with the parameters used, e.g.
``[{"name": "bicubic_downsample", "scale": 4, "keep_size": true, ...}, {"name": "gaussian_noise", "sigma": 0.02}]``.
``apply_forward`` re-applies the deterministic steps to an image; stochastic steps (noise, low-dose CT) and
steps that act across the slices of a volume are skipped and reported, since they cannot be re-applied to a
single output pixel for pixel.

Conventions (the data builder's, ``bagel_sr.data.degradations``; the reference's own data-consistency error
``dc_ref_nrmse`` shows any remaining mismatch):
- ``bicubic_downsample``: PIL ``Image.BICUBIC`` (antialiased when reducing) on float32 planes, to ``lr_shape`` or
  ``(H // scale, W // scale)``; with ``keep_size`` the result is brought back to the input size the same way.
  ``backend="skimage"`` uses ``skimage.transform.resize(order=3, anti_aliasing=True, mode="reflect")`` instead.
- ``kspace_truncation``: orthonormal 2D FFT; along each truncated axis of length n the kept band is the ``2 m + 1``
  lines around the DC line with ``m = (round(n / scale) - 1) // 2`` (``scale = 1 / keep_fraction``); symmetric, so
  a real image stays real. ``window="hann"`` tapers the band by ``0.5 (1 + cos(pi k / (m + 1)))``.
  ``axes``: ``"both"``, ``"rows"`` (axis 0) or ``"cols"`` (axis 1). The result is the real part of the inverse
  FFT, same size as the input (zero-filled). The rest of k-space is the null space.
- ``gaussian_blur``: ``scipy.ndimage.gaussian_filter`` with ``sigma`` pixels in-plane, reflect padding.
- ``jpeg_compression``: 8-bit quantisation of ``value_range`` (default [0, 1]), PIL JPEG at ``quality``, decode.
"""
from __future__ import annotations

import inspect
import warnings
from typing import Any, Callable, Sequence

import numpy as np

from .kspace import kspace_band
from .operators import blur_in_plane, jpeg_round_trip, per_channel, pil_resize

# ---------------------------------------------------------------- k-space


def fft2c(x: np.ndarray) -> np.ndarray:
    """Centered orthonormal 2D FFT over axes (0, 1) of (H, W) or (H, W, C); DC at index (H // 2, W // 2)."""
    return np.fft.fftshift(np.fft.fft2(np.fft.ifftshift(x, axes=(0, 1)), axes=(0, 1), norm="ortho"), axes=(0, 1))


def ifft2c(k: np.ndarray) -> np.ndarray:
    """Inverse of ``fft2c``."""
    return np.fft.fftshift(np.fft.ifft2(np.fft.ifftshift(k, axes=(0, 1)), axes=(0, 1), norm="ortho"), axes=(0, 1))


def _band_1d(n: int, scale: float, window: str | None) -> np.ndarray:
    """Centered weights of one axis: the data builder's band (:func:`bagel_sr.data.kspace.kspace_band`), DC at n // 2."""
    return np.fft.fftshift(kspace_band(n, scale, window)[0])


_AXES = {"both": (0, 1), "rows": (0,), "cols": (1,)}


def _scale_of(scale: float | None, keep_fraction: float | None) -> float:
    if (scale is None) == (keep_fraction is None):
        raise ValueError("k-space truncation needs exactly one of scale (builder) or keep_fraction (= 1 / scale)")
    s = float(scale) if scale is not None else 1.0 / float(keep_fraction)
    if not s >= 1.0:
        raise ValueError(f"k-space truncation scale must be >= 1 (keep_fraction <= 1), got {s}")
    return s


def kspace_weights(shape: Sequence[int], scale: float | None = None, window: str | None = None,
                   axes: str | Sequence[int] = "both", keep_fraction: float | None = None) -> np.ndarray:
    """Centered (H, W) weights of the kept band (zero on the null space) for an image of spatial ``shape``."""
    s = _scale_of(scale, keep_fraction)
    ax = _AXES[axes] if isinstance(axes, str) else tuple(axes)
    h, w = int(shape[0]), int(shape[1])
    wy = _band_1d(h, s, window) if 0 in ax else np.ones(h)
    wx = _band_1d(w, s, window) if 1 in ax else np.ones(w)
    return np.outer(wy, wx)


def kspace_truncation(x: np.ndarray, scale: float | None = None, window: str | None = None,
                      axes: str | Sequence[int] = "both", keep_fraction: float | None = None) -> np.ndarray:
    """Keep the central k-space band of (H, W) or (H, W, C) ``x``; the zero-filled real image, same size."""
    wts = kspace_weights(x.shape, scale, window, axes, keep_fraction)
    if x.ndim == 3:
        wts = wts[..., None]
    return ifft2c(fft2c(x) * wts).real


# ---------------------------------------------------------------- resampling, blur, JPEG


def _resize(x: np.ndarray, size_hw: tuple[int, int], backend: str, reduce: bool) -> np.ndarray:
    if backend == "pil":
        return per_channel(x, lambda c: pil_resize(c, size_hw))
    if backend == "skimage":
        from skimage.transform import resize

        return resize(x, tuple(size_hw) + x.shape[2:], order=3, mode="reflect", anti_aliasing=reduce,
                      preserve_range=True)
    raise ValueError(f"unknown resize backend {backend!r}; use 'pil' or 'skimage'")


def bicubic_downsample(x: np.ndarray, scale: int, lr_shape: Sequence[int] | None = None, keep_size: bool = False,
                       backend: str = "pil") -> np.ndarray:
    """Bicubic down-sampling of (H, W[, C]) to ``lr_shape`` or (H // scale, W // scale); ``keep_size`` resizes back."""
    h, w = x.shape[:2]
    lr_hw = (int(lr_shape[0]), int(lr_shape[1])) if lr_shape is not None else (h // int(scale), w // int(scale))
    lr = _resize(x, lr_hw, backend, reduce=True)
    return _resize(lr, (h, w), backend, reduce=False) if keep_size else lr


def bicubic_upsample(x: np.ndarray, scale: float, out_shape: Sequence[int] | None = None,
                     backend: str = "pil") -> np.ndarray:
    """Bicubic up-sampling of (H, W[, C]) by ``scale`` to ``out_shape`` or (H * scale, W * scale)."""
    if out_shape is None:
        out_shape = (int(round(x.shape[0] * scale)), int(round(x.shape[1] * scale)))
    return _resize(x, (int(out_shape[0]), int(out_shape[1])), backend, reduce=False)


def gaussian_blur(x: np.ndarray, sigma: float) -> np.ndarray:
    """In-plane Gaussian blur of (H, W[, C]) with ``sigma`` pixels, reflect padding."""
    return blur_in_plane(x, sigma)


def jpeg_compression(x: np.ndarray, quality: int, value_range: Sequence[float] = (0.0, 1.0)) -> np.ndarray:
    """JPEG round trip: ``value_range`` -> 0..255 (clipped, rounded), PIL JPEG at ``quality``, back to the range."""
    return jpeg_round_trip(x, quality, float(value_range[0]), float(value_range[1]))


# ---------------------------------------------------------------- registry

OPERATORS: dict[str, Callable[..., np.ndarray]] = {
    "bicubic_downsample": bicubic_downsample,
    "bicubic_upsample": bicubic_upsample,
    "kspace_truncation": kspace_truncation,
    "gaussian_blur": gaussian_blur,
    "jpeg_compression": jpeg_compression,
}
#: Steps that data consistency skips, with the reason.
SKIPPED_STEPS: dict[str, str] = {
    "gaussian_noise": "stochastic", "rician_noise": "stochastic", "poisson_noise": "stochastic",
    "speckle_noise": "stochastic", "low_dose_ct": "stochastic", "slice_thickness": "acts across slices",
}
ALIASES: dict[str, str] = {
    "bicubic": "bicubic_downsample", "downsample": "bicubic_downsample", "downsample_bicubic": "bicubic_downsample",
    "bicubic_down": "bicubic_downsample", "upsample": "bicubic_upsample", "upsample_bicubic": "bicubic_upsample",
    "kspace_trunc": "kspace_truncation", "k_space_truncation": "kspace_truncation", "kspace_crop": "kspace_truncation",
    "kspace_lowpass": "kspace_truncation", "blur": "gaussian_blur", "jpeg": "jpeg_compression",
    "noise": "gaussian_noise", "awgn": "gaussian_noise", "rician": "rician_noise", "poisson": "poisson_noise",
    "ldct": "low_dose_ct",
}
#: Recorded fields that describe a step but are not operator arguments (ignored without a warning).
METADATA_KEYS = frozenset({"name", "seed", "kernel", "kept_half_width", "lr_slices", "filter", "note"})


def canonical_name(name: str) -> str:
    """The registry name of a recorded step name (case, '-' and ' ' ignored; a few aliases accepted)."""
    key = str(name).strip().lower().replace("-", "_").replace(" ", "_")
    key = ALIASES.get(key, key)
    if key in OPERATORS or key in SKIPPED_STEPS:
        return key
    raise ValueError(f"unknown degradation step {name!r}: known operators {sorted(OPERATORS)}, "
                     f"skipped {sorted(SKIPPED_STEPS)}, aliases {sorted(ALIASES)}")


def split_steps(degradations: Sequence[dict[str, Any]]) -> tuple[list[tuple[str, dict]], list[str]]:
    """Split recorded steps into deterministic ``(name, params)`` to apply and skipped step names."""
    apply, skipped = [], []
    for step in degradations:
        if "name" not in step:
            raise ValueError(f"degradation step without 'name': {step}")
        name = canonical_name(step["name"])
        if name in SKIPPED_STEPS:
            skipped.append(name)
        else:
            apply.append((name, {k: v for k, v in step.items() if k not in METADATA_KEYS}))
    return apply, skipped


def _call(name: str, x: np.ndarray, params: dict) -> np.ndarray:
    fn = OPERATORS[name]
    accepted = set(inspect.signature(fn).parameters) - {"x"}
    unknown = sorted(set(params) - accepted)
    if unknown:
        warnings.warn(f"{name}: ignoring recorded parameters {unknown} (accepted: {sorted(accepted)})")
    return fn(x, **{k: v for k, v in params.items() if k in accepted})


def apply_forward(x: np.ndarray, degradations: Sequence[dict[str, Any]]) -> tuple[np.ndarray, list[str], list[str]]:
    """Apply the deterministic steps to ``x``: (result, applied step descriptions, skipped step names)."""
    steps, skipped = split_steps(degradations)
    applied = []
    for name, params in steps:
        x = _call(name, x, params)
        applied.append(f"{name}({', '.join(f'{k}={v}' for k, v in params.items())})")
    return x, applied, skipped


# ---------------------------------------------------------------- back-projection
# ``x <- x + B(y - A(x))`` with the ``A`` above (the same as the data-consistency metric's), ``B`` the bicubic
# up-sampling back to the output's size when ``A(x)`` is smaller, else the identity. For a k-space truncation with
# the plain band ``A`` is an orthogonal projector, so one step replaces the measured band of ``x`` with the input's
# and keeps the rest of k-space; for a bicubic down-sampling it is classic iterative back-projection (Irani &
# Peleg). Stochastic steps (noise) are not re-applied, so a pure denoising pair has nothing to project on and is
# left unchanged. Only linear steps are projected (``LINEAR``); anything else (JPEG) leaves the image unchanged
# and says so.

LINEAR = ("bicubic_downsample", "kspace_truncation", "gaussian_blur")


def projection_steps(degradations: Sequence[dict[str, Any]]) -> tuple[list[str], str]:
    """The deterministic step names a projection uses and, when none can be used, why (else '')."""
    steps, _ = split_steps(degradations)
    names = [n for n, _ in steps]
    if not names:
        return [], "no deterministic step recorded (pure denoising): nothing measured to project on"
    nonlinear = [n for n in names if n not in LINEAR]
    if nonlinear:
        return [], f"non-linear step(s) {nonlinear}: not projected"
    return names, ""


def back_project(x: np.ndarray, degraded: np.ndarray, degradations: Sequence[dict[str, Any]],
                 steps: int = 10) -> tuple[np.ndarray, str]:
    """``steps`` back-projection steps of ``x`` toward ``A(x) = degraded``; returns (result, note; '' when applied)."""
    names, why = projection_steps(degradations)
    x = np.asarray(x, dtype=np.float64)
    if why or steps < 1:
        return x, why or "steps < 1"
    y = np.asarray(degraded, dtype=np.float64)
    for _ in range(int(steps)):
        residual = y - apply_forward(x, degradations)[0]
        if residual.shape[:2] != x.shape[:2]:
            residual = bicubic_upsample(residual, 1.0, out_shape=x.shape[:2])
        x = x + residual
    return x, ""
