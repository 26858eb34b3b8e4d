"""Lesion study: are inserted lesions kept, and are none invented? Measures a restoration against the records of a
lesion set (``lesions.json`` of the data builder, or one made by :func:`bagel_sr.data.lesions.variants`).

Images are compared in stored units ([0, 1] over the builder's window); contrasts are ratios, so units cancel.

* contrast recovery (CR) of a lesion = (mean in lesion - mean in ring) of the image / the same of the truth;
  ``erased`` = CR < 0.5 (:data:`ERASED_BELOW`);
* detector: a scale-normalised Laplacian-of-Gaussian (``-sigma^2 LoG``, ``sigma = r / sqrt(2)``, the matched scale of
  a disk of radius r) per channel = (detector radius, sign); radii are the lesions' radii snapped to the bank
  :data:`BANK`. Each channel's response is divided by the local background variation, the standard deviation in the
  ring around each pixel (floored by its 5th percentile over the body of the system's own lesion-free twins, the
  flattest tissue's level, and at least half an 8-bit level), so an edge of
  anatomy scores low and a blob on flat tissue high (a contrast-to-noise score); peaks are found per channel and merged across channels (greedy, strongest first; a peak within the sum of
  the two radii of a stronger one, such as a bright blob's dark side lobes, is the same detection);
* threshold: one per system (truth, degraded input, each restoration), set on that system's lesion-free twins so the
  mean number of false detections **per image** is the stated rate (``fp_per_image``);
* a lesion is detected when its own channel's normalised response within ``max(2, r / 2)`` pixels of its centre
  reaches the threshold; **invented** = detections in the lesion image that are farther than the ring's outer radius
  from every inserted lesion and not within ``max(2, r)`` of a detection in the truth;
* intervals: per-subject means, bootstrapped over subjects (:mod:`bagel_sr.eval.stats`).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pandas as pd
from scipy import ndimage

from bagel_sr.data import lesions as L
from bagel_sr.errors import BadInput, MissingInput

from . import stats

ERASED_BELOW = 0.5
BANK = tuple(float(v) for v in 1.5 * np.sqrt(2.0) ** np.arange(6))  # 1.5 ... 8.5 px
DEFAULT_FP_PER_IMAGE = 0.25
FLOOR_PERCENTILE = 5  # the local-variation floor: this percentile of the ring std over the twins' bodies (flat tissue)


# ------------------------------------------------------------------------------------------------ records

@dataclass
class LesionSet:
    """The records of a lesion set: ``images`` (pair_id, twin_id, subject, body_threshold) and ``lesions``."""

    images: list[dict]
    lesions: list[dict]
    conventions: dict = field(default_factory=dict)

    def lesions_of(self, pair_id: str) -> list[dict]:
        return [r for r in self.lesions if r["pair_id"] == pair_id]


def load_lesion_file(path: str | Path) -> LesionSet:
    """Read ``lesions.json``; one clear error for a missing or malformed file."""
    path = Path(path)
    if not path.is_file():
        raise MissingInput(f"--lesions {path}: no such file (the data builder writes lesions.json next to the "
                           "manifest when the config has a lesions block)")
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        images, lesions = doc["images"], doc["lesions"]
        for r in lesions:
            r["center"], r["radius"], r["amplitude_stored"] = [int(v) for v in r["center"]], float(r["radius"]), \
                float(r["amplitude_stored"])
        for im in images:
            im["pair_id"], im["twin_id"] = str(im["pair_id"]), str(im["twin_id"])
    except (ValueError, KeyError, TypeError) as e:
        raise BadInput(f"--lesions {path} is not a lesion record file ({type(e).__name__}: {e}); expected the "
                       "builder's lesions.json") from None
    if not images:
        raise BadInput(f"--lesions {path} lists no lesion images")
    return LesionSet(images, lesions, doc.get("conventions", {}))


# ------------------------------------------------------------------------------------------------ detector

def detector_radius(radius: float) -> float:
    """The bank radius nearest to ``radius`` (in log scale)."""
    return min(BANK, key=lambda b: abs(np.log(b / radius)))


def channels_for(lesions: Sequence[dict]) -> list[tuple[float, int]]:
    """(detector radius, sign) channels: the bank radii of the lesions, both signs (invented ones may be either)."""
    radii = sorted({detector_radius(r["radius"]) for r in lesions}) or [BANK[2]]
    return [(r, s) for r in radii for s in (1, -1)]


def response(image: np.ndarray, radius: float, sign: int) -> np.ndarray:
    """Signed, scale-normalised LoG response: high at a blob of ``radius`` with contrast of ``sign``."""
    sigma = radius / np.sqrt(2.0)
    return -sign * sigma ** 2 * ndimage.gaussian_laplace(np.asarray(image, dtype=np.float64), sigma, mode="reflect")


def channel_mask(body: np.ndarray, radius: float) -> np.ndarray:
    """Where a channel may report a detection: the body eroded by the ring's outer radius."""
    return ndimage.distance_transform_edt(body) > L.ring_radii(radius)[1]


