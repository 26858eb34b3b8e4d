"""Synthetic lesions: inserted into the clean (HR) slices of chosen splits before the 2D degradation chain, each with
a lesion-free twin of the same slice (same degradation seed, so the same noise), and recorded next to the manifest.

Conventions (shared with ``bagel_sr.eval.lesions``, which measures them):

* geometry in pixels of the stored (cropped) image: ``center = [row, col]`` (integers), ``radius`` r;
* profiles, peak 1: ``disk`` (1 where distance <= r), ``gaussian`` (``exp(-d^2 / (2 (r/2)^2))``), ``irregular``
  (1 inside ``r (1 + sum_k a_k cos(k theta + phi_k))``, k = 2, 3);
* contrast in the set's units: HU for CT (working units are HU), else a signed fraction of the local tissue
  intensity (the clean image's mean in the ring); ``amplitude`` = the value added at the profile's peak in working
  units, ``amplitude_stored`` = the same in stored-image units ([0, 1] over the 8-bit window);
* measurement regions: lesion = distance <= r; ring = ``r + RING_GAP < d <= r + RING_GAP + max(RING_MIN, r)``;
* placement: inside the body (CT above -500 HU, else above 10% of the range) with the ring, not overlapping another
  lesion's ring, unclipped by the 8-bit window, on locally flat tissue: the clean image's own lesion-minus-ring
  difference at most a quarter of the lesion's, and the clutter at the lesion's scale (the standard deviation in the
  ring of the clean image smoothed by a Gaussian of sigma r / sqrt(2), which leaves anatomy and removes pixel noise)
  at most 0.3 of its contrast.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from scipy import ndimage

from .errors import ConfigError

SHAPES = ("disk", "gaussian", "irregular")
RING_GAP, RING_MIN = 2.0, 3.0
CT_BODY_HU = -500.0            # air / lung below this
OTHER_BODY_FRACTION = 0.1      # background below this share of the working range
FLATNESS = 0.25                # clean lesion-minus-ring difference allowed, as a share of the lesion's contrast
CLUTTER = 0.3                  # ring std of the clean image at the lesion's scale allowed, as a share of its contrast
TRIES = 200                    # placement draws per lesion
LESION_FILE = "lesions.json"
FORMAT = "bagel-sr-lesions/1"

DEFAULTS: dict[str, Any] = {
    "splits": ["test"],
    "per_slice": [1, 3],
    "radius": [1.5, 8.0],
    "contrast_hu": [10.0, 80.0],
    "contrast_fraction": [0.1, 0.4],
    "sign": "both",
    "shapes": list(SHAPES),
    "seed": None,
}


# ------------------------------------------------------------------------------------------------ config

def _pair_of(v: Any, lo: float, integer: bool = False) -> bool:
    ok_type = (lambda x: isinstance(x, int) and not isinstance(x, bool)) if integer else \
        (lambda x: isinstance(x, (int, float)) and not isinstance(x, bool))
    return isinstance(v, list) and len(v) == 2 and all(ok_type(x) for x in v) and lo <= v[0] <= v[1]


def validate_config(raw: Any, volumetric_steps: Sequence[str] = (), color: str = "gray") -> dict[str, Any] | None:
    """The ``lesions:`` block of a build config with defaults filled in (``None``: no lesions). Raises ConfigError."""
    if raw is None or raw is False:
        return None
    if raw is True:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError.bad_value("lesions", raw, "a mapping with keys " + ", ".join(DEFAULTS))
    unknown = set(raw) - set(DEFAULTS)
    if unknown:
        raise ConfigError(f"unknown config key 'lesions.{sorted(unknown)[0]}'; allowed keys here: {', '.join(DEFAULTS)}")
    d = {**DEFAULTS, **raw}
    if not (isinstance(d["splits"], list) and d["splits"] and set(d["splits"]) <= {"train", "val", "test"}):
        raise ConfigError.bad_value("lesions.splits", d["splits"], "a non-empty list of train, val, test")
    if isinstance(d["per_slice"], int) and not isinstance(d["per_slice"], bool):
        d["per_slice"] = [d["per_slice"], d["per_slice"]]
    if not _pair_of(d["per_slice"], 0, integer=True) or d["per_slice"][1] < 1:
        raise ConfigError.bad_value("lesions.per_slice", d["per_slice"], "an integer >= 1 or [min, max] (drawn per slice)")
    if not _pair_of(d["radius"], 1.0):
        raise ConfigError.bad_value("lesions.radius", d["radius"], "[min, max] in pixels, min >= 1, e.g. [1.5, 8]")
    if not _pair_of(d["contrast_hu"], 0.0) or d["contrast_hu"][1] <= 0:
        raise ConfigError.bad_value("lesions.contrast_hu", d["contrast_hu"], "[min, max] |contrast| in HU (CT), e.g. [10, 80]")
    if not _pair_of(d["contrast_fraction"], 0.0) or not 0 < d["contrast_fraction"][1] <= 1:
        raise ConfigError.bad_value("lesions.contrast_fraction", d["contrast_fraction"],
                                    "[min, max] |contrast| as a fraction of the local intensity (MR, other), e.g. [0.1, 0.4]")
    if d["sign"] not in ("both", "positive", "negative"):
        raise ConfigError.bad_value("lesions.sign", d["sign"], "both, positive or negative")
    if not (isinstance(d["shapes"], list) and d["shapes"] and set(d["shapes"]) <= set(SHAPES)):
        raise ConfigError.bad_value("lesions.shapes", d["shapes"], "a non-empty list of " + ", ".join(SHAPES))
    if d["seed"] is not None and not (isinstance(d["seed"], int) and not isinstance(d["seed"], bool)):
        raise ConfigError.bad_value("lesions.seed", d["seed"], "an integer or null (= the set's seed)")
    if color != "gray":
        raise ConfigError("config key 'lesions': lesions are inserted into grayscale slices; set input.color: gray")
    if volumetric_steps:
        raise ConfigError(f"config key 'lesions': lesions are inserted per slice before the 2D degradations; the "
                          f"volumetric step(s) {', '.join(volumetric_steps)} would not see them. Drop them or the "
                          "lesions block")
    return d


# ------------------------------------------------------------------------------------------------ geometry

def ring_radii(radius: float) -> tuple[float, float]:
    """Inner and outer radius of the background ring of a lesion of ``radius`` (pixels)."""
    inner = radius + RING_GAP
    return inner, inner + max(RING_MIN, radius)


def _distance(shape: tuple[int, int], center: Sequence[float]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[: shape[0], : shape[1]].astype(np.float64)
    dy, dx = yy - center[0], xx - center[1]
    return np.hypot(dy, dx), dy, dx


def profile(shape: tuple[int, int], center: Sequence[float], radius: float, kind: str,
            params: dict | None = None) -> np.ndarray:
    """The lesion's profile (peak 1) on an image of ``shape``."""
    d, dy, dx = _distance(shape, center)
    if kind == "disk":
        return (d <= radius).astype(np.float64)
    if kind == "gaussian":
        return np.exp(-d ** 2 / (2 * (radius / 2.0) ** 2))
    if kind == "irregular":
        theta = np.arctan2(dy, dx)
        edge = np.full_like(d, radius)
        for k, a, phi in zip((2, 3), params["a"], params["phi"]):
            edge = edge + radius * a * np.cos(k * theta + phi)
        return (d <= edge).astype(np.float64)
    raise ValueError(f"unknown lesion shape {kind!r}; allowed: {', '.join(SHAPES)}")


