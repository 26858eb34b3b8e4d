"""Evaluate restoration outputs against references: per-image CSV, per-volume aggregation, bootstrap means,
an optional paired comparison of two runs, a markdown summary and a PNG of the worst cases.

Pairs come from plain folders (outputs and references matched by file stem) or from the data builder's
``manifest.jsonl`` (an output is ``OUTPUTS/<pair_id>.<png|tif|tiff|npy>``; references, degraded inputs and
degradation steps come from the rows). Usage::

    python -m bagel_sr.eval.evaluate --outputs OUT --references REF --data_range 1.0 --out REPORT
    python -m bagel_sr.eval.evaluate --outputs OUT --manifest data/manifest.jsonl --split test \\
        --convention fastmri --compare OTHER_OUT --out REPORT
"""
from __future__ import annotations

import argparse
import json
import sys
import textwrap
import warnings
from collections import OrderedDict
from dataclasses import asdict
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from bagel_sr.errors import ArgumentParser, BadInput, RunFailed, cli_main

from . import hu
from . import metrics as M
from . import readable, report
from .images import COLOR_MODES, LoadedImage, load_image
from .pairs import (Pair, collect_pairs, pairs_from_folders, pairs_from_manifest,  # noqa: F401 (re-exported)
                    read_manifest)
from .lesion_report import run_lesion_study
from .lpips_metric import make_lpips
from .settings import EvalSettings, prepare
from .worst_cases import worst_cases_figure  # noqa: F401 (re-exported)
from .tables import (_comparison_view, _summary_view, compare_tables, failed_units,  # noqa: F401 (re-exported)
                     metric_columns, summarize, unit_table)

# ---------------------------------------------------------------- loading

def _fixed_range(ref: LoadedImage, out: LoadedImage, s: EvalSettings) -> float | None:
    """The data range for plain convention, or a ValueError saying what to pass."""
    if s.hu_window:
        return 1.0
    if s.data_range is not None:
        return float(s.data_range)
    if ref.was_integer and out.was_integer:
        return 1.0
    raise BadInput(f"data_range is required for float data ({ref.path if not ref.was_integer else out.path}): "
                     "pass --data_range (e.g. 1.0 for [0, 1] images), --convention fastmri (max of the ground "
                     "truth per volume) or --hu_window LEVEL,WIDTH for CT in HU.")

def _groups(pairs: Sequence[Pair]) -> "OrderedDict[str, list[Pair]]":
    groups: OrderedDict[str, list[Pair]] = OrderedDict()
    for p in pairs:
        groups.setdefault(p.volume_id if p.volume_id is not None else f"\0{p.pair_id}", []).append(p)
    for key in groups:
        groups[key].sort(key=lambda p: (p.slice_index if p.slice_index is not None else -1, p.pair_id))
    return groups

def _working(x: np.ndarray, intensity: dict | None) -> tuple[np.ndarray, float | None]:
    """Stored [0, 1] values in the builder's working units (HU for CT) and that range, or unchanged and None."""
    if intensity and intensity.get("working") == "physical":
        lo, hi = float(intensity["low"]), float(intensity["high"])
        return lo + x * (hi - lo), hi - lo
    return x, None

def _dc_row(pair: Pair, out_raw: np.ndarray, ref_raw: np.ndarray, s: EvalSettings, dr: float) -> dict:
    """Data consistency in the units the degradation ran in (unwindowed values; the builder's working units)."""
    if not (s.data_consistency and pair.degraded is not None and pair.degradations):
        return {}
    degraded, work_range = _working(load_image(pair.degraded, s.color, s.bits_stored).array, pair.intensity)
    out_w, ref_w = _working(out_raw, pair.intensity)[0], _working(ref_raw, pair.intensity)[0]
    dc_range = work_range or (s.hu_window[1] if s.hu_window else dr)
    return M.data_consistency(out_w, degraded, pair.degradations, dc_range, reference=ref_w)

def _intensity_note(pairs: Sequence[Pair]) -> str | None:
    ranges = sorted({(p.intensity.get("low"), p.intensity.get("high"), p.intensity.get("unit", ""))
                     for p in pairs if p.intensity and p.intensity.get("working") == "physical"})
    if not ranges:
        return None
    shown = ", ".join(f"[{lo:g}, {hi:g}] {unit}" for lo, hi, unit in ranges[:3])
    return (f"images stored by the data builder are 8-bit over {shown}{' ...' if len(ranges) > 3 else ''}: "
            "metrics compare in that window; data consistency runs in those physical units")

