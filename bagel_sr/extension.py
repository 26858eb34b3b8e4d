"""``with_pixel_loss(BagelClass)``: BAGEL's training forward plus a pixel-fidelity term.

The subclass runs the parent's ``forward`` unchanged and, while armed, captures three tensors with temporary forward
hooks on the modules the contract names:

- ``t``     input of ``time_embedder``: flow time of every VAE token, ``(N_vae_tokens,)``;
- ``z_t``   input of ``vae2llm``: the noisy latent tokens, ``(N_vae_tokens, p*p*C)``;
- ``v_hat`` output of ``llm2vae``: the predicted velocity of the target tokens, ``(N_target_tokens, p*p*C)``.

The term itself is :func:`bagel_sr.pixel_term.pixel_term`; its weight (warm-up, adaptive factor) is
:mod:`bagel_sr.weighting`'s.  The model gets no parameters, buffers or submodules: the VAE and every counter live
in one :class:`~bagel_sr.state.PixelLossState` held in ``model.__dict__``.
"""
import inspect
from typing import Any, List, Optional

import torch

from . import decoding, fidelity_terms, weighting
from .config import PixelLossConfig
from .pixel_term import Captured, LatentGeometry, pixel_term
from .monitoring import NoImageWatch
from .state import KEY_PREFIX, CallTensors, PixelLossState

#: Keys the armed forward adds to the outputs (the wrapper's fold adds ``pixel_weight`` and the monitoring keys).
OUTPUT_KEYS = ("pixel", "pixel_images", "pixel_skipped")

_STATE_ATTR = "_bagel_sr_pixel_loss"


class MissingGroundTruthError(ValueError):
    """The pixel loss is armed but the forward got no ``padded_images``."""


class _Capture:
    """Temporary forward hooks collecting ``t``, ``z_t`` and ``v_hat`` during one parent forward."""

    MODULES = (("time_embedder", "t", False), ("vae2llm", "z_t", False), ("llm2vae", "v_hat", True))

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
        for attr, name, take_output in self.MODULES:
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

    def tensors(self) -> Captured:
        if self.v_hat is None or self.z_t is None or self.t is None:
            raise RuntimeError(
                "bagel-sr: the forward did not call time_embedder, vae2llm and llm2vae (contract: generation path); "
                "is this batch without VAE images?"
            )
        return Captured(t=self.t, z_t=self.z_t, v_hat=self.v_hat)


def with_pixel_loss(base: type) -> type:
    """A subclass of ``base`` (BAGEL's ``Bagel`` or a model with the same forward contract) with the pixel term.

    Same constructor.  ``attach_pixel_loss(config, vae)`` arms it; ``forward(**batch, padded_images=...,
    batch_data_indexes=None)`` then returns the parent's ``mse`` and ``ce`` unchanged plus ``pixel`` (0-dim,
    unweighted, differentiable), with ``--pixel_loss_terms`` ``pixel_<term>`` (each term unweighted, detached),
    ``pixel_images`` (how many images it used, a tensor) and ``pixel_skipped`` (how many
    micro-steps so far dropped a non-finite term, a tensor); when the parent returns one of these keys itself (a fork
    with its own pixel term) ours are ``bagel_sr_pixel``, ... (``model.pixel_loss_state.key(name)``).  A parent
    whose ``forward`` takes ``padded_images`` gets them passed through.  ``next_pixel_weight(flow_loss)`` gives the weight of
    this micro-step (:func:`bagel_sr.weighting.next_weight`).  Not armed or weight 0: the parent's forward, untouched.
    """
    if getattr(base, "_bagel_sr_extended", False):
        return base
    # a host forward with its own pixel term takes the ground truth too: it gets it, armed or not
    host_takes_images = "padded_images" in inspect.signature(base.forward).parameters

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
            if "lpl" in config.term_weights:
                fidelity_terms.feature_modules(decoding.decoder_of(vae))  # fails now, naming what is missing
            for attr in ("latent_patch_size", "latent_channel", "latent_downsample"):
                if not hasattr(self, attr):
                    raise AttributeError(f"bagel-sr: the model lacks `{attr}`; build it with visual_gen=True")
            llm2vae = getattr(self, "llm2vae", None)  # read before FSDP flattens the parameters
            self.__dict__[_STATE_ATTR] = PixelLossState(
                config=config, vae=vae, llm2vae_bias=getattr(llm2vae, "bias", None) is not None,
                no_image_watch=NoImageWatch())
            return self

        def detach_pixel_loss(self) -> None:
            """Disarm: the model behaves as its parent again."""
            self.__dict__.pop(_STATE_ATTR, None)

        @property
        def pixel_loss_state(self) -> Optional[PixelLossState]:
            return self.__dict__.get(_STATE_ATTR)

        def next_pixel_weight(self, flow_loss: Optional[torch.Tensor] = None,
                              gradient_accumulation_steps: int = 1) -> weighting.WeightStep:
            """The pixel weight of this micro-step; call once per armed forward (see :mod:`bagel_sr.weighting`)."""
            return weighting.next_weight(self.pixel_loss_state, flow_loss, gradient_accumulation_steps)

        def resume_pixel_loss_at(self, step: int) -> None:
            """The optimizer step the loop resumes at (0 for a fresh run): the weight's warm-up goes on from there."""
            if self.pixel_loss_state is None:
                raise RuntimeError("bagel-sr: arm the pixel loss (attach_pixel_loss) before resume_pixel_loss_at")
            self.pixel_loss_state.start_step = int(step)

        def forward(self, *args, padded_images: Optional[torch.Tensor] = None, batch_data_indexes=None, **kwargs):
            state = self.__dict__.get(_STATE_ATTR)
            if host_takes_images:
                kwargs["padded_images"] = padded_images
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
            result = pixel_term(
                LatentGeometry.of(self), state, capture.tensors(), padded_images,
                kwargs["patchified_vae_latent_shapes"], kwargs["packed_vae_token_indexes"], kwargs["sample_lens"],
                batch_data_indexes, kwargs.get("padded_latent"),
            )
            state.calls += 1
            state.current = (CallTensors(capture.v_hat, capture.hidden, result.grad, result.term_grads, result.mix)
                             if state.wants_call_tensors else None)
            out = dict(out)
            if any(k in out for k in OUTPUT_KEYS):  # the host returns a key of ours: never overwrite it
                state.key_prefix = KEY_PREFIX
            out[state.key("pixel")] = result.pixel
            out[state.key("pixel_images")] = result.count
            if state.config.terms:  # --pixel_loss_terms: each term's unweighted value as pixel_<term>
                out.update({state.key(f"pixel_{name}"): value for name, value in result.terms.items()})
            out[state.key("pixel_skipped")] = torch.tensor(float(state.skipped_nonfinite), device=result.pixel.device)
            if state.no_image_watch is not None and not state.no_image_watch.done:  # loud if nothing is admitted
                state.no_image_watch.observe(float(result.count), state.config.weight, state.config.datasets)
            return out

    PixelLoss.__name__ = f"{base.__name__}WithPixelLoss"
    PixelLoss.__qualname__ = PixelLoss.__name__
    PixelLoss.__module__ = base.__module__
    return PixelLoss
