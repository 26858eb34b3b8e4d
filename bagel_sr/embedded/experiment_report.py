"""The default experiment's report: the printed table of a seed (references, arms, paired differences, inference
modes, wall times), the summary over seeds, and ``grid.png`` (LR | flow only | + pixel | HR)."""
import dataclasses
from typing import Dict, List

import numpy as np
import torch

from ..config import PixelLossConfig
from ..eval.stats import bootstrap_ci
from . import data
from .experiment_settings import arm_label


def _fmt(m: Dict) -> str:
    return (f"{m['psnr']['mean']:6.2f} ± {m['psnr']['std']:4.2f}   {m['ssim']['mean']:.3f} ± {m['ssim']['std']:.3f}   "
            f"{100 * m['halluc']['mean']:6.2f}")


def paired_difference(a: Dict, b: Dict) -> Dict[str, np.ndarray]:
    """Per-image differences ``a - b`` of PSNR, SSIM and hallucination share (same images, same order)."""
    return {k: np.array(a["per_image"][k]) - np.array(b["per_image"][k]) for k in ("psnr", "ssim", "halluc")}


def _difference_line(label: str, d: Dict[str, np.ndarray], width: int) -> str:

    ci = bootstrap_ci(d["psnr"], n_boot=2000, seed=0)
    lo, hi = ci.lo, ci.hi
    return (f"{label:{width}}{d['psnr'].mean():+6.2f} ± {d['psnr'].std():4.2f}   {d['ssim'].mean():+.3f} ± "
            f"{d['ssim'].std():.3f}   {100 * d['halluc'].mean():+6.2f}   (per image; PSNR 95% CI [{lo:+.2f}, {hi:+.2f}], "
            f"{int((d['psnr'] > 0).sum())}/{len(d['psnr'])} images better)")


def format_table(seed_result: Dict, base: Dict, pixel: PixelLossConfig, n_pairs: int, split: str) -> str:
    """The printed table of one seed: references, every arm (stock sampling), paired differences, the inference
    modes of every arm (the one chosen on val marked), wall times."""
    arms = seed_result["arms"]
    labels = {arm: arm_label(arm, dataclasses.replace(pixel, terms=arm[len("terms="):]) if arm.startswith("terms=")
                             else pixel) for arm in arms}
    w = max(30, *(len(v) + 2 for v in labels.values()))
    lines = [
        f"seed {seed_result['seed']}: {split} split, {n_pairs} pairs (x2 and x4); PSNR/SSIM on grayscale [0,1], "
        "data_range 1, mean ± std over images; halluc % = pixels with |error| > 0.1",
        f"{'':{w}}{'PSNR (dB)':>15}   {'SSIM':>13}   {'halluc %':>6}   {'x2 PSNR':>8} {'x4 PSNR':>8}   "
        f"{'unpaired flow':>13} {'paired flow':>11}   {'train s':>7} {'sample s':>8}",
    ]
    rows = [("LR input (bicubic up)", base["lr_input"], None), ("VAE round trip of HR", base["vae_round_trip"], None)]
    rows += [(labels[arm], arms[arm], arms[arm]) for arm in arms]
    for name, m, a in rows:
        extra = (f"{a['unpaired_flow_loss']['mean']:13.4f} {a['paired_flow_loss']['mean']:11.4f}   "
                 f"{a['train_seconds']:7.0f} {a['sample_seconds']:8.1f}" if a else f"{'-':>13} {'-':>11}")
        lines.append(f"{name:{w}}{_fmt(m)}   {m['x2']['psnr']['mean']:8.2f} {m['x4']['psnr']['mean']:8.2f}   {extra}")
    lines.append(_difference_line("difference (+pixel - flow only)", paired_difference(arms["pixel"], arms["flow_only"]), w))
    for arm in list(arms)[2:]:
        lines.append(_difference_line(f"{arm} - pixel", paired_difference(arms[arm], arms["pixel"]), w))
    if "modes" in arms["pixel"]:
        chosen = seed_result["chosen_mode"]
        lines.append(f"inference modes ({split}; T0 start time, K samples averaged, +DC back-projection); "
                     f"chosen on val (+ pixel arm; the cheapest mode within the paired 95% interval of the best "
                     f"PSNR): {chosen}")
        lines.append(f"{'':{w}}{'PSNR (dB)':>15}   {'SSIM':>13}   {'halluc %':>6}   {'val PSNR':>8} {'val SSIM':>8}   "
                     f"{'sample s':>8}")
        for name in arms["pixel"]["modes"]:
            for arm in arms:
                m = arms[arm]["modes"][name]
                mark = "  <- chosen on val" if name == chosen else ""
                label = ("flow only" if arm == "flow_only" else "+ pixel" if arm == "pixel" else arm) + ", " + name
                lines.append(f"{label:{w}}{_fmt(m)}   {arms[arm]['modes_val_psnr'][name]:8.2f} "
                             f"{arms[arm]['modes_val_ssim'][name]:8.3f}   "
                             f"{m['sample_seconds']:8.1f}{mark}")
        for arm in list(arms)[1:]:
            ref = "flow_only" if arm == "pixel" else "pixel"
            d = paired_difference(arms[arm]["modes"][chosen], arms[ref]["modes"][chosen])
            lines.append(_difference_line(f"{arm} - {ref}, {chosen}", d, w))
    flow_s, pixel_s = arms["flow_only"]["train_seconds"], arms["pixel"]["train_seconds"]
    lines.append(f"wall time (s): train flow only {flow_s:.0f}, + pixel {pixel_s:.0f} "
                 f"({'x%.2f' % (pixel_s / flow_s) if flow_s >= 1 else 'ratio n/a'}); "
                 f"stock sampling flow only {arms['flow_only'].get('sample_seconds', float('nan')):.0f}, + pixel "
                 f"{arms['pixel'].get('sample_seconds', float('nan')):.0f}")
    if "grad_norm_ratio" in arms["pixel"]:
        lines.append(f"gradient norm on llm2vae, weighted pixel term / flow term: "
                     f"{arms['pixel']['grad_norm_ratio']['mean']:.2g} (mean over training)")
    return "\n".join(lines)