def ring_std(image: np.ndarray, radius: float) -> np.ndarray:
    """Standard deviation of ``image`` in the ring (:func:`bagel_sr.data.lesions.ring_radii`) around every pixel."""
    from scipy.signal import fftconvolve

    inner, outer = L.ring_radii(radius)
    n = int(np.ceil(outer))
    d = np.hypot(*np.mgrid[-n:n + 1, -n:n + 1])
    kernel = ((d > inner) & (d <= outer)).astype(np.float64)
    kernel /= kernel.sum()
    x = np.pad(np.asarray(image, dtype=np.float64), n, mode="reflect")
    mean, sq = fftconvolve(x, kernel, mode="valid"), fftconvolve(x * x, kernel, mode="valid")
    return np.sqrt(np.clip(sq - mean * mean, 0.0, None))


@dataclass
class Detector:
    """Per-channel floor of the local variation (a low percentile of the ring std over the twins' bodies) and one threshold on the
    score ``response / sqrt(ring_std^2 + floor^2)``."""

    channels: list[tuple[float, int]]
    floor: dict[tuple[float, int], float]
    threshold: float = float("inf")
    fp_per_image: float = DEFAULT_FP_PER_IMAGE
    achieved_fp_per_image: float = float("nan")

    def score(self, image: np.ndarray, channel: tuple[float, int]) -> np.ndarray:
        return response(image, *channel) / np.sqrt(ring_std(image, channel[0]) ** 2 + self.floor[channel] ** 2)

    def scores(self, image: np.ndarray) -> dict[tuple[float, int], np.ndarray]:
        return {c: self.score(image, c) for c in self.channels}

    def peaks(self, image: np.ndarray, body: np.ndarray) -> list[tuple[float, int, int, float]]:
        """All merged peaks ``(score, row, col, radius)``, strongest first (no threshold)."""
        found = []
        for (r, s), z in self.scores(image).items():
            size = 2 * int(np.ceil(r)) + 1
            is_max = (z == ndimage.maximum_filter(z, size=size, mode="nearest")) & channel_mask(body, r) & (z > 0)
            found += [(float(z[y, x]), int(y), int(x), r) for y, x in np.argwhere(is_max)]
        found.sort(key=lambda p: -p[0])
        kept: list[tuple[float, int, int, float]] = []
        for p in found:
            if all(np.hypot(p[1] - q[1], p[2] - q[2]) > p[3] + q[3] for q in kept):  # overlapping blobs: one
                kept.append(p)
        return kept

    def detections(self, image: np.ndarray, body: np.ndarray) -> list[tuple[float, int, int, float]]:
        return [p for p in self.peaks(image, body) if p[0] >= self.threshold]

    def lesion_score(self, image: np.ndarray, lesion: dict) -> float:
        """The lesion's own channel's score, maximal within ``max(2, r/2)`` of its centre."""
        c = (detector_radius(lesion["radius"]), 1 if lesion["amplitude_stored"] > 0 else -1)
        z = self.score(image, c)
        d = np.hypot(*np.meshgrid(np.arange(image.shape[0]) - lesion["center"][0],
                                  np.arange(image.shape[1]) - lesion["center"][1], indexing="ij"))
        return float(z[d <= max(2.0, lesion["radius"] / 2)].max())


