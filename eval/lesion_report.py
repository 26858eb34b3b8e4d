"""The lesion study's files: per-lesion and per-image CSVs, the summary by size and contrast with per-subject
intervals, paired comparisons, ``lesions.md`` and ``lesion_crops.png`` (worst lesions and invented ones, zoomed).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pandas as pd

from bagel_sr.data import lesions as L

from . import lesions as LS
from . import report

ZOOM = 4


def _crop(img: np.ndarray, center: Sequence[int], half: int) -> np.ndarray:
    y, x = int(center[0]), int(center[1])
    pad = np.pad(img, half, mode="edge")
    c = pad[y: y + 2 * half + 1, x: x + 2 * half + 1]
    return np.kron(c, np.ones((ZOOM, ZOOM)))


def crops_figure(items: Sequence[LS.StudyImages], per_lesion: pd.DataFrame, per_image: pd.DataFrame,
                 systems: Sequence[str], path: Path, k: int = 6) -> str | None:
    """Rows of crops (truth | input | each restoration): the ``k`` lesions with the lowest contrast recovery in the
    first restoration, then up to ``k`` invented detections of it."""
    if k <= 0 or not len(per_lesion):
        return None
    by_id = {it.record["pair_id"]: it for it in items}
    first = systems[0]
    cols = ["truth"] + (["input"] if "input" in next(iter(items)).lesion else []) + list(systems)
    rows = []
    worst = per_lesion[per_lesion["system"] == first].sort_values("cr").head(k)
    for r in worst.itertuples():
        it = by_id[r.pair_id]
        half = int(np.ceil(L.ring_radii(r.radius)[1])) + 2
        rows.append((f"{r.lesion_id}\nr={r.radius:g} c={r.contrast:g} {r.unit or ''}\nCR={r.cr:.2f} "
                     f"{'detected' if r.detected else 'missed'}",
                     [(c, _crop(it.lesion[c], (r.center_row, r.center_col), half)) for c in cols]))
    inv = per_image[(per_image["system"] == first) & (per_image["invented"] > 0)]
    for r in inv.itertuples():
        for y, x, rad in json.loads(r.invented_at):
            if len(rows) >= 2 * k:
                break
            it = by_id[r.pair_id]
            rows.append((f"{r.pair_id}\ninvented at ({y}, {x}), r~{rad:.1f}",
                         [(c, _crop(it.lesion[c], (y, x), int(np.ceil(L.ring_radii(rad)[1])) + 2)) for c in cols]))
    return report.image_grid(rows, path) if rows else None


def markdown(summary: pd.DataFrame, comparisons: pd.DataFrame | None, dets: dict, settings: dict,
             figures: Sequence[str]) -> str:
    view = summary.assign(**{"mean [95% CI]": [report.fmt_ci(r.mean, r.ci_lo, r.ci_hi, 3) for r in summary.itertuples()]})
    wide = view.pivot_table(index=["group", "metric"], columns="system", values="mean [95% CI]", aggfunc="first",
                            sort=False).reset_index()
    out = ["# Lesion study", "", "## Conventions", ""] + [f"- {k}: {v}" for k, v in settings.items()]
    out += ["- detector thresholds (normalised LoG score; false detections per image on the system's twins): " +
            ", ".join(f"{s} {d.threshold:.2f} ({d.achieved_fp_per_image:.2f}/image)" for s, d in dets.items())]
    out += ["", "## Lesions kept and invented (mean over subjects [95% bootstrap interval over subjects])", "",
            "detected: share detected at the stated false-positive rate; cr: contrast recovery; erased: share with "
            "CR < 0.5; invented: detections per lesion image not in the truth, away from inserted lesions; twin_fp: "
            "detections per lesion-free twin (the calibration's check)", "", report.markdown_table(wide)]
    if comparisons is not None and len(comparisons):
        comp = pd.DataFrame({"A": comparisons["a"], "B": comparisons["b"], "metric": comparisons["metric"],
                             "A - B [95% CI]": [report.fmt_ci(r.mean_diff, r.diff_lo, r.diff_hi, 3)
                                                for r in comparisons.itertuples()],
                             "Wilcoxon p": comparisons["p_value"], "subjects": comparisons["n"]})
        out += ["", "## Paired comparison (per subject)", "", report.markdown_table(comp)]
    for f in figures:
        out += ["", f"![{Path(f).stem}]({f})"]
    return "\n".join(out) + "\n"


def run_lesion_study(lesion_file: str | Path, runs: dict[str, dict], out_dir: str | Path,
                     load: Callable[[Path], np.ndarray], fp_per_image: float = LS.DEFAULT_FP_PER_IMAGE,
                     n_boot: int = 10000, seed: int = 0, worst: int = 6, progress: bool = True) -> dict:
    """Measure every run (``{"output A": {pair_id: Pair}, ...}``), the truth and the degraded input on the lesion
    images of ``lesion_file`` and write the study's files to ``out_dir``; returns the tables and notes."""
    out_dir = Path(out_dir)
    lesion_set = LS.load_lesion_file(lesion_file)
    items, notes = LS.gather(lesion_set, runs, load, progress)
    systems = ["truth"] + (["input"] if "input" in items[0].lesion else []) + list(runs)
    per_lesion, per_image, dets = LS.measure(items, lesion_set, systems, fp_per_image)
    summary = LS.summary_table(per_lesion, per_image, n_boot, seed)
    pairs_to_compare = [(a, b) for a, b in zip(list(runs)[1:], [list(runs)[0]] * len(runs))] + \
        ([(r, "input") for r in runs] if "input" in systems else [])
    comparisons = pd.concat([LS.compare_systems(per_lesion, per_image, a, b, n_boot, seed) for a, b in pairs_to_compare]) \
        if pairs_to_compare and len(per_lesion) else None
    per_lesion.to_csv(out_dir / "lesions_per_lesion.csv", index=False)
    per_image.to_csv(out_dir / "lesions_per_image.csv", index=False)
    summary.to_csv(out_dir / "lesions_summary.csv", index=False)
    if comparisons is not None:
        comparisons.to_csv(out_dir / "lesions_comparison.csv", index=False)
    fig = crops_figure(items, per_lesion, per_image, list(runs), out_dir / "lesion_crops.png", worst)
    settings = {"lesion images": str(len(items)), "lesions": str(len(lesion_set.lesions)),
                "subjects": str(per_image["subject"].nunique()),
                "false-positive rate": f"{fp_per_image:g} false detections per image, set on each system's own "
                                       "lesion-free twins",
                "erased": f"contrast recovery < {LS.ERASED_BELOW:g}", **{k: str(v) for k, v in lesion_set.conventions.items()}}
    (out_dir / "lesions.md").write_text(markdown(summary, comparisons, dets, settings, [Path(fig).name] if fig else []),
                                        encoding="utf-8")
    return {"per_lesion": per_lesion, "per_image": per_image, "summary": summary, "comparison": comparisons,
            "detectors": dets, "notes": notes}
