"""Locate a user's BAGEL checkout and import its training script as a module.

BAGEL is not a pip package: users point us at a checkout (often a fork) with ``--bagel_root PATH`` or the
environment variable ``BAGEL_ROOT``. Nothing here runs the checkout's ``main()``.

BAGEL's modelling modules ``import flash_attn`` at import time: on a machine without it, call
``bagel_sr.patches.cpu.install_flash_attn_stand_in()`` (or ``apply_cpu_compat``) before importing them.
"""
from __future__ import annotations

import importlib.util
import os
import pathlib
import sys
from types import ModuleType

from bagel_sr.errors import UserError

ENV_VAR = "BAGEL_ROOT"
# Files whose presence identifies a BAGEL checkout (relative to its root).
MARKER_FILES = ("modeling/bagel/bagel.py", "data/dataset_base.py", "modeling/autoencoder.py")
# Training scripts tried in order when no name is given: forks often rename the upstream one to train/main.py.
TRAINING_SCRIPT_CANDIDATES = ("train/main.py", "train/pretrain_unified_navit.py")
TRAINING_MODULE_NAME = "bagel_train_main"

_HOW_TO_POINT = f"pass --bagel_root PATH or set {ENV_VAR}=PATH to the root of a BAGEL checkout"


class CheckoutError(UserError, ValueError):
    """The BAGEL checkout is missing, incomplete, or its training script cannot be found or imported."""


def find_checkout(path: str | os.PathLike | None = None) -> pathlib.Path:
    """Return the resolved root of a BAGEL checkout, from ``path`` or else ``$BAGEL_ROOT``.

    Raises CheckoutError naming what is missing and how to point at a checkout.
    """
    source = "the given path"
    if path is None or str(path) == "":
        path = os.environ.get(ENV_VAR) or None
        source = f"${ENV_VAR}"
    if path is None:
        raise CheckoutError(f"No BAGEL checkout given: {_HOW_TO_POINT}.")
    root = pathlib.Path(path).expanduser().resolve()
    if not root.is_dir():
        raise CheckoutError(f"BAGEL checkout {root} (from {source}) is not a folder: {_HOW_TO_POINT}.")
    missing = [rel for rel in MARKER_FILES if not (root / rel).is_file()]
    if missing:
        raise CheckoutError(
            f"{root} (from {source}) does not look like a BAGEL checkout: missing {', '.join(missing)}. "
            f"Clone https://github.com/ByteDance-Seed/Bagel (or your fork) and {_HOW_TO_POINT}."
        )
    return root


def add_to_sys_path(root: str | os.PathLike) -> str:
    """Put ``root`` first on ``sys.path`` (moved there if already present; idempotent). Returns the entry.

    First place matters: a checkout's top-level packages (``data``, ``modeling``, ``train``, ``eval``) have
    generic names that must not be shadowed by other folders on the path.
    """
    entry = str(pathlib.Path(root).resolve())
    if sys.path and sys.path[0] == entry:
        return entry
    while entry in sys.path:
        sys.path.remove(entry)
    sys.path.insert(0, entry)
    return entry


def find_training_script(root: str | os.PathLike, name: str | None = None) -> pathlib.Path:
    """Return the checkout's training script: ``name`` (relative to root, or absolute) if given, else the
    first of ``train/main.py``, ``train/pretrain_unified_navit.py`` that exists."""
    root = pathlib.Path(root)
    candidates = (name,) if name else TRAINING_SCRIPT_CANDIDATES
    for rel in candidates:
        script = root / rel
        if script.is_file():
            return script.resolve()
    looked = ", ".join(str(root / rel) for rel in candidates)
    hint = "check the name" if name else "pass the script's name (relative to the checkout)"
    raise CheckoutError(f"No BAGEL training script found; looked for: {looked}. {hint}.")


def import_training_module(
    root: str | os.PathLike, script: str | os.PathLike | None = None, module_name: str = TRAINING_MODULE_NAME
) -> ModuleType:
    """Import the checkout's training script as module ``module_name`` without running its ``main()``.

    ``script`` is a path (absolute or relative to ``root``) or None to autodetect. The checkout is put first on
    ``sys.path`` so the script's own imports (``data``, ``modeling``, ``train``) resolve to it. Importing the
    same file twice returns the module already in ``sys.modules``.
    """
    root = find_checkout(root)
    path = find_training_script(root, None if script is None else str(script))
    add_to_sys_path(root)
    loaded = sys.modules.get(module_name)
    if loaded is not None and getattr(loaded, "__file__", None) == str(path):
        return loaded
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except ModuleNotFoundError as err:
        sys.modules.pop(module_name, None)
        hint = _missing_module_hint(err, root)
        raise CheckoutError(f"Importing the BAGEL training script {path} failed: {hint}") from err
    except BaseException:
        sys.modules.pop(module_name, None)
        raise
    return module


#: Import names whose pip package is named differently (BAGEL's requirements.txt).
PIP_NAMES = {"cv2": "opencv-python-headless", "yaml": "pyyaml", "PIL": "pillow", "sklearn": "scikit-learn"}


def _missing_module_hint(err: ModuleNotFoundError, root: pathlib.Path) -> str:
    """Say which module was missing and what to do about it."""
    name = err.name or str(err)
    top = name.split(".")[0]
    if top == "flash_attn":
        return ("it imports flash_attn, which is not installed; on a machine without flash-attn call "
                "bagel_sr.patches.cpu.apply_cpu_compat() before importing the checkout.")
    if (root / top).exists():
        return f"module {name!r} is missing from the checkout {root}; is the checkout complete?"
    package = PIP_NAMES.get(top, top)
    return f"it needs module {name!r}, which is not installed: pip install {package}"
