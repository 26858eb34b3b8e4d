"""Runtime patches of a BAGEL training script so that its own, unchanged ``main()`` trains with the pixel loss.

``apply_pixel_loss_training(train_module)`` replaces these names, each after checking the fact of
``BAGEL_CONTRACT.md`` it relies on, and returns a handle whose ``undo()`` restores them:

==================================  ============================================================================
``train_module.TrainingArguments``  a subclass with the ``--pixel_loss_*`` fields (``--help`` lists them, wandb
                                    records them, bad values are rejected at parse time)
``train_module.HfArgumentParser``   a subclass that remembers the parsed settings and prints the start-up banner
``train_module.load_ae``            the checkout's ``load_ae``, remembering the VAE it returns
``train_module.Bagel``              ``with_pixel_loss(Bagel)``, armed at construction, whose forward folds
                                    ``weight * pixel`` into the returned ``mse`` (value unchanged, see below)
``SimpleCustomBatch.to_dict``       also returns ``pixel_loss_inputs``: the ground-truth images and
                                    ``batch_data_indexes``, which the loop otherwise pops before forward
==================================  ============================================================================

The loss fold.  The loop computes ``mse = mse_rows.mean(-1).sum() * W / N_tokens`` and
``loss = (ce * ce_weight + mse * mse_weight) / GA``.  The patched forward appends one row ``k * (P - P.detach())``
to ``mse`` with ``k = weight * N_tokens / (W * mse_weight)``: its value is exactly 0 (logged ``mse`` is unchanged)
and its gradient adds ``weight * dP / GA``, i.e. the loop back-propagates ``(ce*ce_weight + mse*mse_weight +
weight*pixel) / GA`` without a line of it changing.  ``pixel``, ``pixel_images``, ``pixel_skipped`` (micro-steps
whose non-finite term was dropped) and ``pixel_weight`` join the returned dict, so the loop logs them (log lines and
wandb) like ``mse`` and ``ce``.

``weight`` is ``--pixel_loss_weight`` times the warm-up factor of the optimizer step and, with
``--pixel_loss_adaptive_weight``, times ``min(||grad L_flow|| / ||grad L_pix||, adaptive_weight_max)`` on ``llm2vae``
(detached, the same on every rank).  With ``--pixel_loss_log_grad_norms_every N`` the dict also carries
``grad_norm_flow``, ``grad_norm_pixel`` (of ``weight * pixel``) and ``grad_norm_ratio``, measured on the first
micro-step of every N-th optimizer step and repeated until the next measurement (the loop logs whatever micro-step
falls on its ``log_every``); see ``bagel_sr.monitoring``.
"""
import dataclasses
import inspect
import logging
from dataclasses import dataclass, field
from typing import Any, Callable, List, Optional

import torch
import torch.distributed as dist

from bagel_sr import flow, monitoring
from bagel_sr.config import PixelLossConfig, pixel_loss_arguments_class
from bagel_sr.extension import with_pixel_loss
from bagel_sr.patches.datasets import NoImageWatch, check_names, dataset_config_names  # issue 15

logger = logging.getLogger("bagel_sr")

#: Keyword arguments of ``Bagel.forward`` the pixel loss reads (BAGEL_CONTRACT.md, generation path).
REQUIRED_FORWARD_ARGS = ("sample_lens", "patchified_vae_latent_shapes", "packed_vae_token_indexes", "packed_timesteps", "mse_loss_indexes")
#: Names the training script must hold in its namespace (BAGEL_CONTRACT.md, import surface).
REQUIRED_SCRIPT_NAMES = ("main", "TrainingArguments", "HfArgumentParser", "load_ae", "Bagel")
#: Fields of the script's TrainingArguments the patches read.
REQUIRED_TRAINING_FIELDS = ("mse_weight", "timestep_shift", "visual_gen")


class IncompatibleCheckoutError(RuntimeError):
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


@dataclass
class PatchState:
    """What the patches learn while ``main()`` runs (parsed settings, the VAE) and how to undo them."""

    config: Optional[PixelLossConfig] = None
    training_args: Any = None
    vae: Any = None
    undo: List[Callable[[], None]] = field(default_factory=list)
    banner: str = ""

    def restore(self) -> None:
        while self.undo:
            self.undo.pop()()


def _rank0() -> bool:
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def banner(config: PixelLossConfig, timestep_shift: float) -> str:
    """The start-up report: settings in force and the share of target images the gate admits."""
    share = flow.admitted_share(config.max_t, timestep_shift)
    mean_w = flow.mean_gate_weight(config.max_t, timestep_shift, config.schedule)
    lines = ["bagel-sr pixel loss " + ("ON" if config.enabled else "OFF (weight 0: stock BAGEL training)")]
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
    return "\n".join(lines)