def regions(shape: tuple[int, int], center: Sequence[float], radius: float) -> tuple[np.ndarray, np.ndarray]:
    """Boolean masks (lesion, ring) of the measurement convention."""
    d = _distance(shape, center)[0]
    inner, outer = ring_radii(radius)
    return d <= radius, (d > inner) & (d <= outer)


def contrast(image: np.ndarray, center: Sequence[float], radius: float) -> float:
    """Mean in the lesion region minus mean in its ring (the image's units)."""
    les, ring = regions(image.shape[:2], center, radius)
    return float(image[les].mean() - image[ring].mean())


def body_mask(working: np.ndarray, unit: str, working_range: tuple[float, float]) -> np.ndarray:
    """Pixels inside the body: above -500 HU for CT, else above 10% of the working range."""
    if unit == "HU":
        return working > CT_BODY_HU
    lo, hi = working_range
    return working > lo + OTHER_BODY_FRACTION * (hi - lo)


def body_threshold_stored(unit: str, working_range: tuple[float, float]) -> float:
    """The body threshold in stored-image units ([0, 1] over the window); at least one 8-bit level."""
    lo, hi = working_range
    t = (CT_BODY_HU - lo) / (hi - lo) if unit == "HU" else OTHER_BODY_FRACTION
    return float(max(t, 1.0 / 255.0))


