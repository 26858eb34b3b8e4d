"""The pixel-fidelity term of one forward, from the three captured tensors: pure tensor code, no hooks.

For every eligible target image it forms ``z0_hat = z_t - t * v_hat`` (``z_t`` and ``t`` detached, so the gradient
reaches the model only through ``v_hat``), decodes it with the frozen VAE and compares it with the ground-truth
pixels ``padded_images[i, :, :16h, :16w]``.  ``pixel`` is the mean over eligible images of ``w(t_i) * loss_i``;
across ranks the sum is divided by the all-reduced count and multiplied by the world size, as the loop does for
``mse``.  The decoder's backward runs here and the result carries its gradient as ``<v_hat, g>``: why, and what it
costs, in docs/loss_fold.md ("carrying the decoder's gradient").
"""
import hashlib
import logging
from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch

from . import decoding, distributed, flow, losses, packing
from .config import PixelLossConfig
from .state import PixelLossState

logger = logging.getLogger("bagel_sr")


@dataclass(frozen=True)
class LatentGeometry:
    """``p``: latent patch size (tokens are ``p x p`` latent pixels), ``c``: latent channels, ``down``: pixels per
    token side (BAGEL: 2, 16, 16)."""

    p: int
    c: int
    down: int

    @classmethod
    def of(cls, model: torch.nn.Module) -> "LatentGeometry":
        return cls(int(model.latent_patch_size), int(model.latent_channel), int(model.latent_downsample))


@dataclass
class Captured:
    """The forward's tensors: ``t`` ``(N_vae_tokens,)``, ``z_t`` ``(N_vae_tokens, p*p*C)``, ``v_hat``
    ``(N_target_tokens, p*p*C)`` (graph kept)."""

    t: torch.Tensor
    z_t: torch.Tensor
    v_hat: torch.Tensor


