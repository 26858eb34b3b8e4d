"""Flags of ablate's commands: placeholders, ``--flag value`` words, names made from flags, and type checks of
the flag mappings a grid YAML gives (``grid``, ``common_flags``, ``runs``, ``infer_grid``, ``infer_flags``)."""
from __future__ import annotations

import re
from typing import Any

from bagel_sr.errors import BadInput

_FLAG = re.compile(r"^(--)?[A-Za-z_][\w.-]*$")
_SCALARS = (str, int, float, bool)


def fill(text: str, fields: dict[str, str]) -> str:
    """Replace the placeholders ``{run_dir}``, ``{name}``, ``{outputs}``, ... (other braces are left as they are)."""
    for key, value in fields.items():
        text = text.replace("{" + key + "}", value)
    return text


def flag_name(key: str) -> str:
    return key[2:] if key.startswith("--") else key


def format_value(value: Any) -> list[str]:
    """Command-line words of one flag value (HfArgumentParser style)."""
    if isinstance(value, bool):
        return ["True" if value else "False"]
    if isinstance(value, (list, tuple)):
        return [w for v in value for w in format_value(v)]
    return [str(value)]


def flag_words(flags: dict[str, Any], fields: dict[str, str]) -> list[str]:
    """``--flag value`` words; templates in string values are filled from ``fields``."""
    words = []
    for key, value in flags.items():
        if value is None:
            continue
        words.append(f"--{flag_name(key)}")
        words += [fill(w, fields) for w in format_value(value)]
    return words


def switch_words(flags: dict[str, Any], fields: dict[str, str]) -> list[str]:
    """Like :func:`flag_words` for an argparse target (``bagel_sr.eval.infer``): ``true`` is the bare switch
    (``--data_consistency``), ``false`` and null leave the flag out."""
    words = []
    for key, value in flags.items():
        if value is None or value is False:
            continue
        words.append(f"--{flag_name(key)}")
        if value is not True:
            words += [fill(w, fields) for w in format_value(value)]
    return words


def run_name(flags: dict[str, Any]) -> str:
    """A folder-safe name from the flags, e.g. ``weight0.05_max_t0.3`` (``pixel_loss_`` prefixes dropped)."""
    parts = []
    for key, value in flags.items():
        short = flag_name(key).removeprefix("pixel_loss_")
        parts.append(f"{short}{'-'.join(format_value(value)) if value is not None else 'None'}")
    return re.sub(r"[^A-Za-z0-9._=-]+", "_", "_".join(parts)) or "run"


def variant_name(flags: dict[str, Any]) -> str:
    """A folder-safe name of an inference variant, e.g. ``start_t=0.3,num_samples=4`` (``default``: no flags)."""
    parts = [f"{flag_name(k)}={'-'.join(format_value(v)) if v is not None else 'None'}" for k, v in flags.items()]
    return re.sub(r"[^A-Za-z0-9._=,-]+", "_", ",".join(parts)) or "default"


def _describe(value: Any) -> str:
    return f"{value!r} ({type(value).__name__})"


def check_value(where: str, key: str, value: Any) -> None:
    """A flag value is a number, string, boolean, null or a list of those."""
    items = value if isinstance(value, list) else [value]
    for item in items:
        if item is not None and not isinstance(item, _SCALARS):
            raise BadInput(f"{where}: value {_describe(item)} of {key!r} is not a flag value; use a number, string, "
                           "boolean, null or a list of them")


def check_flag_map(where: str, flags: Any, skip: tuple[str, ...] = ()) -> dict[str, Any]:
    """``flags`` is a mapping of flag names (strings such as ``start_t`` or ``--start_t``) to flag values."""
    if not isinstance(flags, dict):
        raise BadInput(f"{where} must be a mapping of flag -> value, got {_describe(flags)}")
    for key, value in flags.items():
        if not isinstance(key, str) or not _FLAG.match(key):
            raise BadInput(f"{where}: {_describe(key)} is not a flag name (expected e.g. start_t or --start_t)")
        if key not in skip:
            check_value(where, key, value)
    return flags


def check_sweep(where: str, grid: Any) -> dict[str, list]:
    """``grid`` maps flag names to non-empty lists of flag values (the product of the lists is swept)."""
    check_flag_map(where, grid, skip=tuple(grid) if isinstance(grid, dict) else ())
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise BadInput(f"{where}: values of {key!r} must be a non-empty list, got {values!r}")
        for value in values:
            check_value(where, key, value)
    return grid
