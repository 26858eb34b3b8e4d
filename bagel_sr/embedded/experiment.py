"""The default experiment: flow-only vs flow + pixel loss on the embedded bench, same seed, same data, same noise.

For every seed: train ``TinyBagel`` twice (pixel weight 0, then the parsed ``--pixel_loss_*`` settings), sample the
held-out low-resolution images with the Euler sampler, and measure PSNR / SSIM against the high-resolution images
(grayscale in [0, 1], data_range 1) and the flow loss on held-out unpaired (text-to-image) and paired samples.
Prints a table, writes ``metrics.json`` and ``grid.png`` (LR | flow-only | + pixel | HR) to ``--output_dir``.

Called by ``train/main_sr_pixel_loss.py`` when no BAGEL checkout is given, or directly::

    python -m bagel_sr.embedded.experiment --steps 600 --pixel_loss_weight 0.05
"""
import dataclasses
import json
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

from . import _compat  # noqa: F401

import numpy as np
import torch

from ..config import CONSERVATIVE_DEFAULTS, PixelLossConfig, pixel_loss_arguments_class
from . import data, sampling
from .backbone import TinyBagelConfig
from .train import LatentPool, TrainConfig, train
from .vae import load_meta, load_vae


@dataclass
class ExperimentArguments(TrainConfig):
    output_dir: str = field(default="outputs/embedded", metadata={"help": "Where metrics.json, grid.png, checkpoints go."})
    seeds: int = field(default=1, metadata={"help": "Repeat the experiment over this many seeds (seed, seed+1, ...)."})
    seed: int = field(default=0, metadata={"help": "First seed (model init, data order, noise)."})
    eval_split: str = field(default="heldout", metadata={"help": "'heldout' (report) or 'val' (for tuning)."})
    eval_ema: bool = field(default=True, metadata={"help": "Evaluate the EMA weights (else the raw weights)."})
    sample_steps: int = field(default=25, metadata={"help": "Euler steps of the sampler."})
    sample_timestep_shift: float = field(default=1.0, metadata={"help": "Timestep shift of the sampler schedule."})
    # the backbone's size: TinyBagelConfig holds the defaults
    hidden_size: int = field(default=TinyBagelConfig.hidden_size, metadata={"help": "Backbone width."})
    num_hidden_layers: int = field(default=TinyBagelConfig.num_hidden_layers, metadata={"help": "Backbone depth."})
    num_attention_heads: int = field(default=TinyBagelConfig.num_attention_heads, metadata={"help": "Attention heads."})
    num_key_value_heads: int = field(default=TinyBagelConfig.num_key_value_heads, metadata={"help": "Key/value heads."})
    intermediate_size: int = field(default=TinyBagelConfig.intermediate_size, metadata={"help": "MLP width."})
    vae_dir: Optional[str] = field(default=None, metadata={"help": "VAE directory (default: the shipped one)."})
    save_checkpoints: bool = field(default=True, metadata={"help": "Write model/ema safetensors per arm."})
    grid_rows: int = field(default=8, metadata={"help": "Examples in grid.png."})
    progress: bool = field(default=True, metadata={"help": "Show progress bars."})


ARMS = ("flow_only", "pixel")


def parse(argv: Optional[Sequence[str]] = None):
    from transformers import HfArgumentParser

    parser = HfArgumentParser((ExperimentArguments, pixel_loss_arguments_class(defaults=CONSERVATIVE_DEFAULTS)))
    args, pixel_args = parser.parse_args_into_dataclasses(args=list(argv) if argv is not None else None)
    if args.eval_split not in ("heldout", "val"):
        raise ValueError(f"--eval_split: got {args.eval_split!r}; allowed: 'heldout', 'val'")
    if args.seeds < 1:
        raise ValueError(f"--seeds: got {args.seeds}; allowed: an integer >= 1")
    return args, PixelLossConfig.from_namespace(pixel_args)


def _summary(values: np.ndarray) -> Dict[str, float]:
    return dict(mean=float(np.mean(values)), std=float(np.std(values)))


def _arm_metrics(pred: torch.Tensor, pairs: List[data.Sample]) -> Dict:
    m = sampling.image_metrics(pred, torch.stack([p.target for p in pairs]))
    scales = np.array([p.meta["scale"] for p in pairs])
    out = dict(psnr=_summary(m["psnr"]), ssim=_summary(m["ssim"]), per_image=dict(psnr=m["psnr"].tolist(),
                                                                                 ssim=m["ssim"].tolist()))
    for s in sorted(set(scales.tolist())):
        out[f"x{s}"] = dict(psnr=_summary(m["psnr"][scales == s]), ssim=_summary(m["ssim"][scales == s]))
    return out


