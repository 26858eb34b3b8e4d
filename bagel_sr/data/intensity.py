"""Intensity handling: CT windows, MR/image normalisation, the single float -> 8-bit conversion.

Conventions
-----------
* *physical* values: HU for CT (after DICOM rescale slope/intercept), scanner units otherwise.
* *working* values, in which degradations run: HU for CT; for everything else the physical value
  normalised so that ``low -> 0`` and ``high -> 1`` (values outside [0, 1] are kept until the end).
* the 8-bit pixel ``p`` maps back to physical units by ``low + p / 255 * (high - low)`` (pixels at 0 or
  255 may have been clipped). ``low``/``high`` are stored per pair in the manifest.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

#: Named CT windows, ``name -> (level, width)`` in HU (common radiology presets).
CT_WINDOWS: dict[str, tuple[float, float]] = {
    "abdomen": (40.0, 400.0),       # = [-160, 240] HU, the usual low-dose CT display range
    "soft_tissue": (50.0, 350.0),
    "mediastinum": (50.0, 350.0),
    "liver": (30.0, 150.0),
    "brain": (40.0, 80.0),
    "subdural": (75.0, 215.0),
    "stroke": (40.0, 40.0),
    "lung": (-600.0, 1500.0),
    "bone": (400.0, 1800.0),
    "temporal_bone": (600.0, 2800.0),
    "full": (1023.5, 4095.0),       # = [-1024, 3071] HU, the 12-bit CT range
}

INTENSITY_MODES = ("auto", "ct_window", "percentile", "minmax", "dtype", "fixed")


@dataclass(frozen=True)
class IntensityMapping:
    """Physical <-> working <-> 8-bit mapping of one source (a volume or a 2D image).

    ``working == "physical"`` (CT): degradations see HU. ``working == "normalised"``: they see
    ``(x - low) / (high - low)``.
    """

    mode: str
    unit: str
    low: float
    high: float
    working: str
    details: dict[str, Any] = field(default_factory=dict)

    def to_working(self, physical: np.ndarray) -> np.ndarray:
        x = np.asarray(physical, dtype=np.float64)
        if self.working == "physical":
            return x
        return (x - self.low) / (self.high - self.low)

    def working_range(self) -> tuple[float, float]:
        """Working values shown as pixel 0 and 255."""
        return (self.low, self.high) if self.working == "physical" else (0.0, 1.0)

    def to_uint8(self, working: np.ndarray) -> np.ndarray:
        """The one and only conversion to 8 bits: clip to the display range, round."""
        lo, hi = self.working_range()
        x = (np.asarray(working, dtype=np.float64) - lo) / (hi - lo)
        return np.round(np.clip(x, 0.0, 1.0) * 255.0).astype(np.uint8)

    def pixel_to_physical(self, pixel: np.ndarray) -> np.ndarray:
        return self.low + np.asarray(pixel, dtype=np.float64) / 255.0 * (self.high - self.low)

    def as_dict(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "unit": self.unit,
            "low": float(self.low),
            "high": float(self.high),
            "working": self.working,
            "to_physical": "low + pixel / 255 * (high - low)",
            **self.details,
        }


def ct_window(window: str | dict[str, float]) -> tuple[float, float, dict[str, Any]]:
    """Resolve a window preset name or ``{level, width}`` to ``(low, high, details)`` in HU."""
    if isinstance(window, str):
        if window not in CT_WINDOWS:
            raise KeyError(window)
        level, width = CT_WINDOWS[window]
        details = {"window": window, "level": level, "width": width}
    else:
        level, width = float(window["level"]), float(window["width"])
        details = {"window": "custom", "level": level, "width": width}
    return level - width / 2.0, level + width / 2.0, details


def dtype_range(dtype: np.dtype) -> tuple[float, float] | None:
    """Full range of an integer dtype (``uint16 -> (0, 65535)``); ``None`` for floats."""
    dtype = np.dtype(dtype)
    if dtype == np.bool_:
        return 0.0, 1.0
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        return float(info.min), float(info.max)
    return None


def auto_mode(modality: str, is_image_file: bool, source_dtype: np.dtype) -> str:
    """Default mode: CT -> window, MR -> percentile, integer image files -> dtype range, else min/max."""
    if modality == "CT":
        return "ct_window"
    if modality == "MR":
        return "percentile"
    if is_image_file and dtype_range(source_dtype) is not None:
        return "dtype"
    return "minmax"


def compute_mapping(
    physical: np.ndarray,
    *,
    modality: str,
    mode: str,
    window: str | dict[str, float] = "abdomen",
    percentiles: tuple[float, float] = (0.0, 99.5),
    fixed_range: tuple[float, float] | None = None,
    source_dtype: np.dtype = np.dtype(np.float64),
    is_image_file: bool = False,
    bits_stored: int | None = None,
) -> IntensityMapping:
    """Build the mapping of one source from its clean physical array (stats over the whole volume)."""
    if mode == "auto":
        mode = auto_mode(modality, is_image_file, source_dtype)
    unit = "HU" if modality == "CT" else "raw"
    working = "physical" if modality == "CT" else "normalised"
    x = np.asarray(physical, dtype=np.float64)
    details: dict[str, Any] = {}
    if mode == "ct_window":
        low, high, details = ct_window(window)
    elif mode == "percentile":
        low, high = (float(v) for v in np.percentile(x, percentiles))
        details = {"percentiles": [float(p) for p in percentiles]}
    elif mode == "minmax":
        low, high = float(x.min()), float(x.max())
    elif mode == "dtype":
        rng = dtype_range(source_dtype)
        if rng is not None and bits_stored and rng[0] == 0:  # unsigned data of a declared/detected depth
            rng = (0.0, float(2 ** int(bits_stored) - 1))
        if rng is None:  # float data has no dtype range: fall back to min/max and say so
            mode, (low, high) = "minmax", (float(x.min()), float(x.max()))
            details = {"fallback_from": "dtype"}
        else:
            low, high = rng
            details = {"dtype": str(np.dtype(source_dtype))}
            if bits_stored:
                details["bits_stored"] = int(bits_stored)
    elif mode == "fixed":
        assert fixed_range is not None
        low, high = float(fixed_range[0]), float(fixed_range[1])
    else:
        raise ValueError(f"unknown intensity mode {mode!r}; allowed: {', '.join(INTENSITY_MODES)}")
    if not high > low:  # constant input: any non-empty range keeps the mapping invertible
        high = low + 1.0
    return IntensityMapping(mode=mode, unit=unit, low=low, high=high, working=working, details=details)
