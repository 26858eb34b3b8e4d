"""The embedded bench's VAE: BAGEL's latent geometry (8x, 16 channels), its training command and loader.

The architecture is :class:`bagel_sr.embedded.autoencoder.LinearPlusResidualAutoencoder` (a PCA-initialised linear
8x8 patch code plus a small diffusers ``AutoencoderDC`` residual).  With BAGEL's 2x2 token patches one token covers
16x16 pixels, so a 64x64 image is a 4x4 token grid.  ``scale_factor`` / ``shift_factor`` are measured on the training
data so that the scaled latents ``scale * (z - shift)`` have about unit standard deviation (BAGEL's convention;
``bagel_sr.decoding.DiffusersVAE`` applies it).

The weights ship with the package (``assets/vae.safetensors``, float16 on disk, float32 in memory) together with
``assets/vae.json`` (configuration, factors, measured PSNR, the command that made them).  Retrain with::

    python -m bagel_sr.embedded.vae train --out bagel_sr/embedded/assets --steps 4000 --lr 3e-4 --lr_share 0.3

PSNR is measured on grayscale images in [0, 1] (channel mean of the decoded RGB, clipped), ``data_range = 1``; the
number that matters is the one on the held-out *high-resolution targets*: no restoration metric can exceed it.
"""
import json
import math
import os
import sys
import time
from typing import Dict, List, Optional, Sequence

from . import _compat  # noqa: F401  (import guard before diffusers)

import torch
import torch.nn.functional as F

from ..decoding import DiffusersVAE
from ..errors import ArgumentParser, cli_main
from . import data
from .autoencoder import LinearPlusResidualAutoencoder, residual_config

ASSETS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets")
WEIGHTS_NAME, META_NAME = "vae.safetensors", "vae.json"
PCA_IMAGES = 512  # training images whose 8x8 patches initialise the linear path

#: The architecture (``LinearPlusResidualAutoencoder`` keyword arguments).
VAE_CONFIG: Dict = dict(residual=residual_config((32, 64, 128, 128)))


def build_autoencoder(config: Optional[Dict] = None) -> LinearPlusResidualAutoencoder:
    config = config or VAE_CONFIG
    if "residual" not in config:
        raise ValueError("this VAE configuration predates bagel-sr's linear + residual autoencoder (no 'residual' "
                         "key); retrain it with `python -m bagel_sr.embedded.vae train --out <dir>`")
    return LinearPlusResidualAutoencoder(config["residual"])


def psnr(x_hat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR (dB) of grayscale images in [0, 1]: ``(N, H, W)`` -> ``(N,)``, data_range 1."""
    mse = (x_hat.float() - x.float()).square().flatten(1).mean(1).clamp(min=1e-12)
    return 10 * torch.log10(1.0 / mse)


def load_vae(directory: Optional[str] = None) -> DiffusersVAE:
    """The frozen VAE (float32, eval, no gradients to its weights) with BAGEL's ``encode``/``decode`` convention."""
    from safetensors.torch import load_file

    directory = directory or ASSETS
    meta = load_meta(directory)
    ae = build_autoencoder(meta["config"])
    state = {k: v.float() for k, v in load_file(os.path.join(directory, WEIGHTS_NAME)).items()}
    ae.load_state_dict(state)
    vae = DiffusersVAE(ae, meta["scale_factor"], meta["shift_factor"]).eval()
    for p in vae.parameters():
        p.requires_grad_(False)
    return vae


def load_meta(directory: Optional[str] = None) -> Dict:
    path = os.path.join(directory or ASSETS, META_NAME)
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"no VAE at {path}; train one with `python -m bagel_sr.embedded.vae train --out <dir>` "
            "(the package ships one in bagel_sr/embedded/assets)"
        )
    with open(path, encoding="utf-8") as f:
        return json.load(f)


@torch.no_grad()
def reconstruction_psnr(vae: DiffusersVAE, images: torch.Tensor, seed: int = 0, batch: int = 32) -> torch.Tensor:
    """Per-image PSNR of ``decode(encode(x))`` (as in training) for (N, 3, H, W) in [-1, 1]."""
    torch.manual_seed(seed)
    out = []
    for i in range(0, len(images), batch):
        x = images[i : i + batch]
        out.append(psnr(data.to_unit_gray(vae.decode(vae.encode(x))), data.to_unit_gray(x)))
    return torch.cat(out)


