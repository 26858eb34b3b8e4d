"""CT evaluation in HU: images in HU (``.npy``, float TIFF) or 8-bit images of the data builder, mapped back to HU
with the intensity mapping that its manifest records for each pair (``pixel p -> low + p / 255 * (high - low)``).

``--hu_window LEVEL,WIDTH`` then clips HU to ``[level - width/2, level + width/2]`` and maps it to [0, 1].
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from bagel_sr.errors import BadInput

from . import metrics as M


def stored_hu_range(intensity: dict | None) -> tuple[float, float] | None:
    """``(low, high)`` HU of pixel 0 and the top pixel value when the builder stored this pair from HU, else None."""
    if intensity and intensity.get("unit") == "HU" and "low" in intensity and "high" in intensity:
        return float(intensity["low"]), float(intensity["high"])
    return None


def refusal(path: str | Path, intensity: dict | None) -> str:
    """The one line that says why integer images cannot be read as HU, and what to do."""
    if intensity:
        return (f"{path}: --hu_window needs CT values in HU, but the data builder stored this pair from "
                f"unit {intensity.get('unit', '?')!r} (modality not CT); drop --hu_window (metrics then use the "
                "stored [0, 1] scale) or rebuild the set with input.modality: CT")
    return (f"{path}: --hu_window needs images stored in HU (.npy or float TIFF), or the data builder's images with "
            "their manifest (--manifest manifest.jsonl, which records how pixels map back to HU)")


def windowed(array: np.ndarray, was_integer: bool, path: str | Path, intensity: dict | None,
             hu_window: tuple[float, float]) -> np.ndarray:
    """``array`` (integer images already scaled to [0, 1]) in HU, clipped to ``hu_window`` and mapped to [0, 1]."""
    if was_integer:
        rng = stored_hu_range(intensity)
        if rng is None:
            raise BadInput(refusal(path, intensity))
        array = rng[0] + np.asarray(array, dtype=np.float64) * (rng[1] - rng[0])
    return M.hu_window(array, *hu_window)


def check_pairs(pairs: Sequence, hu_window: tuple[float, float] | None) -> None:
    """Refuse (one line) a ``hu_window`` that the pairs' references cannot be read in: the check ``plan`` shares."""
    if not hu_window:
        return
    level, width = hu_window
    if not width > 0:
        raise BadInput(f"hu_window {level:g},{width:g}: the width must be > 0 (LEVEL,WIDTH in HU, e.g. 40,400)")
    for p in pairs:  # PNG is always integer; a TIFF's type is known once read (evaluate refuses it then)
        if stored_hu_range(p.intensity) is None and (p.intensity or Path(p.reference).suffix.lower() == ".png"):
            raise BadInput(refusal(p.reference, p.intensity))


def window_note(pairs: Sequence, hu_window: tuple[float, float] | None) -> str | None:
    """A note when the evaluation window reaches outside the HU range the builder stored (clipped there)."""
    if not hu_window:
        return None
    ranges = sorted({r for r in (stored_hu_range(p.intensity) for p in pairs) if r})
    if not ranges:
        return None
    lo, hi = hu_window[0] - hu_window[1] / 2, hu_window[0] + hu_window[1] / 2
    shown = ", ".join(f"[{a:g}, {b:g}]" for a, b in ranges[:3])
    text = (f"8-bit images mapped back to HU with the builder's recorded range {shown} HU, then windowed; data "
            "consistency runs in HU")
    if any(lo < a or hi > b for a, b in ranges):
        text += (f"; the evaluation window [{lo:g}, {hi:g}] HU reaches outside it, where the stored images are "
                 "clipped (both output and reference), so differences there are not measured")
    return text
