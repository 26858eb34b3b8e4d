"""The wrapper's logic: find the checkout, patch its training script, run its own ``main()``.

Its flags (``--bagel_root``, ``--bagel_train_script``, ``--bagel_sr_datasets``, ``--bagel_sr_host_pixel_loss``) and
the ``--pixel_loss_*`` flags are taken out of the command line and parsed once, before the checkout's parser sees the
rest; the parsed pixel-loss settings are the defaults of the patched ``TrainingArguments``.
``bagel_sr.train.main_sr_pixel_loss`` is the command that runs it (or the embedded demo without a checkout).
"""
import dataclasses
import os
import sys
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any, Callable, List, Mapping, Optional, Sequence, Tuple

from bagel_sr import argv as argv_words
from bagel_sr.config import (CONSERVATIVE_DEFAULTS, FLAG_PREFIX, PixelLossConfig, flag_name, parse_flags,
                             pixel_loss_arguments_class)
from bagel_sr.errors import UsageError
from bagel_sr.lora_settings import LORA_FLAGS, LoraSettings, settings_from_flags
from bagel_sr.validation_config import ValidationConfig, val_flag, val_flag_help

from . import checkout, host, registry
from .context import PatchContext
from .lora import require_peft
from .validation_set import check_val_sets, load_val_set

WRAPPER_FLAGS = {
    "bagel_root": "Path of the BAGEL checkout (or set BAGEL_ROOT). Without one, the embedded default runs.",
    "bagel_train_script": "Training script inside the checkout (default: train/main.py, else train/pretrain_unified_navit.py).",
    "bagel_sr_datasets": "Comma-separated dataset YAMLs written by `python -m bagel_sr.data build`, registered into "
    "the checkout's DATASET_INFO at run time.",
    "bagel_sr_host_pixel_loss": "What to do when the checkout carries its own pixel loss: "
    + "; ".join(f"{k}: {v}" for k, v in host.HOST_MODES.items()) + f" (default {host.DEFAULT_HOST_MODE}).",
    **val_flag_help(),
    **LORA_FLAGS,
}
#: The registry row of validation during training (registered by ``bagel_sr.validation`` on import).
VALIDATION_ROW = "patch_val_model"
#: Wrapper flags that may stand alone (``--bagel_sr_val_ema`` means ``--bagel_sr_val_ema True``).
SWITCH_FLAGS = (val_flag("ema"),)

HOW_TO_POINT = (
    "To train a real BAGEL, point at your checkout: --bagel_root PATH (or BAGEL_ROOT=PATH) followed by the "
    "checkout's own training flags, e.g.\n"
    "  torchrun --nproc_per_node 8 train/main_sr_pixel_loss.py --bagel_root ~/Bagel --model_path hf/BAGEL-7B-MoT "
    "--finetune_from_hf True --resume_model_only True --finetune_from_ema True --dataset_config_file my_sr.yaml ...\n"
)


@dataclass
class WrapperArgs:
    """The wrapper's command line, parsed once (:func:`parse_wrapper_args`): its own flags, the ``--pixel_loss_*``
    words and the rest, which is the checkout's."""

    bagel_root: Optional[str] = None
    bagel_train_script: Optional[str] = None
    bagel_sr_datasets: Optional[str] = None
    bagel_sr_host_pixel_loss: str = host.DEFAULT_HOST_MODE
    bagel_sr_val_datasets: Optional[str] = None
    bagel_sr_val_every: Optional[str] = None
    bagel_sr_val_images: Optional[str] = None
    bagel_sr_val_start_t: Optional[str] = None
    bagel_sr_val_ema: Optional[str] = None
    bagel_sr_val_seed: Optional[str] = None
    bagel_sr_lora_rank: Optional[str] = None
    bagel_sr_lora_alpha: Optional[str] = None
    bagel_sr_lora_dropout: Optional[str] = None
    bagel_sr_lora_targets: Optional[str] = None
    help: bool = False
    pixel_flags: List[str] = field(default_factory=list)
    rest: List[str] = field(default_factory=list)

    @property
    def lora(self) -> LoraSettings:
        """The ``--bagel_sr_lora_*`` flags as validated settings (rank 0 = off)."""
        return settings_from_flags({name: getattr(self, name) for name in LORA_FLAGS})


