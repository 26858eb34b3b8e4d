"""The pixel metrics both the evaluation (``bagel_sr.eval.metrics``) and validation during training use: PSNR,
SSIM, the hallucination share and the CT window, in numpy only (one implementation, two callers).

Shapes: an image is (H, W) or (H, W, C) channels last; argument order is ``(ref, pred)`` (ground truth first).
``data_range`` is required for float data (the dtype's range for integer arrays, as scikit-image).  SSIM windows:
``uniform7`` (scikit-image's default: 7x7 uniform, sample covariance) and ``gaussian11`` (Wang et al. 2004:
Gaussian sigma 1.5 truncated at 3.5 sigma, population covariance); K1 = 0.01, K2 = 0.03, reflect padding (the
edge sample repeated, ``d c b a | a b c d``), the map averaged after cropping ``(win - 1) // 2`` at each border.
"""
from __future__ import annotations

import numpy as np

SSIM_WINDOWS = ("uniform7", "gaussian11")
_K1, _K2 = 0.01, 0.03


def ssim_key(window: str) -> str:
    """Column name of SSIM computed with ``window``: ``ssim_uniform7`` or ``ssim_gaussian11``."""
    if window not in SSIM_WINDOWS:
        raise ValueError(f"SSIM window must be one of {SSIM_WINDOWS}, got {window!r}")
    return f"ssim_{window}"


def pair(ref: np.ndarray, pred: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Both as arrays of one shape (a ``ValueError`` naming both shapes otherwise)."""
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
    ref, pred = pair(ref, pred)
    return float(np.mean((ref.astype(np.float64) - pred.astype(np.float64)) ** 2))


def psnr(ref: np.ndarray, pred: np.ndarray, data_range: float | None = None) -> float:
    """Peak signal-to-noise ratio ``10 log10(data_range^2 / MSE)`` in dB; ``inf`` for identical inputs."""
    dr = resolve_data_range(ref, data_range)
    err = mse(ref, pred)
    return float("inf") if err == 0 else float(10.0 * np.log10(dr * dr / err))


def _kernel(window: str) -> np.ndarray:
    if window == "uniform7":
        return np.full(7, 1.0 / 7.0)
    x = np.arange(-5, 6, dtype=np.float64)  # radius int(3.5 * 1.5 + 0.5) = 5
    k = np.exp(-0.5 * x * x / 1.5 ** 2)
    return k / k.sum()


def _filter(a: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """Separable correlation of a 2-D array with a symmetric 1-D ``kernel`` on both axes, reflect padding."""
    r = len(kernel) // 2
    for axis in (0, 1):
        pad = [(0, 0), (0, 0)]
        pad[axis] = (r, r)
        p = np.pad(a, pad, mode="symmetric")
        n = a.shape[axis]
        out = np.zeros_like(a)
        for i, w in enumerate(kernel):
            out += w * (p[i:i + n] if axis == 0 else p[:, i:i + n])
        a = out
    return a


def ssim_map_2d(x: np.ndarray, y: np.ndarray, data_range: float, window: str) -> tuple[np.ndarray, int]:
    """The SSIM map of two float64 (H, W) images and the border to crop before averaging it."""
    win = 7 if window == "uniform7" else 11
    cov_norm = 49.0 / 48.0 if window == "uniform7" else 1.0
    if min(x.shape) < win:
        raise ValueError(f"SSIM window {window} needs images of at least {win}x{win}, got {x.shape}")
    k = _kernel(window)
    mx, my = _filter(x, k), _filter(y, k)
    vx = cov_norm * (_filter(x * x, k) - mx * mx)
    vy = cov_norm * (_filter(y * y, k) - my * my)
    vxy = cov_norm * (_filter(x * y, k) - mx * my)
    c1, c2 = (_K1 * data_range) ** 2, (_K2 * data_range) ** 2
    smap = ((2 * mx * my + c1) * (2 * vxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return smap, (win - 1) // 2


def ssim(ref: np.ndarray, pred: np.ndarray, data_range: float | None = None, window: str = "uniform7",
         channel_axis: int | None = None) -> float:
    """Mean SSIM of (H, W) images, or of (H, W, C) with ``channel_axis=-1`` (mean over channels)."""
    ssim_key(window)
    ref, pred = pair(ref, pred)
    dr = resolve_data_range(ref, data_range)
    ref, pred = ref.astype(np.float64), pred.astype(np.float64)
    if channel_axis is not None:
        ref, pred = np.moveaxis(ref, channel_axis, -1), np.moveaxis(pred, channel_axis, -1)
        return float(np.mean([ssim(ref[..., c], pred[..., c], dr, window) for c in range(ref.shape[-1])]))
    if ref.ndim != 2:
        raise ValueError(f"ssim expects (H, W) images (or channel_axis for (H, W, C)); got shape {ref.shape}")
    smap, pad = ssim_map_2d(ref, pred, dr, window)
    return float(smap[pad:smap.shape[0] - pad, pad:smap.shape[1] - pad].mean())


def hu_window(x_hu: np.ndarray, level: float, width: float) -> np.ndarray:
    """Clip a CT image in HU to ``[level - width/2, level + width/2]`` and map it to [0, 1] (data_range 1)."""
    if not width > 0:
        raise ValueError(f"HU window width must be > 0, got {width}")
    lo = level - width / 2.0
    return np.clip((np.asarray(x_hu, dtype=np.float64) - lo) / width, 0.0, 1.0)


def hallucination_share(ref: np.ndarray, pred: np.ndarray, data_range: float, threshold: float = 0.1) -> float:
    """Share of pixels whose ``|pred - ref|`` exceeds ``threshold * data_range`` (invented or lost structure)."""
    ref, pred = pair(ref, pred)
    return float(np.mean(np.abs(pred.astype(np.float64) - ref) > threshold * data_range))
