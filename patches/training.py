"""The training-script patches: each replaces one name of the checkout after checking the contract fact it needs,
and returns its undo.  The table of all patches, and ``apply``, are in :mod:`bagel_sr.patches.registry`.

The patched model folds ``weight * pixel`` into the ``mse`` it returns (value unchanged; docs/loss_fold.md), with
``weight`` from :mod:`bagel_sr.weighting` (warm-up, adaptive factor, gradient-norm logs).  ``pixel``,
``pixel_images``, ``pixel_skipped``, ``pixel_weight`` and, when asked, ``grad_norm_*`` / ``pixel_adaptive_factor``
join the returned dict, so the loop logs them (log lines and wandb) like ``mse`` and ``ce``.
"""
import dataclasses
import inspect
from typing import Any, Optional

import torch

from bagel_sr import distributed, flow, monitoring, weighting
from bagel_sr.config import PixelLossConfig, pixel_loss_arguments_class
from bagel_sr.errors import UserError
from bagel_sr.extension import with_pixel_loss
from bagel_sr.names import check_names
from bagel_sr.patches.datasets import dataset_config_names

from bagel_sr.state import KEY_PREFIX

from . import fold, host
from .context import PatchContext, RunState
from .undo import NOTHING, Undo, replace_attribute

#: Keyword arguments of ``Bagel.forward`` the pixel loss reads (BAGEL_CONTRACT.md, generation path).
REQUIRED_FORWARD_ARGS = ("sample_lens", "patchified_vae_latent_shapes", "packed_vae_token_indexes", "packed_timesteps", "mse_loss_indexes")
#: Names the training script must hold in its namespace (BAGEL_CONTRACT.md, import surface).
REQUIRED_SCRIPT_NAMES = ("main", "TrainingArguments", "HfArgumentParser", "load_ae", "Bagel")
#: Fields of the script's TrainingArguments the patches read.
REQUIRED_TRAINING_FIELDS = ("mse_weight", "timestep_shift", "visual_gen")


class IncompatibleCheckoutError(UserError, RuntimeError):
    """A fact of BAGEL_CONTRACT.md the patches need does not hold in this checkout."""


def require(ok: bool, fact: str, hint: str = "") -> None:
    if not ok:
        raise IncompatibleCheckoutError(
            f"bagel-sr cannot patch this BAGEL checkout: {fact} (see BAGEL_CONTRACT.md in the bagel-sr docs)."
            + (f" {hint}" if hint else "")
        )


class PixelLossInputs:
    """Ground truth for the pixel loss, carried past the loop's ``pop`` of ``padded_images``.

    A plain object on purpose: FSDP casts floating tensors found in forward inputs (lists, dicts, dataclasses) to
    bf16, and the ground truth must stay in float32.
    """

    __slots__ = ("padded_images", "batch_data_indexes")

    def __init__(self, padded_images: torch.Tensor, batch_data_indexes: Optional[list]):
        self.padded_images = padded_images
        self.batch_data_indexes = batch_data_indexes


def banner(config: PixelLossConfig, timestep_shift: float, applied: Optional[dict] = None, host_line: str = "") -> str:
    """The start-up report: settings in force, the share of target images the gate admits, the host's own pixel
    term (taken over or kept), the patches in force."""
    share = flow.admitted_share(config.max_t, timestep_shift)
    mean_w = flow.mean_gate_weight(config.max_t, timestep_shift, config.schedule)
    lines = ["bagel-sr pixel loss " + ("ON" if config.enabled else "OFF (weight 0: stock BAGEL training)")]
    if host_line:
        lines.append(host_line)
    lines.append(config.describe())
    if config.enabled:
        lines.append(
            f"  gate: t <= {config.max_t} ({config.schedule}) admits {100 * share:.1f}% of target images under "
            f"timestep_shift={timestep_shift} (mean weight w(t) {mean_w:.3f}); "
            + ("only paired targets (a clean condition image before them)" if config.paired_only else "paired and unpaired targets")
        )
        if share < 0.05:
            lines.append(
                "  note: under 5% of targets pass the gate; raise --pixel_loss_max_t or lower --timestep_shift if "
                "the pixel term should act more often"
            )
    if applied:
        lines.append("  patches in force: " + ", ".join(f"{name} ({target})" for name, target in applied.items()))
    return "\n".join(lines)


