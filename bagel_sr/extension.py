"""``with_pixel_loss(BagelClass)``: BAGEL's training forward plus a pixel-fidelity term.

The subclass runs the parent's ``forward`` unchanged and, while armed, captures three tensors with temporary forward
hooks on the modules the contract names:

- ``t``     input of ``time_embedder``: flow time of every VAE token, ``(N_vae_tokens,)``;
- ``z_t``   input of ``vae2llm``: the noisy latent tokens, ``(N_vae_tokens, p*p*C)``;
- ``v_hat`` output of ``llm2vae``: the predicted velocity of the target tokens, ``(N_target_tokens, p*p*C)``.

For every eligible target image it forms ``z0_hat = z_t - t * v_hat`` (``z_t`` and ``t`` detached, so the gradient
reaches the model only through ``v_hat``), decodes it with the frozen VAE and compares it with the ground-truth
pixels ``padded_images[i, :, :16h, :16w]``.  ``pixel`` is the mean over eligible images of ``w(t_i) * loss_i``;
across ranks the sum is divided by the all-reduced count and multiplied by the world size, as the loop does for
``mse``.  The model gets no parameters, buffers or submodules: the VAE is held by a plain object.

The decoder's backward runs inside the forward: ``g = dL_pix/dv_hat`` is taken with ``torch.autograd.grad`` (the
decoder graph is freed before the model's backward) and the returned ``pixel`` carries it as ``<v_hat, g>`` (value
``L_pix``, gradient ``g`` exactly; the gradient reaches the model only through ``v_hat`` anyway).  This is what makes
the guard, the gradient-norm logging and the adaptive weight cheap: a non-finite ``L_pix`` or ``g`` drops the term
for that micro-step (counted, warned) before anything reaches the model's graph.
"""
import hashlib
import logging
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist

from . import decoding, flow, losses, packing
from .config import PixelLossConfig

_STATE_ATTR = "_bagel_sr_pixel_loss"
logger = logging.getLogger("bagel_sr")


class MissingGroundTruthError(ValueError):
    """The pixel loss is armed but the forward got no ``padded_images``."""


@dataclass
class CallTensors:
    """Tensors of one armed forward, kept for monitoring (gradient norms, adaptive weight).

    ``v_hat``: ``llm2vae``'s output ``(N_target_tokens, p*p*C)``, graph kept; ``hidden``: its input
    ``(N_target_tokens, D)``, detached; ``pixel_grad``: ``dL_pix/dv_hat`` of the unweighted, rank-normalised term,
    float32, detached (zeros when no image was used).
    """

    v_hat: torch.Tensor
    hidden: torch.Tensor
    pixel_grad: torch.Tensor


@dataclass
class PixelLossState:
    """What an armed model holds: the settings, the VAE (never a submodule) and per-run counters.

    ``skipped_nonfinite`` counts micro-steps whose term was dropped as non-finite (value or gradient).
    ``current`` holds the :class:`CallTensors` of the latest forward while the config asks for them
    (``log_grad_norms_every`` or ``adaptive_weight``);
    its consumer takes them with :meth:`pop_call`.  ``deepcopy`` (e.g. BAGEL's EMA copy) shares this object.
    """

    config: PixelLossConfig
    vae: Any
    calls: int = 0
    skipped_nonfinite: int = 0
    last: Dict[str, float] = field(default_factory=dict)
    current: Optional[CallTensors] = None

    def __deepcopy__(self, memo):
        return self

    @property
    def wants_call_tensors(self) -> bool:
        return self.config.log_grad_norms_every > 0 or self.config.adaptive_weight

    def pop_call(self) -> Optional[CallTensors]:
        """The latest forward's tensors (once), then None."""
        call, self.current = self.current, None
        return call


