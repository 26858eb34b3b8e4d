"""The frozen VAE seen as one ``decode(z) -> image`` with gradients to ``z``.

Convention (BAGEL's ``AutoEncoder``): ``encode(x)`` returns the *scaled* latent ``scale * (z - shift)`` of shape
``(N, 16, H/8, W/8)`` and ``decode(z)`` undoes the scaling before the decoder; images are in [-1, 1], ``(N, 3, H, W)``.
Cost controls live here: a random latent crop with a margin, activation checkpointing of the decoder per block and
the decode dtype.
"""
import contextlib
import types
from dataclasses import dataclass
from typing import Iterator, Optional, Tuple

import torch
import torch.utils.checkpoint as torch_checkpoint
from torch import nn
from torch.utils.checkpoint import checkpoint

#: Decoder blocks checkpointed one by one, the outermost match wins: residual blocks, attention, upsampling of
#: BAGEL's AutoEncoder (``ResnetBlock``, ``AttnBlock``, ``Upsample``), of diffusers' AutoencoderKL
#: (``ResnetBlock2D``, ``Attention``, ``Upsample2D``) and AutoencoderDC (``ResBlock``, ``EfficientViTBlock``,
#: ``DCUpBlock2d``).  Per residual block, not per up-block: recomputing a whole full-resolution up-block in backward
#: would hold its three residual blocks' activations at once.
CHECKPOINT_BLOCKS = frozenset(
    {"ResnetBlock", "AttnBlock", "Upsample", "ResnetBlock2D", "Attention", "Upsample2D", "ResBlock",
     "EfficientViTBlock", "DCUpBlock2d"}
)


class DiffusersVAE(nn.Module):
    """A diffusers-style autoencoder with BAGEL's ``encode``/``decode`` convention (scaled latents).

    The autoencoder's ``encode(x)`` returns ``.latent_dist`` (a posterior, as ``AutoencoderKL``) or ``.latent``
    (deterministic, as ``AutoencoderDC``); ``decode(z)`` returns ``.sample``.  ``encode`` samples a posterior, like
    BAGEL's ``AutoEncoder``; ``encode_mean`` returns its mean; both are the latent of a deterministic encoder.
    """

    def __init__(self, autoencoder: nn.Module, scale_factor: float, shift_factor: float):
        super().__init__()
        self.vae = autoencoder
        self.scale_factor = float(scale_factor)
        self.shift_factor = float(shift_factor)

    @property
    def decoder(self) -> nn.Module:
        return self.vae.decoder

    def _scale(self, z: torch.Tensor) -> torch.Tensor:
        return self.scale_factor * (z - self.shift_factor)

    def posterior(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Mean and standard deviation of the *unscaled* latent; the deviation is zero for a deterministic encoder."""
        out = self.vae.encode(x)
        dist = getattr(out, "latent_dist", None)
        if dist is None:
            return out.latent, torch.zeros_like(out.latent)
        return dist.mean, dist.std

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        out = self.vae.encode(x)
        dist = getattr(out, "latent_dist", None)
        return self._scale(out.latent if dist is None else dist.sample())

    def encode_mean(self, x: torch.Tensor) -> torch.Tensor:
        return self._scale(self.posterior(x)[0])

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(z / self.scale_factor + self.shift_factor).sample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))


def decoder_of(vae) -> Optional[nn.Module]:
    """The VAE's ``decoder`` module (BAGEL's AutoEncoder, :class:`DiffusersVAE`), or None."""
    dec = getattr(vae, "decoder", None)
    return dec if isinstance(dec, nn.Module) else None


def _checkpoint_targets(module: nn.Module) -> Iterator[nn.Module]:
    """Outermost submodules whose class is a known decoder block (top-down; children of a hit are skipped)."""
    for child in module.children():
        if type(child).__name__ in CHECKPOINT_BLOCKS:
            yield child
        else:
            yield from _checkpoint_targets(child)


_CHECKPOINT_FUNCTIONS = (torch_checkpoint, torch_checkpoint.checkpoint, torch_checkpoint.checkpoint_sequential)


def _code_calls_checkpoint(code: types.CodeType, globals_: dict) -> bool:
    """Whether ``code`` (or code nested in it) names ``checkpoint`` or a global bound to torch's checkpointing."""
    for name in code.co_names:
        if name in ("checkpoint", "checkpoint_sequential") or any(globals_.get(name) is f for f in _CHECKPOINT_FUNCTIONS):
            return True
    return any(_code_calls_checkpoint(c, globals_) for c in code.co_consts if isinstance(c, types.CodeType))


