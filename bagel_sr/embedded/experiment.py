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
from pathlib import Path
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

from . import _compat  # noqa: F401

import numpy as np
import torch

from ..config import DEMO_DEFAULTS, DEMO_TRAIN_OVERRIDES, PixelLossConfig, parse_flags, pixel_loss_arguments_class
from ..errors import BadInput
from ..names import check_names
from ..outputs import Ledger, OutputFolderError, claim
from ..eval.stats import bootstrap_ci
from ..restoration import aggregate, visited_times
from . import data, sampling
from .backbone import TinyBagelConfig
from .train import LatentPool, TrainConfig, train, validate_train_config
from .vae import load_meta, load_vae


@dataclass
class ExperimentArguments(TrainConfig):
    steps: int = field(
        default=DEMO_TRAIN_OVERRIDES["steps"],
        metadata={"help": "Optimizer steps per arm (the demo's own default; the embedded loop's is 2000)."})
    timestep_shift: float = field(
        default=DEMO_TRAIN_OVERRIDES["timestep_shift"],
        metadata={"help": "Training timestep shift s: t = s*t/(1+(s-1)*t); below 1 puts more training targets at "
                          "low t, where the inference modes start (1 = BAGEL's logit-normal)."})
    t2i_ratio: float = field(
        default=DEMO_TRAIN_OVERRIDES["t2i_ratio"],
        metadata={"help": "Share of unpaired text-to-image samples in a batch (the loop's default is 0.25); "
                          "--pixel_loss_paired_only excludes their targets."})
    vae_cond_dropout_prob: float = field(
        default=DEMO_TRAIN_OVERRIDES["vae_cond_dropout_prob"],
        metadata={"help": "Probability of dropping the condition image (BAGEL's 0.1 trains the unconditional branch "
                          "for CFG, which the demo's samplers do not use)."})
    output_dir: str = field(default="outputs/embedded", metadata={"help": "Where metrics.json, grid.png, checkpoints go."})
    seeds: int = field(default=1, metadata={"help": "Repeat the experiment over this many seeds (seed, seed+1, ...)."})
    seed: int = field(default=0, metadata={"help": "First seed (model init, data order, noise)."})
    eval_split: str = field(default="heldout", metadata={"help": "'heldout' (report) or 'val' (for tuning)."})
    eval_ema: bool = field(default=True, metadata={"help": "Evaluate the EMA weights (else the raw weights)."})
    sample_steps: int = field(default=25, metadata={"help": "Euler steps of the sampler."})
    sample_timestep_shift: float = field(default=1.0, metadata={"help": "Timestep shift of the sampler schedule."})
    sample_modes: str = field(
        default="1:1:0,0.3:8:0,0.3:16:0,0.3:16:1,0.3:16:0:1",
        metadata={"help": "Inference modes measured for every arm, comma-separated START_T:NUM_SAMPLES:DC[:ONE_STEP] "
                          "(DC 1: back-projection onto the input, 10 steps; ONE_STEP 1: one Euler step from the start "
                          "to 0, the model's clean estimate), e.g. 1:1:0,0.3:4:0,0.3:4:1,0.3:8:0:1. The mode chosen on "
                          "the val split (+ pixel arm): the cheapest of those whose PSNR is within the paired 95% "
                          "interval of the best. Empty: only the stock sampler."})
    term_arms: str = field(
        default="",
        metadata={"help": "More + pixel arms, ';'-separated, each the + pixel arm with --pixel_loss_terms replaced, "
                          "e.g. 'ssim:1;grad:1;lpl:1;l2:1,ssim:0.1,grad:0.1,lpl:0.05' (each term alone and a "
                          "combination, against the + pixel arm's terms); compared with the + pixel arm per image."})
    # the backbone's size: TinyBagelConfig holds the defaults
    hidden_size: int = field(default=TinyBagelConfig.hidden_size, metadata={"help": "Backbone width."})
    num_hidden_layers: int = field(default=TinyBagelConfig.num_hidden_layers, metadata={"help": "Backbone depth."})
    num_attention_heads: int = field(default=TinyBagelConfig.num_attention_heads, metadata={"help": "Attention heads."})
    num_key_value_heads: int = field(default=TinyBagelConfig.num_key_value_heads, metadata={"help": "Key/value heads."})
    intermediate_size: int = field(default=TinyBagelConfig.intermediate_size, metadata={"help": "MLP width."})
    aligned_condition: bool = field(
        default=True,
        metadata={"help": "Add each target token's condition token (same grid cell) to its input embedding, as SR "
                          "diffusion models concatenate the input (BAGEL sees the condition through attention only)."})
    vae_dir: Optional[str] = field(default=None, metadata={"help": "VAE directory (default: the shipped one)."})
    save_checkpoints: bool = field(default=True, metadata={"help": "Write model/ema safetensors per arm."})
    grid_rows: int = field(default=8, metadata={"help": "Examples in grid.png."})
    lesion_images: int = field(
        default=16,
        metadata={"help": "Held-out patches of the lesion line (synthetic lesions and lesion-free twins, restored by "
                          "both arms in the chosen mode; seed 0 only); 0: no lesion line."})
    progress: bool = field(default=True, metadata={"help": "Show progress bars."})
    overwrite: bool = field(
        default=False,
        metadata={"help": "Redo a finished run in --output_dir (deletes only the files that run wrote there)."})


