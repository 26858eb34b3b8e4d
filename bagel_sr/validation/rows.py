"""Validation's rows of the patch registry: each replaces one name of the training script, after checking it is
there, and returns its undo; they apply when ``--bagel_sr_val_datasets`` is given (``ctx.validation``).  The first
row applied builds the run's :class:`~bagel_sr.validation.loop.Validator` (``ctx.validator``) the others feed.
"""
from __future__ import annotations

import importlib
from typing import Any, Callable, Tuple

import torch

from bagel_sr.patches.context import PatchContext
from bagel_sr.patches.undo import Undo, replace_attribute
from bagel_sr.patches.registry import Patch
from bagel_sr.patches.training import require

from .fits import check_fits
from .loop import Validator, _rank_world, loop_step


#: The keyword the live model's forward calls the EMA with (the EMA is a copy of the same class): validate, no loss.
VALIDATE_ARG = "bagel_sr_validate_step"


def run_validator(ctx: PatchContext) -> Validator:
    """The run's validator, built on first use from ``ctx.validation`` and ``ctx.val_sets``."""
    if ctx.validator is None:
        ctx.validator = Validator(ctx.validation, list(ctx.val_sets), ctx.run)
    return ctx.validator


def patch_val_tokenizer(ctx: PatchContext) -> Undo:
    """``<script>.add_special_tokens`` also hands the tokenizer and the new token ids to the validator."""
    base = getattr(ctx.train_module, "add_special_tokens", None)
    require(callable(base), "the training script does not import `add_special_tokens` (validation needs the tokenizer)")
    validator = run_validator(ctx)

    def add_special_tokens(tokenizer, *args, **kwargs):
        result = base(tokenizer, *args, **kwargs)
        validator.tokenizer, validator.new_token_ids = result[0], result[1]
        return result

    return replace_attribute(ctx.train_module, "add_special_tokens", add_special_tokens)


def patch_val_ema(ctx: PatchContext) -> Undo:
    """``<script>.fsdp_ema_setup`` also hands the EMA model it returns to the validator."""
    base = getattr(ctx.train_module, "fsdp_ema_setup", None)
    require(callable(base), "the training script does not import `fsdp_ema_setup` (--bagel_sr_val_ema needs it)")
    validator = run_validator(ctx)

    def fsdp_ema_setup(*args, **kwargs):
        validator.ema = base(*args, **kwargs)
        return validator.ema

    return replace_attribute(ctx.train_module, "fsdp_ema_setup", fsdp_ema_setup)


def patch_val_start_step(ctx: PatchContext) -> Undo:
    """``<script>.FSDPCheckpoint.try_load_train_state`` also hands the step the loop resumes at to the validator."""
    owner = ctx.train_module.FSDPCheckpoint
    base, validator = owner.try_load_train_state, run_validator(ctx)

    def try_load_train_state(*args, **kwargs):
        result = base(*args, **kwargs)
        validator.start_step = int(result[2])
        return result

    return replace_attribute(owner, "try_load_train_state", staticmethod(try_load_train_state))


def patch_val_model(ctx: PatchContext) -> Undo:
    """``<script>.Bagel`` gains validation before the forward of a due step and the ``val_*`` keys after it.  With
    ``--bagel_sr_val_ema`` the live model's forward calls the EMA model (its own FSDP root, so its parameters are
    gathered as for any forward) with :data:`VALIDATE_ARG`; the EMA's forward validates itself and returns ``{}``."""
    base, validator, run = ctx.train_module.Bagel, run_validator(ctx), ctx.run
    script_file = getattr(ctx.train_module, "__file__", None)

    class WithValidation(base):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            if getattr(WithValidation, "_bagel_sr_bound", False):
                return
            WithValidation._bagel_sr_bound = True  # the first model built is the live one (the EMA is its copy)
            transforms = importlib.import_module("data.transforms")
            check_fits(validator.sets, transforms.ImageTransform, int(self.max_latent_size), int(self.latent_downsample),
                       getattr(self, "vit_max_num_patch_per_side", None))
            if _rank_world()[0] == 0:
                print(validator.start_line(), flush=True)

        def forward(self, **kwargs):
            if VALIDATE_ARG in kwargs:  # the EMA, called through its own FSDP root by the live model's forward
                validator.validate(self, kwargs[VALIDATE_ARG])
                return {}
            step = validator.due(loop_step(script_file))
            if step is not None and validator.config.ema:
                require(validator.ema is not None, "--bagel_sr_val_ema: the script built no EMA through fsdp_ema_setup")
                with torch.no_grad():
                    validator.ema(**{VALIDATE_ARG: step})
            elif step is not None:
                validator.validate(self, step)
            out = super().forward(**kwargs)
            device = out["mse"].device if isinstance(out.get("mse"), torch.Tensor) else torch.device("cpu")
            out.update(validator.log_values(device))
            return out

    WithValidation.__name__ = WithValidation.__qualname__ = base.__name__
    WithValidation.__module__ = base.__module__
    return replace_attribute(ctx.train_module, "Bagel", WithValidation)


def _script_name(name: str) -> Callable[[PatchContext], Any]:
    return lambda ctx: vars(ctx.train_module).get(name)


def _validating(ctx: PatchContext) -> bool:
    return ctx.validation is not None and ctx.validation.enabled


def _resumes_through_fsdp_checkpoint(ctx: PatchContext) -> bool:
    owner = getattr(ctx.train_module, "FSDPCheckpoint", None)
    return _validating(ctx) and callable(getattr(owner, "try_load_train_state", None))


VALIDATION_PATCHES: Tuple[Patch, ...] = (
    Patch("patch_val_tokenizer", "<script>.add_special_tokens", "training", "script",
          "also hands the tokenizer and its new token ids to validation during training",
          patch_val_tokenizer, _script_name("add_special_tokens"),
          when=_validating, condition="--bagel_sr_val_datasets given"),
    Patch("patch_val_ema", "<script>.fsdp_ema_setup", "training", "script",
          "also hands the EMA model it returns to validation during training",
          patch_val_ema, _script_name("fsdp_ema_setup"),
          when=lambda ctx: _validating(ctx) and bool(ctx.validation.ema), condition="--bagel_sr_val_ema True"),
    Patch("patch_val_start_step", "<script>.FSDPCheckpoint.try_load_train_state", "training", "script",
          "also hands the step the loop resumes at to validation during training",
          patch_val_start_step, lambda ctx: vars(ctx.train_module.FSDPCheckpoint).get("try_load_train_state"),
          when=_resumes_through_fsdp_checkpoint,
          condition="--bagel_sr_val_datasets given, the script resumes through FSDPCheckpoint"),
    Patch("patch_val_model", "<script>.Bagel", "training", "script",
          "validates every --bagel_sr_val_every steps before the forward, returns the latest val_* keys",
          patch_val_model, _script_name("Bagel"),
          when=_validating, condition="--bagel_sr_val_datasets given"),
)
