"""Optional LPIPS from local weights only; never downloads. Without the package or the weights it is skipped."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

LpipsFn = Callable[[np.ndarray, np.ndarray, float], float]


def make_lpips(weights: str | None, net: str = "alex") -> tuple[LpipsFn | None, str]:
    """Return ``(fn, message)``; ``fn(ref, pred, data_range)`` scores (H, W[, 3]) images, or None with the reason.

    ``weights`` is a local file loadable by ``lpips.LPIPS(model_path=...)``; the backbone must already be in the
    local torch hub cache (no network access is attempted on purpose: any download failure means skip).
    """
    if not weights:
        return None, "LPIPS skipped: no local weights given (pass --lpips_weights FILE; nothing is downloaded)."
    if not Path(weights).is_file():
        return None, f"LPIPS skipped: weights file not found: {weights}"
    try:
        import lpips  # type: ignore
        import torch
    except ImportError:
        return None, "LPIPS skipped: the 'lpips' package is not installed (pip install bagel-sr[lpips])."
    try:
        model = lpips.LPIPS(net=net, model_path=str(weights), verbose=False).eval()
    except Exception as exc:  # backbone weights missing offline, bad file, ...
        return None, f"LPIPS skipped: could not build the {net} model from local files ({type(exc).__name__}: {exc})"

    def to_tensor(x: np.ndarray, data_range: float) -> "torch.Tensor":
        x = np.asarray(x, dtype=np.float32) / data_range * 2.0 - 1.0
        x = np.repeat(x[..., None], 3, axis=-1) if x.ndim == 2 else x
        return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))[None]

    def score(ref: np.ndarray, pred: np.ndarray, data_range: float) -> float:
        with torch.no_grad():
            return float(model(to_tensor(ref, data_range), to_tensor(pred, data_range)).item())

    return score, f"LPIPS ({net}) from local weights {Path(weights).name}"
