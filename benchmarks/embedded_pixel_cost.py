"""What the pixel term costs the embedded experiment's training, measured side by side in one run (a script, never a
timed test).

    python benchmarks/embedded_pixel_cost.py                 # about 3 minutes on 2 CPU cores
    python benchmarks/embedded_pixel_cost.py --steps 300 --repeats 5

The default experiment times its two arms one after the other, minutes apart, and on a shared VM those timings swing
by 20-30%. Here the arms train from the same seed, pool and settings (the experiment's defaults, fewer steps),
alternated ``--repeats`` times: flow only, the pixel arm at the embedded defaults (one decoded image per
micro-batch, a 4x4-latent crop, no margin), the same with a 1-latent-pixel margin, and the whole image
(``--pixel_loss_crop 0``). Prints each arm's median ms per training step and its ratio to flow only (the
target: <= 1.3x).
"""
import argparse
import dataclasses
import statistics

import torch

from bagel_sr.embedded import _compat  # noqa: F401
from bagel_sr.config import DEMO_DEFAULTS, PixelLossConfig
from bagel_sr.embedded import data
from bagel_sr.embedded.experiment_settings import ExperimentArguments, model_config_for, train_config_for
from bagel_sr.embedded.train import LatentPool, train
from bagel_sr.embedded.vae import load_vae

ARMS = {
    "flow only": dict(weight=0.0),
    "+ pixel, embedded defaults (crop 4, margin 0)": {},
    "+ pixel, crop 4, margin 1": dict(crop_margin=1),
    "+ pixel, whole image (crop 0)": dict(crop=0),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=150, help="training steps per timing")
    parser.add_argument("--repeats", type=int, default=3, help="timings of each arm")
    parser.add_argument("--num_threads", type=int, default=2, help="torch CPU threads")
    args = parser.parse_args()

    torch.set_num_threads(args.num_threads)
    exp = ExperimentArguments()
    tokenizer = data.WordTokenizer.default()
    vae = load_vae()
    model_config = model_config_for(exp, tokenizer)
    cfg = dataclasses.replace(train_config_for(exp), steps=args.steps)
    pool = LatentPool.build(0, exp.pool_size, vae, exp.t2i_ratio)
    print(f"{args.steps} steps per timing, {args.repeats} repeats alternated, {torch.get_num_threads()} threads, "
          f"batch {cfg.batch_size}")

    times = {name: [] for name in ARMS}
    for _ in range(args.repeats):
        for name, change in ARMS.items():
            pixel = PixelLossConfig(**{**DEMO_DEFAULTS, **change})
            run = train(dataclasses.replace(model_config), cfg, pixel, vae, seed=0, progress=False,
                        tokenizer=tokenizer, pool=pool)
            times[name].append(1000 * run.seconds / args.steps)
    flow = statistics.median(times["flow only"])
    for name, values in times.items():
        ms = statistics.median(values)
        print(f"{name:48s} {ms:6.1f} ms/step (median; range {min(values):.1f}-{max(values):.1f})  "
              f"{ms / flow:.2f}x flow only")


if __name__ == "__main__":
    main()
