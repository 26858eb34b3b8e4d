"""The degradation operators: what the data builder applies to make pairs, and the math that the evaluation's
forward operators re-apply for data consistency (:mod:`bagel_sr.data.consistency`: the operator ``A`` of a
recorded step, back-projection). The builder's registry and validation: :mod:`bagel_sr.data.degradations`.

Every builder operator is a pure function ``f(x, rng, **params) -> (degraded, used_params)``:

* ``x``: float array in *working units* (HU for CT, normalised intensity otherwise, see
  :mod:`bagel_sr.data.intensity`); ``(H, W)`` or ``(H, W, C)`` images, ``(X, Y, Z)`` volumes for
  the volumetric ones. Spatial operations act on the first two axes of an image.
* ``rng``: a seeded ``numpy.random.Generator`` (the only source of randomness).
* returns a float64 array of the input's shape (super-resolution degradations bring the
  low-resolution result back to the input size) and a JSON-able dict of the parameters used.
"""
from __future__ import annotations

import io
import math
from typing import Any, Callable

import numpy as np
from PIL import Image
from scipy import ndimage
from scipy.interpolate import make_interp_spline

from .kspace import kspace_band

Array = np.ndarray
Result = tuple[Array, dict[str, Any]]


# ---------------------------------------------------------------- shared math (builder and forward operators)


def per_channel(x: Array, fn: Callable[[Array], Array]) -> Array:
    if x.ndim == 2:
        return fn(x)
    return np.stack([fn(x[..., c]) for c in range(x.shape[-1])], axis=-1)


def pil_resize(channel: Array, size_hw: tuple[int, int]) -> Array:
    """Pillow bicubic resize of one float plane to ``size_hw`` (mode "F": no clipping, antialiased when reducing)."""
    img = Image.fromarray(np.ascontiguousarray(channel, dtype=np.float32))  # mode "F": no clipping
    out = img.resize((size_hw[1], size_hw[0]), Image.Resampling.BICUBIC)
    return np.asarray(out, dtype=np.float64)


def blur_in_plane(x: Array, sigma: float) -> Array:
    """Gaussian blur of (H, W[, C]) with ``sigma`` pixels in-plane, reflect padding."""
    return ndimage.gaussian_filter(x, (sigma, sigma) + (0.0,) * (x.ndim - 2), mode="reflect")


def jpeg_round_trip(x: Array, quality: int, lo: float, hi: float) -> Array:
    """``[lo, hi]`` -> 0..255 (clipped, rounded), Pillow JPEG at ``quality``, decoded back to ``[lo, hi]``."""
    u8 = np.round(np.clip((x - lo) / (hi - lo), 0.0, 1.0) * 255.0).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(u8).save(buf, format="JPEG", quality=int(quality))
    decoded = np.asarray(Image.open(io.BytesIO(buf.getvalue())), dtype=np.float64)
    return lo + decoded / 255.0 * (hi - lo)


# ---------------------------------------------------------------- the builder's operators


