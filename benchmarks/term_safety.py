"""Safety runs of the fidelity terms on the embedded bench (a script, not a test).

    python benchmarks/term_safety.py                  # 200 steps, each structural term at 10x its default weight
    python benchmarks/term_safety.py --steps 50 --terms ssim:1

Trains the embedded ``TinyBagel`` once with the flow loss only and once per ``--terms`` entry (flow + pixel term,
the wrapper's conservative defaults otherwise), from the same seed, data and noise, and reports for each arm whether
every logged value stayed finite and its held-out unpaired (text-to-image) flow loss relative to the flow-only arm's
(the criterion: within 5%).  Also the largest logged ratio of the weighted pixel gradient to the flow gradient on
``llm2vae``.  Writes ``term_safety.json`` to ``--output_dir``.
"""
import argparse
import dataclasses
import json
import math
import os
import sys
import time

from bagel_sr.config import CONSERVATIVE_DEFAULTS, DEFAULT_TERM_WEIGHTS, PixelLossConfig
from bagel_sr.embedded import data, sampling
from bagel_sr.embedded.backbone import TinyBagelConfig
from bagel_sr.embedded.train import TrainConfig, train
from bagel_sr.embedded.vae import load_vae

TEN_X = ",".join(f"{k}:{10 * DEFAULT_TERM_WEIGHTS[k]:g}" for k in ("ssim", "grad", "lpl"))


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=200, help="optimizer steps per arm")
    p.add_argument("--terms", default=TEN_X, help="one arm per comma-separated term:weight")
    p.add_argument("--seed", type=int, default=0, help="seed of every arm (model, data, noise)")
    p.add_argument("--split", default="heldout", choices=("val", "heldout"), help="split the flow loss is measured on")
    p.add_argument("--output_dir", default="outputs/term_safety", help="folder of term_safety.json")
    return p.parse_args(argv)


def _finite(history) -> bool:
    return all(math.isfinite(float(v)) for rec in history for v in rec.values() if isinstance(v, (int, float)))


def main(argv=None) -> dict:
    args = parse(argv)
    vae, tokenizer = load_vae(), data.WordTokenizer.default()
    unpaired = data.eval_unpaired(args.split)
    cfg = TrainConfig(steps=args.steps)
    base = PixelLossConfig(**CONSERVATIVE_DEFAULTS)
    arms = {"flow_only": dataclasses.replace(base, weight=0.0)}
    for item in args.terms.split(","):
        arms[item] = dataclasses.replace(base, terms=item, log_grad_norms_every=10)
    out = {"command": " ".join(["python", "benchmarks/term_safety.py"] + (argv or sys.argv[1:])), "arms": {}}
    for name, pixel in arms.items():
        t0 = time.time()
        run = train(TinyBagelConfig(), cfg, pixel, vae, seed=args.seed, progress=False, desc=name, tokenizer=tokenizer)
        flow = sampling.flow_loss(run.ema_model, vae, unpaired, tokenizer, seed=args.seed)["mean"]
        ratios = [float(h["grad_norm_ratio"]) for h in run.history if "grad_norm_ratio" in h]
        out["arms"][name] = dict(finite=_finite(run.history), unpaired_flow_loss=flow,
                                 max_grad_norm_ratio=max(ratios) if ratios else None,
                                 skipped=float(run.history[-1].get("pixel_skipped", 0)) if run.history else 0,
                                 seconds=round(time.time() - t0, 1))
        print(name, out["arms"][name], flush=True)
    ref = out["arms"]["flow_only"]["unpaired_flow_loss"]
    print(f"\n{'arm':<12} {'finite':>6} {'unpaired flow':>14} {'vs flow only':>13} {'max grad ratio':>15}")
    for name, a in out["arms"].items():
        a["relative_to_flow_only"] = a["unpaired_flow_loss"] / ref - 1
        ratio = f"{a['max_grad_norm_ratio']:.3f}" if a["max_grad_norm_ratio"] is not None else "-"
        print(f"{name:<12} {str(a['finite']):>6} {a['unpaired_flow_loss']:14.4f} {100 * a['relative_to_flow_only']:+12.2f}% "
              f"{ratio:>15}")
    os.makedirs(args.output_dir, exist_ok=True)
    with open(os.path.join(args.output_dir, "term_safety.json"), "w") as f:
        json.dump(out, f, indent=2)
    return out


if __name__ == "__main__":
    main()