def check_training_module(train_module: Any) -> None:
    """Fail with the missing fact unless the script exposes what the patches need."""
    for name in REQUIRED_SCRIPT_NAMES:
        require(hasattr(train_module, name), f"the training script does not define or import `{name}`",
                "Name the script with --bagel_train_script if your fork keeps its loop elsewhere.")
    targs = train_module.TrainingArguments
    require(dataclasses.is_dataclass(targs), "`TrainingArguments` is not a dataclass")
    names = {f.name for f in dataclasses.fields(targs)}
    for name in REQUIRED_TRAINING_FIELDS:
        require(name in names, f"`TrainingArguments` has no field `{name}`")
    params = inspect.signature(train_module.Bagel.forward).parameters
    for name in REQUIRED_FORWARD_ARGS:
        require(name in params, f"`Bagel.forward` takes no `{name}` argument")


def make_training_model_class(bagel_cls: type, run: RunState) -> type:
    """``with_pixel_loss(Bagel)`` armed from ``run`` at construction, folding ``weight * pixel`` into ``mse``."""
    extended = with_pixel_loss(bagel_cls)

    class PixelLossFold(extended):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            if run.config is not None and run.config.enabled:
                if run.vae is None:
                    raise IncompatibleCheckoutError(
                        "bagel-sr: the pixel loss needs the VAE, but load_ae was not called before the model was "
                        "built (is --visual_gen False?)."
                    )
                self.attach_pixel_loss(run.config, run.vae)
                if run.host_mode == "off":  # the host logs its own pixel keys: ours never overwrite them
                    self.pixel_loss_state.key_prefix = KEY_PREFIX

        def forward(self, **kwargs):
            inputs = kwargs.pop("pixel_loss_inputs", None)
            if run.host_mode == "off":  # bagel-sr took over: the host's own term stays off whatever its loop passes
                kwargs.update({name: 0.0 for name in run.host.weight_args})
            state = self.pixel_loss_state
            if state is None or not state.config.enabled:
                return super().forward(**kwargs)
            host_images = kwargs.pop("padded_images", None)  # a host loop that keeps them passes them itself
            out = super().forward(
                padded_images=inputs.padded_images if inputs is not None else host_images,
                batch_data_indexes=inputs.batch_data_indexes if inputs is not None else None,
                **kwargs,
            )
            mse_weight = float(run.training_args.mse_weight)
            tokens = fold.global_token_count(len(kwargs["mse_loss_indexes"]), out["mse"].device)
            flow_loss = monitoring.flow_term(out["mse"], tokens, mse_weight) if state.wants_call_tensors else None
            state.start_step = run.start_step  # the weight's clock is the loop's optimizer step (after a resume too)
            step = weighting.next_weight(state, flow_loss, run.gradient_accumulation_steps)
            pixel = out[state.key("pixel")]
            out["mse"] = fold.fold_into_mse(out["mse"], pixel, step.weight, mse_weight, tokens)
            out[state.key("pixel")] = pixel.detach()
            out[state.key("pixel_weight")] = torch.as_tensor(step.weight, dtype=torch.float32, device=pixel.device).detach()
            out.update({state.key(k): v for k, v in state.grad_logs.items()})  # latest measurement, until the next
            return out

    PixelLossFold.__name__ = PixelLossFold.__qualname__ = f"{bagel_cls.__name__}WithPixelLossFold"
    PixelLossFold.__module__ = bagel_cls.__module__
    return PixelLossFold


# -- one function per replaced name (rows of bagel_sr.patches.registry.PATCHES) ---------------------------------

def patch_training_arguments(ctx: PatchContext) -> Undo:
    """``TrainingArguments`` gains the ``--pixel_loss_*`` fields, defaults from ``ctx.defaults``.

    A checkout with its own pixel term (:mod:`.host`) is decided on here: ``refuse`` stops, ``keep`` leaves its
    arguments alone (nothing replaced), ``off`` makes the fields it shares with ours ours (the host's weights are
    set to 0 after parsing, in :func:`patch_parser`).
    """
    check_training_module(ctx.train_module)
    ctx.run.host = host.detect(ctx.train_module)
    ctx.run.host_mode = host.decide(ctx.run.host, ctx.host_mode)
    if ctx.run.host_mode == "keep":
        return NOTHING
    base = ctx.train_module.TrainingArguments
    args_cls = pixel_loss_arguments_class(base, name=base.__name__, defaults=ctx.defaults)
    return replace_attribute(ctx.train_module, "TrainingArguments", args_cls)


