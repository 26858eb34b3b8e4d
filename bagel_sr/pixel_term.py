"""The pixel-fidelity term of one forward, from the three captured tensors: pure tensor code, no hooks.

For every eligible target image it forms ``z0_hat = z_t - t * v_hat`` (``z_t`` and ``t`` detached, so the gradient
reaches the model only through ``v_hat``), decodes it with the frozen VAE and compares it with the ground-truth
pixels ``padded_images[i, :, :16h, :16w]``.  ``pixel`` is the mean over eligible images of ``w(t_i) * loss_i``,
``loss_i = sum_k a_k L_k`` over the fidelity terms of ``--pixel_loss_terms`` (:mod:`bagel_sr.fidelity_terms`);
across ranks the sum is divided by the all-reduced count and multiplied by the world size, as the loop does for
``mse``.  The decoder's backward runs here and the result carries its gradient as ``<v_hat, g>``: why, and what it
costs, in docs/loss_fold.md ("carrying the decoder's gradient").
"""
import hashlib
import logging
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import torch

from . import decoding, distributed, fidelity_terms, flow, packing
from .config import STRUCTURAL_TERMS, PixelLossConfig
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


def _image_terms(geometry: LatentGeometry, config: PixelLossConfig, vae, captured: Captured, v_float: torch.Tensor,
                 t_all: torch.Tensor, img: packing.VaeImage, padded_images: torch.Tensor,
                 padded_latent: Optional[torch.Tensor], names: Sequence[str],
                 generator: torch.Generator) -> Dict[str, torch.Tensor]:
    """``{term: w(t_i) * loss_i}`` of one target image (0-dim, float32): ``z0_hat`` (cropped if asked) is decoded
    once; ``lpl`` also reads the decoder's features of it and of ``D(z0)`` (no gradient, ``z0`` from
    ``padded_latent``)."""
    p, c, down = geometry.p, geometry.c, geometry.down
    vae_down = down // p
    rows = slice(img.token_start, img.token_start + img.num_tokens)
    z_t = captured.z_t[rows].detach().float()
    v = v_float[img.target_start : img.target_start + img.num_tokens]
    z0_hat = packing.unpatchify(flow.z0_from_velocity(z_t, t_all[rows][:, None], v), img.h, img.w, p, c)
    gt = padded_images[img.index, :, : img.h * down, : img.w * down]
    win = None
    wants_features = "lpl" in names
    z0 = padded_latent[img.index, :, : img.h * p, : img.w * p] if wants_features else None
    if config.crop:
        win = decoding.crop_window(img.h * p, img.w * p, config.crop, config.crop_margin, generator)
        top, left, bottom, right = win.outer
        z0_hat = z0_hat[:, top:bottom, left:right]
        z0 = z0[:, top:bottom, left:right] if z0 is not None else None
        rows_px, cols_px = win.inner_pixels(vae_down)
        gt = gt[:, rows_px, cols_px]
    features_hat = features = None
    if wants_features:
        tap = fidelity_terms.FeatureTap(decoding.decoder_of(vae))
        with tap:
            x_hat = _decode(vae, z0_hat, config)
        features_hat = tap.features
        with tap, torch.no_grad():
            _decode(vae, z0.to(z0_hat.device, z0_hat.dtype), config)
        features = tap.features
        if win is not None:
            outer_hw = z0_hat.shape[-2:]
            features_hat = fidelity_terms.crop_features(features_hat, outer_hw, win.inner_in_outer)
            features = fidelity_terms.crop_features(features, outer_hw, win.inner_in_outer)
    else:
        x_hat = _decode(vae, z0_hat, config)
    if win is not None:
        rs, cs = win.inner_in_outer(vae_down)
        x_hat = x_hat[:, rs, cs]
    w = flow.gate_weight(torch.tensor(img.t, dtype=torch.float32), config.max_t, config.schedule).to(x_hat.device)
    inputs = fidelity_terms.TermInputs(x_hat[None], gt[None].to(x_hat.device), features_hat, features)
    return {name: w * fidelity_terms.term_loss(name, inputs, config.charbonnier_eps, config.lpl_outlier_quantile)[0]
            for name in names}


def _decode(vae, z: torch.Tensor, config: PixelLossConfig) -> torch.Tensor:
    """``(C, H, W)`` image of one latent ``(c, h, w)``."""
    return decoding.decode(vae, z[None], dtype=config.decode_dtype, checkpointing=config.checkpointing)[0]


def computed_terms(config: PixelLossConfig) -> Dict[str, float]:
    """The terms to compute and their weights: the user's terms with weight > 0, plus ``l2`` at weight 0 as the
    reference of the gradient bound when a structural term is used without it."""
    weights = {k: w for k, w in config.term_weights.items() if w > 0}
    if any(k in STRUCTURAL_TERMS for k in weights) and "l2" not in weights:
        weights["l2"] = 0.0
    return weights


def bound_gradients(grads: Dict[str, torch.Tensor], bound: float) -> Dict[str, torch.Tensor]:
    """Each structural term's gradient scaled to norm at most ``bound * ||grad l2||`` (pointwise terms unchanged)."""
    if "l2" not in grads:
        return grads
    ref = grads["l2"].norm()
    out = {}
    for name, g in grads.items():
        if name in STRUCTURAL_TERMS:
            g = g * torch.clamp(bound * ref / g.norm().clamp(min=1e-30), max=1.0)
        out[name] = g
    return out


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


