"""What makes a report readable: run labels from names and settings (not a folder called ``outputs``), a note when
the sample is small, one line per data-consistency metric, and console tables that fit a terminal."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Sequence

import pandas as pd

#: Folder names that say nothing about a run (skipped when a label is made from a path).
GENERIC_FOLDERS = {"outputs", "output", "out", "results", "predictions", "preds"}
#: Fewer units (images or volumes) or subjects than this get a note that the intervals are not to be trusted.
SMALL_N, SMALL_SUBJECTS = 10, 3
#: Console width of printed tables.
CONSOLE_WIDTH = 120

#: One line per metric a reader may not know (the data-consistency family first).
METRIC_NOTES = {
    "dc_nrmse": "dc_nrmse: the output degraded again by the recorded operator vs the degraded input (lower = closer "
                "to the measurements; noise steps are not re-applied, so copying the input scores 0)",
    "dc_psnr": "dc_psnr: the same comparison as dc_nrmse, in dB (higher = closer to the input)",
    "dc_ref_nrmse": "dc_ref_nrmse: dc_nrmse of the ground truth itself: the floor set by what the operator cannot "
                    "reproduce (noise, 8-bit rounding and clipping). It can be worse than an output's dc_nrmse: an "
                    "output that keeps the input's noise (the input itself scores 0) matches the input better than "
                    "the clean truth does, so a dc_nrmse below dc_ref_nrmse is no sign of a better restoration",
    "dc_band_nrmse": "dc_band_nrmse: output vs input on the kept k-space band only (0 = fully consistent)",
    "null_energy_fraction": "null_energy_fraction: share of the output's energy outside the kept band (what the "
                            "model added)",
    "err_band_nrmse": "err_band_nrmse: error against the reference inside the kept band",
    "err_null_nrmse": "err_null_nrmse: error against the reference outside the kept band (err_band^2 + err_null^2 "
                      "= nrmse^2)",
    "halluc_share": "halluc_share: share of pixels with |error| > threshold x data_range (lower is better)",
    "bg_mean": "bg_mean: mean output / data_range where the reference is background (invented signal)",
}


def path_label(path: str | Path, keep: int = 1) -> str:
    """A run's name from its outputs path: the last ``keep`` parts that are not generic folder names
    (``runs/weight0.05/outputs`` -> ``weight0.05``; ``runs/w/outputs/start_t=0.3`` -> ``w/start_t=0.3``)."""
    parts = [p for p in Path(path).resolve().parts if p not in ("/", "")]
    named = [p for p in parts if p.lower() not in GENERIC_FOLDERS]
    return "/".join(named[-keep:]) if named else Path(path).name


def pair_labels(a: str | Path, b: str | Path, given: tuple[str | None, str | None] = (None, None)) -> tuple[str, str]:
    """Labels of two runs: the given ones, else the shortest path labels that tell them apart."""
    if given[0] and given[1]:
        return given[0], given[1]
    for keep in range(1, 6):
        la, lb = path_label(a, keep), path_label(b, keep)
        if la != lb:
            break
    return given[0] or la, given[1] or lb


def small_sample_note(n_units: int, unit: str, n_images: int, subjects: Sequence[str | None]) -> str | None:
    """A warning line when there are fewer than 10 units or fewer than 3 known subjects (else None)."""
    known = {s for s in subjects if s}
    few_subjects = bool(known) and len(known) < SMALL_SUBJECTS
    if n_units >= SMALL_N and not few_subjects:
        return None
    who = f" from {len(known)} subject(s)" if known else " (subjects unknown)"
    images = f" ({n_images} images)" if unit != "image" else ""
    return (f"small sample: {n_units} {unit}(s){images}{who}. The intervals treat the {unit}s as "
            f"independent, which slices of one patient are not, so they look tighter than they are; evaluate at "
            f"least {SMALL_N} {unit}s from {SMALL_SUBJECTS} or more subjects before comparing runs")


def metric_notes(columns: Sequence[str]) -> list[str]:
    """The explanations of the metrics in ``columns`` that have one."""
    present = set(columns)
    return [line for m, line in METRIC_NOTES.items() if m in present]


def _shorten(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def fit_console(df: pd.DataFrame, where: str, width: int = CONSOLE_WIDTH, max_cell: int = 44) -> str:
    """``df`` as text no wider than ``width``: long cells shortened, columns from the right left out (named in a
    last line that points to ``where``, the file holding everything)."""
    view = df.copy()
    for c in view.columns:
        if view[c].dtype == object:
            view[c] = [_shorten(str(v), max_cell) for v in view[c]]
    shown = list(view.columns)
    text = view.to_string(index=False)
    while len(shown) > 1 and max(len(line) for line in text.splitlines()) > width:
        shown.pop()
        text = view[shown].to_string(index=False)
    left = [str(c) for c in df.columns if c not in shown]
    if left:
        text += "\n" + _shorten(f"(not shown here: {', '.join(left)}; all in {where})", width)
    return text


def slug(text: str) -> str:
    """A file-name-safe form of a label."""
    return re.sub(r"[^A-Za-z0-9._=-]+", "_", text).strip("_") or "run"
