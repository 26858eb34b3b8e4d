"""The registry of fidelity terms: each compares one decoded prediction with its ground truth, one value per image.

A term reads the decoder's output ``x_hat`` ``(N, C, H, W)`` (images in [-1, 1]) and, for ``lpl``, the decoder's
up-block features of ``D(z0_hat)`` and ``D(z0)`` (lists of ``(N, C_l, H_l, W_l)``).  The gate, the pairing,
``max_images``, crops, the non-finite guard and the single decode per image are :mod:`bagel_sr.pixel_term`'s; the
bound on the structural terms' gradients (``ssim``, ``grad``, ``lpl``: at most ``term_grad_bound`` times the L2
term's gradient norm at ``v_hat``) is applied there too.

- ``l2``, ``l1``, ``charbonnier``: pointwise errors (:func:`bagel_sr.losses.per_image_loss`).
- ``ssim``: ``1 - SSIM`` per channel, averaged: 7x7 uniform window, sample covariance, ``K1 = 0.01``,
  ``K2 = 0.03``, data range 2, mean over the valid window positions (the evaluation's ``ssim_uniform7``).
- ``grad``: L1 between the images' finite differences along x and y (mean of both directions).
- ``lpl``: latent perceptual loss (Berrada et al., ICLR 2025): for every up-block of the frozen decoder, both
  feature maps standardised per channel with the target's spatial mean and deviation, squared differences averaged
  outside an optional outlier mask (target values above the ``1 - q`` quantile of ``|standardised|``), uniform
  layer weights.
"""
from dataclasses import dataclass
from typing import Callable, List, Optional

import torch
import torch.nn.functional as F

from . import losses
from .config import LOSS_TYPES as POINTWISE, TERM_NAMES

SSIM_WINDOW, SSIM_K1, SSIM_K2, SSIM_DATA_RANGE = 7, 0.01, 0.03, 2.0


def ssim_per_image(x: torch.Tensor, y: torch.Tensor, data_range: float = SSIM_DATA_RANGE,
                   win: int = SSIM_WINDOW) -> torch.Tensor:
    """SSIM of ``(N, C, H, W)`` pairs, per channel then averaged: ``(N,)`` (Wang et al. 2004, uniform window)."""
    x, y = x.float(), y.float()
    c = x.shape[1]
    if min(x.shape[-2:]) < win:
        raise ValueError(f"ssim needs images of at least {win}x{win} pixels, got {tuple(x.shape[-2:])}")
    kernel = x.new_full((c, 1, win, win), 1.0 / (win * win))

    def mean(a):
        return F.conv2d(a, kernel, groups=c)

    cov_norm = win * win / (win * win - 1.0)  # sample covariance, as scikit-image
    mu_x, mu_y = mean(x), mean(y)
    var_x = cov_norm * (mean(x * x) - mu_x * mu_x)
    var_y = cov_norm * (mean(y * y) - mu_y * mu_y)
    cov_xy = cov_norm * (mean(x * y) - mu_x * mu_y)
    c1, c2 = (SSIM_K1 * data_range) ** 2, (SSIM_K2 * data_range) ** 2
    s = ((2 * mu_x * mu_y + c1) * (2 * cov_xy + c2)) / ((mu_x ** 2 + mu_y ** 2 + c1) * (var_x + var_y + c2))
    return s.flatten(1).mean(1)


