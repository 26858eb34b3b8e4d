"""Synthetic degradations for paired restoration data.

Every degradation is a pure function ``f(x, rng, **params) -> (degraded, used_params)``:

* ``x``: float array in *working units* (HU for CT, normalised intensity otherwise, see
  :mod:`bagel_sr.data.intensity`); ``(H, W)`` or ``(H, W, C)`` images, ``(X, Y, Z)`` volumes for
  the volumetric ones. Spatial operations act on the first two axes of an image.
* ``rng``: a seeded ``numpy.random.Generator`` (the only source of randomness).
* returns a float64 array of the input's shape (super-resolution degradations bring the
  low-resolution result back to the input size) and a JSON-able dict of the parameters used.

:data:`DEGRADATIONS` registers them by name with their parameter specs, which the build config
is validated against; :func:`sample_params` draws per-pair values for ``{uniform: [a, b]}`` /
``{choice: [...]}`` parameters.
"""
from __future__ import annotations

import io
import math
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
from PIL import Image
from scipy import ndimage
from scipy.interpolate import make_interp_spline

Array = np.ndarray
Result = tuple[Array, dict[str, Any]]


def _per_channel(x: Array, fn: Callable[[Array], Array]) -> Array:
    if x.ndim == 2:
        return fn(x)
    return np.stack([fn(x[..., c]) for c in range(x.shape[-1])], axis=-1)


def _pil_resize(channel: Array, size_hw: tuple[int, int]) -> Array:
    img = Image.fromarray(np.ascontiguousarray(channel, dtype=np.float32))  # mode "F": no clipping
    out = img.resize((size_hw[1], size_hw[0]), Image.Resampling.BICUBIC)
    return np.asarray(out, dtype=np.float64)


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
    lr = _per_channel(x, lambda c: _pil_resize(c, lr_hw))
    out = _per_channel(lr, lambda c: _pil_resize(c, (h, w))) if keep_size else lr
    return out, {"scale": int(scale), "lr_shape": list(lr_hw), "kernel": "bicubic", "keep_size": bool(keep_size)}


def _kspace_band(n: int, scale: float, window: str) -> tuple[Array, int]:
    """1D k-space weights over ``np.fft.fftfreq`` order: 1 (or Hann) for ``|k| <= m``, else 0.

    ``m = (round(n / scale) - 1) // 2``; the band is symmetric, so a real image stays real and the kept
    coefficients are reproduced exactly (without a window).
    """
    k = np.fft.fftfreq(n, d=1.0 / n)
    m = (int(round(n / scale)) - 1) // 2
    inside = np.abs(k) <= m
    if window == "hann":
        weights = 0.5 * (1.0 + np.cos(np.pi * k / (m + 1)))
        return np.where(inside, weights, 0.0), m
    return inside.astype(np.float64), m


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
    wr, mr = _kspace_band(h, scale, window) if axes in ("both", "rows") else (np.ones(h), None)
    wc, mc = _kspace_band(w, scale, window) if axes in ("both", "cols") else (np.ones(w), None)
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
    sig = (sigma, sigma) + (0.0,) * (x.ndim - 2)
    return ndimage.gaussian_filter(x, sig, mode="reflect"), {"sigma": float(sigma)}


def jpeg_compression(
    image: Array, rng: np.random.Generator, quality: int, value_range: tuple[float, float] = (0.0, 1.0)
) -> Result:
    """JPEG round trip at ``quality`` (Pillow). ``value_range`` (working units) maps to 0..255 for coding."""
    x = np.asarray(image, dtype=np.float64)
    lo, hi = float(value_range[0]), float(value_range[1])
    u8 = np.round(np.clip((x - lo) / (hi - lo), 0.0, 1.0) * 255.0).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(u8).save(buf, format="JPEG", quality=int(quality))
    decoded = np.asarray(Image.open(io.BytesIO(buf.getvalue())), dtype=np.float64)
    return lo + decoded / 255.0 * (hi - lo), {"quality": int(quality), "value_range": [lo, hi]}


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


# --------------------------------------------------------------------------------------- registry

_REQUIRED = object()
_FBP_FILTERS = ("ramp", "shepp-logan", "cosine", "hamming", "hann")


@dataclass(frozen=True)
class ParamSpec:
    """One parameter: default (``_REQUIRED`` if none), a check on a concrete value and its description."""

    check: Callable[[Any], bool]
    allowed: str
    default: Any = _REQUIRED
    samplable: bool = True
    integer: bool = False                # {uniform: [a, b]} draws integers