@dataclass
class PixelTermResult:
    """What :func:`pixel_term` returns.

    ``pixel``: ``sum_k a_k L_k``, unweighted by lambda, rank-normalised, 0-dim, differentiable through ``v_hat``;
    ``count``: images used locally (a tensor); ``grad``: ``dpixel/dv_hat`` (float32, detached, shape of ``v_hat``);
    ``terms``: ``{term: L_k}`` (detached, unweighted); ``term_grads``: ``{term: dL_k/dv_hat}`` after the bound
    (only with several terms); ``mix``: the :class:`TermMix` the gradient of ``pixel`` reads (several terms).
    """

    pixel: torch.Tensor
    count: torch.Tensor
    grad: torch.Tensor
    terms: Dict[str, torch.Tensor]
    term_grads: Dict[str, torch.Tensor] = field(default_factory=dict)
    mix: Optional["TermMix"] = None


class TermMix:
    """The gradient of a multi-term ``pixel``: ``sum_k a_k f_k g_k``, with the per-term adaptive factors ``f_k``
    (1 until :mod:`bagel_sr.weighting` sets them after the forward, before the backward reads them)."""

    def __init__(self, weights: Dict[str, float], grads: Dict[str, torch.Tensor]):
        self.weights = dict(weights)
        self.grads = grads
        self.factors: Dict[str, torch.Tensor] = {}

    def gradient(self) -> torch.Tensor:
        out = None
        for name, a in self.weights.items():
            g = self.grads[name] * (a * self.factors.get(name, 1.0))
            out = g if out is None else out + g
        return out


class _MixedGradient(torch.autograd.Function):
    """Value 0; gradient w.r.t. ``v_hat`` read from a :class:`TermMix` when the backward runs."""

    @staticmethod
    def forward(ctx, v_hat, mix):
        ctx.mix, ctx.v_dtype = mix, v_hat.dtype
        return v_hat.new_zeros((), dtype=torch.float32)

    @staticmethod
    def backward(ctx, grad_out):
        return (grad_out * ctx.mix.gradient()).to(ctx.v_dtype), None


def pixel_term(
    geometry: LatentGeometry,
    state: PixelLossState,
    captured: Captured,
    padded_images: torch.Tensor,
    shapes,
    packed_vae_token_indexes: torch.Tensor,
    sample_lens,
    batch_data_indexes=None,
    padded_latent: Optional[torch.Tensor] = None,
) -> PixelTermResult:
    """The fidelity terms of one forward (:class:`PixelTermResult`).

    Eligible images are decoded once and back-propagated to ``v_hat`` here (one backward per term when there are
    several, so that each term's gradient is known and the structural ones are bounded); a non-finite value or
    gradient of any term drops the local term (count 0, counted in ``state.skipped_nonfinite``).  The count is
    all-reduced whatever happened.
    """
    config, vae, v_hat = state.config, state.vae, captured.v_hat
    weights = computed_terms(config)
    names = list(weights)
    if "lpl" in names and padded_latent is None:
        raise ValueError("bagel-sr: the lpl term needs the clean latents (padded_latent) in the forward's arguments; "
                         "this loop does not pass them. Drop lpl from --pixel_loss_terms.")
    t_all = captured.t.detach().reshape(-1).float()  # (N_vae_tokens,), whatever shape time_embedder takes
    images = packing.describe_vae_images(shapes, packed_vae_token_indexes, t_all, sample_lens)
    generator = _generator(config, state.calls)
    chosen = select_eligible(images, config, packing.dataset_of_samples(batch_data_indexes), generator)

    zero = v_hat.new_zeros((), dtype=torch.float32)
    totals = {name: zero for name in names}
    grads: Dict[str, Optional[torch.Tensor]] = {name: None for name in names}
    if chosen:  # nothing eligible: no decode at all
        v_float = v_hat.float()
        per_image = [_image_terms(geometry, config, vae, captured, v_float, t_all, img, padded_images, padded_latent,
                                  names, generator) for img in chosen]
        totals = {name: sum(terms[name] for terms in per_image) for name in names}
        if totals[names[0]].requires_grad:  # the decoder's backward, one per term, graph freed after the last
            for k, name in enumerate(names):
                (grads[name],) = torch.autograd.grad(totals[name], v_float, retain_graph=k < len(names) - 1)
        totals = {name: v.detach() for name, v in totals.items()}
        if not all(_is_finite(totals[n], grads[n]) for n in names):
            bad = next(n for n in names if not _is_finite(totals[n], grads[n]))
            _record_nonfinite(state, totals[bad], grads[bad])
            chosen = []
            totals = {name: zero for name in names}
            grads = {name: None for name in names}
    scale = _rank_scale(len(chosen), v_hat.device)
    totals = {name: v * scale for name, v in totals.items()}
    full = {name: (g * scale if g is not None else torch.zeros(v_hat.shape, dtype=torch.float32, device=v_hat.device))
            for name, g in grads.items()}
    full = bound_gradients(full, config.term_grad_bound)
    value = sum(weights[n] * totals[n] for n in names) if len(names) > 1 else totals[names[0]] * weights[names[0]]
    logged = {n: totals[n] for n in config.term_weights if n in totals}
    count = torch.tensor(float(len(chosen)), device=v_hat.device)
    if len(names) == 1:  # one term: its gradient carried directly
        a = weights[names[0]]
        grad = full[names[0]] * a if a != 1.0 else full[names[0]]
        has = grads[names[0]] is not None
        return PixelTermResult(carry_gradient(value, v_hat, grad if has else None), count, grad, logged)
    mix = TermMix(weights, full)
    grad = mix.gradient()
    if v_hat.requires_grad:
        pixel = value.detach() + _MixedGradient.apply(v_hat, mix)
    else:
        pixel = value.detach()
    term_grads = {n: full[n] for n in names if weights[n] > 0}
    return PixelTermResult(pixel, count, grad, logged, term_grads, mix)
