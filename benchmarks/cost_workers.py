"""What one measurement process of ``pixel_loss_cost.py`` runs (``--_worker``): BAGEL's full-size VAE geometry with
random weights, one decode + backward per configuration (part a), the best step time of a model (parts c, d) and
one fidelity-term set through the contract model (part d). Each returns what its process measured."""
import resource
import time
from typing import Dict

import torch

from bagel_sr import PixelLossConfig, decoding, losses, with_pixel_loss
from bagel_sr.testing.contract_model import ContractModel, forward_kwargs, pack, set_timesteps

SCALE, SHIFT = 0.3611, 0.1159  # BAGEL's AutoEncoderParams
MODES = {  # name -> (crop?, checkpointing?)
    "whole": (False, False),
    "whole+ckpt": (False, True),
    "crop": (True, False),
    "crop+ckpt": (True, True),
}


def flux_vae(block_out_channels=(128, 256, 512, 512), layers_per_block=2, seed=0) -> decoding.DiffusersVAE:
    """A diffusers AutoencoderKL with FLUX's geometry (about 84M parameters), random weights, frozen, fp32."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    n = len(block_out_channels)
    kl = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=tuple(block_out_channels),
                       down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
                       layers_per_block=layers_per_block, norm_num_groups=32, use_quant_conv=False,
                       use_post_quant_conv=False)
    return decoding.DiffusersVAE(kl, SCALE, SHIFT).eval().requires_grad_(False)


def decode_and_backward(vae, z: torch.Tensor, gt: torch.Tensor, crop: int, margin: int, checkpointing: bool,
                        dtype: str) -> torch.Tensor:
    """What the extension does per image: decode ``z`` (its crop window with margin), L2 on the inner window
    against ``gt`` (cut to the same window), gradient w.r.t. ``z``."""
    z = z.detach().requires_grad_(True)
    zin, target, inner = z, gt, None
    if crop:
        win = decoding.crop_window(z.shape[-2], z.shape[-1], crop, margin, torch.Generator().manual_seed(0))
        top, left, bottom, right = win.outer
        zin = z[:, :, top:bottom, left:right]
        rows, cols = win.inner_pixels(8)
        target, inner = gt[:, :, rows, cols], win.inner_in_outer(8)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16"):
        x = decoding.decode(vae, zin, dtype="fp32" if dtype == "fp32" else "autocast", checkpointing=checkpointing)
    if inner is not None:
        x = x[:, :, inner[0], inner[1]]
    loss = losses.per_image_loss(x, target, "l2").sum()
    (grad,) = torch.autograd.grad(loss, z)
    return grad


def decode_worker(args) -> Dict:
    """One configuration in this process: warm-up at 64 px, then ``repeats`` timed runs; peak RSS of the process."""
    torch.set_num_threads(args.threads)
    vae = flux_vae()
    g = torch.Generator().manual_seed(1)
    z = torch.randn(1, 16, args.size // 8, args.size // 8, generator=g)
    gt = torch.rand(1, 3, args.size, args.size, generator=g) * 2 - 1
    crop, ckpt = MODES.get(args.mode, (False, False))
    decode_and_backward(vae, z[:, :, :8, :8], gt[:, :, :64, :64], 0, 0, ckpt, args.dtype)  # warm-up (also baseline)
    times = []
    if args.mode != "baseline":
        for _ in range(args.repeats):
            start = time.perf_counter()
            decode_and_backward(vae, z, gt, args.crop if crop else 0, args.margin, ckpt, args.dtype)
            times.append(time.perf_counter() - start)
    with decoding.checkpointed_decoder(vae) as blocks:
        pass
    return dict(times=times, peak_kb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, blocks=blocks,
                params=sum(p.numel() for p in vae.parameters()))


def best_step_time(model, kw: dict, extra: dict, repeats: int) -> float:
    """Seconds of one forward + backward of ``mse + 0.05 * pixel``, best of ``repeats`` after one warm-up run
    (best of: robust to other processes on a shared machine)."""
    times = []
    for i in range(repeats + 1):
        start = time.perf_counter()
        out = model(**kw, **extra)
        loss = out["mse"].mean(-1).sum() / len(kw["mse_loss_indexes"])
        if "pixel" in out:
            loss = loss + 0.05 * out["pixel"]
        loss.backward()
        model.zero_grad(set_to_none=True)
        if i:
            times.append(time.perf_counter() - start)
    return min(times)


def term_worker(args) -> Dict:
    """One term set (``args.mode``; 'flow' = flow only) in this process: best step time and peak RSS."""
    torch.set_num_threads(args.threads)
    vae = flux_vae()
    n = args.d_tokens
    batch = set_timesteps(pack([[("cond", n, n), ("text", 2), ("target", n, n)]], seed=0), [0, 0.1])
    kw, images = forward_kwargs(batch, vae)
    torch.manual_seed(0)
    model = with_pixel_loss(ContractModel)(hidden=32)
    extra = {}
    if args.mode != "flow":
        model.attach_pixel_loss(PixelLossConfig(weight=0.05, terms=args.mode, max_images=0), vae)
        extra = dict(padded_images=images)
    return dict(time=best_step_time(model, kw, extra, args.repeats_d),
                peak_kb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
