"""Full-reference image metrics with explicit conventions (pure numpy/scipy; inputs are numpy arrays).

Shapes: an image is (H, W) or (H, W, C) with channels last; a volume is (S, H, W). Argument order is always
``(ref, pred)``: the ground truth first, as in scikit-image (``image_true, image_test``) and fastMRI (``gt, pred``).

Conventions, never guessed:
- ``data_range`` is required for float data (``max - min`` of the intensity scale, e.g. 1.0 for [0, 1],
  the window width for CT in HU). For integer arrays it defaults to the dtype's range, as scikit-image does.
- SSIM window: ``"uniform7"`` = scikit-image's default (7x7 uniform, sample covariance) and
  ``"gaussian11"`` = Wang et al. 2004 (Gaussian sigma 1.5 truncated at 3.5 sigma = 11x11, population
  covariance); both use K1 = 0.01, K2 = 0.03, reflect padding, and average the map after cropping
  ``(win - 1) // 2`` pixels at each border. No automatic down-sampling (Wang's MATLAB code has one).
  Results name the window: ``ssim_uniform7`` / ``ssim_gaussian11``.
- fastMRI: ``data_range = gt.max()`` per volume; volume PSNR and NMSE; SSIM (uniform7) per slice, averaged.
- CT: compare in a stated HU window (``hu_window``) that maps ``[level - width/2, level + width/2]`` to [0, 1].
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
from scipy import ndimage

from bagel_sr.data import consistency


SSIM_WINDOWS = ("uniform7", "gaussian11")
_K1, _K2 = 0.01, 0.03


def ssim_key(window: str) -> str:
    """Column name of SSIM computed with ``window``: ``ssim_uniform7`` or ``ssim_gaussian11``."""
    if window not in SSIM_WINDOWS:
        raise ValueError(f"SSIM window must be one of {SSIM_WINDOWS}, got {window!r}")
    return f"ssim_{window}"


def _pair(ref: np.ndarray, pred: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    ref, pred = np.asarray(ref), np.asarray(pred)
    if ref.shape != pred.shape:
        raise ValueError(f"shape mismatch: reference {ref.shape} vs prediction {pred.shape}")
    return ref, pred


def resolve_data_range(ref: np.ndarray, data_range: float | None) -> float:
    """``data_range`` if given; the dtype range for integer ``ref``; otherwise a ValueError saying what to pass."""
    if data_range is not None:
        if not data_range > 0:
            raise ValueError(f"data_range must be > 0, got {data_range}")
        return float(data_range)
    ref = np.asarray(ref)
    if np.issubdtype(ref.dtype, np.integer):
        info = np.iinfo(ref.dtype)
        return float(info.max - info.min) if info.min < 0 else float(info.max)
    raise ValueError("data_range is required for float data: pass data_range=1.0 for images in [0, 1], "
                     "the HU window width for CT (or use hu_window), or use fastmri_volume_metrics for "
                     "fastMRI's per-volume gt.max() convention.")


def mse(ref: np.ndarray, pred: np.ndarray) -> float:
    """Mean squared error."""
    ref, pred = _pair(ref, pred)
    return float(np.mean((ref.astype(np.float64) - pred.astype(np.float64)) ** 2))


def psnr(ref: np.ndarray, pred: np.ndarray, data_range: float | None = None) -> float:
    """Peak signal-to-noise ratio ``10 log10(data_range^2 / MSE)`` in dB; ``inf`` for identical inputs."""
    dr = resolve_data_range(ref, data_range)
    err = mse(ref, pred)
    return float("inf") if err == 0 else float(10.0 * np.log10(dr * dr / err))


def nmse(ref: np.ndarray, pred: np.ndarray) -> float:
    """Normalised MSE as in fastMRI: ``||ref - pred||^2 / ||ref||^2``."""
    ref, pred = _pair(ref, pred)
    ref = ref.astype(np.float64)
    return float(np.sum((ref - pred) ** 2) / np.sum(ref ** 2))


def nrmse(ref: np.ndarray, pred: np.ndarray, normalization: str = "euclidean") -> float:
    """Normalised RMSE as scikit-image: RMSE / (``sqrt(mean(ref^2))`` | ``max - min`` | ``mean``) of ``ref``.

    With the default ``"euclidean"`` this is ``||ref - pred|| / ||ref|| = sqrt(nmse)``.
    """
    ref, pred = _pair(ref, pred)
    ref = ref.astype(np.float64)
    denom = {"euclidean": lambda: np.sqrt(np.mean(ref * ref)), "min-max": lambda: ref.max() - ref.min(),
             "mean": lambda: ref.mean()}
    if normalization not in denom:
        raise ValueError(f"normalization must be one of {sorted(denom)}, got {normalization!r}")
    return float(np.sqrt(mse(ref, pred)) / denom[normalization]())


def _ssim_map_2d(x: np.ndarray, y: np.ndarray, data_range: float, window: str) -> tuple[np.ndarray, int]:
    if window == "uniform7":
        win, cov_norm = 7, 49.0 / 48.0

        def filt(a):
            return ndimage.uniform_filter(a, size=win, mode="reflect")
    else:
        win, cov_norm = 11, 1.0

        def filt(a):
            return ndimage.gaussian_filter(a, sigma=1.5, truncate=3.5, mode="reflect")
    if min(x.shape) < win:
        raise ValueError(f"SSIM window {window} needs images of at least {win}x{win}, got {x.shape}")
    mx, my = filt(x), filt(y)
    vx = cov_norm * (filt(x * x) - mx * mx)
    vy = cov_norm * (filt(y * y) - my * my)
    vxy = cov_norm * (filt(x * y) - mx * my)
    c1, c2 = (_K1 * data_range) ** 2, (_K2 * data_range) ** 2
    smap = ((2 * mx * my + c1) * (2 * vxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return smap, (win - 1) // 2


def ssim(ref: np.ndarray, pred: np.ndarray, data_range: float | None = None, window: str = "uniform7",
         channel_axis: int | None = None) -> float:
    """Mean SSIM of (H, W) images, or of (H, W, C) with ``channel_axis=-1`` (mean over channels)."""
    ssim_key(window)
    ref, pred = _pair(ref, pred)
    dr = resolve_data_range(ref, data_range)
    ref, pred = ref.astype(np.float64), pred.astype(np.float64)
    if channel_axis is not None:
        ref, pred = np.moveaxis(ref, channel_axis, -1), np.moveaxis(pred, channel_axis, -1)
        return float(np.mean([ssim(ref[..., c], pred[..., c], dr, window) for c in range(ref.shape[-1])]))
    if ref.ndim != 2:
        raise ValueError(f"ssim expects (H, W) images (or channel_axis for (H, W, C)); got shape {ref.shape}")
    smap, pad = _ssim_map_2d(ref, pred, dr, window)
    return float(smap[pad:smap.shape[0] - pad, pad:smap.shape[1] - pad].mean())


def log_kernel(sigma: float = 1.5, size: int = 15) -> np.ndarray:
    """(size, size) Laplacian-of-Gaussian kernel, zero-sum (MATLAB ``fspecial('log')`` form).

    ``g = exp(-r^2 / 2 sigma^2) / sum(...)``, ``h = g (r^2 - 2 sigma^2) / sigma^4``, then ``h -= mean(h)``.
    """
    half = (size - 1) / 2.0
    yy, xx = np.mgrid[-half:half + 1, -half:half + 1]
    r2 = xx * xx + yy * yy
    g = np.exp(-r2 / (2.0 * sigma * sigma))
    g /= g.sum()
    h = g * (r2 - 2.0 * sigma * sigma) / sigma ** 4
    return h - h.mean()


def log_filter(x: np.ndarray, sigma: float = 1.5, size: int = 15) -> np.ndarray:
    """LoG-filtered (H, W) or (H, W, C) image (each channel separately, reflect padding)."""
    k = log_kernel(sigma, size)
    x = np.asarray(x, dtype=np.float64)
    if x.ndim == 3:
        return np.stack([ndimage.correlate(x[..., c], k, mode="reflect") for c in range(x.shape[-1])], axis=-1)
    return ndimage.correlate(x, k, mode="reflect")


def hfen(ref: np.ndarray, pred: np.ndarray, sigma: float = 1.5, size: int = 15) -> float:
    """High-frequency error norm (Ravishankar & Bresler 2011): ``||LoG(pred) - LoG(ref)|| / ||LoG(ref)||``.

    LoG: 15x15, sigma 1.5 (their setting), see ``log_kernel``.
    """
    ref, pred = _pair(ref, pred)
    lr, lp = log_filter(ref, sigma, size), log_filter(pred, sigma, size)
    return float(np.linalg.norm(lp - lr) / np.linalg.norm(lr))


def hu_window(x_hu: np.ndarray, level: float, width: float) -> np.ndarray:
    """Clip a CT image in HU to ``[level - width/2, level + width/2]`` and map it to [0, 1] (data_range 1)."""
    if not width > 0:
        raise ValueError(f"HU window width must be > 0, got {width}")
    lo = level - width / 2.0
    return np.clip((np.asarray(x_hu, dtype=np.float64) - lo) / width, 0.0, 1.0)


def image_metrics(ref: np.ndarray, pred: np.ndarray, data_range: float, window: str = "uniform7") -> dict[str, float]:
    """PSNR, SSIM (named by window), NMSE, NRMSE, HFEN of one (H, W) or (H, W, C) pair."""
    ref, pred = _pair(ref, pred)
    chan = -1 if ref.ndim == 3 else None
    return {"psnr": psnr(ref, pred, data_range), ssim_key(window): ssim(ref, pred, data_range, window, chan),
            "nmse": nmse(ref, pred), "nrmse": nrmse(ref, pred), "hfen": hfen(ref, pred)}


def fastmri_volume_metrics(gt: np.ndarray, pred: np.ndarray) -> dict[str, float]:
    """fastMRI's volume metrics of (S, H, W) magnitude volumes.

    ``data_range = gt.max()`` of this volume; NMSE and PSNR over the whole volume; SSIM (uniform7) per
    slice with that data range, averaged over slices.
    """
    gt, pred = _pair(gt, pred)
    if gt.ndim != 3:
        raise ValueError(f"fastmri_volume_metrics expects (S, H, W) volumes, got {gt.shape}")
    maxval = float(gt.max())
    slice_ssim = [ssim(gt[s], pred[s], maxval, "uniform7") for s in range(gt.shape[0])]
    return {"nmse": nmse(gt, pred), "psnr": psnr(gt, pred, maxval), "ssim_uniform7": float(np.mean(slice_ssim)),
            "data_range": maxval}


# ---------------------------------------------------------------- hallucination and calibration


def hallucination_share(ref: np.ndarray, pred: np.ndarray, data_range: float, threshold: float = 0.1) -> float:
    """Share of pixels whose ``|pred - ref|`` exceeds ``threshold * data_range`` (invented or lost structure)."""
    ref, pred = _pair(ref, pred)
    return float(np.mean(np.abs(pred.astype(np.float64) - ref) > threshold * data_range))


def background_mean(ref: np.ndarray, pred: np.ndarray, data_range: float) -> float:
    """Mean output intensity (in units of ``data_range``, above the range minimum 0) where the reference is at the
    range minimum (background); NaN when the reference has no such pixel."""
    ref, pred = _pair(ref, pred)
    mask = ref <= 1e-6 * data_range
    return float(np.mean(pred[mask]) / data_range) if mask.any() else float("nan")


def uncertainty_calibration(ref: np.ndarray, pred: np.ndarray, std: np.ndarray) -> dict[str, float]:
    """How well a per-pixel std map predicts the error: Spearman correlation of ``std`` and ``|pred - ref|``
    (``std_spearman``) and the share of pixels with ``|error| <= 2 std`` (``std_within_2``); same units."""
    from scipy.stats import spearmanr

    ref, pred = _pair(ref, pred)
    err = np.abs(pred.astype(np.float64) - ref)
    err = err.mean(-1) if err.ndim == 3 else err
    std = np.asarray(std, dtype=np.float64)
    if std.shape != err.shape:
        raise ValueError(f"std map has shape {std.shape} but the error {err.shape}")
    rho = spearmanr(std.ravel(), err.ravel()).correlation if std.std() > 0 and err.std() > 0 else float("nan")
    return {"std_spearman": float(rho), "std_within_2": float(np.mean(err <= 2 * std))}


# ---------------------------------------------------------------- data consistency


def kspace_consistency(output: np.ndarray, measured: np.ndarray, scale: float | None = None,
                       window: str | None = None, axes: str | Sequence[int] = "both",
                       reference: np.ndarray | None = None, keep_fraction: float | None = None) -> dict[str, float]:
    """Split errors of a k-space-truncation pair into the measured band and the null space.

    ``measured`` is the degraded input (zero-filled, same size as ``output``); ``scale`` (or ``keep_fraction``),
    ``window`` and ``axes`` as in ``consistency.kspace_truncation``.
    Returns
    - ``dc_band_nrmse``: ``||W F(output) - F(measured)||`` over the band / ``||F(measured)||`` over the band
      (0 when the output agrees with the measurements);
    - ``null_energy_fraction``: share of the output's k-space energy outside the band (what was filled in);
    - with ``reference``: ``err_band_nrmse`` and ``err_null_nrmse``, ``||F(output - reference)||`` on the band
      and on the null space over ``||reference||`` (their squares add up to ``nrmse^2``, Parseval), and
      ``err_band_fraction``, the band's share of the squared error.
    """
    output, measured = _pair(output, measured)
    wts = consistency.kspace_weights(output.shape, scale, window, axes, keep_fraction)
    if output.ndim == 3:
        wts = wts[..., None] * np.ones(output.shape[-1])
    band = wts > 0
    k_out = consistency.fft2c(output.astype(np.float64))
    k_meas = consistency.fft2c(measured.astype(np.float64))
    out = {"dc_band_nrmse": float(np.linalg.norm((wts * k_out - k_meas)[band]) / np.linalg.norm(k_meas[band])),
           "null_energy_fraction": float(np.sum(np.abs(k_out[~band]) ** 2) / np.sum(np.abs(k_out) ** 2))}
    if reference is not None:
        reference = _pair(reference, output)[0].astype(np.float64)
        err = consistency.fft2c(output - reference)
        ref_norm = np.linalg.norm(reference)
        e_band, e_null = np.sum(np.abs(err[band]) ** 2), np.sum(np.abs(err[~band]) ** 2)
        out.update(err_band_nrmse=float(np.sqrt(e_band) / ref_norm), err_null_nrmse=float(np.sqrt(e_null) / ref_norm),
                   err_band_fraction=float(e_band / (e_band + e_null)) if e_band + e_null > 0 else float("nan"))
    return out


def data_consistency(output: np.ndarray, degraded: np.ndarray, degradations: Sequence[dict[str, Any]],
                     data_range: float | None = None, reference: np.ndarray | None = None) -> dict[str, Any]:
    """Re-apply the pair's recorded degradation to ``output`` and compare with the ``degraded`` input.

    Noise steps (and steps across volume slices) are skipped and listed in ``dc_skipped``; the remaining error
    then includes the input's noise. Returns ``dc_nrmse`` (``||A(output) - degraded|| / ||degraded||``), ``dc_psnr`` (when
    ``data_range`` is given), ``dc_ops``, ``dc_skipped``; with ``reference`` also ``dc_ref_nrmse``, the floor the
    ground truth itself reaches (noise, or an operator that differs from the builder's). When the only
    deterministic step is ``kspace_truncation`` the ``kspace_consistency`` split is added.
    """
    degraded = np.asarray(degraded, dtype=np.float64)
    predicted, applied, skipped = consistency.apply_forward(np.asarray(output, dtype=np.float64), degradations)
    if predicted.shape != degraded.shape:
        raise ValueError(f"re-degraded output has shape {predicted.shape} but the degraded input has "
                         f"{degraded.shape} (steps: {applied})")
    res: dict[str, Any] = {"dc_nrmse": nrmse(degraded, predicted), "dc_ops": "; ".join(applied),
                           "dc_skipped": "; ".join(skipped)}
    if data_range is not None:
        res["dc_psnr"] = psnr(degraded, predicted, data_range)
    if reference is not None:
        res["dc_ref_nrmse"] = nrmse(degraded, consistency.apply_forward(np.asarray(reference, np.float64),
                                                                      degradations)[0])
    steps, _ = consistency.split_steps(degradations)
    if len(steps) == 1 and steps[0][0] == "kspace_truncation":
        p = steps[0][1]
        res.update(kspace_consistency(output, degraded, p.get("scale"), p.get("window"), p.get("axes", "both"),
                                      reference, p.get("keep_fraction")))
    return res