def _replace(obj: Any, name: str, value: Any, state: PatchState) -> None:
    had = name in vars(obj) if not isinstance(obj, dict) else name in obj
    old = getattr(obj, name) if had else None

    def undo():
        if had:
            setattr(obj, name, old)
        else:
            delattr(obj, name)

    setattr(obj, name, value)
    state.undo.append(undo)


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


def _world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def global_token_count(num_tokens_local: int, device: torch.device) -> torch.Tensor:
    """The loop's ``total_mse_tokens``: the target tokens of all ranks (a collective when distributed)."""
    total = torch.tensor(float(num_tokens_local), device=device)
    if _world() > 1:
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return total


def fold_into_mse(mse: torch.Tensor, pixel: torch.Tensor, weight, mse_weight: float,
                  num_tokens_global: torch.Tensor) -> torch.Tensor:
    """Append the zero-valued row carrying ``weight * pixel``'s gradient through the loop's ``mse`` reduction.

    ``weight``: a float or a detached 0-dim tensor; ``num_tokens_global``: :func:`global_token_count`.
    """
    k = weight * num_tokens_global / (_world() * mse_weight)
    carrier = (k * (pixel - pixel.detach())).to(mse.dtype)
    return torch.cat([mse, carrier.reshape(1, 1).expand(1, mse.shape[-1])], dim=0)