def evaluate_pairs(pairs: Sequence[Pair], settings: EvalSettings, progress: bool = True,
                   ) -> tuple[pd.DataFrame, pd.DataFrame | None, list[str]]:
    """Per-image metrics, per-volume metrics (None without volume ids) and notes for the summary.

    Plain convention: a volume's row is the mean of its slices' rows. fastMRI convention: a volume's row is
    ``fastmri_volume_metrics`` of the stacked slices, and slice rows use the volume's ``gt.max()`` as data range.
    """
    s = settings
    lpips_fn, lpips_msg = make_lpips(s.lpips_weights)
    notes = [lpips_msg]
    rows, vol_rows = [], []
    groups = _groups(pairs)
    bar = tqdm(total=len(pairs), desc="evaluate", disable=not progress, unit="img")
    for key, group in groups.items():
        loaded = [(load_image(p.reference, s.color, s.bits_stored), load_image(p.output, s.color, s.bits_stored))
                  for p in group]
        refs = [prepare(r, s, p.intensity) for p, (r, _) in zip(group, loaded)]
        outs = [prepare(o, s, p.intensity) for p, (_, o) in zip(group, loaded)]
        vol_max = float(max(r.max() for r in refs)) if s.convention == "fastmri" else None
        for p, (r_img, o_img), ref, out in zip(group, loaded, refs, outs):
            dr = vol_max if vol_max is not None else _fixed_range(r_img, o_img, s)
            rows.append(_pair_row(p, r_img, o_img, ref, out, dr, s, lpips_fn))
            bar.update(1)
        if not key.startswith("\0"):
            vol_rows.append(_volume_row(key, refs, outs, rows[-len(group):], s))
    bar.close()
    if vol_rows and any(k.startswith("\0") for k in groups):
        warnings.warn("some pairs have no volume id: the per-volume table and its intervals leave them out")
    per_image = pd.DataFrame(rows)
    skipped = sorted({x for v in per_image.get("dc_skipped", pd.Series(dtype=str)).dropna() if v
                      for x in str(v).split("; ")})
    if skipped:
        notes.append(f"data consistency skipped steps it cannot re-apply ({', '.join(skipped)}: noise, or across "
                     "slices): their effect stays in dc_nrmse (an output equal to the input scores 0) and in "
                     "dc_ref_nrmse, what the ground truth itself scores")
    note = hu.window_note(pairs, s.hu_window) or _intensity_note(pairs)
    if note:
        notes.append(note)
    return per_image, (pd.DataFrame(vol_rows) if vol_rows else None), notes

def _pair_row(p: Pair, r_img: LoadedImage, o_img: LoadedImage, ref: np.ndarray, out: np.ndarray, dr: float,
              s: EvalSettings, lpips_fn) -> dict:
    """One per-image row; an output holding NaN/Inf is a failure (``nonfinite`` True, no metrics), never skipped."""
    if ref.shape != out.shape:
        raise BadInput(f"pair {p.pair_id}: output {p.output} has shape {out.shape}, reference "
                       f"{p.reference} has {ref.shape}")
    row = {"pair_id": p.pair_id, "volume_id": p.volume_id, "slice_index": p.slice_index, "data_range": dr,
           "nonfinite": not bool(np.isfinite(o_img.array).all()), "output": str(p.output)}
    if row["nonfinite"]:
        return row
    row.update(M.image_metrics(ref, out, dr, s.window))
    if lpips_fn is not None:
        row["lpips"] = lpips_fn(ref, out, dr)
    row.update(_dc_row(p, o_img.array, r_img.array, s, dr))
    row.update(halluc_share=M.hallucination_share(ref, out, dr, s.hallucination_threshold),
               bg_mean=M.background_mean(ref, out, dr))
    std_file = Path(p.output).parent / "std" / f"{Path(p.output).stem}.npy"
    if std_file.exists() and not s.hu_window and o_img.was_integer:  # the std map is in [0, 1] image units
        row.update(M.uncertainty_calibration(ref, out, np.load(std_file)))
    return row

