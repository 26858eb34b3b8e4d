"""Data-consistency projection of a restored image onto what the degraded input measured.

Iterative back-projection with the evaluation's own forward operators (``eval/operators.py``, the same ``A`` as the
data-consistency metric): ``x <- x + B(y - A(x))``, ``B`` the bicubic up-sampling back to the output's size when
``A(x)`` is smaller, else the identity.  For a k-space truncation with the plain band ``A`` is an orthogonal
projector, so one step replaces the measured band of ``x`` with the input's and keeps the rest of k-space; for a
bicubic down-sampling it is classic iterative back-projection (Irani & Peleg).  Stochastic steps (noise) are not
re-applied, so a pure denoising pair has nothing to project on and is left unchanged.  Only linear steps are
projected (``LINEAR``); anything else (JPEG) leaves the image unchanged and says so.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from . import operators

LINEAR = ("bicubic_downsample", "kspace_truncation", "gaussian_blur")


def projection_steps(degradations: Sequence[dict[str, Any]]) -> tuple[list[str], str]:
    """The deterministic step names a projection uses and, when none can be used, why (else '')."""
    steps, _ = operators.split_steps(degradations)
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
        residual = y - operators.apply_forward(x, degradations)[0]
        if residual.shape[:2] != x.shape[:2]:
            residual = operators.bicubic_upsample(residual, 1.0, out_shape=x.shape[:2])
        x = x + residual
    return x, ""