def arm_configs(pixel: PixelLossConfig, term_arms: str) -> Dict[str, PixelLossConfig]:
    """``{arm name: its pixel-loss settings}``: flow only (weight 0), + pixel, then one arm per ``--term_arms`` item.
    The pixel arms also measure the gradient norms of the terms on llm2vae every 10 steps (monitoring only)."""
    watched = dataclasses.replace(pixel, log_grad_norms_every=pixel.log_grad_norms_every or 10)
    arms = {"flow_only": dataclasses.replace(pixel, weight=0.0), "pixel": watched}
    for item in filter(None, (t.strip() for t in term_arms.split(";"))):
        name = f"terms={item}"
        if name in arms:
            raise BadInput(f"--term_arms: {item!r} appears twice")
        try:
            arms[name] = dataclasses.replace(watched, terms=item)
            arms[name].term_weights  # parses the terms, naming the flag on error
        except ValueError as exc:
            raise BadInput(f"--term_arms {item!r}: {exc}") from None
    return arms


def arm_label(arm: str, pixel: PixelLossConfig) -> str:
    if arm == "flow_only":
        return "flow only"
    terms = pixel.terms or pixel.loss_type
    return f"flow + pixel (w={pixel.weight:g}, {terms}, t<={pixel.max_t:g})"


@dataclass(frozen=True)
class Mode:
    """An inference mode: start time, samples averaged (mean), data consistency on/off, one Euler step from the
    start to 0 (the model's clean estimate) instead of the rest of the grid."""

    start_t: float = 1.0
    num_samples: int = 1
    dc: bool = False
    one_step: bool = False

    @property
    def name(self) -> str:
        return f"T0={self.start_t:g} K={self.num_samples}{' one-step' if self.one_step else ''}{' +DC' if self.dc else ''}"

    def evaluations(self, steps: int, timestep_shift: float) -> int:
        """Model evaluations per image on the sampler's grid of ``steps`` steps."""
        times = visited_times(sampling.sampler_grid(steps, timestep_shift), self.start_t, self.one_step)
        return self.num_samples * (len(times) - 1)


def parse_modes(text: str) -> List[Mode]:
    """``"1:1:0,0.3:4:1,0.3:8:0:1"`` -> modes; a ``BadInput`` for anything else."""
    modes = []
    for item in filter(None, (t.strip() for t in text.split(","))):
        try:
            fields = item.split(":")
            if len(fields) not in (3, 4):
                raise ValueError
            mode = Mode(float(fields[0]), int(fields[1]), bool(int(fields[2])),
                        bool(int(fields[3])) if len(fields) == 4 else False)
        except ValueError:
            raise BadInput(f"--sample_modes {item!r}: expected START_T:NUM_SAMPLES:DC[:ONE_STEP], e.g. 0.3:4:1 or "
                           "0.3:8:0:1") from None
        if not (0.0 <= mode.start_t <= 1.0 and mode.num_samples >= 1):
            raise BadInput(f"--sample_modes {item!r}: START_T in [0, 1], NUM_SAMPLES >= 1")
        if mode.name in {m.name for m in modes}:
            raise BadInput(f"--sample_modes: {item!r} appears twice")
        modes.append(mode)
    return modes


def choose_mode(val_psnr: Dict[str, Sequence[float]], modes: Sequence[Mode], steps: int, timestep_shift: float) -> str:
    """The mode chosen on the val split: among the modes whose per-image PSNR difference to the best mode (by mean)
    has a bootstrap 95% interval reaching 0 (as good as the best, within the noise of the split), the one with the
    fewest model evaluations per image, then without DC, then the best mean.  ``val_psnr``: mode name -> per-image
    PSNR on val, the same images in the same order."""

    best = max(val_psnr, key=lambda n: float(np.mean(val_psnr[n])))
    tied = [m for m in modes if m.name in val_psnr and
            bootstrap_ci(np.asarray(val_psnr[m.name]) - np.asarray(val_psnr[best]), n_boot=2000, seed=0).hi >= 0]
    return min(tied, key=lambda m: (m.evaluations(steps, timestep_shift), m.dc, -float(np.mean(val_psnr[m.name])))).name