def patch_parser(ctx: PatchContext) -> Undo:
    """``HfArgumentParser`` remembers the parsed settings in ``ctx.run`` and prints the start-up banner."""
    check_training_module(ctx.train_module)
    run = ctx.run

    class PixelLossArgumentParser(ctx.train_module.HfArgumentParser):
        def parse_args_into_dataclasses(self, *args, **kwargs):
            parsed = super().parse_args_into_dataclasses(*args, **kwargs)
            run.parsed = tuple(parsed)
            for item in parsed:
                if hasattr(item, "pixel_loss_weight") and hasattr(item, "mse_weight"):
                    run.training_args = item
                    run.config = PixelLossConfig.from_namespace(item) if run.host_mode != "keep" else PixelLossConfig()
            if run.host_mode == "off" and run.training_args is not None:
                for name in run.host.weight_fields:  # read into run.config above; the host's own loop now sees 0
                    setattr(run.training_args, name, 0.0)
            if run.config is not None:
                if run.config.enabled and float(run.training_args.mse_weight) <= 0:
                    raise ValueError(
                        "--pixel_loss_weight > 0 needs --mse_weight > 0: the pixel term rides on the flow loss's "
                        "reduction; set --pixel_loss_weight 0 or a positive --mse_weight."
                    )
                # --pixel_loss_datasets names must exist in the --dataset_config_file's groups
                known = dataset_config_names(parsed)
                if run.config.enabled and known is not None:
                    check_names("--pixel_loss_datasets", run.config.dataset_names, known)
                host_line = host.banner_line(run.host, run.host_mode, KEY_PREFIX)
                run.banner = banner(run.config, float(run.training_args.timestep_shift), run.applied, host_line)
                if distributed.is_rank0():
                    print(run.banner, flush=True)
            return parsed

    return replace_attribute(ctx.train_module, "HfArgumentParser", PixelLossArgumentParser)


def patch_load_ae(ctx: PatchContext) -> Undo:
    """``load_ae`` also remembers the VAE it returns in ``ctx.run.vae``."""
    check_training_module(ctx.train_module)
    base_load_ae, run = ctx.train_module.load_ae, ctx.run

    def load_ae(*args, **kwargs):
        result = base_load_ae(*args, **kwargs)
        run.vae = result[0] if isinstance(result, tuple) else result
        return result

    return replace_attribute(ctx.train_module, "load_ae", load_ae)


def patch_model_class(ctx: PatchContext) -> Undo:
    """``Bagel`` becomes :func:`make_training_model_class` of it (named ``BagelWithPixelLossFold``)."""
    check_training_module(ctx.train_module)
    return replace_attribute(ctx.train_module, "Bagel", make_training_model_class(ctx.train_module.Bagel, ctx.run))


def patch_batch(ctx: PatchContext) -> Undo:
    """``SimpleCustomBatch.to_dict`` also returns ``pixel_loss_inputs`` (ground truth past the loop's pop)."""
    batch_cls = getattr(ctx.module("batch_module", "data.dataset_base"), "SimpleCustomBatch", None)
    require(batch_cls is not None and callable(getattr(batch_cls, "to_dict", None)),
            "`data.dataset_base.SimpleCustomBatch.to_dict` is missing")
    original, run = batch_cls.to_dict, ctx.run

    def to_dict(self):
        data = original(self)
        if run.config is not None and run.config.enabled and "padded_images" in data:
            data["pixel_loss_inputs"] = PixelLossInputs(data["padded_images"], getattr(self, "batch_data_indexes", None))
        return data

    return replace_attribute(batch_cls, "to_dict", to_dict)


def patch_train_state(ctx: PatchContext) -> Undo:
    """``FSDPCheckpoint.try_load_train_state`` also tells the weight controller the optimizer step the loop resumes
    at (the third item it returns), so the warm-up goes on from there instead of starting again."""
    checkpoint, run = ctx.train_module.FSDPCheckpoint, ctx.run
    original = checkpoint.try_load_train_state

    def try_load_train_state(*args, **kwargs):
        result = original(*args, **kwargs)
        if isinstance(result, tuple) and len(result) == 4 and isinstance(result[2], int):
            run.start_step = result[2]  # (optimizer, scheduler, train_step, data_status)
        return result

    return replace_attribute(checkpoint, "try_load_train_state", staticmethod(try_load_train_state))