def _generator(config: PixelLossConfig, call: int) -> torch.Generator:
    """A CPU generator seeded by (seed, rank, call): the image choice and crops are reproducible per rank."""
    digest = hashlib.sha256(f"{config.seed}:{distributed.rank()}:{call}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


def select_eligible(
    images: List[packing.VaeImage],
    config: PixelLossConfig,
    sample_datasets: Optional[List[Optional[str]]],
    generator: Optional[torch.Generator] = None,
) -> List[packing.VaeImage]:
    """Targets with ``w(t) > 0``, paired (if asked), from the named datasets (if asked), at most ``max_images``.

    When more are eligible than ``max_images``, a random subset (from ``generator``) is kept, in batch order.
    """
    names = config.dataset_names
    if names is not None and sample_datasets is None:
        raise ValueError(
            "--pixel_loss_datasets is set but the batch carries no batch_data_indexes to tell datasets apart; "
            "pass batch_data_indexes to forward (the wrapper's batch patch does this for BAGEL's loop)."
        )
    chosen = []
    for img in images:
        if not img.is_target:
            continue
        if float(flow.gate_weight(torch.tensor(img.t), config.max_t, config.schedule)) <= 0:
            continue
        if config.paired_only and not packing.is_paired(img, images):
            continue
        if names is not None:
            name = sample_datasets[img.sample] if img.sample < len(sample_datasets) else None
            if name not in names:
                continue
        chosen.append(img)
    if config.max_images and len(chosen) > config.max_images:
        keep = torch.randperm(len(chosen), generator=generator)[: config.max_images].sort().values.tolist()
        chosen = [chosen[k] for k in keep]
    return chosen


def _image_loss(geometry: LatentGeometry, config: PixelLossConfig, vae, captured: Captured, v_float: torch.Tensor,
                t_all: torch.Tensor, img: packing.VaeImage, padded_images: torch.Tensor,
                generator: torch.Generator) -> torch.Tensor:
    """``w(t_i) * loss_i`` of one target image (0-dim, float32), decoding ``z0_hat`` (cropped if asked)."""
    p, c, down = geometry.p, geometry.c, geometry.down
    vae_down = down // p
    rows = slice(img.token_start, img.token_start + img.num_tokens)
    z_t = captured.z_t[rows].detach().float()
    v = v_float[img.target_start : img.target_start + img.num_tokens]
    z0_hat = packing.unpatchify(flow.z0_from_velocity(z_t, t_all[rows][:, None], v), img.h, img.w, p, c)
    gt = padded_images[img.index, :, : img.h * down, : img.w * down]
    if config.crop:
        win = decoding.crop_window(img.h * p, img.w * p, config.crop, config.crop_margin, generator)
        top, left, bottom, right = win.outer
        z0_hat = z0_hat[:, top:bottom, left:right]
        rows_px, cols_px = win.inner_pixels(vae_down)
        gt = gt[:, rows_px, cols_px]
    x_hat = decoding.decode(vae, z0_hat[None], dtype=config.decode_dtype, checkpointing=config.checkpointing)[0]
    if config.crop:
        rs, cs = win.inner_in_outer(vae_down)
        x_hat = x_hat[:, rs, cs]
    w = flow.gate_weight(torch.tensor(img.t, dtype=torch.float32), config.max_t, config.schedule).to(x_hat.device)
    loss = losses.per_image_loss(x_hat[None], gt[None].to(x_hat.device), config.loss_type, config.charbonnier_eps)[0]
    return w * loss


def _rank_scale(count: int, device: torch.device) -> torch.Tensor:
    """``1 / count`` on one process, ``world / all_reduced(count)`` across ranks (a collective on every call)."""
    total = distributed.sum_over_ranks(torch.tensor(float(count), device=device))
    return distributed.world() / total.clamp(min=1.0)


def _is_finite(total: torch.Tensor, grad: Optional[torch.Tensor]) -> bool:
    ok = torch.isfinite(total)
    if grad is not None:
        ok = ok & torch.isfinite(grad).all()
    return bool(ok)  # one host sync per armed micro-step with images


def _record_nonfinite(state: PixelLossState, total: torch.Tensor, grad: Optional[torch.Tensor]) -> None:
    """Count a dropped term; log a warning on the 1st, 2nd, 4th, 8th, ... occurrence (rate-limited)."""
    state.skipped_nonfinite += 1
    n = state.skipped_nonfinite
    if n & (n - 1) == 0:
        where = "value" if not bool(torch.isfinite(total)) else "gradient w.r.t. v_hat"
        logger.warning(
            "bagel-sr: non-finite pixel term (%s) on rank %d at call %d: dropped for this micro-step, the flow loss "
            "is untouched (%d dropped so far; logged as pixel_skipped). Frequent drops: try --pixel_loss_decode_dtype "
            "fp32 or a lower --pixel_loss_weight.", where, distributed.rank(), state.calls, n,
        )


def carry_gradient(value: torch.Tensor, v_hat: torch.Tensor, grad: Optional[torch.Tensor]) -> torch.Tensor:
    """A 0-dim float32 tensor equal to ``value`` whose gradient w.r.t. ``v_hat`` is ``grad`` (zero when None).

    ``value + (s - s.detach())`` with ``s = <v_hat, grad>`` (docs/loss_fold.md); finite even when ``v_hat`` is not
    (``v_hat[:0].sum()`` keeps the graph when there is no gradient to carry).
    """
    if not v_hat.requires_grad:
        return value.detach()
    if grad is None:
        return value.detach() + v_hat[:0].float().sum()
    s = (v_hat.float() * grad).sum()
    return value.detach() + (s - s.detach())


def pixel_term(
    geometry: LatentGeometry,
    state: PixelLossState,
    captured: Captured,
    padded_images: torch.Tensor,
    shapes,
    packed_vae_token_indexes: torch.Tensor,
    sample_lens,
    batch_data_indexes=None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(pixel, count, grad)``: the unweighted, rank-normalised term (0-dim, differentiable through ``v_hat``),
    the local number of images it used and ``dpixel/dv_hat`` (float32, detached, shape of ``v_hat``).

    Eligible images are decoded and back-propagated to ``v_hat`` here; a non-finite value or gradient drops the
    local term (count 0, counted in ``state.skipped_nonfinite``).  The count is all-reduced whatever happened.
    """
    config, vae, v_hat = state.config, state.vae, captured.v_hat
    t_all = captured.t.detach().reshape(-1).float()  # (N_vae_tokens,), whatever shape time_embedder takes
    images = packing.describe_vae_images(shapes, packed_vae_token_indexes, t_all, sample_lens)
    generator = _generator(config, state.calls)
    chosen = select_eligible(images, config, packing.dataset_of_samples(batch_data_indexes), generator)

    total, grad = v_hat.new_zeros((), dtype=torch.float32), None
    if chosen:  # nothing eligible: no decode at all
        v_float = v_hat.float()
        total = sum(_image_loss(geometry, config, vae, captured, v_float, t_all, img, padded_images, generator)
                    for img in chosen)
        if total.requires_grad:
            (grad,) = torch.autograd.grad(total, v_float)  # the decoder's backward, graph freed here
        total = total.detach()
        if not _is_finite(total, grad):
            _record_nonfinite(state, total, grad)
            chosen, total, grad = [], torch.zeros_like(total), None
    scale = _rank_scale(len(chosen), v_hat.device)
    grad = grad * scale if grad is not None else None
    pixel = carry_gradient(total * scale, v_hat, grad)
    full_grad = grad if grad is not None else torch.zeros(v_hat.shape, dtype=torch.float32, device=v_hat.device)
    return pixel, torch.tensor(float(len(chosen)), device=v_hat.device), full_grad
