"""The dry run's checks of a LoRA run (``--bagel_sr_lora_rank R``), on the files the checkout's loop wrote.

The resumed launch records, on rank 0, the weights it starts from once LoRA joined the model
(``lora_initial.safetensors`` beside the checkpoint folder: the base under stock names and the adapters under
peft's; every rank loaded the same checkpoint, unlike launch 1, whose tiny model starts from each rank's own
random base).  After the last launch:

1. base bit-identical: the last checkpoint's ``model.safetensors`` and ``ema.safetensors`` equal the recorded base
   exactly (BAGEL's sinusoidal position tables aside: ``try_load_ckpt`` drops them and the model rebuilds them);
2. resume restored the adapters of the checkpoint it resumed from, and the live and EMA adapters then moved;
3. the optimizer held state for the adapters only (its shards' ``exp_avg`` values count the adapter parameters);
4. merged: the recorded base with the EMA adapter merged in (``python -m bagel_sr.lora merge``'s arithmetic)
   loads into the checkout's stock ``Bagel`` with ``strict=True``.

A DeepSpeed port (no EMA, no resume) is recorded by rank 0 right after ``deepspeed.initialize`` (the engine
broadcasts rank 0's model) and checked the same way on its module states, its ``adapter/`` and ZeRO's fp32
partitions.
"""
from __future__ import annotations

import json
import os
import pathlib
from typing import Any, Callable, Optional, Sequence

import torch
from safetensors.torch import load_file, save_file

from bagel_sr.patches import lora_files

from bagel_sr.argv import value as flag_value

INITIAL = "lora_initial.safetensors"
RESULT = "lora_check.json"
#: Rebuilt by the model, dropped by ``try_load_ckpt``: not part of the trained base.
POSITION_TABLES = ("latent_pos_embed.pos_embed", "vit_pos_embed.pos_embed")


def lora_rank(flags: Sequence[str]) -> int:
    """The ``--bagel_sr_lora_rank`` among ``flags`` (0 when absent)."""
    value = flag_value(flags, "bagel_sr_lora_rank")
    return int(value) if value not in (None, "") else 0


def record_initial(module: Any, checkpoint_dir: Optional[str]) -> None:
    """Wrap ``<script>.FSDPCheckpoint.try_load_ckpt`` so that rank 0 records the weights a launch resuming a LoRA
    checkpoint starts from (and which checkpoint that was)."""
    if checkpoint_dir is None:
        return
    base = module.FSDPCheckpoint
    out = pathlib.Path(checkpoint_dir).parent / INITIAL

    class Recording(base):
        @staticmethod
        def try_load_ckpt(*args, **kwargs):
            model, ema_model = base.try_load_ckpt(*args, **kwargs)
            resume_from = kwargs.get("resume_from", args[0] if args else None)  # upstream's first parameter
            resumed = resume_from and (pathlib.Path(resume_from) / "adapter").is_dir()
            if int(os.environ.get("RANK", "0")) == 0 and resumed:
                (out.parent / (INITIAL + ".from")).write_text(str(resume_from))
                stock, adapters = lora_files.split_state(model.state_dict())
                save_file({k: v.detach().cpu().contiguous() for k, v in {**stock, **adapters}.items()}, str(out))
            return model, ema_model

    module.FSDPCheckpoint = Recording
    if hasattr(module, "deepspeed"):
        _record_deepspeed_start(module, out)


def _record_deepspeed_start(module: Any, out: pathlib.Path) -> None:
    """A DeepSpeed port: rank 0 records the engine's module once ``initialize`` (with LoRA) broadcast it."""
    real = module.deepspeed

    class Recording:
        def __getattr__(self, name: str) -> Any:
            return getattr(real, name)

        @staticmethod
        def initialize(*args, **kwargs):
            result = real.initialize(*args, **kwargs)
            if int(os.environ.get("RANK", "0")) == 0 and not out.exists():
                stock, adapters = lora_files.split_state(result[0].module.state_dict())
                save_file({k: v.detach().cpu().contiguous() for k, v in {**stock, **adapters}.items()}, str(out))
            return result

    module.deepspeed = Recording()


