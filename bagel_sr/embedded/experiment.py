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
from typing import Dict, List, Optional

from . import _compat  # noqa: F401

import numpy as np
import torch

from ..config import PixelLossConfig
from ..errors import BadInput, cli_main  # noqa: F401 (BadInput re-exported)
from ..outputs import Ledger, claim
from . import data, sampling
from .experiment_report import format_across_seeds, format_table, save_grid, _across_seeds
from .experiment_settings import (ExperimentArguments, arm_configs,  # noqa: F401 (re-exported)
                                  model_config_for, parse, train_config_for)
from .lesion_bench import lesion_line
from .modes import Mode, choose_mode, parse_modes, sample_modes  # noqa: F401 (re-exported)
from .train import LatentPool, TrainConfig, train
from .vae import load_meta, load_vae


TOOL = "bagel_sr.embedded.experiment"


def claim_output_dir(args: ExperimentArguments, pixel: PixelLossConfig) -> Ledger:
    """The ``--output_dir`` ledger; a finished run there is refused unless ``--overwrite`` (see bagel_sr.outputs)."""
    settings = {k: v for k, v in dataclasses.asdict(args).items() if k not in ("output_dir", "overwrite", "progress")}
    settings.update(pixel.to_flags())
    return claim(args.output_dir, TOOL, settings, overwrite=args.overwrite, refuse_finished=True)[0]


def checkpoint_files(arm_dir: str, cfg: TrainConfig) -> List[str]:
    """Files :func:`train` writes under ``arm_dir`` (final and intermediate checkpoints)."""
    names = ("model.safetensors", "ema.safetensors", "config.json")
    steps = [s for s in range(cfg.save_every, cfg.steps, cfg.save_every)] if cfg.save_every else []
    dirs = [arm_dir] + [os.path.join(arm_dir, f"{s:07d}") for s in steps]
    return [os.path.join(d, n) for d in dirs for n in names]


def _summary(values: np.ndarray) -> Dict[str, float]:
    return dict(mean=float(np.mean(values)), std=float(np.std(values)))


def _arm_metrics(pred: torch.Tensor, pairs: List[data.Sample]) -> Dict:
    m = sampling.image_metrics(pred, torch.stack([p.target for p in pairs]))
    scales = np.array([p.meta["scale"] for p in pairs])
    out = dict(psnr=_summary(m["psnr"]), ssim=_summary(m["ssim"]), halluc=_summary(m["halluc"]),
               per_image={k: m[k].tolist() for k in ("psnr", "ssim", "halluc")})
    for s in sorted(set(scales.tolist())):
        out[f"x{s}"] = dict(psnr=_summary(m["psnr"][scales == s]), ssim=_summary(m["ssim"][scales == s]))
    return out