def calibrate(twins: Sequence[np.ndarray], bodies: Sequence[np.ndarray], channels: list[tuple[float, int]],
              fp_per_image: float = DEFAULT_FP_PER_IMAGE) -> Detector:
    """A detector whose threshold gives ``fp_per_image`` false detections per image on ``twins`` (lesion-free): the
    threshold is the ``k+1``-th highest merged peak score, ``k = floor(fp_per_image * len(twins))``."""
    if not twins:
        raise BadInput("the lesion study needs the lesion-free twins (their outputs too) to set the detector threshold")
    floor = {}
    for r in sorted({c[0] for c in channels}):
        vals = np.concatenate([ring_std(t, r)[b] for t, b in zip(twins, bodies)])
        low = float(np.percentile(vals, FLOOR_PERCENTILE)) if vals.size else 0.0
        floor[(r, 1)] = floor[(r, -1)] = max(low, 0.5 / 255)  # at least half an 8-bit level
    det = Detector(channels, {c: floor[c] for c in channels}, fp_per_image=fp_per_image)
    scores = sorted((p[0] for t, b in zip(twins, bodies) for p in det.peaks(t, b)), reverse=True)
    k = int(np.floor(fp_per_image * len(twins) + 1e-9))
    det.threshold = float(np.nextafter(scores[k], np.inf)) if k < len(scores) else (scores[-1] if scores else 0.0)
    det.achieved_fp_per_image = sum(s >= det.threshold for s in scores) / len(twins)
    return det


# ------------------------------------------------------------------------------------------------ the study

@dataclass
class StudyImages:
    """The images of one lesion image of the set, per system: ``lesion[name]`` and ``twin[name]`` (stored units)."""

    record: dict
    lesion: dict[str, np.ndarray]
    twin: dict[str, np.ndarray]


def _body(truth_twin: np.ndarray, threshold: float) -> np.ndarray:
    return truth_twin > threshold


def measure(items: Sequence[StudyImages], lesion_set: LesionSet, systems: Sequence[str],
            fp_per_image: float = DEFAULT_FP_PER_IMAGE) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, Detector]]:
    """Per-lesion and per-image tables for every system (``"truth"`` must be one), and each system's detector."""
    channels = channels_for(lesion_set.lesions)
    bodies = [_body(it.twin["truth"], it.record["body_threshold"]) for it in items]
    dets = {s: calibrate([it.twin[s] for it in items], bodies, channels, fp_per_image) for s in systems}
    les_rows, img_rows = [], []
    for it, body in zip(items, bodies):
        recs = lesion_set.lesions_of(it.record["pair_id"])
        truth = it.lesion["truth"]
        truth_dets = dets["truth"].detections(truth, body)
        for s in systems:
            img, det = it.lesion[s], dets[s]
            for rec in recs:
                c_truth = L.contrast(truth, rec["center"], rec["radius"])
                cr = L.contrast(img, rec["center"], rec["radius"]) / c_truth if c_truth else float("nan")
                score = det.lesion_score(img, rec)
                les_rows.append({"system": s, "lesion_id": rec["lesion_id"], "pair_id": rec["pair_id"],
                                 "subject": it.record["subject"], "radius": rec["radius"], "radius_mm": rec.get("radius_mm"),
                                 "contrast": rec["contrast"], "unit": rec.get("unit"), "shape": rec["shape"],
                                 "center_row": rec["center"][0], "center_col": rec["center"][1],
                                 "truth_contrast": c_truth, "cr": cr, "erased": bool(cr < ERASED_BELOW),
                                 "score": score, "detected": bool(score >= det.threshold)})
            inv = invented(det.detections(img, body), truth_dets, recs) if s != "truth" else []
            img_rows.append({"system": s, "pair_id": it.record["pair_id"], "subject": it.record["subject"],
                             "n_lesions": len(recs), "invented": len(inv),
                             "invented_at": json.dumps([[p[1], p[2], p[3]] for p in inv]),
                             "twin_fp": len(det.detections(it.twin[s], body))})
    return pd.DataFrame(les_rows), pd.DataFrame(img_rows), dets