@dataclass(frozen=True)
class DegradationSpec:
    fn: Callable[..., Result]
    params: dict[str, ParamSpec]
    task: str                            # instruction-template key (see instructions.py)
    volumetric: bool = False             # runs on the 3D volume before slicing
    context: tuple[str, ...] = ()        # filled in by the pipeline when not given: value_range, pixel_size_mm
    modality: str | None = None          # required modality (low_dose_ct needs CT in HU)
    grayscale_only: bool = False


def _num(lo: float, hi: float = math.inf, lo_open: bool = False, integer: bool = False) -> Callable[[Any], bool]:
    def check(v: Any) -> bool:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            return False
        if integer and float(v) != int(v):
            return False
        return (v > lo if lo_open else v >= lo) and v <= hi

    return check


def _one_of(*values: Any) -> Callable[[Any], bool]:
    return lambda v: v in values


DEGRADATIONS: dict[str, DegradationSpec] = {
    "bicubic_downsample": DegradationSpec(
        bicubic_downsample,
        {
            "scale": ParamSpec(_one_of(2, 3, 4), "2, 3 or 4", integer=True),
            "keep_size": ParamSpec(lambda v: v is True, "true (condition and target must have the same size)", True, False),
        },
        task="super_resolution",
    ),
    "kspace_truncation": DegradationSpec(
        kspace_truncation,
        {
            "scale": ParamSpec(_num(1.0, 16.0, lo_open=True), "a number in (1, 16]"),
            "window": ParamSpec(_one_of("none", "hann"), "'none' or 'hann'", "none"),
            "axes": ParamSpec(_one_of("both", "rows", "cols"), "'both', 'rows' or 'cols'", "both"),
        },
        task="super_resolution",
    ),
    "slice_thickness": DegradationSpec(
        slice_thickness,
        {
            "factor": ParamSpec(_num(2, 16, integer=True), "an integer in [2, 16]", integer=True),
            "thickness": ParamSpec(lambda v: v is None or _num(0.0, 64.0, lo_open=True)(v), "a number in (0, 64] (voxels)", None),
            "profile": ParamSpec(_one_of("gaussian", "rect"), "'gaussian' or 'rect'", "gaussian"),
            "axis": ParamSpec(_one_of(0, 1, 2), "0, 1 or 2", 2, False),
            "keep_size": ParamSpec(lambda v: v is True, "true (condition and target must have the same size)", True, False),
        },
        task="slice_thickness",
        volumetric=True,
    ),
    "gaussian_noise": DegradationSpec(
        gaussian_noise, {"sigma": ParamSpec(_num(0.0), "a number >= 0 (working units: HU for CT, else 0..1)")}, task="denoise"
    ),
    "rician_noise": DegradationSpec(
        rician_noise, {"sigma": ParamSpec(_num(0.0), "a number >= 0 (normalised units, 0..1)")}, task="denoise"
    ),
    "low_dose_ct": DegradationSpec(
        low_dose_ct,
        {
            "photons_per_ray": ParamSpec(_num(1.0), "a number >= 1 (incident photons per ray, I0)", 2.5e5),
            "electronic_noise_std": ParamSpec(_num(0.0), "a number >= 0 (counts)", 10.0),
            "n_angles": ParamSpec(lambda v: v is None or _num(8, 4096, integer=True)(v), "an integer in [8, 4096]", None, integer=True),
            "pixel_size_mm": ParamSpec(lambda v: v is None or _num(0.0, 100.0, lo_open=True)(v), "a number in (0, 100] (mm)", None),
            "mu_water": ParamSpec(_num(0.0, 1.0, lo_open=True), "a number in (0, 1] (1/mm)", 0.0192),
            "mode": ParamSpec(_one_of("noise_insertion", "reconstruct"), "'noise_insertion' or 'reconstruct'", "noise_insertion", False),
            "filter": ParamSpec(_one_of(*_FBP_FILTERS), ", ".join(_FBP_FILTERS) + " (scikit-image iradon)", "ramp", False),
        },
        task="low_dose_ct",
        context=("pixel_size_mm",),
        modality="CT",
        grayscale_only=True,
    ),
    "gaussian_blur": DegradationSpec(
        gaussian_blur, {"sigma": ParamSpec(_num(0.0, 64.0, lo_open=True), "a number in (0, 64] (pixels)")}, task="deblur"
    ),
    "jpeg_compression": DegradationSpec(
        jpeg_compression,
        {
            "quality": ParamSpec(_num(1, 95, integer=True), "an integer in [1, 95]", integer=True),
            "value_range": ParamSpec(
                lambda v: v is None or (isinstance(v, (list, tuple)) and len(v) == 2 and v[1] > v[0]),
                "[low, high] in working units", None, False,
            ),
        },
        task="jpeg_artifacts",
        context=("value_range",),
    ),
}


