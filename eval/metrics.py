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
- PSNR, SSIM, the hallucination share and the HU window live in :mod:`bagel_sr.image_metrics` (validation during
  training uses the same ones) and are re-exported here.
- CT: compare in a stated HU window (``hu_window``) that maps ``[level - width/2, level + width/2]`` to [0, 1].
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
from scipy import ndimage

from bagel_sr.data import consistency
from bagel_sr.image_metrics import (SSIM_WINDOWS, hallucination_share, hu_window, mse,  # noqa: F401
                                    psnr, resolve_data_range, ssim, ssim_key)
from bagel_sr.image_metrics import pair as _pair


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