def stock_model(config: Any) -> torch.nn.Module:
    """The checkout's stock ``Bagel`` built from the ``BagelConfig`` main() used (ViT converted as main() does)."""
    import importlib

    if config is None:
        raise RuntimeError("main() built no model")
    stock = importlib.import_module("modeling.bagel")
    vit = stock.SiglipVisionModel(config.vit_config) if config.visual_und else None
    model = stock.Bagel(stock.Qwen2ForCausalLM(config.llm_config), vit, config)
    if config.visual_und:
        model.vit_model.vision_model.embeddings.convert_conv2d_to_linear(config.vit_config)
    return model


def _last_folder(checkpoint_dir: str) -> pathlib.Path:
    steps = sorted(int(d) for d in os.listdir(checkpoint_dir) if d.isdigit())
    if not steps:
        raise RuntimeError(f"no checkpoint folder in {checkpoint_dir}")
    return pathlib.Path(checkpoint_dir) / f"{steps[-1]:07d}"


def _max_change(now: dict, before: dict) -> float:
    return max(float((now[k].float() - before[k].float()).abs().max()) for k in now)


def _split(initial: dict) -> tuple:
    return ({k: v for k, v in initial.items() if not lora_files.is_adapter_key(k)},
            {k: v for k, v in initial.items() if lora_files.is_adapter_key(k)})


def _same_base(saved: dict, base: dict, where: str) -> None:
    differ = [k for k in base if k not in POSITION_TABLES and not torch.equal(saved[k], base[k].to(saved[k].dtype))]
    if differ or set(saved) != set(base):
        raise RuntimeError(f"{where}: base weights changed ({(differ or ['names'])[0]}, {len(differ)} tensors)")


def _moved(folder: pathlib.Path, before: dict) -> float:
    adapters, _ = lora_files.load_adapter(folder)
    if set(adapters) != set(before):
        raise RuntimeError(f"{folder.parent.name}/{folder.name}: adapter names differ from the initial ones")
    change = _max_change(adapters, before)
    if not change > 0:
        raise RuntimeError(f"{folder.parent.name}/{folder.name}: the adapters did not move")
    return change


def _optimizer_values(folder: pathlib.Path) -> int:
    """Values of the first AdamW moment the optimizer shards hold (FSDP's ``optimizer.*.pt``), or of ZeRO's fp32
    partitions (a DeepSpeed checkpoint)."""
    values = 0
    for shard in sorted(folder.glob("optimizer.*.pt")):
        state = torch.load(shard, map_location="cpu", weights_only=True)["state"]
        values += sum(s["exp_avg"].numel() for s in state.values() if "exp_avg" in s)
    for shard in sorted(folder.glob("*_optim_states.pt")):  # DeepSpeed's own file
        state = torch.load(shard, map_location="cpu", weights_only=False)["optimizer_state_dict"]
        values += sum(t.numel() for t in state["single_partition_of_fp32_groups"])
    return values


def _merged_loads(build_stock: Callable[[], torch.nn.Module], base: dict, adapter: pathlib.Path) -> None:
    model = build_stock()
    merged = lora_files.merge_state(base, *lora_files.load_adapter(adapter))
    merged.update({k: v for k, v in model.state_dict().items() if k in POSITION_TABLES and k not in merged})
    model.load_state_dict(merged, strict=True)


def _check_one_launch(build_stock: Callable[[], torch.nn.Module], folder: pathlib.Path) -> dict:
    """``--no_resume`` on an FSDP loop: nothing recorded a start every rank shares (the tiny model starts from each
    rank's own random base), so the base and resume checks are left out; the adapters moved from peft's zero
    ``B``, the optimizer held adapter state only, and the checkpoint's base + EMA adapter loads strictly."""
    adapters, _ = lora_files.load_adapter(folder / "adapter")
    moved = max(float(v.abs().max()) for k, v in adapters.items() if ".lora_B." in k)
    if not moved > 0:
        raise RuntimeError(f"{folder.name}/adapter: the adapters did not move (every B is still 0)")
    adapter_values, state_values = sum(v.numel() for v in adapters.values()), _optimizer_values(folder)
    if not adapter_values <= state_values < adapter_values + 1024 * max(1, len(adapters)):
        raise RuntimeError(f"the optimizer holds {state_values} values per moment; the adapters have {adapter_values}")
    _merged_loads(build_stock, load_file(str(folder / "ema.safetensors")), folder / "adapter_ema")
    return {"notes": [f"LoRA: adapters moved (max |B| {moved:.2e}; base and resume checks need the resume launch)",
                      f"optimizer state for the adapters only ({state_values:,} values per moment, adapters "
                      f"{adapter_values:,})", "base + EMA adapter merged loads into stock Bagel (strict)"]}