def parse_wrapper_args(argv: Sequence[str]) -> WrapperArgs:
    """Take the wrapper's own flags and the ``--pixel_loss_*`` flags out of ``argv`` (the rest is the checkout's);
    the host mode is checked here (a :class:`~bagel_sr.errors.UserError` names what is allowed)."""
    values, pixel_flags, rest = argv_words.split(argv, WRAPPER_FLAGS, prefixes=(FLAG_PREFIX,), switches=SWITCH_FLAGS)
    wargs = WrapperArgs(**values, help=argv_words.wants_help(rest), pixel_flags=pixel_flags, rest=rest)
    host.check_mode(wargs.bagel_sr_host_pixel_loss)
    if wargs.lora.enabled:
        require_peft()
    return wargs


def validation_settings(wargs: WrapperArgs) -> Optional[Tuple[ValidationConfig, list]]:
    """The ``--bagel_sr_val_*`` settings and their val sets, checked (one line each) before training; None: off."""
    try:
        config = ValidationConfig.from_flags(vars(wargs))
    except ValueError as err:
        raise UsageError(str(err)) from None
    if not config.enabled:
        return None
    if not checkout_root(wargs):
        raise UsageError("--bagel_sr_val_datasets validates inside a BAGEL checkout's loop: give --bagel_root PATH")
    sets = [load_val_set(path) for path in config.yamls]
    if wargs.bagel_sr_val_images is None:  # the default asks for at most what the splits hold
        config.images = min(config.images, sum(len(s.images) for s in sets))
    train_yamls = [p.strip() for p in (wargs.bagel_sr_datasets or "").split(",") if p.strip()]
    check_val_sets(sets, config.images, train_yamls, argv_words.value(wargs.rest, "dataset_config_file"))
    return config, sets


def pixel_settings(wargs: WrapperArgs, defaults: Mapping[str, Any] = CONSERVATIVE_DEFAULTS) -> Optional[PixelLossConfig]:
    """The ``--pixel_loss_*`` flags parsed over ``defaults`` (once, before the checkout's ``main()`` starts process
    groups or asserts CUDA); None under ``--bagel_sr_host_pixel_loss keep`` (the flags are the host's)."""
    if wargs.bagel_sr_host_pixel_loss == "keep":
        return None
    (parsed,) = parse_flags(pixel_loss_arguments_class(defaults=defaults), wargs.pixel_flags)
    return PixelLossConfig.from_namespace(parsed)


def checkout_argv(wargs: WrapperArgs) -> List[str]:
    """What the checkout's parser sees: the rest; the ``--pixel_loss_*`` flags too under ``keep`` (the host's own).
    Otherwise their parsed values are the defaults of the patched ``TrainingArguments``."""
    return list(wargs.rest) + (list(wargs.pixel_flags) if wargs.bagel_sr_host_pixel_loss == "keep" else [])


def wrapper_help() -> str:
    lines = ["bagel-sr wrapper flags (taken before the checkout's parser sees the rest):"]
    lines += [f"  --{k}  {v}" for k, v in WRAPPER_FLAGS.items()]
    lines.append("Defaults of the wrapper (unless given): "
                 + " ".join(f"--{flag_name(k)} {v}" for k, v in CONSERVATIVE_DEFAULTS.items()))
    return "\n".join(lines)