def split_images(split: str, hr_only: bool = False) -> torch.Tensor:
    """The images the bench feeds the VAE for an evaluation split: its HR patches (the targets, whose reconstruction
    is the ceiling of any pixel metric) and, unless ``hr_only``, their LR inputs (x2, x4)."""
    images = []
    for p in data.eval_pairs(split):
        if p.meta["scale"] == data.SCALES[0]:  # each patch comes once per scale: take its HR image once
            images.append(p.target)
        if not hr_only:
            images.append(p.condition)
    return torch.stack(images)


def _training_batch(stream: data.TrainStream, n: int, lr_share: float = 0.5, crop: int = 0) -> torch.Tensor:
    """``n`` training images: high-resolution patches and (a share ``lr_share``) their degraded inputs, optionally
    randomly cropped to ``crop`` pixels (the autoencoder is fully convolutional: cheap small crops train it too)."""
    images: List[torch.Tensor] = []
    while len(images) < n:
        s = next(stream)
        x = s.condition if s.condition is not None and stream.rng.random() < lr_share else s.target
        if crop and crop < x.shape[-1]:
            top, left = (int(v) for v in stream.rng.integers(0, x.shape[-1] - crop + 1, size=2))
            x = x[:, top : top + crop, left : left + crop]
        images.append(x)
    return torch.stack(images)


@torch.no_grad()
def measure_factors(ae, stream: data.TrainStream, n_batches: int = 8, batch: int = 32) -> Dict[str, float]:
    """``shift`` = mean and ``scale`` = 1 / std of the raw latents of training images."""
    zs = torch.cat([ae.encode(_training_batch(stream, batch)).latent.flatten() for _ in range(n_batches)])
    shift = float(zs.mean())
    return dict(shift_factor=shift, scale_factor=float(1.0 / (zs - shift).std().clamp(min=1e-6)))