def run_seed(args: ExperimentArguments, pixel: PixelLossConfig, seed: int, vae, pairs, unpaired, tokenizer) -> Dict:
    model_config = TinyBagelConfig(
        vocab_size=len(tokenizer), hidden_size=args.hidden_size, num_hidden_layers=args.num_hidden_layers,
        num_attention_heads=args.num_attention_heads, num_key_value_heads=args.num_key_value_heads,
        intermediate_size=args.intermediate_size, timestep_shift=args.timestep_shift,
    )
    train_cfg = TrainConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)})
    result = {}
    preds = {}
    t0 = time.time()
    pool = LatentPool.build(seed, args.pool_size, vae, args.t2i_ratio) if args.pool_size > 0 else None
    pool_seconds = round(time.time() - t0, 1)
    for arm in ARMS:
        # the pixel arm also measures the gradient norms of both terms on llm2vae (monitoring only)
        arm_pixel = (dataclasses.replace(pixel, weight=0.0) if arm == "flow_only" else
                     dataclasses.replace(pixel, log_grad_norms_every=pixel.log_grad_norms_every or 10))
        out_dir = os.path.join(args.output_dir, f"seed{seed}", arm) if args.save_checkpoints else None
        run = train(dataclasses.replace(model_config), train_cfg, arm_pixel, vae, seed=seed, output_dir=out_dir,
                    progress=args.progress, desc=f"seed {seed} {arm}", tokenizer=tokenizer, pool=pool)
        model = run.ema_model if args.eval_ema else run.model
        t0 = time.time()
        pred = sampling.euler_sample(model, vae, pairs, tokenizer, steps=args.sample_steps,
                                     timestep_shift=args.sample_timestep_shift, seed=seed)
        metrics = _arm_metrics(pred, pairs)
        metrics["unpaired_flow_loss"] = sampling.flow_loss(model, vae, unpaired, tokenizer, seed=seed)
        metrics["paired_flow_loss"] = sampling.flow_loss(model, vae, pairs, tokenizer, seed=seed)
        metrics.update(train_seconds=round(run.seconds, 1), eval_seconds=round(time.time() - t0, 1),
                       final_log=run.history[-1] if run.history else {}, history=run.history,
                       pixel_loss=arm_pixel.to_flags())
        ratios = [h["grad_norm_ratio"] for h in run.history if "grad_norm_ratio" in h]
        if ratios:
            metrics["grad_norm_ratio"] = dict(mean=float(np.mean(ratios)), last=float(ratios[-1]))
        pix = [h["pixel"] for h in run.history if "pixel" in h]
        if pix:
            metrics["train_pixel_loss_last"] = float(pix[-1])
        result[arm] = metrics
        preds[arm] = pred
    return dict(seed=seed, pool_seconds=pool_seconds, arms=result), preds


def baselines(vae, pairs: List[data.Sample]) -> Dict:
    lr = torch.stack([p.condition for p in pairs])
    hr = torch.stack([p.target for p in pairs])
    return dict(lr_input=_arm_metrics(lr, pairs), vae_round_trip=_arm_metrics(sampling.vae_round_trip(vae, hr), pairs))


def _fmt(m: Dict) -> str:
    return f"{m['psnr']['mean']:6.2f} ± {m['psnr']['std']:4.2f}   {m['ssim']['mean']:.3f} ± {m['ssim']['std']:.3f}"


def format_table(seed_result: Dict, base: Dict, pixel: PixelLossConfig, n_pairs: int, split: str) -> str:
    arms = seed_result["arms"]
    pix = f"flow + pixel (w={pixel.weight:g}, {pixel.terms or pixel.loss_type}, t<={pixel.max_t:g})"
    w = max(30, len(pix) + 2)
    lines = [
        f"seed {seed_result['seed']}: {split} split, {n_pairs} pairs (x2 and x4); PSNR/SSIM on grayscale [0,1], "
        "data_range 1, mean ± std over images",
        f"{'':{w}}{'PSNR (dB)':>15}   {'SSIM':>13}   {'x2 PSNR':>8} {'x4 PSNR':>8}   "
        f"{'unpaired flow':>13} {'paired flow':>11}",
    ]
    rows = [("LR input (bicubic up)", base["lr_input"], None), ("VAE round trip of HR", base["vae_round_trip"], None),
            ("flow only", arms["flow_only"], arms["flow_only"]), (pix, arms["pixel"], arms["pixel"])]
    for name, m, a in rows:
        flows = (f"{a['unpaired_flow_loss']['mean']:13.4f} {a['paired_flow_loss']['mean']:11.4f}" if a else
                 f"{'-':>13} {'-':>11}")
        lines.append(f"{name:{w}}{_fmt(m)}   {m['x2']['psnr']['mean']:8.2f} {m['x4']['psnr']['mean']:8.2f}   {flows}")
    d_psnr = np.array(arms["pixel"]["per_image"]["psnr"]) - np.array(arms["flow_only"]["per_image"]["psnr"])
    d_ssim = np.array(arms["pixel"]["per_image"]["ssim"]) - np.array(arms["flow_only"]["per_image"]["ssim"])
    lines.append(f"{'difference (+pixel - flow only)':{w}}{d_psnr.mean():+6.2f} ± {d_psnr.std():4.2f}   "
                 f"{d_ssim.mean():+.3f} ± {d_ssim.std():.3f}   (per-image paired differences; "
                 f"{int((d_psnr > 0).sum())}/{len(d_psnr)} images better in PSNR)")
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


