"""Merge a LoRA adapter into a released BAGEL model folder: a new folder whose ``ema.safetensors`` loads into stock
BAGEL with ``strict=True`` (``m.weight = W + alpha / r * B @ A`` on every adapted module; the rest unchanged).

    python -m bagel_sr.lora merge --model_path RELEASED --adapter CKPT_OR_ADAPTER --out DIR [--live]

``--adapter``: a LoRA run's checkpoint folder (its ``adapter_ema/``; ``--live``: its ``adapter/``) or an adapter
folder (``adapter_model.safetensors`` + ``adapter_config.json``).  The released folder's other files (configs,
tokenizer, ``ae.safetensors``) are copied, so ``DIR`` is a model folder like the released one.
"""
from __future__ import annotations

import os
import pathlib
import shutil

from safetensors import safe_open
from safetensors.torch import load_file, save_file

from bagel_sr.errors import BadInput, MissingInput
from bagel_sr.patches import lora_files

WEIGHTS = "ema.safetensors"
NOT_COPIED = (WEIGHTS, "model.safetensors")


def merge(model_path: os.PathLike, adapter: os.PathLike, out: os.PathLike, live: bool = False) -> pathlib.Path:
    """Write ``out`` (a model folder) = ``model_path`` with the adapter merged into its ``ema.safetensors``."""
    model_path, out = pathlib.Path(model_path), pathlib.Path(out)
    base_file = model_path / WEIGHTS
    if not base_file.is_file():
        raise MissingInput(f"--model_path {model_path}: no {WEIGHTS} there (pass the released model folder)")
    if out.resolve() == model_path.resolve():
        raise BadInput(f"--out {out}: is the released folder itself; name a new folder")
    if (out / WEIGHTS).exists():
        raise BadInput(f"--out {out}: already holds {WEIGHTS}; name a new folder or remove it")
    adapters, config = lora_files.load_adapter(adapter, ema=not live)
    with safe_open(str(base_file), framework="pt") as handle:  # shapes first: a mismatch fails before the big read
        shapes = {k: tuple(handle.get_slice(k).get_shape()) for k in handle.keys()}
    lora_files.check_matches(shapes, adapters)
    merged = lora_files.merge_state(load_file(str(base_file)), adapters, config)
    out.mkdir(parents=True, exist_ok=True)
    for item in model_path.iterdir():
        if item.is_file() and item.name not in NOT_COPIED:
            shutil.copy2(item, out / item.name)
    save_file(merged, str(out / WEIGHTS), metadata={"format": "pt"})
    return out
