"""The conventions of one evaluation (:class:`EvalSettings`) and the image as the metrics see it (:func:`prepare`):
shared by the evaluation (``evaluate.py``), its worst-cases figure and ablate's checks."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from bagel_sr.errors import BadInput

from . import hu
from . import metrics as M
from .images import LoadedImage


@dataclass
class EvalSettings:
    """Conventions of one evaluation; all of them are written into the summary."""

    data_range: float | None = None
    window: str = "uniform7"
    color: str = "gray"
    convention: str = "plain"  # or "fastmri": data_range = gt.max() per volume
    hu_window: tuple[float, float] | None = None  # (level, width) in HU
    data_consistency: bool = True
    lpips_weights: str | None = None
    bits_stored: int | None = None  # bit depth of integer images (else their container's)
    hallucination_threshold: float = 0.1  # share of pixels with |error| > this * data_range

    def __post_init__(self) -> None:
        if self.bits_stored is not None and not 1 <= int(self.bits_stored) <= 32:
            raise BadInput(f"--bits_stored {self.bits_stored}: expected an integer in [1, 32]")
        M.ssim_key(self.window)
        if self.convention not in ("plain", "fastmri"):
            raise BadInput(f"convention must be 'plain' or 'fastmri', got {self.convention!r}")
        if self.convention == "fastmri" and (self.hu_window or self.data_range is not None):
            raise BadInput("the fastMRI convention sets data_range = gt.max() per volume: drop --data_range "
                             "and --hu_window")

    def describe(self) -> dict[str, str]:
        if self.convention == "fastmri":
            dr = "fastMRI: max of the ground truth per volume"
        elif self.hu_window:
            dr = f"1.0 after the HU window level {self.hu_window[0]:g} / width {self.hu_window[1]:g}"
        elif self.data_range is not None:
            dr = f"{self.data_range:g} (given)"
        else:
            dr = ("1.0 (integer images scaled to [0, 1] by " + (f"2^{self.bits_stored} - 1, --bits_stored)"
                  if self.bits_stored else "their dtype maximum; --bits_stored for 12-bit data in 16-bit files)"))
        windows = {"uniform7": "uniform 7x7, sample covariance (scikit-image default)",
                   "gaussian11": "Gaussian 11x11, sigma 1.5 (Wang et al. 2004)"}
        return {"data_range": dr, "SSIM window": windows[self.window],
                "colour": self.color, "convention": self.convention,
                "HFEN": "15x15 LoG, sigma 1.5, normalised by the reference's LoG norm",
                "halluc_share": f"share of pixels with |error| > {self.hallucination_threshold:g} x data_range",
                "bg_mean": "mean output / data_range where the reference is at the range minimum (background)",
                "std_spearman, std_within_2": "with OUTPUTS/std/<id>.npy (infer --num_samples): Spearman of std "
                                              "and |error|, share of pixels with |error| <= 2 std"}


def prepare(img: LoadedImage, s: EvalSettings, intensity: dict | None = None) -> np.ndarray:
    """The image as metrics see it: with ``hu_window``, in HU (builder images via their ``intensity``), windowed."""
    if s.hu_window:
        return hu.windowed(img.array, img.was_integer, img.path, intensity, s.hu_window)
    return img.array
