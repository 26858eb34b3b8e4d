"""The wrapper's logic: find the checkout, patch its training script, run its own ``main()``.

Its flags (``--bagel_root``, ``--bagel_train_script``, ``--bagel_sr_datasets``, ``--bagel_sr_host_pixel_loss``) are
taken out of the command line before the checkout's parser sees the rest; ``bagel_sr.train.main_sr_pixel_loss`` is
the command that runs it (or the embedded demo without a checkout).
"""
import os
import sys
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Callable, List, Optional, Sequence, Tuple

from bagel_sr.config import CONSERVATIVE_DEFAULTS, FLAG_PREFIX, PixelLossConfig, flag_name, pixel_loss_arguments_class
from bagel_sr.errors import UserError
from bagel_sr.validation_config import ValidationConfig, val_flag, val_flag_help
from bagel_sr.lora_settings import LORA_FLAGS, LoraSettings, LoraSettingsError, settings_from_flags

from . import checkout, host, registry
from .checkout import CheckoutError
from .context import PatchContext
from .datasets import DatasetRegistrationError
from .host import HostPixelLossError
from .lora import MissingExtra, require_peft
from .training import IncompatibleCheckoutError
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

    @property
    def lora(self) -> LoraSettings:
        """The ``--bagel_sr_lora_*`` flags as validated settings (rank 0 = off)."""
        return settings_from_flags({name: getattr(self, name) for name in LORA_FLAGS})


def split_wrapper_args(argv: Sequence[str]) -> Tuple[WrapperArgs, List[str]]:
    """Take the wrapper's own flags (``--flag value`` or ``--flag=value``) out of ``argv``; the rest is the script's."""
    out, rest, i = WrapperArgs(), [], 0
    argv = list(argv)
    while i < len(argv):
        arg = argv[i]
        name, _, inline = arg[2:].partition("=") if arg.startswith("--") else ("", "", "")
        if name in WRAPPER_FLAGS:
            if inline:
                value = inline
            elif name in SWITCH_FLAGS and (i + 1 == len(argv) or argv[i + 1].startswith("--")):
                value = "True"
            elif i + 1 < len(argv):
                value, i = argv[i + 1], i + 1
            else:
                raise SystemExit(f"--{name} needs a value: {WRAPPER_FLAGS[name]}")
            setattr(out, name, value)
        else:
            if arg in ("-h", "--help"):
                out.help = True
            rest.append(arg)
        i += 1
    return out, rest


def wrapper_help() -> str:
    lines = ["bagel-sr wrapper flags (taken before the checkout's parser sees the rest):"]
    lines += [f"  --{k}  {v}" for k, v in WRAPPER_FLAGS.items()]
    lines.append("Defaults of the wrapper (unless given): "
                 + " ".join(f"--{flag_name(k)} {v}" for k, v in CONSERVATIVE_DEFAULTS.items()))
    return "\n".join(lines)


def prepare_checkout(root: str, script: Optional[str] = None, dataset_yamls: Optional[str] = None, *,
                     pixel_loss: bool = True, dry_run: bool = False, host_mode: str = host.DEFAULT_HOST_MODE,
                     validation: Optional[Tuple[ValidationConfig, list]] = None,
                     lora: Optional[LoraSettings] = None) -> Tuple[ModuleType, registry.Handle]:
    """Import the checkout's training script and apply every row of :data:`registry.PATCHES` that holds here.

    The ``checkout`` stage (CPU compatibility) goes first, since importing the script imports BAGEL's modelling
    code.  Returns ``(train_module, handle)``; ``handle.undo()`` undoes every patch, ``handle.run`` holds what they
    learn while ``main()`` runs.  ``pixel_loss=False`` leaves the ``training`` rows out (the stock script, for
    comparisons); ``dry_run=True`` adds the ``dryrun`` rows (``main()`` on CPU under gloo, ``bagel_sr.smoke``);
    ``host_mode``: ``--bagel_sr_host_pixel_loss`` (:mod:`.host`); ``validation``: ``(settings, val sets)`` of
    validation during training (:func:`validation_settings`; None: off); ``lora``: the ``--bagel_sr_lora_*``
    settings (the ``lora`` rows apply when its rank > 0).
    """
    root_path = checkout.find_checkout(root)
    checkout.add_to_sys_path(root_path)
    ctx = PatchContext(dataset_yamls=[p for p in (dataset_yamls or "").split(",") if p.strip()],
                       defaults=dict(CONSERVATIVE_DEFAULTS), dry_run=dry_run, host_mode=host.check_mode(host_mode),
                       lora=lora)
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


def pixel_loss_flags(argv: Sequence[str]) -> List[str]:
    """The ``--pixel_loss_*`` flags of ``argv`` with their values (``--flag value`` or ``--flag=value``)."""
    out, i = [], 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("--" + FLAG_PREFIX):
            out.append(arg)
            if "=" not in arg and i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                out.append(argv[i + 1])
                i += 1
        i += 1
    return out