# ------------------------------------------------------------------------------------------------ insertion

def _draw(rng: np.random.Generator, cfg: dict, unit: str) -> dict:
    kind = str(cfg["shapes"][int(rng.integers(len(cfg["shapes"])))])
    r = float(np.round(rng.uniform(*cfg["radius"]), 2))
    lo, hi = cfg["contrast_hu"] if unit == "HU" else cfg["contrast_fraction"]
    mag = float(np.round(rng.uniform(lo, hi), 1 if unit == "HU" else 3))
    sign = {"positive": 1.0, "negative": -1.0}.get(cfg["sign"], 1.0 if rng.random() < 0.5 else -1.0)
    params = None
    if kind == "irregular":
        params = {"a": [float(np.round(v, 3)) for v in rng.uniform(0.1, 0.25, 2)],
                  "phi": [float(np.round(v, 3)) for v in rng.uniform(0, 2 * np.pi, 2)]}
    return {"shape": kind, "radius": r, "contrast": sign * mag, "shape_params": params}


def insert_lesions(hr: np.ndarray, cfg: dict, rng: np.random.Generator, unit: str,
                   working_range: tuple[float, float]) -> tuple[np.ndarray, list[dict]]:
    """``hr`` (H, W) in working units -> (copy with lesions added, their records). ``unit``: ``"HU"`` (CT: contrast
    in HU) or anything else (contrast = fraction of the local intensity). Fewer lesions than drawn when the slice has
    no room left (each lesion gets ``TRIES`` placement draws)."""
    if hr.ndim != 2:
        raise ValueError(f"lesions need grayscale slices (H, W); got shape {hr.shape} (set input.color: gray)")
    lo, hi = working_range
    out = np.array(hr, dtype=np.float64, copy=True)
    body_dist = ndimage.distance_transform_edt(body_mask(hr, unit, working_range))
    n = int(rng.integers(cfg["per_slice"][0], cfg["per_slice"][1] + 1))
    placed: list[dict] = []
    smoothed: dict[float, np.ndarray] = {}
    for _ in range(n):
        for _ in range(TRIES):
            les = _draw(rng, cfg, unit)
            r = les["radius"]
            outer = ring_radii(r)[1]
            cand = np.argwhere(body_dist > outer + 1)
            if not len(cand):
                continue
            cy, cx = (int(v) for v in cand[int(rng.integers(len(cand)))])
            if any(np.hypot(cy - p["center"][0], cx - p["center"][1]) <= outer + ring_radii(p["radius"])[1]
                   for p in placed):
                continue
            les_mask, ring_mask = regions(hr.shape, (cy, cx), r)
            local = float(hr[ring_mask].mean())
            amp = les["contrast"] if unit == "HU" else les["contrast"] * local
            if unit != "HU" and local <= lo:
                continue
            prof = profile(hr.shape, (cy, cx), r, les["shape"], les["shape_params"])
            added = out + amp * prof
            if added[prof > 0].min() < lo or added[prof > 0].max() > hi:   # clipped by the 8-bit window
                continue
            expected = amp * (prof[les_mask].mean() - prof[ring_mask].mean())
            if abs(contrast(hr, (cy, cx), r)) > FLATNESS * abs(expected):  # background not flat
                continue
            sigma = round(r / np.sqrt(2.0), 1)
            if sigma not in smoothed:
                smoothed[sigma] = ndimage.gaussian_filter(np.asarray(hr, dtype=np.float64), sigma)
            if smoothed[sigma][ring_mask].std() > CLUTTER * abs(amp):  # anatomy at the lesion's scale
                continue
            out = added
            placed.append({**les, "center": [cy, cx], "amplitude": float(amp),
                           "amplitude_stored": float(amp / (hi - lo)), "local_mean": local})
            break
    return out, placed