def run_seed(args: ExperimentArguments, pixel: PixelLossConfig, seed: int, vae, pairs, unpaired, tokenizer,
             ledger: Optional[Ledger] = None, val_pairs: Optional[List[data.Sample]] = None,
             models: Optional[Dict] = None) -> Dict:
    model_config = model_config_for(args, tokenizer)
    train_cfg = train_config_for(args)
    modes = parse_modes(args.sample_modes)
    result, preds = {}, {}
    t0 = time.time()
    pool = LatentPool.build(seed, args.pool_size, vae, args.t2i_ratio) if args.pool_size > 0 else None
    pool_seconds = round(time.time() - t0, 1)
    for arm, arm_pixel in arm_configs(pixel, args.term_arms).items():
        folder = arm.replace("terms=", "terms_").replace(":", "-").replace(",", "_")
        out_dir = os.path.join(args.output_dir, f"seed{seed}", folder) if args.save_checkpoints else None
        for rel in checkpoint_files(os.path.join(f"seed{seed}", folder), train_cfg) if out_dir and ledger else []:
            ledger.record(rel)
        run = train(dataclasses.replace(model_config), train_cfg, arm_pixel, vae, seed=seed, output_dir=out_dir,
                    progress=args.progress, desc=f"seed {seed} {arm}", tokenizer=tokenizer, pool=pool)
        model = run.ema_model if args.eval_ema else run.model
        if models is not None:  # kept for the lesion line
            models[arm] = model
        t0 = time.time()
        pred = sampling.euler_sample(model, vae, pairs, tokenizer, steps=args.sample_steps,
                                     timestep_shift=args.sample_timestep_shift, seed=seed)
        sample_seconds = time.time() - t0
        metrics = _arm_metrics(pred, pairs)
        if modes:
            runs = sample_modes(model, vae, pairs, tokenizer, modes, args, seed, stock=(pred, sample_seconds))
            metrics["modes"] = {name: dict(_arm_metrics(r["pred"], pairs), sample_seconds=round(r["seconds"], 1))
                                for name, r in runs.items()}
            val = val_pairs if val_pairs is not None else pairs
            val_runs = runs if val_pairs is None else sample_modes(model, vae, val, tokenizer, modes, args, seed)
            val_metrics = {n: _arm_metrics(r["pred"], val) for n, r in val_runs.items()}
            metrics["modes_val_psnr"] = {n: float(m["psnr"]["mean"]) for n, m in val_metrics.items()}
            metrics["modes_val_ssim"] = {n: float(m["ssim"]["mean"]) for n, m in val_metrics.items()}
            metrics["modes_val_per_image_psnr"] = {n: m["per_image"]["psnr"] for n, m in val_metrics.items()}
        t_flow = time.time()
        metrics["unpaired_flow_loss"] = sampling.flow_loss(model, vae, unpaired, tokenizer, seed=seed)
        metrics["paired_flow_loss"] = sampling.flow_loss(model, vae, pairs, tokenizer, seed=seed)
        metrics.update(train_seconds=round(run.seconds, 1), eval_seconds=round(time.time() - t_flow + sample_seconds, 1),
                       sample_seconds=round(sample_seconds, 1),
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
    out = dict(seed=seed, pool_seconds=pool_seconds, arms=result)
    if "modes_val_psnr" in result["pixel"]:  # chosen on the val split, never on held-out
        out["chosen_mode"] = choose_mode(result["pixel"]["modes_val_per_image_psnr"], modes, args.sample_steps,
                                         args.sample_timestep_shift)
    return out, preds


def baselines(vae, pairs: List[data.Sample]) -> Dict:
    lr = torch.stack([p.condition for p in pairs])
    hr = torch.stack([p.target for p in pairs])
    return dict(lr_input=_arm_metrics(lr, pairs), vae_round_trip=_arm_metrics(sampling.vae_round_trip(vae, hr), pairs))


def main(argv: Optional[List[str]] = None) -> Dict:
    """Run the experiment; returns the dict written to ``metrics.json``."""
    start = time.time()
    args, pixel = parse(argv)
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    if not pixel.enabled:
        print("note: --pixel_loss_weight 0: both arms are flow-only")
    ledger = claim_output_dir(args, pixel)
    vae = load_vae(args.vae_dir)
    vae_meta = load_meta(args.vae_dir)
    tokenizer = data.WordTokenizer.default()
    pairs = data.eval_pairs(args.eval_split)
    unpaired = data.eval_unpaired(args.eval_split)
    val_pairs = data.eval_pairs("val") if args.eval_split != "val" and parse_modes(args.sample_modes) else None
    base = baselines(vae, pairs)
    print(f"embedded bench: {len(pairs)} {args.eval_split} pairs from {len({p.meta['source'] for p in pairs})} sources, "
          f"{len(unpaired)} unpaired; VAE held-out reconstruction PSNR {vae_meta.get('heldout_psnr', float('nan')):.2f} dB; "
          f"{torch.get_num_threads()} torch threads")
    print("pixel loss:", ", ".join(f"{k}={v}" for k, v in pixel.to_flags().items()
                                   if k in ("pixel_loss_weight", "pixel_loss_type", "pixel_loss_terms", "pixel_loss_max_t",
                                            "pixel_loss_schedule", "pixel_loss_paired_only", "pixel_loss_max_images")))
    results, tables, lesions = [], [], None
    for k in range(args.seeds):
        seed = args.seed + k
        models = {} if k == 0 and args.lesion_images else None
        seed_result, preds = run_seed(args, pixel, seed, vae, pairs, unpaired, tokenizer, ledger, val_pairs, models)
        results.append(seed_result)
        tables.append(format_table(seed_result, base, pixel, len(pairs), args.eval_split))
        print(tables[-1], flush=True)
        if k == 0:
            save_grid(str(ledger.record("grid.png")), pairs, preds, args.grid_rows)
        if models:  # after the results, from its own generators: nothing printed above changes
            lesions = lesion_line(args, seed_result, models, vae, tokenizer)
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
    if lesions is not None:
        report["lesions"] = lesions
    if args.seeds > 1:
        report["across_seeds"] = _across_seeds(results)
        print(format_across_seeds(report["across_seeds"], base, results))
    with open(ledger.record("metrics.json"), "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2)
    ledger.mark_complete()
    print(f"wrote {os.path.join(args.output_dir, 'metrics.json')} and grid.png in {report['seconds']:.0f} s")
    return report


if __name__ == "__main__":
    sys.exit(cli_main(main, sys.argv[1:]))