@dataclass(frozen=True)
class DegradationStep:
    """A validated chain entry: ``params`` may hold ``{'uniform': [a, b]}`` / ``{'choice': [...]}`` samplers."""

    name: str
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def spec(self) -> DegradationSpec:
        return DEGRADATIONS[self.name]


def _yaml_number(v: Any) -> Any:
    """PyYAML reads ``1.0e4`` (no sign in the exponent) as a string; accept it as the number it means."""
    if isinstance(v, str):
        try:
            return float(v) if any(c in v for c in ".eE") else int(v)
        except ValueError:
            return v
    if isinstance(v, list):
        return [_yaml_number(x) for x in v]
    if isinstance(v, dict):
        return {k: _yaml_number(x) for k, x in v.items()}
    return v


def validate_step(entry: Any, key: str) -> DegradationStep:
    """Check one YAML chain entry (``{name: ..., <param>: ...}``); raise ``ConfigError`` naming ``key``."""
    from .errors import ConfigError

    if not isinstance(entry, dict) or "name" not in entry:
        raise ConfigError.bad_value(key, entry, "a mapping with a 'name' key, e.g. {name: gaussian_noise, sigma: 0.02}")
    name = entry["name"]
    if name not in DEGRADATIONS:
        raise ConfigError.bad_value(f"{key}.name", name, ", ".join(sorted(DEGRADATIONS)))
    spec = DEGRADATIONS[name]
    params: dict[str, Any] = {}
    for p, value in entry.items():
        if p == "name":
            continue
        if p not in spec.params:
            raise ConfigError.bad_value(f"{key}.{p}", value, f"parameters of {name}: {', '.join(spec.params)}")
        ps = spec.params[p]
        value = _yaml_number(value)
        if isinstance(value, dict):
            if not ps.samplable:
                raise ConfigError.bad_value(f"{key}.{p}", value, ps.allowed + " (a fixed value)")
            if set(value) == {"uniform"} and isinstance(value["uniform"], list) and len(value["uniform"]) == 2:
                lo, hi = value["uniform"]
                if not (ps.check(lo) and ps.check(hi) and lo <= hi):
                    raise ConfigError.bad_value(f"{key}.{p}.uniform", value["uniform"], f"[low, high], each {ps.allowed}")
            elif set(value) == {"choice"} and isinstance(value["choice"], list) and value["choice"]:
                bad = [v for v in value["choice"] if not ps.check(v)]
                if bad:
                    raise ConfigError.bad_value(f"{key}.{p}.choice", bad, f"values that are each {ps.allowed}")
            else:
                raise ConfigError.bad_value(f"{key}.{p}", value, f"{ps.allowed}, or {{uniform: [low, high]}}, or {{choice: [...]}}")
        elif not ps.check(value):
            raise ConfigError.bad_value(f"{key}.{p}", value, ps.allowed)
        params[p] = value
    missing = [p for p, ps in spec.params.items() if ps.default is _REQUIRED and p not in params]
    if missing:
        raise ConfigError(f"config key '{key}' ({name}) is missing required parameter(s): {', '.join(missing)}")
    return DegradationStep(name, params)


def sample_params(step: DegradationStep, rng: np.random.Generator, context: dict[str, Any] | None = None) -> dict[str, Any]:
    """Concrete keyword arguments for one pair: defaults, then samplers drawn from ``rng``, then context."""
    spec = step.spec
    out: dict[str, Any] = {p: ps.default for p, ps in spec.params.items() if ps.default is not _REQUIRED}
    for p, value in step.params.items():
        if isinstance(value, dict) and "uniform" in value:
            lo, hi = value["uniform"]
            value = int(rng.integers(lo, hi + 1)) if spec.params[p].integer else float(rng.uniform(lo, hi))
        elif isinstance(value, dict) and "choice" in value:
            value = value["choice"][int(rng.integers(len(value["choice"])))]
        out[p] = value
    for name in spec.context:
        if out.get(name) is None and context and context.get(name) is not None:
            out[name] = context[name]
    return {k: v for k, v in out.items() if v is not None}


def apply_chain(
    steps: list[DegradationStep], x: Array, rng: np.random.Generator, context: dict[str, Any] | None = None
) -> tuple[Array, list[dict[str, Any]]]:
    """Run ``steps`` in order; returns the degraded array and one record ``{name, **used_params}`` per step."""
    records = []
    for step in steps:
        x, used = step.spec.fn(x, rng, **sample_params(step, rng, context))
        records.append({"name": step.name, **used})
    return x, records