def sample_modes(model, vae, pairs, tokenizer, modes: Sequence[Mode], args, seed: int,
                 stock: Optional[tuple] = None) -> Dict[str, Dict]:
    """Predictions and sampling seconds of every mode.  Modes that differ only in K share one set of runs: the
    K-sample mode averages the first K of the largest K's runs (seeds ``seed .. seed + K - 1``, as
    :func:`sampling.posterior_samples`; its seconds are that set's times K / K_max), and modes that differ only in
    DC share their samples.  ``stock``: ``(prediction, seconds)`` of the stock sampler on ``pairs`` with this seed,
    reused for ``T0=1 K=1`` (the same sample: one run from noise, its mean is itself)."""

    largest: Dict[tuple, int] = {}
    for mode in modes:
        key = (mode.start_t, mode.one_step)
        largest[key] = max(largest.get(key, 0), mode.num_samples)
    out, runs = {}, {}
    for mode in modes:
        key = (mode.start_t, mode.one_step)
        if stock is not None and key == (1.0, False) and mode.num_samples == 1:
            pred, seconds = stock
        else:
            if key not in runs:
                t0 = time.time()
                runs[key] = (sampling.euler_runs(model, vae, pairs, tokenizer, seeds=range(seed, seed + largest[key]),
                                                 steps=args.sample_steps, timestep_shift=args.sample_timestep_shift,
                                                 start_t=mode.start_t, one_step=mode.one_step, clamp=False),
                             time.time() - t0)
            all_runs, all_seconds = runs[key]
            pred = aggregate(all_runs[: mode.num_samples], "mean")[0].clamp(-1, 1)
            seconds = all_seconds * mode.num_samples / largest[key]
        if mode.dc:
            t0 = time.time()
            pred = sampling.back_project(pred, pairs)
            seconds += time.time() - t0
        out[mode.name] = dict(pred=pred, seconds=seconds)
    return out


def parse(argv: Optional[Sequence[str]] = None):
    classes = (ExperimentArguments, pixel_loss_arguments_class(defaults=DEMO_DEFAULTS))
    args, pixel_args = parse_flags(classes, sys.argv[1:] if argv is None else argv)
    if args.eval_split not in ("heldout", "val"):
        raise BadInput(f"--eval_split: got {args.eval_split!r}; allowed: 'heldout', 'val'")
    for name, low in (("seeds", 1), ("sample_steps", 1), ("grid_rows", 0), ("lesion_images", 0), ("hidden_size", 1),
                      ("num_hidden_layers", 1), ("num_attention_heads", 1), ("num_key_value_heads", 1),
                      ("intermediate_size", 1)):
        if getattr(args, name) < low:
            raise BadInput(f"--{name} {getattr(args, name)}: expected an integer >= {low}")
    validate_train_config(args)
    parse_modes(args.sample_modes)
    pixel = PixelLossConfig.from_namespace(pixel_args)
    arm_configs(pixel, args.term_arms)
    check_names("--pixel_loss_datasets", pixel.dataset_names, data.DATASET_NAMES)
    return args, pixel


TOOL = "bagel_sr.embedded.experiment"


def claim_output_dir(args: ExperimentArguments, pixel: PixelLossConfig) -> Ledger:
    """The ``--output_dir`` ledger; a finished run there is refused unless ``--overwrite`` (see bagel_sr.outputs)."""
    settings = {k: v for k, v in dataclasses.asdict(args).items() if k not in ("output_dir", "overwrite", "progress")}
    settings.update(pixel.to_flags())
    old = Ledger.read(Path(args.output_dir)) if os.path.isdir(args.output_dir) else None
    if old is not None and old.complete:
        if not args.overwrite:
            raise OutputFolderError(f"--output_dir {args.output_dir} holds a finished run; pass --overwrite to redo it "
                                    "(deletes only the files that run wrote) or choose another --output_dir")
        old.remove_written()
        return Ledger(Path(args.output_dir), TOOL, settings).start()
    return claim(args.output_dir, TOOL, settings, overwrite=args.overwrite)[0]


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


def model_config_for(args: ExperimentArguments, tokenizer: data.WordTokenizer) -> TinyBagelConfig:
    """The backbone that ``args`` asks for."""
    return TinyBagelConfig(
        vocab_size=len(tokenizer), hidden_size=args.hidden_size, num_hidden_layers=args.num_hidden_layers,
        num_attention_heads=args.num_attention_heads, num_key_value_heads=args.num_key_value_heads,
        intermediate_size=args.intermediate_size, timestep_shift=args.timestep_shift,
        aligned_condition=args.aligned_condition,
    )


def train_config_for(args: ExperimentArguments) -> TrainConfig:
    """The training settings that ``args`` asks for (the fields the two share)."""
    return TrainConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)})


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
            from .lesion_bench import lesion_line

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
    from ..errors import cli_main

    sys.exit(cli_main(main, sys.argv[1:]))
