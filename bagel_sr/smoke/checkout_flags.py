"""The flags a checkout's training script accepts, read from its argument dataclasses before any launch.

A checkout's ``main()`` parses ``HfArgumentParser((ModelArguments, DataArguments, TrainingArguments))`` and stops on
any flag none of them declares. Forks and older bases lack fields upstream HEAD has (e.g. ``--peak_device_tflops``,
``--wandb_project``, ``--gradient_accumulation_steps``), so flags that *we* add to a command (the dry run's settings)
are first matched against the script's fields: a setting the checkout lacks is left out and said so; a setting the
run cannot do without stops with one line naming it. The user's own flags are passed on as given.
"""
from __future__ import annotations

import dataclasses
from types import ModuleType
from typing import Callable, Collection, Dict, FrozenSet, List, Mapping, Optional, Tuple

#: The argument classes a BAGEL training script hands to its ``HfArgumentParser`` (BAGEL_CONTRACT.md, import surface).
ARGUMENT_CLASSES = ("ModelArguments", "DataArguments", "TrainingArguments")


class MissingCheckoutFlags(RuntimeError):
    """The checkout's script declares none of some flags a run needs; the message names them."""


def accepted_flags(module: ModuleType) -> FrozenSet[str]:
    """Field names of the script's ``ModelArguments``, ``DataArguments`` and ``TrainingArguments`` (as imported,
    patched classes included): the ``--flags`` its parser accepts. A script lacking one of the classes fails here,
    naming it."""
    missing = [name for name in ARGUMENT_CLASSES if not dataclasses.is_dataclass(getattr(module, name, None))]
    if missing:
        raise MissingCheckoutFlags(
            f"{getattr(module, '__file__', module.__name__)} has no dataclass {', '.join(missing)}: the dry run reads "
            "the flags the script accepts from them (BAGEL_CONTRACT.md, training loop)")
    return frozenset(f.name for name in ARGUMENT_CLASSES for f in dataclasses.fields(getattr(module, name)))


def keep_accepted(flags: Mapping[str, str], accepted: Collection[str], needed: Collection[str] = (),
                  exempt: Collection[str] = (), script: str = "the training script",
                  note: Optional[Callable[[str], None]] = None) -> Dict[str, str]:
    """``flags`` (name -> value, our own additions to a command) without those the checkout does not accept.

    ``needed``: names the run cannot do without (their absence raises :class:`MissingCheckoutFlags`, one line);
    ``exempt``: names taken by the wrapper before the checkout's parser sees the rest. ``note`` receives one line
    naming the settings left out, if any.
    """
    kept, dropped = split_accepted(flags, accepted, exempt)
    lacking = sorted(set(needed) - set(accepted))
    if lacking:
        raise MissingCheckoutFlags(
            f"{script} declares no {', '.join('--' + n for n in lacking)} in its ModelArguments / DataArguments / "
            "TrainingArguments, which the dry run needs; add the field(s) to your fork or run the upstream script")
    if dropped and note is not None:
        note(f"the checkout's script has no {', '.join('--' + n for n in dropped)}: those dry-run settings are "
             "left out (its own defaults apply)")
    return kept


def split_accepted(flags: Mapping[str, str], accepted: Collection[str],
                   exempt: Collection[str] = ()) -> Tuple[Dict[str, str], List[str]]:
    """(the flags the checkout accepts or the wrapper takes, the names left out), in ``flags``' order."""
    kept = {k: v for k, v in flags.items() if k in accepted or k in exempt}
    return kept, [k for k in flags if k not in kept]