def ssim_loss(x_hat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``1 - SSIM`` per image, ``(N,)``."""
    return 1.0 - ssim_per_image(x_hat, x)


def finite_differences(x: torch.Tensor):
    """``(d/dx, d/dy)`` of ``(N, C, H, W)``: ``x[..., 1:] - x[..., :-1]`` along width, then height."""
    return x[..., :, 1:] - x[..., :, :-1], x[..., 1:, :] - x[..., :-1, :]


def gradient_loss(x_hat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """L1 between finite differences, mean of both directions, ``(N,)``."""
    (gx_hat, gy_hat), (gx, gy) = finite_differences(x_hat.float()), finite_differences(x.float())
    return 0.5 * ((gx_hat - gx).abs().flatten(1).mean(1) + (gy_hat - gy).abs().flatten(1).mean(1))


def standardise(f_hat: torch.Tensor, f: torch.Tensor, eps: float = 1e-6):
    """Both ``(N, C, H, W)`` maps standardised with the target's per-channel spatial mean and deviation."""
    mu = f.mean(dim=(-2, -1), keepdim=True)
    sd = f.std(dim=(-2, -1), keepdim=True, unbiased=False)
    return (f_hat - mu) / (sd + eps), (f - mu) / (sd + eps)


def outlier_mask(n: torch.Tensor, quantile: float) -> torch.Tensor:
    """1 where ``|n|`` is at most its per-image ``1 - quantile`` quantile (``quantile`` 0: all ones)."""
    if quantile <= 0:
        return torch.ones_like(n)
    a = n.detach().abs().flatten(1)
    cut = torch.quantile(a, 1.0 - quantile, dim=1)
    return (n.detach().abs() <= cut.view(-1, *([1] * (n.dim() - 1)))).to(n.dtype)


def lpl_loss(features_hat: List[torch.Tensor], features: List[torch.Tensor], outlier_quantile: float = 0.0,
             layer_weights: Optional[List[float]] = None) -> torch.Tensor:
    """Latent perceptual loss over the decoder's layers, ``(N,)``; ``features`` (of ``D(z0)``) carry no gradient."""
    if not features_hat or len(features_hat) != len(features):
        raise ValueError(f"lpl needs one target feature map per predicted one, got {len(features_hat)} and {len(features)}")
    weights = layer_weights or [1.0 / len(features)] * len(features)
    total = 0.0
    for w, f_hat, f in zip(weights, features_hat, features):
        n_hat, n = standardise(f_hat.float(), f.detach().float())
        mask = outlier_mask(n, outlier_quantile)
        per = ((n_hat - n) ** 2 * mask).flatten(1).sum(1) / mask.flatten(1).sum(1).clamp(min=1.0)
        total = total + w * per
    return total


@dataclass(frozen=True)
class TermInputs:
    """What a term may read for a batch of images: decoded prediction, ground truth, and (``lpl``) features."""

    x_hat: torch.Tensor
    x: torch.Tensor
    features_hat: Optional[List[torch.Tensor]] = None
    features: Optional[List[torch.Tensor]] = None


def term_loss(name: str, inputs: TermInputs, charbonnier_eps: float = 1e-3,
              lpl_outlier_quantile: float = 0.0) -> torch.Tensor:
    """The per-image value ``(N,)`` of the term called ``name``."""
    if name in POINTWISE:
        return losses.per_image_loss(inputs.x_hat, inputs.x, name, charbonnier_eps)
    if name == "ssim":
        return ssim_loss(inputs.x_hat, inputs.x)
    if name == "grad":
        return gradient_loss(inputs.x_hat, inputs.x)
    if name == "lpl":
        return lpl_loss(inputs.features_hat, inputs.features, lpl_outlier_quantile)
    raise ValueError(f"unknown fidelity term {name!r}; allowed: {', '.join(TERM_NAMES)}")


# -- decoder features for lpl ---------------------------------------------------------------------------------

def feature_modules(decoder: torch.nn.Module) -> List[torch.nn.Module]:
    """The modules whose outputs are the decoder's up-block features, coarse to fine.

    diffusers decoders (``AutoencoderKL``, ``AutoencoderDC``, the shipped embedded VAE): each of ``up_blocks``.
    BAGEL's ``AutoEncoder`` (FLUX): its ``up[i]`` containers are not called as modules, so per level the last module
    it runs (``upsample``, else the last ``attn``, else the last ``block``), levels in execution order.
    """
    if not isinstance(decoder, torch.nn.Module):
        raise ValueError("the lpl term needs the VAE's `decoder` module (BAGEL's AutoEncoder or a diffusers VAE); "
                         "this VAE has none; drop lpl from --pixel_loss_terms.")
    if isinstance(getattr(decoder, "up_blocks", None), torch.nn.ModuleList):
        return list(decoder.up_blocks)
    up = getattr(decoder, "up", None)
    if isinstance(up, torch.nn.ModuleList):
        out = []
        for level in reversed(range(len(up))):
            stage = up[level]
            last = getattr(stage, "upsample", None)
            if not isinstance(last, torch.nn.Module):
                attn = getattr(stage, "attn", None)
                last = attn[-1] if attn is not None and len(attn) else stage.block[-1]
            out.append(last)
        return out
    raise ValueError(
        f"the lpl term needs the VAE decoder's up-block features, but {type(decoder).__name__} has neither "
        "`up_blocks` (diffusers) nor `up` (BAGEL's AutoEncoder); drop lpl from --pixel_loss_terms."
    )


class FeatureTap:
    """Within ``with``, collects the outputs of :func:`feature_modules` of ``decoder`` in call order."""

    def __init__(self, decoder: torch.nn.Module):
        self.modules = feature_modules(decoder)
        self.features: List[torch.Tensor] = []
        self._handles = []

    def __enter__(self) -> "FeatureTap":
        self.features = []
        self._handles = [m.register_forward_hook(lambda _m, _a, out: self.features.append(out)) for m in self.modules]
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


def crop_features(features: List[torch.Tensor], outer_hw, select: Callable[[int], tuple]) -> List[torch.Tensor]:
    """Each ``(N, C, H_l, W_l)`` map cut to the inner window: ``select(scale)`` gives its slices at ``H_l / H_outer``."""
    out = []
    for f in features:
        scale = f.shape[-2] // outer_hw[0]
        if scale < 1 or f.shape[-2] != scale * outer_hw[0] or f.shape[-1] != scale * outer_hw[1]:
            raise ValueError(f"lpl with a crop needs feature maps at integer multiples of the latent, got {tuple(f.shape)}")
        rs, cs = select(scale)
        out.append(f[..., rs, cs])
    return out