def grad_norms_due(config: PixelLossConfig, micro_step: int, gradient_accumulation: int) -> bool:
    """Every micro-step with the adaptive weight; else the first micro-step of every N-th optimizer step."""
    if config.adaptive_weight:
        return True
    every = config.log_grad_norms_every
    ga = max(1, gradient_accumulation)
    return every > 0 and micro_step % ga == 0 and (micro_step // ga) % every == 0


def make_training_model_class(bagel_cls: type, state: PatchState, gradient_accumulation: Callable[[], int]) -> type:
    """``with_pixel_loss(Bagel)`` armed from ``state`` at construction and folding the term into ``mse``."""
    extended = with_pixel_loss(bagel_cls)

    class BagelSR(extended):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            config = state.config
            if config is not None and config.enabled:
                if state.vae is None:
                    raise IncompatibleCheckoutError(
                        "bagel-sr: the pixel loss needs the VAE, but load_ae was not called before the model was "
                        "built (is --visual_gen False?)."
                    )
                self.attach_pixel_loss(config, state.vae)
            self.__dict__["_bagel_sr_microsteps"] = 0
            llm2vae = getattr(self, "llm2vae", None)  # read before FSDP flattens the parameters
            self.__dict__["_bagel_sr_llm2vae_bias"] = getattr(llm2vae, "bias", None) is not None

        def forward(self, **kwargs):
            inputs = kwargs.pop("pixel_loss_inputs", None)
            armed = self.pixel_loss_state is not None and self.pixel_loss_state.config.enabled
            if not armed:
                return super().forward(**kwargs)
            out = super().forward(
                padded_images=inputs.padded_images if inputs is not None else None,
                batch_data_indexes=inputs.batch_data_indexes if inputs is not None else None,
                **kwargs,
            )
            pixel_state, config = self.pixel_loss_state, self.pixel_loss_state.config
            micro, ga = self.__dict__["_bagel_sr_microsteps"], max(1, gradient_accumulation())
            self.__dict__["_bagel_sr_microsteps"] += 1
            weight = config.weight * warmup_factor(micro // ga, config.warmup_steps)
            mse_weight = float(state.training_args.mse_weight)
            tokens = global_token_count(len(kwargs["mse_loss_indexes"]), out["mse"].device)
            call = pixel_state.pop_call()
            if call is not None and out["mse"].requires_grad and grad_norms_due(config, micro, ga):
                weight = self._bagel_sr_measure(out["mse"], call, tokens, mse_weight, weight, config)
            elif config.adaptive_weight:
                weight = weight * self.__dict__.get("_bagel_sr_factor", 1.0)
            out["mse"] = fold_into_mse(out["mse"], out["pixel"], weight, mse_weight, tokens)
            out["pixel"] = out["pixel"].detach()
            out["pixel_weight"] = torch.as_tensor(weight, dtype=torch.float32, device=out["pixel"].device).detach()
            watch = self.__dict__.setdefault("_bagel_sr_watch", NoImageWatch())  # issue 15: loud if nothing admitted
            if not watch.done:
                watch.observe(float(out["pixel_images"]), float(weight) or config.weight, config.datasets)
            out.update(self.__dict__.get("_bagel_sr_grad_logs", {}))
            return out

        def _bagel_sr_measure(self, mse_rows, call, tokens, mse_weight, weight, config):
            """Gradient norms on llm2vae (kept for the logs); returns the weight, adapted if asked."""
            flow_grad = monitoring.output_gradient(monitoring.flow_term(mse_rows, tokens, mse_weight), call.v_hat)
            norms = monitoring.llm2vae_grad_norms(call.hidden, flow_grad, call.pixel_grad, weight,
                                                  bias=self.__dict__["_bagel_sr_llm2vae_bias"])
            logs = {}
            if config.adaptive_weight:
                factor = monitoring.adaptive_factor(norms, config.adaptive_weight_max)
                self.__dict__["_bagel_sr_factor"] = factor
                weight = weight * factor
                norms.pixel = weight * norms.pixel_unweighted
                logs["pixel_adaptive_factor"] = factor
            if config.log_grad_norms_every > 0:
                logs.update(norms.as_log())
            self.__dict__["_bagel_sr_grad_logs"] = {k: v.detach() for k, v in logs.items()}
            return weight

    BagelSR.__name__ = BagelSR.__qualname__ = bagel_cls.__name__
    BagelSR.__module__ = bagel_cls.__module__
    return BagelSR


def warmup_factor(step: int, warmup_steps: int) -> float:
    """Linear ramp of the weight from 0 over ``warmup_steps`` optimizer steps (1 afterwards or when 0)."""
    if warmup_steps <= 0:
        return 1.0
    return min(1.0, step / warmup_steps)


def apply_pixel_loss_training(train_module: Any, batch_module: Any = None) -> PatchState:
    """Patch ``train_module`` (an imported BAGEL training script) and return the state; ``state.restore()`` undoes.

    ``batch_module`` is the checkout's ``data.dataset_base`` (imported when None).
    """
    check_training_module(train_module)
    if batch_module is None:
        import importlib

        batch_module = importlib.import_module("data.dataset_base")
    batch_cls = getattr(batch_module, "SimpleCustomBatch", None)
    require(batch_cls is not None and callable(getattr(batch_cls, "to_dict", None)),
            "`data.dataset_base.SimpleCustomBatch.to_dict` is missing")

    state = PatchState()
    base_args = train_module.TrainingArguments
    args_cls = pixel_loss_arguments_class(base_args, name=base_args.__name__)
    base_parser = train_module.HfArgumentParser
    base_load_ae = train_module.load_ae
    original_to_dict = batch_cls.to_dict

    class PixelLossArgumentParser(base_parser):
        def parse_args_into_dataclasses(self, *args, **kwargs):
            parsed = super().parse_args_into_dataclasses(*args, **kwargs)
            for item in parsed:
                if isinstance(item, args_cls):
                    state.training_args = item
                    state.config = PixelLossConfig.from_namespace(item)
            if state.config is not None:
                if state.config.enabled and float(state.training_args.mse_weight) <= 0:
                    raise ValueError(
                        "--pixel_loss_weight > 0 needs --mse_weight > 0: the pixel term rides on the flow loss's "
                        "reduction; set --pixel_loss_weight 0 or a positive --mse_weight."
                    )
                # issue 15: --pixel_loss_datasets names must exist (bagel_sr.patches.datasets)
                known = dataset_config_names(parsed)
                if state.config.enabled and known is not None:
                    check_names("--pixel_loss_datasets", state.config.dataset_names, known)
                state.banner = banner(state.config, float(state.training_args.timestep_shift))
                if _rank0():
                    print(state.banner, flush=True)
            return parsed

    def load_ae(*args, **kwargs):
        result = base_load_ae(*args, **kwargs)
        vae = result[0] if isinstance(result, tuple) else result
        state.vae = vae
        return result

    def to_dict(self):
        data = original_to_dict(self)
        if state.config is not None and state.config.enabled and "padded_images" in data:
            data["pixel_loss_inputs"] = PixelLossInputs(data["padded_images"], getattr(self, "batch_data_indexes", None))
        return data

    gradient_accumulation = lambda: int(getattr(state.training_args, "gradient_accumulation_steps", 1) or 1)
    _replace(train_module, "TrainingArguments", args_cls, state)
    _replace(train_module, "HfArgumentParser", PixelLossArgumentParser, state)
    _replace(train_module, "load_ae", load_ae, state)
    _replace(train_module, "Bagel", make_training_model_class(train_module.Bagel, state, gradient_accumulation), state)
    _replace(batch_cls, "to_dict", to_dict, state)
    return state
