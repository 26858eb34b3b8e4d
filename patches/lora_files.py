"""LoRA adapters on disk, in peft's format, and merged into a base state dict; no peft needed here.

Names.  In the training model (peft layers injected) a targeted ``nn.Linear`` named ``m`` holds
``m.base_layer.weight`` (the frozen base), ``m.lora_A.default.weight`` (``A``: rank x in) and
``m.lora_B.default.weight`` (``B``: out x rank).  peft's ``adapter_model.safetensors`` names them
``base_model.model.m.lora_A.weight`` / ``...lora_B.weight``; ``adapter_config.json`` holds ``r``,
``lora_alpha``, ``target_modules``...  Merging gives ``m.weight = W + (lora_alpha / r) * B @ A`` (fp32, cast
back to ``W``'s dtype), which is what peft's layer computes in its forward.

A checkpoint of a LoRA run keeps the checkout's files loadable into stock BAGEL: ``model.safetensors`` and
``ema.safetensors`` hold the base weights under the stock names, and the adapters live beside them in
``adapter/`` (live) and ``adapter_ema/`` (EMA) (:func:`split_checkpoint_file`).
"""
from __future__ import annotations

import json
import os
import pathlib
from typing import Dict, Mapping, Optional, Tuple

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from bagel_sr.errors import BadInput, MissingInput

PEFT_PREFIX = "base_model.model."
ADAPTER_NAME = "default"
WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"
#: Checkpoint file -> the adapter folder written beside it.
ADAPTER_DIRS = {"model.safetensors": "adapter", "ema.safetensors": "adapter_ema"}
#: A DeepSpeed engine's module states in its checkpoint folder; its adapters go to ``adapter/``.
DEEPSPEED_STATES = "mp_rank_00_model_states.pt"
_PARTS = (".lora_A.", ".lora_B.")

StateDict = Dict[str, torch.Tensor]


def is_adapter_key(key: str) -> bool:
    return any(part in key for part in _PARTS)


def to_peft_key(key: str, adapter: str = ADAPTER_NAME) -> str:
    """``m.lora_A.default.weight`` -> ``base_model.model.m.lora_A.weight``."""
    for part in _PARTS:
        key = key.replace(f"{part}{adapter}.", part)
    return PEFT_PREFIX + key


def from_peft_key(key: str, adapter: str = ADAPTER_NAME) -> str:
    """``base_model.model.m.lora_A.weight`` -> ``m.lora_A.default.weight`` (the injected model's name)."""
    key = key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key
    for part in _PARTS:
        key = key.replace(part, f"{part}{adapter}.")
    return key


def stock_key(key: str) -> str:
    """``m.base_layer.weight`` -> ``m.weight`` (the name in stock BAGEL)."""
    return key.replace(".base_layer.", ".")


def split_state(state: Mapping[str, torch.Tensor]) -> Tuple[StateDict, StateDict]:
    """An injected model's state dict -> ``(base under stock names, adapters under peft's names)``."""
    base, adapters = {}, {}
    for key, value in state.items():
        if is_adapter_key(key):
            adapters[to_peft_key(key)] = value
        else:
            base[stock_key(key)] = value
    return base, adapters


def save_adapter(folder: os.PathLike, adapters: Mapping[str, torch.Tensor], config: Mapping) -> pathlib.Path:
    """Write ``adapter_model.safetensors`` + ``adapter_config.json`` (peft's layout) into ``folder``."""
    folder = pathlib.Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in adapters.items()}, str(folder / WEIGHTS_NAME),
              metadata={"format": "pt"})
    (folder / CONFIG_NAME).write_text(json.dumps(dict(config), indent=2, sort_keys=True, default=list) + "\n")
    return folder


def adapter_folder(path: os.PathLike, ema: bool = True) -> pathlib.Path:
    """An adapter folder itself, or a checkpoint folder's ``adapter_ema/`` (``ema``) or ``adapter/``."""
    path = pathlib.Path(path)
    if (path / WEIGHTS_NAME).is_file():
        return path
    sub = path / ADAPTER_DIRS["ema.safetensors" if ema else "model.safetensors"]
    if (sub / WEIGHTS_NAME).is_file():
        return sub
    raise MissingInput(f"--adapter {path}: no {WEIGHTS_NAME} there nor in {sub.name}/; pass a LoRA run's "
                       f"checkpoint folder or an adapter folder")


def load_adapter(path: os.PathLike, ema: bool = True) -> Tuple[StateDict, dict]:
    """``(adapter tensors under peft's names, adapter_config.json)`` of :func:`adapter_folder` ``(path, ema)``."""
    folder = adapter_folder(path, ema)
    if not (folder / CONFIG_NAME).is_file():
        raise MissingInput(f"{folder}: {CONFIG_NAME} is missing (an adapter folder holds both peft files)")
    config = json.loads((folder / CONFIG_NAME).read_text())
    return load_file(str(folder / WEIGHTS_NAME)), config