def validate_pixel_loss_flags(argv: Sequence[str]) -> PixelLossConfig:
    """Parse and check our flags alone, before the checkout's ``main()`` starts process groups or asserts CUDA.

    Raises ``UsageError`` with one line naming the flag and what is allowed.
    """
    from transformers import HfArgumentParser

    parser = HfArgumentParser(pixel_loss_arguments_class())
    try:
        (parsed,) = parser.parse_args_into_dataclasses(args=pixel_loss_flags(argv), return_remaining_strings=False)
    except ValueError as err:
        raise UsageError(str(err)) from None
    except SystemExit:
        raise UsageError("a --pixel_loss_* flag has a value of the wrong type or no value; see --help") from None
    return PixelLossConfig.from_namespace(parsed)


def validation_settings(wargs: WrapperArgs, rest: Sequence[str]) -> Optional[Tuple[ValidationConfig, list]]:
    """The ``--bagel_sr_val_*`` settings and their val sets, checked (one line each) before training; None: off."""
    try:
        config = ValidationConfig.from_flags(vars(wargs))
    except ValueError as err:
        raise UsageError(str(err)) from None
    if not config.enabled:
        return None
    sets = [load_val_set(path) for path in config.yamls]
    if wargs.bagel_sr_val_images is None:  # the default asks for at most what the splits hold
        config.images = min(config.images, sum(len(s.images) for s in sets))
    train_yamls = [p.strip() for p in (wargs.bagel_sr_datasets or "").split(",") if p.strip()]
    check_val_sets(sets, config.images, train_yamls, _flag_value(rest, "dataset_config_file"))
    return config, sets


def _flag_value(argv: Sequence[str], name: str) -> Optional[str]:
    for i, arg in enumerate(argv):
        if arg == f"--{name}" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(f"--{name}="):
            return arg.split("=", 1)[1]
    return None


class UsageError(ValueError):
    """A flag the user gave is wrong; printed as one line, no traceback."""


def print_checkout_help(module) -> None:
    """The patched script's flags (``--pixel_loss_*`` included), without running its ``main()``."""
    parser = module.HfArgumentParser((module.ModelArguments, module.DataArguments, module.TrainingArguments))
    print(wrapper_help() + "\n")
    parser.print_help()


def check_wrapper_flags(wargs: WrapperArgs, rest: Sequence[str]) -> Optional[Tuple[ValidationConfig, list]]:
    """The host mode, the ``--pixel_loss_*`` and ``--bagel_sr_val_*`` flags, checked before anything is imported or
    launched (raises ``SystemExit`` with one line); returns the validation settings and sets (None: off)."""
    try:
        host.check_mode(wargs.bagel_sr_host_pixel_loss)
        lora = wargs.lora
        if lora.enabled:
            require_peft()
        if not wargs.help and wargs.bagel_sr_host_pixel_loss != "keep":  # under keep the flags are the host's
            validate_pixel_loss_flags(rest)
        if not checkout_root(wargs) and wargs.bagel_sr_val_datasets:
            raise UsageError("--bagel_sr_val_datasets validates inside a BAGEL checkout's loop: give --bagel_root PATH")
        return None if wargs.help else validation_settings(wargs, rest)
    except (UsageError, HostPixelLossError, UserError, DatasetRegistrationError, LoraSettingsError, MissingExtra) as err:
        raise SystemExit(f"bagel-sr: {err}") from None


def checkout_root(wargs: WrapperArgs) -> Optional[str]:
    """The checkout to run: ``--bagel_root``, else ``BAGEL_ROOT``, else None."""
    return wargs.bagel_root or os.environ.get("BAGEL_ROOT") or None


def run(wargs: WrapperArgs, rest: List[str], *, before_main: Optional[Callable[[Any], Any]] = None,
        pixel_loss: bool = True, dry_run: bool = False):
    """The wrapper on already split flags: patch the checkout's script and run its ``main()`` with ``rest``.
    ``pixel_loss=False`` runs the stock script (data-set registration only); ``dry_run=True`` adds the ``dryrun``
    rows (``bagel_sr.smoke``); ``before_main(train_module)`` runs last before ``main()``."""
    root = checkout_root(wargs)
    validation = check_wrapper_flags(wargs, rest)
    if not root:
        raise SystemExit("bagel-sr: no BAGEL checkout: pass --bagel_root PATH or set BAGEL_ROOT "
                         "(python train/main_sr_pixel_loss.py runs the embedded demo without one)")
    try:
        module, _handle = prepare_checkout(root, wargs.bagel_train_script, wargs.bagel_sr_datasets,
                                           pixel_loss=pixel_loss, dry_run=dry_run,
                                           host_mode=wargs.bagel_sr_host_pixel_loss, validation=validation,
                                           lora=wargs.lora)
    except (CheckoutError, IncompatibleCheckoutError, DatasetRegistrationError, HostPixelLossError, UsageError) as err:
        raise SystemExit(f"bagel-sr: {err}") from None
    if wargs.help:
        print_checkout_help(module)
        return None
    sys.argv = [str(module.__file__)] + list(rest)
    if before_main is not None:
        before_main(module)
    return module.main()


def main(argv: Optional[Sequence[str]] = None, **options: Any):
    """The wrapper on a command line (``sys.argv[1:]`` when None); ``options`` as for :func:`run`."""
    wargs, rest = split_wrapper_args(sys.argv[1:] if argv is None else argv)
    return run(wargs, rest, **options)