def _volume_row(vol: str, refs: list, outs: list, slice_rows: list[dict], s: EvalSettings) -> dict:
    """Plain: the mean over slices of each metric (finite values only, so one identical slice's inf PSNR does not
    make the volume's mean inf). fastMRI: ``fastmri_volume_metrics`` replaces PSNR, SSIM, NMSE, NRMSE."""
    failed = any(r["nonfinite"] for r in slice_rows)
    row = {"volume_id": vol, "n_slices": len(slice_rows), "nonfinite": failed}
    if failed:  # one non-finite slice fails the volume
        return row
    keys = [k for k, v in slice_rows[0].items() if isinstance(v, (int, float)) and not isinstance(v, bool)
            and k != "slice_index"]
    for k in keys:
        vals = np.array([r.get(k, np.nan) for r in slice_rows], dtype=float)
        vals = vals[np.isfinite(vals)]
        row[k] = float(vals.mean()) if vals.size else float("nan")
    if s.convention == "fastmri" and all(r.ndim == 2 for r in refs):
        fm = M.fastmri_volume_metrics(np.stack(refs), np.stack(outs))
        row.update(fm, nrmse=float(np.sqrt(fm["nmse"])))
    return row

# ---------------------------------------------------------------- orchestration

def run_evaluation(outputs: str | Path, out_dir: str | Path, settings: EvalSettings,
                   references: str | Path | None = None, manifest: str | Path | None = None,
                   compare: str | Path | None = None, split: str | None = None, inputs: str | Path | None = None,
                   degradations: list | None = None, volume_pattern: str | None = None,
                   allow_missing: bool = False, n_boot: int = 10000, seed: int = 0, worst: int = 6,
                   progress: bool = True, title: str = "Evaluation", allow_nonfinite: bool = False,
                   label: str | None = None, compare_label: str | None = None,
                   lesions: str | Path | None = None, lesion_fp_per_image: float = 0.25) -> dict[str, Any]:
    """Evaluate ``outputs`` (and ``compare``), write CSVs, ``summary.md``, ``summary.json`` and figures to ``out_dir``.

    ``label``/``compare_label`` name the runs in the report (default: their outputs paths without generic folder
    names such as ``outputs``). Returns the tables (``per_image``, ``per_volume``, ``summary``, ``comparison``), the
    ``notes`` and ``labels`` of the summary, the unit used and
    ``nonfinite`` (output files holding NaN/Inf, per run). Such outputs are failures: counted in the tables, scored
    as losses in the comparison, and, unless ``allow_nonfinite``, a :class:`RunFailed` after the report is written.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    kw = dict(references=references, manifest=manifest, split=split, inputs=inputs, degradations=degradations,
              volume_pattern=volume_pattern, allow_missing=allow_missing)
    pairs = collect_pairs(outputs, **kw)
    hu.check_pairs(pairs, settings.hu_window)
    per_image, per_volume, notes = evaluate_pairs(pairs, settings, progress)
    print(notes[0], file=sys.stderr)
    per_image.to_csv(out_dir / "per_image.csv", index=False)
    if per_volume is not None:
        per_volume.to_csv(out_dir / "per_volume.csv", index=False)
    table, unit, key = unit_table(per_image, per_volume)
    summary = summarize(table, unit, n_boot, seed)
    summary.to_csv(out_dir / "summary.csv", index=False)
    labels = (readable.pair_labels(outputs, compare, (label, compare_label)) if compare
              else (label or readable.path_label(outputs), "compare"))
    result: dict[str, Any] = {"labels": labels, "notes": notes, "per_image": per_image, "per_volume": per_volume,
                              "summary": summary, "unit": unit,
                              "pairs": pairs, "comparison": None}
    other_pairs, bad = None, {"A": _nonfinite_files(per_image)}
    if compare:
        other_pairs = collect_pairs(compare, **kw)
        img_b, vol_b, _ = evaluate_pairs(other_pairs, settings, progress)
        bad["B"] = _nonfinite_files(img_b)
        img_b.to_csv(out_dir / "compare_per_image.csv", index=False)
        diffs_img, _ = compare_tables(per_image, img_b, "pair_id", n_boot, seed)
        diffs_img.to_csv(out_dir / "comparison_per_image.csv", index=False)
        diffs, tests = compare_tables(table, unit_table(img_b, vol_b)[0], key, n_boot, seed)
        if unit == "volume":
            diffs.to_csv(out_dir / "comparison_per_volume.csv", index=False)
        tests.to_csv(out_dir / "comparison.csv", index=False)
        result["comparison"] = tests
        notes.append(f"A = {labels[0]} ({outputs}), B = {labels[1]} ({compare}); Wilcoxon signed-rank on per-{unit} "
                     "differences (two-sided)")
        if bad["A"] or bad["B"]:
            notes.append("in the comparison a failed (NaN/Inf) output scores one observed range worse than the worst "
                         "finite value of either run: it loses against any output and ties with another failure")
    if unit == "volume":
        notes.append("intervals resample volumes (slices of a volume are not independent)")
    small = readable.small_sample_note(len(table), unit, len(per_image), [p.subject for p in pairs])
    if small:
        notes.insert(0, small)
    fig = worst_cases_figure(per_image, pairs, settings, out_dir / "worst_cases.png", worst,
                             {p.pair_id: p for p in other_pairs} if other_pairs else None, labels=labels)
    result["nonfinite"] = bad
    if lesions:  # the lesion study (eval/lesion_report.py): its own tables, lesions.md and crops

        runs = {"A": {p.pair_id: p for p in pairs}, **({"B": {p.pair_id: p for p in other_pairs}} if other_pairs else {})}
        result["lesions"] = run_lesion_study(
            lesions, runs, out_dir, lambda f: load_image(f, settings.color, settings.bits_stored).array,
            lesion_fp_per_image, n_boot, seed, worst, progress)
        notes += result["lesions"]["notes"] + ["lesion study (kept, erased, invented lesions): lesions.md"]
    failed_note = {"failed outputs (NaN/Inf)": "; ".join(
        f"{run}: {len(files)}" + (f" ({', '.join(Path(f).name for f in files[:5])})" if files else "")
        for run, files in bad.items())}
    md = report.summary_markdown(title, {**settings.describe(), "images": str(len(per_image)),
                                         "volumes": str(0 if per_volume is None else len(per_volume)),
                                         **failed_note},
                                 _summary_view(summary),
                                 _comparison_view(result["comparison"]) if compare else None,
                                 notes, [Path(fig).name] if fig else [], labels,
                                 readable.metric_notes(summary["metric"].tolist()))
    (out_dir / "summary.md").write_text(md, encoding="utf-8")
    (out_dir / "summary.json").write_text(json.dumps(
        {"settings": asdict(settings), "unit": unit, "summary": summary.to_dict("records"), "nonfinite_outputs": bad,
         "comparison": None if result["comparison"] is None else result["comparison"].to_dict("records")},
        indent=2, default=str), encoding="utf-8")
    if not allow_nonfinite:
        check_finite(result, out_dir)
    return result

def check_finite(result: dict[str, Any], out_dir: str | Path) -> None:
    """Raise :class:`RunFailed` naming the output files that hold NaN/Inf (``result`` of :func:`run_evaluation`)."""
    failed = [f for files in result["nonfinite"].values() for f in files]
    if failed:
        raise RunFailed(f"{len(failed)} output(s) hold NaN/Inf values: {', '.join(failed[:5])}"
                        f"{' ...' if len(failed) > 5 else ''}; they are scored as failures in "
                        f"{Path(out_dir) / 'summary.md'}. Fix the restorer, or pass --allow_nonfinite to accept "
                        "the report as it is")

def _nonfinite_files(per_image: pd.DataFrame) -> list[str]:
    return [str(f) for f in per_image.loc[failed_units(per_image), "output"]] if len(per_image) else []

def _hu(text: str) -> tuple[float, float]:
    try:
        level, width = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError("--hu_window takes LEVEL,WIDTH in HU, e.g. 40,400") from None
    return level, width

def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="python -m bagel_sr.eval.evaluate", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--outputs", required=True, help="folder of restored images (run A)")
    p.add_argument("--references", help="folder of ground-truth images, matched by file stem")
    p.add_argument("--manifest", help="manifest.jsonl of the data builder (instead of --references)")
    p.add_argument("--split", help="manifest split to evaluate (e.g. test)")
    p.add_argument("--compare", help="outputs of a second run (B) for a paired comparison")
    p.add_argument("--label", help="name of run A in the report (default: its outputs path without 'outputs')")
    p.add_argument("--compare_label", help="name of run B in the report (default: as --label)")
    p.add_argument("--inputs", help="folder mode: degraded inputs, for data consistency with --degradations")
    p.add_argument("--degradations", help="folder mode: JSON list of degradation steps applied to every pair")
    p.add_argument("--data_range", type=float, help="intensity range (required for float images)")
    p.add_argument("--bits_stored", type=int, help="bit depth of integer images (e.g. 12 for 12-bit MR/CT values in "
                   "16-bit PNGs); default: the container's")
    p.add_argument("--convention", choices=("plain", "fastmri"), default="plain",
                   help="fastmri: data_range = max of the ground truth per volume, volume PSNR/NMSE")
    p.add_argument("--hu_window", type=_hu, help="CT: LEVEL,WIDTH in HU; metrics on the window mapped to [0, 1]")
    p.add_argument("--ssim_window", choices=M.SSIM_WINDOWS, default="uniform7", help="SSIM window (default uniform7)")
    p.add_argument("--color", choices=COLOR_MODES, default="gray", help="how colour images are compared (default gray)")
    p.add_argument("--volume_pattern", help=r"folder mode: regex on the stem, e.g. '(?P<volume>.+)_(?P<slice>\d+)'")
    p.add_argument("--no_data_consistency", action="store_true", help="skip the data-consistency metrics")
    p.add_argument("--lpips_weights", help="local LPIPS weights file (optional; never downloaded)")
    p.add_argument("--hallucination_threshold", type=float, default=0.1,
                   help="halluc_share counts pixels with |error| > this x data_range (default 0.1)")
    p.add_argument("--allow_missing", action="store_true", help="evaluate the pairs that exist")
    p.add_argument("--allow_nonfinite", action="store_true",
                   help="exit 0 even when outputs hold NaN/Inf (they are still counted and scored as failures)")
    p.add_argument("--lesions", help="lesions.json of a lesion set: also measure kept, erased and invented lesions")
    p.add_argument("--lesion_fp_per_image", type=float, default=0.25,
                   help="detector threshold: false detections per lesion-free image (default 0.25)")
    p.add_argument("--n_boot", type=int, default=10000, help="bootstrap resamples (default 10000)")
    p.add_argument("--seed", type=int, default=0, help="seed of the bootstrap (default 0)")
    p.add_argument("--worst", type=int, default=6, help="rows in worst_cases.png (0: none)")
    p.add_argument("--no_progress", action="store_true", help="hide the progress bar")
    p.add_argument("--out", required=True, help="report folder")
    return p

def _check_args(a: argparse.Namespace) -> list | None:
    """Validate counts and ranges (one line naming the flag); returns the parsed ``--degradations``."""
    if a.n_boot < 1:
        raise BadInput(f"--n_boot {a.n_boot}: expected an integer >= 1")
    if a.worst < 0:
        raise BadInput(f"--worst {a.worst}: expected an integer >= 0")
    if not (np.isfinite(a.lesion_fp_per_image) and a.lesion_fp_per_image > 0):
        raise BadInput(f"--lesion_fp_per_image {a.lesion_fp_per_image}: expected a number > 0")
    if a.data_range is not None and not (np.isfinite(a.data_range) and a.data_range > 0):
        raise BadInput(f"--data_range {a.data_range}: expected a finite number > 0")
    if not a.degradations:
        return None
    try:
        steps = json.loads(a.degradations)
    except json.JSONDecodeError as e:
        raise BadInput(f"--degradations is not JSON ({e.msg}); expected a list such as "
                       "'[{\"name\": \"bicubic_downsample\", \"scale\": 4}]'") from None
    if not isinstance(steps, list):
        raise BadInput(f"--degradations {a.degradations}: expected a JSON list of steps")
    return steps

def main(argv: Sequence[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    degradations = _check_args(a)
    settings = EvalSettings(a.data_range, a.ssim_window, a.color, a.convention, a.hu_window,
                            not a.no_data_consistency, a.lpips_weights, bits_stored=a.bits_stored,
                            hallucination_threshold=a.hallucination_threshold)
    res = run_evaluation(a.outputs, a.out, settings, a.references, a.manifest, a.compare, a.split, a.inputs,
                         degradations, a.volume_pattern, a.allow_missing, a.n_boot, a.seed, a.worst,
                         not a.no_progress, allow_nonfinite=True, label=a.label, compare_label=a.compare_label,
                         lesions=a.lesions, lesion_fp_per_image=a.lesion_fp_per_image)
    print(readable.fit_console(_summary_view(res["summary"]), str(Path(a.out) / "summary.md")))
    for note in res["notes"]:
        if note.startswith("small sample"):
            print(textwrap.fill("note: " + note, readable.CONSOLE_WIDTH))
    print(f"report: {Path(a.out) / 'summary.md'}" + (f", lesion study: {Path(a.out) / 'lesions.md'}" if a.lesions else ""))
    if not a.allow_nonfinite:
        check_finite(res, a.out)
    return 0

if __name__ == "__main__":
    sys.exit(cli_main(main))