def prepare_checkout(root: str, script: Optional[str] = None, dataset_yamls: Optional[str] = None, *,
                     pixel_loss: bool = True, dry_run: bool = False, host_mode: str = host.DEFAULT_HOST_MODE,
                     settings: Optional[PixelLossConfig] = None,
                     validation: Optional[Tuple[ValidationConfig, list]] = None,
                     lora: Optional[LoraSettings] = None) -> Tuple[ModuleType, registry.Handle]:
    """Import the checkout's training script and apply every row of :data:`registry.PATCHES` that holds here.

    The ``checkout`` stage (CPU compatibility) goes first, since importing the script imports BAGEL's modelling
    code.  Returns ``(train_module, handle)``; ``handle.undo()`` undoes every patch, ``handle.run`` holds what they
    learn while ``main()`` runs.  ``pixel_loss=False`` leaves the ``training`` rows out (the stock script, for
    comparisons); ``dry_run=True`` adds the ``dryrun`` rows (``main()`` on CPU under gloo, ``bagel_sr.smoke``);
    ``host_mode``: ``--bagel_sr_host_pixel_loss`` (:mod:`.host`); ``settings``: the parsed ``--pixel_loss_*``
    flags, the defaults of the patched ``TrainingArguments`` (None: the wrapper's defaults); ``validation``:
    ``(settings, val sets)`` of validation during training (:func:`validation_settings`; None: off); ``lora``: the
    ``--bagel_sr_lora_*`` settings (the ``lora`` rows apply when its rank > 0).
    """
    root_path = checkout.find_checkout(root)
    checkout.add_to_sys_path(root_path)
    defaults = dict(CONSERVATIVE_DEFAULTS) if settings is None else dataclasses.asdict(settings)
    ctx = PatchContext(dataset_yamls=[p for p in (dataset_yamls or "").split(",") if p.strip()],
                       defaults=defaults, dry_run=dry_run, host_mode=host.check_mode(host_mode), lora=lora)
    if validation is not None:
        if not any(p.name == VALIDATION_ROW for p in registry.PATCHES):
            raise UsageError("--bagel_sr_val_datasets: validation's rows are not registered in this process; start "
                             "training with train/main_sr_pixel_loss.py (or import bagel_sr.validation first)")
        ctx.validation, ctx.val_sets = validation
    groups = [g for g in registry.GROUPS if pixel_loss or g != "training"]
    handle = registry.apply(ctx, stage="checkout", groups=groups)
    try:
        ctx.train_module = checkout.import_training_module(root_path, script)
        registry.apply(ctx, stage="script", groups=groups, handle=handle)
    except BaseException:
        handle.undo()
        raise
    return ctx.train_module, handle


def print_checkout_help(module) -> None:
    """The patched script's flags (``--pixel_loss_*`` included), without running its ``main()``."""
    parser = module.HfArgumentParser((module.ModelArguments, module.DataArguments, module.TrainingArguments))
    print(wrapper_help() + "\n")
    parser.print_help()


def checkout_root(wargs: WrapperArgs) -> Optional[str]:
    """The checkout to run: ``--bagel_root``, else ``BAGEL_ROOT``, else None."""
    return wargs.bagel_root or os.environ.get("BAGEL_ROOT") or None


def run(wargs: WrapperArgs, *, before_main: Optional[Callable[[Any], Any]] = None, pixel_loss: bool = True,
        dry_run: bool = False):
    """The wrapper on its parsed command line: patch the checkout's script and run its ``main()``.
    ``pixel_loss=False`` runs the stock script (data-set registration only); ``dry_run=True`` adds the ``dryrun``
    rows (``bagel_sr.smoke``); ``before_main(train_module)`` runs last before ``main()``."""
    root = checkout_root(wargs)
    settings = None if wargs.help else pixel_settings(wargs)
    validation = None if wargs.help else validation_settings(wargs)
    if not root:
        raise UsageError("no BAGEL checkout: pass --bagel_root PATH or set BAGEL_ROOT "
                         "(python train/main_sr_pixel_loss.py runs the embedded demo without one)")
    module, _handle = prepare_checkout(root, wargs.bagel_train_script, wargs.bagel_sr_datasets,
                                       pixel_loss=pixel_loss, dry_run=dry_run, host_mode=wargs.bagel_sr_host_pixel_loss,
                                       settings=settings, validation=validation, lora=wargs.lora)
    if wargs.help:
        print_checkout_help(module)
        return None
    sys.argv = [str(module.__file__)] + checkout_argv(wargs)
    if before_main is not None:
        before_main(module)
    return module.main()


def main(argv: Optional[Sequence[str]] = None, **options: Any):
    """The wrapper on a command line (``sys.argv[1:]`` when None); ``options`` as for :func:`run`."""
    return run(parse_wrapper_args(sys.argv[1:] if argv is None else argv), **options)