def invented(dets: Sequence[tuple], truth_dets: Sequence[tuple], recs: Sequence[dict]) -> list[tuple]:
    """Detections not near an inserted lesion (its ring's outer radius plus the detector's) nor near a truth
    detection (``max(2, r)``)."""
    out = []
    for p in dets:
        if any(np.hypot(p[1] - r["center"][0], p[2] - r["center"][1]) <= L.ring_radii(r["radius"])[1] + p[3]
               for r in recs):
            continue
        if any(np.hypot(p[1] - q[1], p[2] - q[2]) <= max(2.0, p[3], q[3]) for q in truth_dets):
            continue
        out.append(p)
    return out


# ------------------------------------------------------------------------------------------------ tables

SIZE_BINS = ("r < 3 px", "3 <= r < 5 px", "r >= 5 px")


def size_bin(radius: float) -> str:
    return SIZE_BINS[0] if radius < 3 else SIZE_BINS[1] if radius < 5 else SIZE_BINS[2]


def contrast_bin(value: float, unit: str | None) -> str:
    """``bright``/``dark`` and one of three |contrast| bins: 20 and 40 HU for CT, 0.2 and 0.3 of the local intensity
    otherwise."""
    (a, b), u = ((20.0, 40.0), " HU") if unit == "HU" else ((0.2, 0.3), "")
    m = abs(value)
    name = f"|c| < {a:g}{u}" if m < a else f"{a:g} <= |c| < {b:g}{u}" if m < b else f"|c| >= {b:g}{u}"
    return ("bright " if value > 0 else "dark ") + name


def _group_order(label: str) -> tuple:
    if label in SIZE_BINS:
        return (0, SIZE_BINS.index(label))
    dark = label.startswith("dark")
    rank = 0 if "|c| <" in label and "<=" not in label else 1 if "<=" in label else 2
    return (1, dark, rank)


LESION_METRICS = {"detected": "detected share", "cr": "mean contrast recovery", "erased": "erased share (CR < 0.5)"}


def _subject_means(df: pd.DataFrame, col: str) -> pd.Series:
    return df.groupby("subject")[col].apply(lambda v: float(np.nanmean(v.astype(float))) if len(v) else np.nan)


def summary_table(per_lesion: pd.DataFrame, per_image: pd.DataFrame, n_boot: int = 10000, seed: int = 0) -> pd.DataFrame:
    """Rows (system, group, metric): mean over subjects of the per-subject means, bootstrap interval over subjects.
    Groups: all lesions, each size bin, each contrast bin; invented lesions per image for the whole set."""
    rows = []
    pl = per_lesion.assign(size=per_lesion["radius"].map(size_bin),
                           cbin=[contrast_bin(c, u) for c, u in zip(per_lesion["contrast"], per_lesion["unit"])])
    for system in pl["system"].unique() if len(pl) else per_image["system"].unique():
        sub = pl[pl["system"] == system]
        groups = [("all", sub)] + sorted(list(sub.groupby("size")) + list(sub.groupby("cbin")),
                                         key=lambda gd: _group_order(gd[0]))
        for group, d in groups:
            for col in LESION_METRICS:
                ci = stats.bootstrap_ci(_subject_means(d, col).to_numpy(), n_boot=n_boot, seed=seed)
                rows.append({"system": system, "group": group, "metric": col, "n_lesions": len(d),
                             "n_subjects": ci.n, "mean": ci.mean, "ci_lo": ci.lo, "ci_hi": ci.hi})
        img = per_image[per_image["system"] == system]
        for col in ("invented", "twin_fp"):
            ci = stats.bootstrap_ci(_subject_means(img, col).to_numpy(), n_boot=n_boot, seed=seed)
            rows.append({"system": system, "group": "per image", "metric": col, "n_lesions": int(img["n_lesions"].sum()),
                         "n_subjects": ci.n, "mean": ci.mean, "ci_lo": ci.lo, "ci_hi": ci.hi})
    return pd.DataFrame(rows)


