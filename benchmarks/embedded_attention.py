"""What per-sample attention saves the embedded backbone, measured side by side in one run (a script, never a
timed test).

    python benchmarks/embedded_attention.py              # about a minute on 2 CPU cores
    python benchmarks/embedded_attention.py --repeats 5 --steps 20

``TinyBagel`` receives BAGEL's packed sequence (16 samples of about 45 tokens, one ``L x L`` additive mask that is
block-diagonal over the samples).  Run as one sequence, attention costs ``L^2`` of which the samples use
``sum n_i^2`` (about 1/16); ``per_sample_attention`` (the default) runs the same samples as a padded batch.  One
training step (forward, backward, AdamW) of a realistic micro-batch of the default experiment, both ways, alternated
``--repeats`` times; prints ms per step (median), the ratio, and the largest difference of the losses (the two are the
same computation).
"""
import argparse
import statistics
import time

import numpy as np
import torch

from bagel_sr.embedded import _compat  # noqa: F401
from bagel_sr.embedded import data
from bagel_sr.embedded.backbone import TinyBagel, TinyBagelConfig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch_size", type=int, default=16, help="samples per micro-batch")
    parser.add_argument("--steps", type=int, default=10, help="training steps per timing")
    parser.add_argument("--repeats", type=int, default=3, help="timings of each way, alternated")
    parser.add_argument("--num_hidden_layers", type=int, default=TinyBagelConfig.num_hidden_layers, help="backbone depth")
    parser.add_argument("--hidden_size", type=int, default=TinyBagelConfig.hidden_size, help="backbone width")
    args = parser.parse_args()

    tokenizer = data.WordTokenizer.default()
    samples = data.TrainStream(0, "train", t2i_ratio=0.1).take(args.batch_size)
    batch = data.pack(samples, tokenizer, np.random.default_rng(0), vae_cond_dropout_prob=0.0)
    batch["padded_latent"] = torch.randn(batch["padded_images"].shape[0], 16, 8, 8, generator=torch.Generator().manual_seed(0))
    inputs = {k: v for k, v in batch.items() if k not in ("padded_images", "batch_data_indexes")}
    lens = batch["sample_lens"]
    print(f"{len(lens)} samples, {sum(lens)} tokens (sample lengths {min(lens)}-{max(lens)}); attention entries: "
          f"packed {sum(lens) ** 2}, per sample padded {len(lens) * max(lens) ** 2}; {torch.get_num_threads()} threads")

    models, optims, losses = {}, {}, {}
    for per_sample in (False, True):
        torch.manual_seed(0)
        config = TinyBagelConfig(vocab_size=len(tokenizer), hidden_size=args.hidden_size,
                                 num_hidden_layers=args.num_hidden_layers, aligned_condition=True,
                                 per_sample_attention=per_sample)
        models[per_sample] = TinyBagel(config)
        torch.nn.init.normal_(models[per_sample].llm2vae.weight, std=0.02)
        optims[per_sample] = torch.optim.AdamW(models[per_sample].parameters(), lr=1e-3)
        torch.manual_seed(1)
        losses[per_sample] = models[per_sample](**inputs)["mse"].detach()
    diff = (losses[True] - losses[False]).abs().max().item()

    times = {False: [], True: []}
    for _ in range(args.repeats):
        for per_sample, model in models.items():
            start = time.perf_counter()
            for _ in range(args.steps):
                loss = model(**inputs)["mse"].mean()
                loss.backward()
                optims[per_sample].step()
                optims[per_sample].zero_grad()
            times[per_sample].append(1000 * (time.perf_counter() - start) / args.steps)
    packed, per_sample = statistics.median(times[False]), statistics.median(times[True])
    print(f"training step, packed block mask: {packed:.1f} ms; per-sample batch: {per_sample:.1f} ms; "
          f"ratio {packed / per_sample:.2f}x (median of {args.repeats} x {args.steps} steps, alternated); "
          f"largest loss difference {diff:.1e}")


if __name__ == "__main__":
    main()
