"""How far above its bicubic input can a simple estimator from the input's latent go on the embedded bench?

    python benchmarks/latent_regression.py                 # ridge on 4000 training pairs, val and held-out
    python benchmarks/latent_regression.py --context 0 1 2 --train_pairs 4000

A yardstick for the embedded restorer, not a restorer: per 2x2-token cell of the latent, a ridge regression from
the input's latent (the cell plus ``context`` latent pixels around it, replicate-padded) to the residual
``z_target - z_input``, fitted in closed form on training pairs (the same stream the restorer trains on, unpaired
samples left out) and decoded by the shipped VAE.  It prints PSNR, SSIM and the hallucination share (grayscale [0, 1],
data range 1, as the experiment) of: the bicubic input, the VAE round trip of the input, and the regression for each
context, on the val and held-out splits.  The lambda of the ridge is chosen on val.
"""
import argparse
from typing import Dict, List, Sequence

import torch
import torch.nn.functional as F

from bagel_sr.embedded import data, sampling
from bagel_sr.embedded.vae import load_vae

P = 2  # latent pixels per token side (TinyBagelConfig.latent_patch_size)


def encode(vae, images: torch.Tensor, chunk: int = 64) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([sampling._encode(vae, images[i : i + chunk]) for i in range(0, len(images), chunk)])


def cell_features(z: torch.Tensor, context: int) -> torch.Tensor:
    """``(N, C, H, W)`` latents -> ``(N * cells, C * (P + 2 context)^2 + 1)`` cell windows with a bias column."""
    k = P + 2 * context
    windows = F.unfold(F.pad(z, (context,) * 4, mode="replicate"), kernel_size=k, stride=P)
    x = windows.transpose(1, 2).reshape(-1, windows.shape[1])
    return torch.cat([x, torch.ones(len(x), 1)], 1)


def cells(z: torch.Tensor) -> torch.Tensor:
    u = F.unfold(z, P, stride=P)
    return u.transpose(1, 2).reshape(-1, u.shape[1])


def uncells(tokens: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    n, c, h, w = like.shape
    return F.fold(tokens.reshape(n, -1, c * P * P).transpose(1, 2), (h, w), P, stride=P)


def ridge(x: torch.Tensor, y: torch.Tensor, lam: float) -> torch.Tensor:
    x, y = x.double(), y.double()
    return torch.linalg.solve(x.T @ x + lam * torch.eye(x.shape[1], dtype=x.dtype), x.T @ y).float()


def metrics(pred: torch.Tensor, pairs: Sequence[data.Sample]) -> Dict[str, float]:
    m = sampling.image_metrics(pred, torch.stack([p.target for p in pairs]))
    return {k: float(v.mean()) for k, v in m.items()}


def main(argv: List[str] = None) -> Dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--train_pairs", type=int, default=4000, help="training pairs the ridge is fitted on")
    p.add_argument("--context", type=int, nargs="+", default=[0, 1, 2], help="latent pixels around each cell, one estimator each")
    p.add_argument("--lambdas", type=float, nargs="+", default=[0.1, 1.0, 10.0], help="ridge lambdas to choose from on val")
    p.add_argument("--seed", type=int, default=0, help="seed of the training stream")
    p.add_argument("--num_threads", type=int, default=2, help="torch CPU threads")
    args = p.parse_args(argv)
    torch.set_num_threads(args.num_threads)
    vae = load_vae(None)
    train = data.TrainStream(args.seed, t2i_ratio=0.0).take(args.train_pairs)
    z_in, z_hr = encode(vae, torch.stack([s.condition for s in train])), encode(vae, torch.stack([s.target for s in train]))
    splits = {name: data.eval_pairs(name) for name in ("val", "heldout")}
    z_eval = {name: encode(vae, torch.stack([s.condition for s in pairs])) for name, pairs in splits.items()}
    rows = {}
    for name, pairs in splits.items():
        rows[("bicubic input", name)] = metrics(torch.stack([s.condition for s in pairs]), pairs)
        rows[("VAE round trip of the input", name)] = metrics(vae.decode(z_eval[name]).clamp(-1, 1), pairs)
    for context in args.context:
        x = cell_features(z_in, context)
        fits = {lam: ridge(x, cells(z_hr) - cells(z_in), lam) for lam in args.lambdas}

        def restore(name: str, w: torch.Tensor) -> torch.Tensor:
            z = z_eval[name]
            return vae.decode(uncells(cells(z) + cell_features(z, context) @ w, z)).clamp(-1, 1)

        best = max(fits, key=lambda lam: metrics(restore("val", fits[lam]), splits["val"])["psnr"])
        for name, pairs in splits.items():
            rows[(f"ridge, context {context} (lambda {best:g}, chosen on val)", name)] = metrics(
                restore(name, fits[best]), pairs)
    print(f"{'':48s}{'val PSNR':>9} {'SSIM':>6} {'halluc%':>8}   {'held-out PSNR':>13} {'SSIM':>6} {'halluc%':>8}")
    for label in dict.fromkeys(k[0] for k in rows):
        v, h = rows[(label, "val")], rows[(label, "heldout")]
        print(f"{label:48s}{v['psnr']:9.2f} {v['ssim']:6.3f} {100 * v['halluc']:8.2f}   "
              f"{h['psnr']:13.2f} {h['ssim']:6.3f} {100 * h['halluc']:8.2f}")
    return {f"{k[0]} | {k[1]}": v for k, v in rows.items()}


if __name__ == "__main__":
    main()