def check(build_stock: Callable[[], torch.nn.Module], checkpoint_dir: str) -> dict:
    """The checks on the last checkpoint; ``{"notes": [...]}`` or ``{"error": "..."}``."""
    try:
        folder = _last_folder(checkpoint_dir)
        recorded = pathlib.Path(checkpoint_dir).parent / INITIAL
        if not recorded.is_file():
            return _check_one_launch(build_stock, folder)
        base, start = _split(load_file(str(recorded)))
        adapter_values = sum(v.numel() for v in start.values())
        state_values = _optimizer_values(folder)
        if not adapter_values <= state_values < adapter_values + 1024 * max(1, len(start)):
            raise RuntimeError(f"the optimizer holds {state_values} values per moment; the adapters have "
                               f"{adapter_values}")
        optimizer_note = f"optimizer state for the adapters only ({state_values:,} values per moment, adapters " \
                         f"{adapter_values:,})"
        if (folder / lora_files.DEEPSPEED_STATES).is_file() and not (folder / "model.safetensors").is_file():
            states = torch.load(folder / lora_files.DEEPSPEED_STATES, map_location="cpu", weights_only=False)
            _same_base(states["module"], base, f"{folder.name}/{lora_files.DEEPSPEED_STATES}")
            moved = _moved(folder / "adapter", start)
            _merged_loads(build_stock, base, folder / "adapter")
            return {"notes": [
                f"LoRA: base weights bit-identical in {folder.name}/{lora_files.DEEPSPEED_STATES} (DeepSpeed)",
                f"adapters moved (max |change| {moved:.2e}; no EMA in this loop)", optimizer_note,
                "base + adapter merged loads into stock Bagel (strict)"]}
        resumed = pathlib.Path((recorded.parent / (INITIAL + ".from")).read_text())
        restored, _ = lora_files.load_adapter(resumed / "adapter")
        if set(restored) != set(start) or any(not torch.equal(restored[k], start[k]) for k in start):
            raise RuntimeError(f"the resumed launch did not start from the adapters of {resumed.name}/adapter")
        for name in ("model.safetensors", "ema.safetensors"):
            _same_base(load_file(str(folder / name)), base, f"{folder.name}/{name}")
        moved = {sub: _moved(folder / sub, lora_files.load_adapter(resumed / sub)[0]) for sub in ("adapter", "adapter_ema")}
        _merged_loads(build_stock, base, folder / "adapter_ema")
        return {"notes": [
            f"LoRA: resume restored {resumed.name}/adapter",
            f"base weights bit-identical in {folder.name}/model.safetensors and ema.safetensors",
            f"adapters moved (max |change| live {moved['adapter']:.2e}, EMA {moved['adapter_ema']:.2e})",
            optimizer_note, "base + EMA adapter merged loads into stock Bagel (strict)"]}
    except Exception as error:
        return {"error": f"{type(error).__name__}: {error}"}


def write_check(out: pathlib.Path, build_stock: Callable[[], torch.nn.Module], checkpoint_dir: Optional[str]) -> None:
    result = check(build_stock, checkpoint_dir) if checkpoint_dir else {"error": "no --checkpoint_dir"}
    out.write_text(json.dumps(result))


def read_check(path: pathlib.Path) -> list:
    """The notes of :func:`write_check`'s file; raises ``RuntimeError`` with its error."""
    result = json.loads(path.read_text()) if path.is_file() else {"error": "no LoRA check written"}
    if result.get("error"):
        raise RuntimeError(f"LoRA check: {result['error']}")
    return result["notes"]