def checkpoints_itself(decoder: nn.Module) -> bool:
    """Whether the decoder already applies activation checkpointing itself (a fork checkpointing its levels,
    diffusers' ``gradient_checkpointing``): then :func:`checkpointed_decoder` adds none, since checkpoints nested
    in it fail at recomputation (``CheckpointError: Recomputed values ... have different metadata``).

    Read from fields (``gradient_checkpointing`` on any submodule decides when present) or else from the code of
    the decoder's and its submodules' own methods (a call of ``torch.utils.checkpoint``).
    """
    flags = [m.gradient_checkpointing for m in decoder.modules() if isinstance(getattr(m, "gradient_checkpointing", None), bool)]
    if flags:
        return any(flags)
    classes = {cls for m in decoder.modules() for cls in type(m).__mro__ if cls.__module__.split(".")[0] != "torch"}
    return any(_code_calls_checkpoint(f.__code__, f.__globals__) for cls in classes for f in vars(cls).values()
               if isinstance(f, types.FunctionType))


@contextlib.contextmanager
def checkpointed_decoder(vae) -> Iterator[int]:
    """Within the block, each decoder block recomputes its activations in backward (yields how many blocks; 0 when
    the decoder checkpoints itself, :func:`checkpoints_itself`).

    Implemented by shadowing each block's ``forward`` with an instance attribute, removed on exit.
    """
    decoder = decoder_of(vae)
    blocks = list(_checkpoint_targets(decoder)) if decoder is not None and not checkpoints_itself(decoder) else []
    for block in blocks:
        original = block.forward

        def run(*args, __original=original, **kwargs):
            if not torch.is_grad_enabled():
                return __original(*args, **kwargs)
            return checkpoint(__original, *args, use_reentrant=False, **kwargs)

        block.forward = run
    try:
        yield len(blocks)
    finally:
        for block in blocks:
            block.__dict__.pop("forward", None)


@dataclass(frozen=True)
class CropWindow:
    """A latent window: ``inner`` gets the loss, ``outer`` = inner plus a margin (clipped) is decoded.

    Boxes are ``(top, left, bottom, right)`` in latent pixels (exclusive ends).
    """

    inner: Tuple[int, int, int, int]
    outer: Tuple[int, int, int, int]

    def inner_in_outer(self, scale: int = 1) -> Tuple[slice, slice]:
        """Slices selecting the inner window inside the decoded outer window, in units of ``scale``."""
        top, left = self.inner[0] - self.outer[0], self.inner[1] - self.outer[1]
        return (
            slice(top * scale, (top + self.inner[2] - self.inner[0]) * scale),
            slice(left * scale, (left + self.inner[3] - self.inner[1]) * scale),
        )

    def inner_pixels(self, scale: int) -> Tuple[slice, slice]:
        """Slices of the inner window in image pixels (``scale`` = VAE downsampling)."""
        return slice(self.inner[0] * scale, self.inner[2] * scale), slice(self.inner[1] * scale, self.inner[3] * scale)


def crop_window(height: int, width: int, crop: int, margin: int, generator: Optional[torch.Generator] = None) -> CropWindow:
    """A random ``crop x crop`` latent window (whole axis when the latent is smaller) and its margin-grown outer box."""
    ch, cw = min(crop, height), min(crop, width)
    top = int(torch.randint(0, height - ch + 1, (1,), generator=generator))
    left = int(torch.randint(0, width - cw + 1, (1,), generator=generator))
    inner = (top, left, top + ch, left + cw)
    outer = (max(0, top - margin), max(0, left - margin), min(height, top + ch + margin), min(width, left + cw + margin))
    return CropWindow(inner=inner, outer=outer)


def decode(vae, z: torch.Tensor, dtype: str = "autocast", checkpointing: bool = False) -> torch.Tensor:
    """``vae.decode(z)`` with gradients to ``z``; ``dtype='fp32'`` leaves any autocast region for the decode."""
    with contextlib.ExitStack() as stack:
        if dtype == "fp32":
            stack.enter_context(torch.autocast(device_type=z.device.type, enabled=False))
            z = z.float()
        elif dtype != "autocast":
            raise ValueError(f"unknown decode dtype {dtype!r}; allowed: 'autocast', 'fp32'")
        else:
            z = z.to(_vae_dtype(vae, z.dtype))
        if checkpointing:
            stack.enter_context(checkpointed_decoder(vae))
        return vae.decode(z)


def _vae_dtype(vae, default: torch.dtype) -> torch.dtype:
    for p in getattr(vae, "parameters", lambda: iter(()))():
        return p.dtype
    return default