def variants(pair_id: str, hr: np.ndarray, cfg: dict, rng: np.random.Generator, unit: str,
             working_range: tuple[float, float]) -> list[tuple[str, np.ndarray, dict]]:
    """``[(lesion pair id, HR with lesions, its manifest block), (pair id, HR, the twin's block)]``."""
    with_lesions, recs = insert_lesions(hr, cfg, rng, unit, working_range)
    lesion_id = f"{pair_id}_lesion"
    body = body_threshold_stored(unit, working_range)
    unit_name = "HU" if unit == "HU" else "fraction"
    for i, rec in enumerate(recs):
        rec.update(lesion_id=f"{lesion_id}_{i}", unit=unit_name)
    return [(lesion_id, with_lesions, {"role": "lesion", "twin": pair_id, "body_threshold": body, "records": recs}),
            (pair_id, hr, {"role": "twin", "of": lesion_id, "body_threshold": body})]


# ------------------------------------------------------------------------------------------------ the record file

def write_lesion_file(out_dir: Path, manifest_rows: Sequence[dict], cfg: dict) -> Path:
    """``lesions.json`` next to the manifest: the conventions, one entry per lesion image (with its twin) and every
    lesion (image, centre, radius, contrast, shape)."""
    images, lesions = [], []
    for row in manifest_rows:
        block = row.get("lesions") or {}
        if block.get("role") != "lesion":
            continue
        src = row.get("source") or {}
        subject = row.get("group") or src.get("id") or row["pair_id"]
        images.append({"pair_id": row["pair_id"], "twin_id": block["twin"], "split": row.get("split"),
                       "subject": subject, "body_threshold": block["body_threshold"], "n_lesions": len(block["records"]),
                       "pixel_size_mm": src.get("pixel_size_mm")})
        px = src.get("pixel_size_mm")
        for rec in block["records"]:
            mm = float(rec["radius"] * px) if isinstance(px, (int, float)) and px else None
            lesions.append({"pair_id": row["pair_id"], "twin_id": block["twin"], "subject": subject,
                            "split": row.get("split"), "radius_mm": mm, **rec})
    doc = {"format": FORMAT, "config": cfg,
           "conventions": {"center": "[row, col] in pixels of the stored image", "radius": "pixels",
                           "contrast": "HU for CT; else a signed fraction of the local tissue intensity",
                           "amplitude_stored": "peak added value in stored-image units ([0, 1] over the 8-bit window)",
                           "lesion region": "distance <= radius",
                           "ring": f"radius + {RING_GAP:g} < distance <= radius + {RING_GAP:g} + max({RING_MIN:g}, radius)",
                           "body_threshold": "stored value above which a pixel is inside the body"},
           "images": images, "lesions": lesions}
    path = Path(out_dir) / LESION_FILE
    path.write_text(json.dumps(doc, indent=1), encoding="utf-8")
    return path