def save_grid(path: str, pairs: List[data.Sample], preds: Dict[str, torch.Tensor], rows: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # spread the rows over the split (sources and scales alternate in eval_pairs)
    idx = np.unique(np.linspace(0, len(pairs) - 1, min(rows, len(pairs))).round().astype(int))
    cols = [("LR input", lambda i: pairs[i].condition), ("flow only", lambda i: preds["flow_only"][i]),
            ("+ pixel loss", lambda i: preds["pixel"][i]), ("HR", lambda i: pairs[i].target)]
    fig, axes = plt.subplots(len(idx), len(cols), figsize=(2 * len(cols), 2 * len(idx)), squeeze=False)
    for r, i in enumerate(idx):
        for c, (title, get) in enumerate(cols):
            ax = axes[r, c]
            ax.imshow(data.to_unit_gray(get(i)).numpy(), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
            ax.set_xticks([]), ax.set_yticks([])
            if r == 0:
                ax.set_title(title, fontsize=10)
            if c == 0:
                ax.set_ylabel(f"{pairs[i].meta['modality']} x{pairs[i].meta['scale']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


METRICS = ("psnr", "ssim", "halluc")


def _across_seeds(results: List[Dict]) -> Dict:
    """Per arm: mean, std and values over seeds of the per-seed means (stock sampling, every mode, and the mode each
    seed chose on val, ``chosen <metric>``)."""
    out = {}
    for arm in results[0]["arms"]:
        vals = {k: [r["arms"][arm][k]["mean"] for r in results] for k in METRICS + ("unpaired_flow_loss", "paired_flow_loss")}
        for name in results[0]["arms"][arm].get("modes", {}):
            for k in METRICS:
                vals[f"{name} {k}"] = [r["arms"][arm]["modes"][name][k]["mean"] for r in results]
        if "chosen_mode" in results[0]:
            for k in METRICS:
                vals[f"chosen {k}"] = [r["arms"][arm]["modes"][r["chosen_mode"]][k]["mean"] for r in results]
        out[arm] = {k: dict(mean=float(np.mean(v)), std=float(np.std(v)), values=v) for k, v in vals.items()}
    return out


def format_across_seeds(summary: Dict, base: Dict, results: List[Dict]) -> str:
    lines = [f"over {len(results)} seeds (mean ± std of the per-seed means); bicubic input "
             f"{base['lr_input']['psnr']['mean']:.2f} dB / SSIM {base['lr_input']['ssim']['mean']:.3f} / halluc "
             f"{100 * base['lr_input']['halluc']['mean']:.2f}%:"]
    for arm, a in summary.items():
        lines.append(f"  {arm:10s} PSNR {a['psnr']['mean']:.2f} ± {a['psnr']['std']:.2f}  SSIM "
                     f"{a['ssim']['mean']:.3f} ± {a['ssim']['std']:.3f}  halluc {100 * a['halluc']['mean']:.2f}%  "
                     f"unpaired flow {a['unpaired_flow_loss']['mean']:.4f} ± {a['unpaired_flow_loss']['std']:.4f}")
        if "chosen psnr" in a:
            modes = ", ".join(r["chosen_mode"] for r in results)
            lines.append(f"  {'':10s} chosen on val ({modes}): PSNR {a['chosen psnr']['mean']:.2f} ± "
                         f"{a['chosen psnr']['std']:.2f}  SSIM {a['chosen ssim']['mean']:.3f} ± {a['chosen ssim']['std']:.3f}"
                         f"  halluc {100 * a['chosen halluc']['mean']:.2f}%  per seed PSNR "
                         + " ".join(f"{v:.2f}" for v in a["chosen psnr"]["values"]))
    return "\n".join(lines)