class _Capture:
    """Temporary forward hooks collecting ``t``, ``z_t`` and ``v_hat`` during one parent forward."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.t: Optional[torch.Tensor] = None
        self.z_t: Optional[torch.Tensor] = None
        self.v_hat: Optional[torch.Tensor] = None
        self.hidden: Optional[torch.Tensor] = None  # input of llm2vae, detached
        self._handles: List[Any] = []

    def _hook(self, name: str, take_output: bool):
        def hook(module, args, output):
            if getattr(self, name) is not None:
                raise RuntimeError(
                    f"bagel-sr: {name} was produced twice in one forward; the contract says the module is called "
                    "once per forward (BAGEL_CONTRACT.md, generation path). This checkout differs."
                )
            setattr(self, name, output if take_output else args[0])
            if name == "v_hat":
                self.hidden = args[0].detach()

        return hook

    def __enter__(self) -> "_Capture":
        for attr, name, take_output in (("time_embedder", "t", False), ("vae2llm", "z_t", False), ("llm2vae", "v_hat", True)):
            module = getattr(self.model, attr, None)
            if module is None:
                raise AttributeError(
                    f"bagel-sr: the model has no `{attr}` module; the pixel loss needs BAGEL's generation path "
                    "(visual_gen=True) with time_embedder, vae2llm and llm2vae."
                )
            self._handles.append(module.register_forward_hook(self._hook(name, take_output)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


def _world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _generator(config: PixelLossConfig, call: int) -> torch.Generator:
    """A CPU generator seeded by (seed, rank, call): the image choice and crops are reproducible per rank."""
    digest = hashlib.sha256(f"{config.seed}:{_rank()}:{call}".encode()).digest()
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


def _image_loss(model, config: PixelLossConfig, vae, capture: _Capture, v_float: torch.Tensor, t_all: torch.Tensor,
                img: packing.VaeImage, padded_images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """``w(t_i) * loss_i`` of one target image (0-dim, float32), decoding ``z0_hat`` (cropped if asked)."""
    p, c, down = int(model.latent_patch_size), int(model.latent_channel), int(model.latent_downsample)
    vae_down = down // p
    rows = slice(img.token_start, img.token_start + img.num_tokens)
    z_t = capture.z_t[rows].detach().float()
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
    local = torch.tensor(float(count), device=device)
    world = _world()
    if world > 1:
        dist.all_reduce(local, op=dist.ReduceOp.SUM)
    return world / local.clamp(min=1.0)


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
            "fp32 or a lower --pixel_loss_weight.", where, _rank(), state.calls, n,
        )


def carry_gradient(value: torch.Tensor, v_hat: torch.Tensor, grad: Optional[torch.Tensor]) -> torch.Tensor:
    """A 0-dim float32 tensor equal to ``value`` whose gradient w.r.t. ``v_hat`` is ``grad`` (zero when None).

    ``value + (s - s.detach())`` with ``s = <v_hat, grad>``: the added term is exactly 0, and finite even when
    ``v_hat`` is not (``v_hat[:0].sum()`` keeps the graph when there is no gradient to carry).
    """
    if not v_hat.requires_grad:
        return value.detach()
    if grad is None:
        return value.detach() + v_hat[:0].float().sum()
    s = (v_hat.float() * grad).sum()
    return value.detach() + (s - s.detach())


def pixel_term(
    model: torch.nn.Module,
    state: PixelLossState,
    capture: _Capture,
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
    config, vae = state.config, state.vae
    v_hat = capture.v_hat
    t_all = capture.t.detach().reshape(-1).float()  # (N_vae_tokens,), whatever shape time_embedder takes
    images = packing.describe_vae_images(shapes, packed_vae_token_indexes, t_all, sample_lens)
    generator = _generator(config, state.calls)
    chosen = select_eligible(images, config, packing.dataset_of_samples(batch_data_indexes), generator)

    total, grad = v_hat.new_zeros((), dtype=torch.float32), None
    if chosen:  # nothing eligible: no decode at all
        v_float = v_hat.float()
        total = sum(_image_loss(model, config, vae, capture, v_float, t_all, img, padded_images, generator) for img in chosen)
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


def with_pixel_loss(base: type) -> type:
    """A subclass of ``base`` (BAGEL's ``Bagel`` or a model with the same forward contract) with the pixel term.

    Same constructor.  ``attach_pixel_loss(config, vae)`` arms it; ``forward(**batch, padded_images=...,
    batch_data_indexes=None)`` then returns the parent's ``mse`` and ``ce`` unchanged plus ``pixel`` (0-dim,
    unweighted, differentiable), ``pixel_images`` (how many images it used, a tensor) and ``pixel_skipped`` (how many
    micro-steps so far dropped a non-finite term, a tensor).  Not armed or weight 0:
    the parent's forward, untouched.
    """
    if getattr(base, "_bagel_sr_extended", False):
        return base

    class PixelLoss(base):
        _bagel_sr_extended = True

        def attach_pixel_loss(self, config: PixelLossConfig, vae: Any) -> "PixelLoss":
            """Arm the pixel term with ``config`` and a frozen VAE exposing ``decode(z)`` (kept out of the module tree)."""
            if not isinstance(config, PixelLossConfig):
                raise TypeError(f"attach_pixel_loss expects a PixelLossConfig, got {type(config).__name__}")
            config.validate()
            if not callable(getattr(vae, "decode", None)):
                raise TypeError(
                    f"attach_pixel_loss needs a VAE with decode(z) (BAGEL's AutoEncoder or bagel_sr.decoding.DiffusersVAE); "
                    f"got {type(vae).__name__}"
                )
            for attr in ("latent_patch_size", "latent_channel", "latent_downsample"):
                if not hasattr(self, attr):
                    raise AttributeError(f"bagel-sr: the model lacks `{attr}`; build it with visual_gen=True")
            self.__dict__[_STATE_ATTR] = PixelLossState(config=config, vae=vae)
            return self

        def detach_pixel_loss(self) -> None:
            """Disarm: the model behaves as its parent again."""
            self.__dict__.pop(_STATE_ATTR, None)

        @property
        def pixel_loss_state(self) -> Optional[PixelLossState]:
            return self.__dict__.get(_STATE_ATTR)

        def forward(self, *args, padded_images: Optional[torch.Tensor] = None, batch_data_indexes=None, **kwargs):
            state = self.__dict__.get(_STATE_ATTR)
            if state is None or not state.config.enabled:
                return super().forward(*args, **kwargs)
            if args:
                raise TypeError("bagel-sr: pass the packed batch to forward as keyword arguments, as BAGEL's loop does")
            if padded_images is None:
                raise MissingGroundTruthError(
                    "bagel-sr: the pixel loss is armed but forward got no padded_images (the ground-truth images); "
                    "pass padded_images=... (the wrapper's batch patch keeps them for BAGEL's loop), or set "
                    "--pixel_loss_weight 0 to train without it."
                )
            with _Capture(self) as capture:
                out = super().forward(**kwargs)
            if capture.v_hat is None or capture.z_t is None or capture.t is None:
                raise RuntimeError(
                    "bagel-sr: the forward did not call time_embedder, vae2llm and llm2vae (contract: generation path); "
                    "is this batch without VAE images?"
                )
            pixel, count, grad = pixel_term(
                self, state, capture, padded_images,
                kwargs["patchified_vae_latent_shapes"], kwargs["packed_vae_token_indexes"], kwargs["sample_lens"],
                batch_data_indexes,
            )
            state.calls += 1
            state.current = CallTensors(capture.v_hat, capture.hidden, grad) if state.wants_call_tensors else None
            out = dict(out)
            out["pixel"] = pixel
            out["pixel_images"] = count
            out["pixel_skipped"] = torch.tensor(float(state.skipped_nonfinite), device=pixel.device)
            return out

    PixelLoss.__name__ = f"{base.__name__}WithPixelLoss"
    PixelLoss.__qualname__ = PixelLoss.__name__
    PixelLoss.__module__ = base.__module__
    return PixelLoss