def bicubic_downsample(image: Array, rng: np.random.Generator, scale: int, keep_size: bool = True) -> Result:
    """Bicubic down-sampling by ``scale`` (antialiased, a=-0.5 like MATLAB ``imresize``; Pillow).

    With ``keep_size`` the LR image is brought back to the input size by bicubic up-sampling, so the
    condition and target images of a pair have the same size. Needs H and W divisible by ``scale``.
    """
    x = np.asarray(image, dtype=np.float64)
    h, w = x.shape[:2]
    if h % scale or w % scale:
        raise ValueError(f"bicubic_downsample: image size {h}x{w} is not divisible by scale {scale}")
    lr_hw = (h // scale, w // scale)
    lr = per_channel(x, lambda c: pil_resize(c, lr_hw))
    out = per_channel(lr, lambda c: pil_resize(c, (h, w))) if keep_size else lr
    return out, {"scale": int(scale), "lr_shape": list(lr_hw), "kernel": "bicubic", "keep_size": bool(keep_size)}


def kspace_truncation(
    image: Array, rng: np.random.Generator, scale: float, window: str = "none", axes: str = "both"
) -> Result:
    """MRI-style resolution loss: keep the central ``1/scale`` of k-space, zero-fill the rest.

    ``axes``: ``both``, ``rows`` (truncate along axis 0 only, e.g. phase encoding) or ``cols``.
    ``window='hann'`` tapers the kept band to reduce Gibbs ringing. The output keeps the input size
    (zero-filled reconstruction) and is the real part of the inverse FFT.
    """
    x = np.asarray(image, dtype=np.float64)
    h, w = x.shape[:2]
    wr, mr = kspace_band(h, scale, window) if axes in ("both", "rows") else (np.ones(h), None)
    wc, mc = kspace_band(w, scale, window) if axes in ("both", "cols") else (np.ones(w), None)
    mask = np.outer(wr, wc)
    if x.ndim == 3:
        mask = mask[..., None]
    out = np.fft.ifft2(np.fft.fft2(x, axes=(0, 1)) * mask, axes=(0, 1)).real
    return out, {"scale": float(scale), "window": window, "axes": axes, "kept_half_width": [mr, mc]}


def _rect_kernel(thickness: float) -> Array:
    """Box slice profile of width ``thickness`` voxels, sampled by voxel overlap (fractional edges)."""
    half = thickness / 2.0
    r = int(math.ceil(half - 0.5))
    j = np.arange(-r, r + 1, dtype=np.float64)
    weights = np.clip(np.minimum(j + 0.5, half) - np.maximum(j - 0.5, -half), 0.0, None)
    return weights / weights.sum()


def slice_thickness(
    volume: Array,
    rng: np.random.Generator,
    factor: int,
    thickness: float | None = None,
    profile: str = "gaussian",
    axis: int = 2,
    keep_size: bool = True,
) -> Result:
    """Thick-slice acquisition: blur along ``axis`` with the slice profile, keep every ``factor``-th slice.

    ``thickness`` is the profile's FWHM (gaussian) or width (rect) in input voxels (default ``factor``,
    i.e. contiguous slices). With ``keep_size`` the subsampled volume is interpolated back onto the input
    grid with a cubic spline along ``axis``. Needs a 3D volume.
    """
    x = np.asarray(volume, dtype=np.float64)
    if x.ndim != 3:
        raise ValueError(f"slice_thickness needs a 3D volume, got an array of shape {x.shape}")
    n = x.shape[axis]
    if n < 2 * factor:
        raise ValueError(f"slice_thickness: {n} slices along axis {axis} are too few for factor {factor}")
    t = float(thickness if thickness is not None else factor)
    used: dict[str, Any] = {"factor": int(factor), "thickness": t, "profile": profile, "axis": int(axis)}
    if profile == "gaussian":
        sigma = t / (2.0 * math.sqrt(2.0 * math.log(2.0)))
        blurred = ndimage.gaussian_filter1d(x, sigma, axis=axis, mode="nearest")
        used["sigma"] = sigma
    else:
        blurred = ndimage.convolve1d(x, _rect_kernel(t), axis=axis, mode="nearest")
    kept = np.arange(0, n, factor)
    sub = np.take(blurred, kept, axis=axis)
    used["lr_slices"] = int(len(kept))
    if not keep_size:
        return sub, used
    spline = make_interp_spline(kept, sub, k=min(3, len(kept) - 1), axis=axis)
    return spline(np.clip(np.arange(n), kept[0], kept[-1])), used


def gaussian_noise(image: Array, rng: np.random.Generator, sigma: float) -> Result:
    """Additive white Gaussian noise with standard deviation ``sigma`` (working units: HU for CT)."""
    x = np.asarray(image, dtype=np.float64)
    return x + rng.normal(0.0, sigma, size=x.shape), {"sigma": float(sigma)}


def rician_noise(image: Array, rng: np.random.Generator, sigma: float) -> Result:
    """Rician noise of MR magnitude images: ``|x + n1 + i n2|`` with ``n1, n2 ~ N(0, sigma^2)``."""
    x = np.asarray(image, dtype=np.float64)
    real = x + rng.normal(0.0, sigma, size=x.shape)
    imag = rng.normal(0.0, sigma, size=x.shape)
    return np.hypot(real, imag), {"sigma": float(sigma)}


def gaussian_blur(image: Array, rng: np.random.Generator, sigma: float) -> Result:
    """Isotropic in-plane Gaussian blur, ``sigma`` in pixels."""
    x = np.asarray(image, dtype=np.float64)
    return blur_in_plane(x, sigma), {"sigma": float(sigma)}


def jpeg_compression(
    image: Array, rng: np.random.Generator, quality: int, value_range: tuple[float, float] = (0.0, 1.0)
) -> Result:
    """JPEG round trip at ``quality`` (Pillow). ``value_range`` (working units) maps to 0..255 for coding."""
    x = np.asarray(image, dtype=np.float64)
    lo, hi = float(value_range[0]), float(value_range[1])
    return jpeg_round_trip(x, quality, lo, hi), {"quality": int(quality), "value_range": [lo, hi]}


def low_dose_ct(
    image: Array,
    rng: np.random.Generator,
    photons_per_ray: float = 2.5e5,
    electronic_noise_std: float = 10.0,
    n_angles: int | None = None,
    pixel_size_mm: float = 1.0,
    mu_water: float = 0.0192,
    mode: str = "noise_insertion",
    filter: str = "ramp",
) -> Result:
    """Low-dose CT noise simulated in the projection domain (scikit-image ``radon``/``iradon``).

    HU -> attenuation ``mu = mu_water * (1 + HU / 1000)`` per mm (times ``pixel_size_mm`` per pixel) ->
    sinogram ``p`` over ``n_angles`` (default ``max(H, W)``) parallel-beam angles -> counts
    ``Poisson(I0 * exp(-p)) + N(0, electronic_noise_std^2)`` with ``I0 = photons_per_ray`` ->
    ``-log(counts / I0)`` (counts clamped to >= 1) -> filtered back projection (``filter``, default the
    ramp; smoother kernels lower the noise like a soft clinical kernel) -> HU.

    ``mode='noise_insertion'`` adds only the noise, ``FBP(noisy) - FBP(clean)``, to the input (no FBP
    discretisation artefacts); ``mode='reconstruct'`` returns ``FBP(noisy)`` itself. 2D input only.
    """
    from skimage.transform import iradon, radon

    hu = np.asarray(image, dtype=np.float64)
    if hu.ndim != 2:
        raise ValueError(f"low_dose_ct needs a 2D (grayscale) image, got shape {hu.shape}")
    h, w = hu.shape
    size = max(h, w)
    pad = ((0, size - h), (0, size - w))
    mu = np.pad(np.clip(mu_water * (1.0 + hu / 1000.0), 0.0, None), pad) * pixel_size_mm
    n_angles = int(n_angles or size)
    theta = np.linspace(0.0, 180.0, n_angles, endpoint=False)
    sino = radon(mu, theta=theta, circle=False)
    counts = rng.poisson(photons_per_ray * np.exp(-sino)).astype(np.float64)
    counts += rng.normal(0.0, electronic_noise_std, size=counts.shape)
    noisy_sino = -np.log(np.maximum(counts, 1.0) / photons_per_ray)

    def fbp(s: Array) -> Array:
        return iradon(s, theta=theta, filter_name=filter, circle=False, output_size=size)[:h, :w]

    def to_hu(m: Array) -> Array:
        return (m / pixel_size_mm / mu_water - 1.0) * 1000.0

    if mode == "noise_insertion":
        out = hu + (to_hu(fbp(noisy_sino)) - to_hu(fbp(sino)))
    else:
        out = to_hu(fbp(noisy_sino))
    used = {
        "photons_per_ray": float(photons_per_ray),
        "electronic_noise_std": float(electronic_noise_std),
        "n_angles": n_angles,
        "pixel_size_mm": float(pixel_size_mm),
        "mu_water": float(mu_water),
        "mode": mode,
        "filter": filter,
    }
    return out, used
