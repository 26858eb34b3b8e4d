"""The inference patch: BAGEL's sampler starts from the degraded input (``--start_t``).

``patch_start_t`` wraps two bound methods of one ``InterleaveInferencer`` (instance attributes, so other
instances and the classes are untouched):

- ``inferencer.update_context_image``: remembers the last image put in the context with ``vae=True`` (the
  condition, already resized by the inferencer's ``vae_transform``, hence at the output size);
- ``inferencer.model.generate_image``: on the checkout's own grid (``linspace(1, 0, num_timesteps)`` with the
  timestep shift, BAGEL_CONTRACT.md) finds the first time ``t_k <= start_t``
  (:func:`bagel_sr.restoration.start_index`), replaces ``packed_init_noises`` by
  ``(1 - t_k) z_input + t_k noise`` (``z_input``: the remembered image through ``vae_transform`` and
  ``vae_model.encode``, patchified as BAGEL packs latents) and, for this call only, makes the model's
  ``_forward_flow`` return a zero velocity for the first ``k`` steps, so the checkout's loop keeps ``z_{t_k}``
  until it integrates from ``t_k`` to 0.  ``k = 0`` (``start_t = 1``) calls the stock method unchanged.
- ``one_step``: the velocity of step ``k`` is scaled by ``t_k / (t_k - t_{k+1})`` and the later steps return zero
  without calling the model, so the loop ends at ``z_{t_k} - t_k v_hat`` (one Euler step to 0, the model's clean
  estimate) after one model evaluation.
"""
import inspect
from typing import Any, Dict, List

import torch

from bagel_sr.flow import shift_timesteps
from bagel_sr.packing import patchify_latent
from bagel_sr.restoration import check_start_t, start_index, start_latent

from .context import PatchContext
from .undo import Undo, combine, replace_attribute
from .training import require

GENERATE_ARGS = ("packed_init_noises", "num_timesteps", "timestep_shift")
MODEL_ATTRS = ("latent_patch_size", "latent_channel", "latent_downsample")


def checkout_grid(num_timesteps: int, shift: float) -> List[float]:
    """The flow times of the checkout's ``generate_image`` (``num_timesteps`` points from 1 to 0, shifted)."""
    ts = torch.linspace(1, 0, int(num_timesteps))
    return [float(t) for t in shift_timesteps(ts, float(shift))]


def _check(inferencer: Any) -> None:
    model = getattr(inferencer, "model", None)
    require(callable(getattr(inferencer, "update_context_image", None)) and callable(getattr(inferencer, "vae_transform", None))
            and callable(getattr(getattr(inferencer, "vae_model", None), "encode", None)),
            "InterleaveInferencer.update_context_image, .vae_transform and .vae_model.encode are needed for --start_t")
    generate = getattr(model, "generate_image", None)
    params = inspect.signature(generate).parameters if callable(generate) else {}
    require(all(a in params for a in GENERATE_ARGS),
            f"Bagel.generate_image({', '.join(GENERATE_ARGS)}, ...) is needed for --start_t")
    flow_params = inspect.signature(model._forward_flow).parameters if callable(getattr(model, "_forward_flow", None)) else {}
    require("x_t" in flow_params, "Bagel._forward_flow(x_t, ...) is needed for --start_t")
    require(all(hasattr(model, a) for a in MODEL_ATTRS), f"Bagel.{', Bagel.'.join(MODEL_ATTRS)} are needed for --start_t")


def _input_tokens(inferencer: Any, image: Any) -> torch.Tensor:
    """The remembered condition image as BAGEL's packed latent tokens ``(h*w, p*p*C)``."""
    model, vae = inferencer.model, inferencer.vae_model
    param = next(vae.parameters(), None) if hasattr(vae, "parameters") else None
    x = inferencer.vae_transform(image)[None]
    if param is not None:
        x = x.to(param.device, param.dtype)
    latent = vae.encode(x)[0]
    h, w = image.size[1] // model.latent_downsample, image.size[0] // model.latent_downsample
    return patchify_latent(latent, h, w, model.latent_patch_size)


def patch_start_t(ctx: PatchContext) -> Undo:
    inferencer, start_t, one_step = ctx.inferencer, check_start_t(ctx.start_t), bool(ctx.one_step)
    _check(inferencer)
    model = inferencer.model
    stock_update, stock_generate, stock_flow = inferencer.update_context_image, model.generate_image, model._forward_flow
    seen: Dict[str, Any] = {}

    def update_context_image(image, gen_context, vae=True, vit=True):
        if vae:
            seen["image"] = image
        return stock_update(image, gen_context, vae=vae, vit=vit)

    def generate_image(*args, **kwargs):
        bound = inspect.signature(stock_generate).bind(*args, **kwargs)
        bound.apply_defaults()
        grid = checkout_grid(bound.arguments["num_timesteps"], bound.arguments["timestep_shift"])
        k = start_index(grid, start_t)
        if (k == 0 and not one_step) or (k > 0 and "image" not in seen):
            return stock_generate(*args, **kwargs)
        if k > 0:
            noise = bound.arguments["packed_init_noises"]
            z_input = _input_tokens(inferencer, seen["image"]).to(noise.device, noise.dtype)
            if z_input.shape != noise.shape:
                raise RuntimeError(f"--start_t: the input's latent has {tuple(z_input.shape)} tokens x features but "
                                   f"the output's noise {tuple(noise.shape)}; the input and output sizes differ")
            bound.arguments["packed_init_noises"] = start_latent(z_input, noise, grid[k])
        calls = {"n": 0}

        def forward_flow(*a, **kw):
            calls["n"] += 1
            step = calls["n"] - 1
            if step < k or (one_step and step > k):  # above t_k: hold z_{t_k}; after the one step: hold its result
                x_t = kw["x_t"] if "x_t" in kw else a[0]
                return torch.zeros_like(x_t)
            v = stock_flow(*a, **kw)
            if one_step:  # the loop multiplies by t_k - t_{k+1}; the step goes to the grid's end instead
                return v * ((grid[k] - grid[-1]) / (grid[k] - grid[k + 1]))
            return v

        undo_flow = replace_attribute(model, "_forward_flow", forward_flow)
        try:
            return stock_generate(*bound.args, **bound.kwargs)
        finally:
            undo_flow()

    return combine(replace_attribute(inferencer, "update_context_image", update_context_image),
                   replace_attribute(model, "generate_image", generate_image))