def train(out: str, steps: int = 3000, batch_size: int = 16, lr: float = 3e-4, seed: int = 0, eval_every: int = 250,
          num_threads: int = 0, progress: bool = True, init: Optional[str] = None, crop: int = 0,
          lr_share: float = 0.5, save_every: int = 100) -> Dict:
    """Train the VAE on the training split (HR and LR images), save it to ``out`` and return its metadata.

    The linear path starts from the principal components of ``PCA_IMAGES`` training images, the residual from zero;
    the loss is ``MSE + 0.5 L1`` of the reconstruction (AdamW, warm-up then cosine decay to 0.1x, clipping at 1).

    ``init``: a directory with a saved VAE to continue from (its weights; a fresh optimizer and schedule);
    ``crop``: train on random crops of this size (0 = whole 64x64 patches); ``lr_share``: share of degraded inputs.
    Every ``save_every`` steps the full training state goes to ``out/train_state.pt``; running the same command
    again resumes from it (same schedule, same data stream) until the run completes.
    """
    from tqdm import tqdm

    if crop and crop % 8:
        raise ValueError(f"--crop {crop}: crops must be a multiple of 8 pixels (the autoencoder's patch), or 0")
    if num_threads:
        torch.set_num_threads(num_threads)
    torch.manual_seed(seed)
    stream = data.TrainStream(seed, "train", t2i_ratio=0.0)
    ae = build_autoencoder()
    pca_variance = ae.pca_init(_training_batch(stream, PCA_IMAGES, lr_share)[:, 0])
    history = []
    if init:
        from safetensors.torch import load_file

        ae.load_state_dict({k: v.float() for k, v in load_file(os.path.join(init, WEIGHTS_NAME)).items()})
        history = load_meta(init).get("history", []) + [load_meta(init).get("command")]
    opt = torch.optim.AdamW(ae.parameters(), lr=lr, weight_decay=0.0)
    warmup = min(100, max(1, steps // 10))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    )
    val_images = split_images("val", hr_only=True)
    start, first = time.time(), 0
    state_path = os.path.join(out, "train_state.pt")
    if os.path.exists(state_path):  # resume an interrupted run of this command
        st = torch.load(state_path, weights_only=False)
        ae.load_state_dict(st["model"])
        opt.load_state_dict(st["opt"])
        sched.load_state_dict(st["sched"])
        stream.rng.bit_generator.state = st["rng"]
        stream.generator.set_state(st["tgen"])
        torch.set_rng_state(st["torch"])
        first, start = st["step"], time.time() - st["seconds"]
        print(f"resuming from step {first}")
    bar = tqdm(range(first, steps), desc="vae", disable=not progress, dynamic_ncols=True, initial=first, total=steps)
    for step in bar:
        x = _training_batch(stream, batch_size, lr_share, crop)
        x_hat = ae.decode(ae.encode(x).latent).sample
        loss = F.mse_loss(x_hat, x) + 0.5 * F.l1_loss(x_hat, x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(ae.parameters(), 1.0)
        opt.step()
        sched.step()
        if (step + 1) % eval_every == 0 or step + 1 == steps:
            ae.eval()
            vae = DiffusersVAE(ae, 1.0, 0.0)
            val = reconstruction_psnr(vae, val_images).mean().item()
            ae.train()
            bar.write(f"step {step + 1}: loss {loss.item():.5f} val PSNR {val:.2f} dB")
            _save(out, ae, dict(config=VAE_CONFIG, scale_factor=1.0, shift_factor=0.0, partial_step=step + 1,
                                val_psnr=val))  # a restartable snapshot (--init), replaced at the end
        bar.set_postfix(loss=f"{loss.item():.4f}")
        if save_every and (step + 1) % save_every == 0 and step + 1 < steps:
            os.makedirs(out, exist_ok=True)
            torch.save(dict(model=ae.state_dict(), opt=opt.state_dict(), sched=sched.state_dict(), step=step + 1,
                            rng=stream.rng.bit_generator.state, tgen=stream.generator.get_state(),
                            torch=torch.get_rng_state(), seconds=time.time() - start), state_path + ".tmp")
            os.replace(state_path + ".tmp", state_path)
    ae.eval()
    factors = measure_factors(ae, stream)
    vae = DiffusersVAE(ae, factors["scale_factor"], factors["shift_factor"])
    val_psnr = reconstruction_psnr(vae, val_images)
    held = reconstruction_psnr(vae, split_images("heldout"))
    held_hr = reconstruction_psnr(vae, split_images("heldout", hr_only=True))
    meta = dict(
        config=VAE_CONFIG,
        **factors,
        image_size=data.PATCH,
        psnr_definition="grayscale in [0,1], data_range 1, deterministic encoder",
        pca_variance_kept=pca_variance,
        val_psnr=float(val_psnr.mean()),
        heldout_psnr=float(held_hr.mean()),
        heldout_psnr_min=float(held_hr.min()),
        heldout_images=int(len(held_hr)),
        heldout_psnr_with_lr_inputs=float(held.mean()),
        train_steps=steps,
        batch_size=batch_size,
        lr=lr,
        seed=seed,
        train_seconds=round(time.time() - start, 1),
        command=f"python -m bagel_sr.embedded.vae train --steps {steps} --batch_size {batch_size} --lr {lr} "
        f"--seed {seed} --crop {crop} --lr_share {lr_share}"
        + (" --init <previous>" if init else ""),
        history=history,
    )
    _save(out, ae, meta)
    if os.path.exists(state_path):
        os.remove(state_path)
    print(f"VAE saved to {out}: held-out reconstruction PSNR {meta['heldout_psnr']:.2f} dB on the "
          f"{meta['heldout_images']} HR targets (min {meta['heldout_psnr_min']:.2f}), "
          f"{meta['heldout_psnr_with_lr_inputs']:.2f} dB with the LR inputs; val {meta['val_psnr']:.2f} dB")
    return meta


def _save(out: str, ae, meta: Dict) -> None:
    from safetensors.torch import save_file

    os.makedirs(out, exist_ok=True)
    save_file({k: v.detach().to(torch.float16).contiguous() for k, v in ae.state_dict().items()},
              os.path.join(out, WEIGHTS_NAME))
    with open(os.path.join(out, META_NAME), "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=2)


@torch.no_grad()
def decoder_channel_gains(vae, images: torch.Tensor, eps: float = 0.2, seed: int = 0) -> torch.Tensor:
    """How much pixel error one unit of error in each scaled latent channel costs, around the latents of ``images``:
    ``gain[k] = mean_i MSE(D(z_i + d_k), D(z_i)) / MSE(d_k)`` (pixel MSE over all pixels, latent MSE over channel
    ``k``) for Gaussian perturbations ``d_k`` of std ``eps`` in channel ``k`` only; shape ``(16,)``.

    Equal gains mean the decoder is close to an isometry of the latent: then ``L_pix`` of a gated step is about
    ``gain * t^2 * L_flow`` and the pixel loss only re-weights the flow loss towards low ``t``.  Unequal gains mean it
    weighs latent errors by what they cost in pixels, which the flow loss cannot do.
    """
    generator = torch.Generator().manual_seed(seed)
    z0 = vae.encode_mean(images)
    x0 = vae.decode(z0)
    gains = []
    for k in range(z0.shape[1]):
        dz = torch.zeros_like(z0)
        dz[:, k] = eps * torch.randn(z0[:, k].shape, generator=generator)
        pixel = (vae.decode(z0 + dz) - x0).square().flatten(1).mean(1)
        gains.append((pixel / dz[:, k].square().flatten(1).mean(1)).mean())
    return torch.stack(gains)


def evaluate(directory: Optional[str] = None) -> Dict:
    """Reload the saved VAE and print its held-out reconstruction PSNR (float16 weights as shipped) and the spread of
    its decoder's channel gains (:func:`decoder_channel_gains`, on the validation HR images)."""
    vae = load_vae(directory)
    held = reconstruction_psnr(vae, split_images("heldout", hr_only=True))
    both = reconstruction_psnr(vae, split_images("heldout"))
    gains = decoder_channel_gains(vae, split_images("val", hr_only=True))
    result = dict(heldout_psnr=float(held.mean()), heldout_psnr_min=float(held.min()), images=int(len(held)),
                  heldout_psnr_with_lr_inputs=float(both.mean()), channel_gains=[round(float(g), 4) for g in gains],
                  channel_gain_spread=float(gains.max() / gains.min()))
    print(f"held-out reconstruction PSNR {result['heldout_psnr']:.2f} dB on {result['images']} HR targets "
          f"(min {result['heldout_psnr_min']:.2f}); {result['heldout_psnr_with_lr_inputs']:.2f} dB with the LR inputs; "
          "grayscale [0,1], data_range 1")
    print(f"decoder gain per latent channel (pixel MSE / latent MSE): {float(gains.min()):.3f} to "
          f"{float(gains.max()):.3f}, spread {result['channel_gain_spread']:.2f}x (1x = an isometry of the latent)")
    return result


def main(argv: Optional[Sequence[str]] = None) -> Dict:
    parser = ArgumentParser(prog="python -m bagel_sr.embedded.vae", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train the VAE on the built-in training split and save it")
    t.add_argument("--out", required=True, help="output directory (the shipped one is bagel_sr/embedded/assets)")
    t.add_argument("--steps", type=int, default=3000, help="optimizer steps (default 3000)")
    t.add_argument("--batch_size", type=int, default=16, help="images per step (default 16)")
    t.add_argument("--lr", type=float, default=3e-4, help="learning rate of AdamW (default 3e-4)")
    t.add_argument("--seed", type=int, default=0, help="seed of the weights and data order (default 0)")
    t.add_argument("--eval_every", type=int, default=250, help="held-out evaluation every N steps (default 250)")
    t.add_argument("--num_threads", type=int, default=0, help="torch threads (0 = torch's default)")
    t.add_argument("--init", default=None, help="continue from the VAE saved in this directory")
    t.add_argument("--crop", type=int, default=0, help="train on random crops of this size (0 = whole patches)")
    t.add_argument("--lr_share", type=float, default=0.5, help="share of degraded (LR) inputs among the images")
    e = sub.add_parser("eval", help="print the held-out reconstruction PSNR of a saved VAE")
    e.add_argument("--dir", default=None, help="directory holding vae.safetensors / vae.json (default: shipped)")
    args = parser.parse_args(argv)
    if args.command == "train":
        return train(args.out, args.steps, args.batch_size, args.lr, args.seed, args.eval_every,
                     args.num_threads, init=args.init, crop=args.crop, lr_share=args.lr_share)
    return evaluate(args.dir)


if __name__ == "__main__":
    sys.exit(cli_main(main))