def scale_of(config: Mapping) -> float:
    """peft's scaling: ``lora_alpha / r`` (``/ sqrt(r)`` with ``use_rslora``)."""
    r = float(config["r"])
    return float(config["lora_alpha"]) / (r ** 0.5 if config.get("use_rslora") else r)


def adapter_pairs(adapters: Mapping[str, torch.Tensor]) -> Dict[str, Tuple[torch.Tensor, torch.Tensor]]:
    """Module name -> ``(A, B)``."""
    out: Dict[str, list] = {}
    for key, value in adapters.items():
        name = key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key
        for index, part in enumerate(_PARTS):
            if part in name:
                out.setdefault(name.split(part)[0], [None, None])[index] = value
    broken = sorted(m for m, ab in out.items() if ab[0] is None or ab[1] is None)
    if broken:
        raise BadInput(f"the adapter lacks lora_A or lora_B for {broken[0]} (and {len(broken) - 1} more): not a "
                       "complete LoRA adapter")
    return {m: (ab[0], ab[1]) for m, ab in out.items()}


def check_matches(base_shapes: Mapping[str, Tuple[int, ...]], adapters: Mapping[str, torch.Tensor]) -> None:
    """Raise ``BadInput`` (adapter/base mismatch) unless every adapted module exists in the base with the
    shape ``(B.rows, A.cols)``."""
    for module, (a, b) in adapter_pairs(adapters).items():
        shape = base_shapes.get(f"{module}.weight")
        if shape is None:
            raise BadInput(f"adapter/base mismatch: the adapter adapts {module}, which the base model has not "
                           "(an adapter of another model?)")
        if tuple(shape) != (b.shape[0], a.shape[1]) or a.shape[0] != b.shape[1]:
            raise BadInput(f"adapter/base mismatch at {module}: base weight {tuple(shape)}, adapter A "
                           f"{tuple(a.shape)} and B {tuple(b.shape)} (an adapter of another model size?)")


def merge_state(base: Mapping[str, torch.Tensor], adapters: Mapping[str, torch.Tensor], config: Mapping) -> StateDict:
    """``base`` with every adapted ``m.weight`` replaced by ``W + scale * B @ A`` (fp32, back to W's dtype)."""
    check_matches({k: tuple(v.shape) for k, v in base.items()}, adapters)
    scale = scale_of(config)
    merged = dict(base)
    for module, (a, b) in adapter_pairs(adapters).items():
        w = base[f"{module}.weight"]
        merged[f"{module}.weight"] = (w.float() + scale * (b.float() @ a.float())).to(w.dtype)
    return merged


@torch.no_grad()
def merge_into_model(model: torch.nn.Module, adapters: Mapping[str, torch.Tensor], config: Mapping) -> int:
    """Add ``scale * B @ A`` to each adapted ``weight`` of a built (stock) model in place, on the weight's device
    and in its dtype (computed in fp32); returns the number of modules merged.  A mismatch is ``BadInput``."""
    params = dict(model.named_parameters())
    check_matches({k: tuple(v.shape) for k, v in params.items()}, adapters)
    scale = scale_of(config)
    pairs = adapter_pairs(adapters)
    for module, (a, b) in pairs.items():
        w = params[f"{module}.weight"]
        w.add_((scale * (b.float() @ a.float())).to(device=w.device, dtype=w.dtype))
    return len(pairs)


def split_checkpoint_file(path: os.PathLike, config: Mapping) -> Optional[pathlib.Path]:
    """Rewrite one checkpoint file of a LoRA run as the base under stock names and write its adapters beside it
    (``ADAPTER_DIRS``); returns the adapter folder, None when the file holds no adapter (or is absent)."""
    path = pathlib.Path(path)
    if not path.is_file():
        return None
    with safe_open(str(path), framework="pt") as handle:
        if not any(is_adapter_key(k) for k in handle.keys()):
            return None
    base, adapters = split_state(load_file(str(path)))
    folder = save_adapter(path.parent / ADAPTER_DIRS.get(path.name, path.stem + "_adapter"), adapters, config)
    tmp = path.with_name(path.name + ".tmp")
    save_file(base, str(tmp))
    os.replace(tmp, path)
    return folder


def split_module_states(path: os.PathLike, config: Mapping) -> Optional[pathlib.Path]:
    """The same for a DeepSpeed checkpoint's module states (``states["module"]``); adapters to ``adapter/``."""
    path = pathlib.Path(path)
    if not path.is_file():
        return None
    states = torch.load(path, map_location="cpu", weights_only=False)  # DeepSpeed's own file, written just now
    if not any(is_adapter_key(k) for k in states["module"]):
        return None
    states["module"], adapters = split_state(states["module"])
    folder = save_adapter(path.parent / "adapter", adapters, config)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(states, tmp)
    os.replace(tmp, path)
    return folder