def compare_systems(per_lesion: pd.DataFrame, per_image: pd.DataFrame, a: str, b: str, n_boot: int = 10000,
                    seed: int = 0) -> pd.DataFrame:
    """Paired per-subject comparison ``a - b`` of detected share, CR, erased share and invented per image."""
    rows = []
    for col, df in (("detected", per_lesion), ("cr", per_lesion), ("erased", per_lesion), ("invented", per_image)):
        ma, mb = _subject_means(df[df["system"] == a], col), _subject_means(df[df["system"] == b], col)
        common = ma.index.intersection(mb.index)
        rows.append({"a": a, "b": b, "metric": col,
                     **stats.paired_comparison(ma[common].to_numpy(), mb[common].to_numpy(), n_boot=n_boot, seed=seed)})
    return pd.DataFrame(rows)


def headline(summary: pd.DataFrame, system: str) -> dict[str, float]:
    """``detected``, ``cr``, ``erased``, ``invented`` (per image) of one system over all lesions."""
    s = summary[(summary["system"] == system) & summary["group"].isin(["all", "per image"])]
    return {m: float(s.loc[s["metric"] == m, "mean"].iloc[0]) for m in ("detected", "cr", "erased", "invented")
            if (s["metric"] == m).any()}


# ------------------------------------------------------------------------------------------------ evaluate's hook

def _resize_to(x: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    if x.shape[:2] == tuple(shape):
        return x
    from PIL import Image

    return np.asarray(Image.fromarray(x.astype(np.float32), mode="F").resize((shape[1], shape[0]), Image.BICUBIC),
                      dtype=np.float64)


def gather(lesion_set: LesionSet, runs: dict[str, dict], load: Callable[[Path], np.ndarray],
           progress: bool = True) -> tuple[list[StudyImages], list[str]]:
    """Images per lesion image of the set from evaluate's pairs: ``runs`` maps a system name (``"output A"``...) to
    ``{pair_id: Pair}``; truth and degraded input come from the first run's pairs. Images without the pair or its
    twin in every run are left out (listed in the returned notes)."""
    from tqdm.auto import tqdm

    first = next(iter(runs.values()))
    items, skipped, nonfinite = [], [], []
    for rec in tqdm(lesion_set.images, desc="lesions", disable=not progress, unit="img"):
        pid, tid = rec["pair_id"], rec["twin_id"]
        if not all(pid in r and tid in r for r in runs.values()):
            skipped.append(pid)
            continue
        lesion = {"truth": load(first[pid].reference)}
        twin = {"truth": load(first[tid].reference)}
        if first[pid].degraded is not None and first[tid].degraded is not None:
            lesion["input"] = _resize_to(load(first[pid].degraded), lesion["truth"].shape)
            twin["input"] = _resize_to(load(first[tid].degraded), lesion["truth"].shape)
        for name, r in runs.items():
            lesion[name], twin[name] = load(r[pid].output), load(r[tid].output)
            for imgs, key in ((lesion, pid), (twin, tid)):
                if not np.isfinite(imgs[name]).all():  # a failure is scored as a loss, never skipped
                    nonfinite.append(f"{name}: {key}")
                    imgs[name] = np.nan_to_num(imgs[name], nan=0.0, posinf=1.0, neginf=0.0)
            if lesion[name].shape != lesion["truth"].shape:
                raise BadInput(f"lesion study: output {r[pid].output} has shape {lesion[name].shape}, the reference "
                               f"{lesion['truth'].shape}")
        items.append(StudyImages(rec, lesion, twin))
    notes = [f"lesion study: {len(skipped)} lesion image(s) without outputs for the image and its twin were left out"
             ] if skipped else []
    if nonfinite:
        notes.append(f"lesion study: {len(nonfinite)} output(s) hold NaN/Inf ({', '.join(nonfinite[:5])}"
                     f"{' ...' if len(nonfinite) > 5 else ''}); measured with those pixels set to 0 (NaN, -inf) or 1 "
                     "(+inf), so their lesions count as lost")
    if not items:
        raise MissingInput("lesion study: no lesion image of the --lesions file has outputs for itself and its twin "
                           "(evaluate the split that holds them, both the lesion images and their twins)")
    return items, notes