def _across_seeds(results: List[Dict]) -> Dict:
    out = {}
    for arm in ARMS:
        vals = {k: [r["arms"][arm][k]["mean"] for r in results] for k in ("psnr", "ssim")}
        vals["unpaired_flow_loss"] = [r["arms"][arm]["unpaired_flow_loss"]["mean"] for r in results]
        vals["paired_flow_loss"] = [r["arms"][arm]["paired_flow_loss"]["mean"] for r in results]
        out[arm] = {k: dict(mean=float(np.mean(v)), std=float(np.std(v)), values=v) for k, v in vals.items()}
    return out


def main(argv: Optional[List[str]] = None) -> Dict:
    """Run the experiment; returns the dict written to ``metrics.json``."""
    start = time.time()
    args, pixel = parse(argv)
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    if not pixel.enabled:
        print("note: --pixel_loss_weight 0: both arms are flow-only")
    os.makedirs(args.output_dir, exist_ok=True)
    vae = load_vae(args.vae_dir)
    vae_meta = load_meta(args.vae_dir)
    tokenizer = data.WordTokenizer.default()
    pairs = data.eval_pairs(args.eval_split)
    unpaired = data.eval_unpaired(args.eval_split)
    base = baselines(vae, pairs)
    print(f"embedded bench: {len(pairs)} {args.eval_split} pairs from {len({p.meta['source'] for p in pairs})} sources, "
          f"{len(unpaired)} unpaired; VAE held-out reconstruction PSNR {vae_meta.get('heldout_psnr', float('nan')):.2f} dB; "
          f"{torch.get_num_threads()} torch threads")
    print("pixel loss:", ", ".join(f"{k}={v}" for k, v in pixel.to_flags().items()
                                   if k in ("pixel_loss_weight", "pixel_loss_type", "pixel_loss_terms", "pixel_loss_max_t",
                                            "pixel_loss_schedule", "pixel_loss_paired_only", "pixel_loss_max_images")))
    results, tables = [], []
    for k in range(args.seeds):
        seed = args.seed + k
        seed_result, preds = run_seed(args, pixel, seed, vae, pairs, unpaired, tokenizer)
        results.append(seed_result)
        tables.append(format_table(seed_result, base, pixel, len(pairs), args.eval_split))
        print(tables[-1], flush=True)
        if k == 0:
            save_grid(os.path.join(args.output_dir, "grid.png"), pairs, preds, args.grid_rows)
    report = dict(
        command="python train/main_sr_pixel_loss.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        arguments=dataclasses.asdict(args),
        pixel_loss=pixel.to_flags(),
        eval_split=args.eval_split,
        n_pairs=len(pairs),
        n_unpaired=len(unpaired),
        metric_definition="PSNR (dB) and SSIM (scikit-image, default window) on grayscale images in [0,1], data_range 1",
        baselines=base,
        seeds=results,
        vae=dict(heldout_psnr=vae_meta.get("heldout_psnr"), command=vae_meta.get("command")),
        torch_threads=torch.get_num_threads(),
        cpu_count=os.cpu_count(),
        platform=platform.platform(),
        seconds=round(time.time() - start, 1),
    )
    if args.seeds > 1:
        report["across_seeds"] = _across_seeds(results)
        lines = [f"over {args.seeds} seeds (mean ± std of the per-seed means):"]
        for arm in ARMS:
            a = report["across_seeds"][arm]
            lines.append(f"  {arm:10s} PSNR {a['psnr']['mean']:.2f} ± {a['psnr']['std']:.2f}  SSIM "
                         f"{a['ssim']['mean']:.3f} ± {a['ssim']['std']:.3f}  unpaired flow "
                         f"{a['unpaired_flow_loss']['mean']:.4f} ± {a['unpaired_flow_loss']['std']:.4f}")
        print("\n".join(lines))
    with open(os.path.join(args.output_dir, "metrics.json"), "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2)
    print(f"wrote {os.path.join(args.output_dir, 'metrics.json')} and grid.png in {report['seconds']:.0f} s")
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
