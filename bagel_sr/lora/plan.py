"""What LoRA saves, computed: the checkout's ``Bagel`` built on the meta device from a released model's configs,
then trainable parameters, optimizer-state and gradient bytes, and per-GPU memory of weights + states for full
fine-tuning vs LoRA, under FSDP FULL_SHARD.

    python -m bagel_sr.lora plan --config 7b-mot [--bagel_root PATH]
    python -m bagel_sr.lora plan --model_path RELEASED [--bagel_root PATH]

The model is assembled as upstream ``main()`` does with its default ``ModelArguments`` (MoT layers, QK-norm, the
ViT cut to ``vit_select_layer``); ``7b-mot`` holds the numbers of BAGEL-7B-MoT's released ``llm_config.json`` and
``vit_config.json`` (Qwen2.5-7B widths, SigLIP so400m/14); the FLUX VAE (16 latent channels) is not trained.

Bytes per parameter, as upstream's loop holds them (fp32 parameters under bf16 mixed precision, AdamW, an EMA
copy of the whole model, every part sharded over the GPUs):

* full fine-tuning: parameter 4 + gradient 4 + AdamW 8 + EMA 4 = 20 B per parameter;
* LoRA: the frozen base 4 + its EMA copy 4 (no gradient, no optimizer state), the adapters 20 B each.

Activations, the all-gathered unit of the moment and CUDA's own reserve come on top (they depend on the tokens per
step, not on the method).
"""
from __future__ import annotations

import importlib
import json
import os
import pathlib
from dataclasses import dataclass
from typing import Any, Dict, List, Sequence

import torch
from torch import nn

from bagel_sr.errors import BadInput, MissingInput
from bagel_sr.lora_settings import LoraSettings
from bagel_sr.patches import checkout
from bagel_sr.patches.cpu import apply_cpu_compat, declare_torchvision_ops
from bagel_sr.patches.lora import resolve_targets

#: BAGEL-7B-MoT's released configs (the values that set parameter shapes) and upstream main()'s model defaults.
PRESETS: Dict[str, Dict[str, Dict[str, Any]]] = {
    "7b-mot": {
        "llm": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                    num_key_value_heads=4, vocab_size=152064, max_position_embeddings=32768, rope_theta=1e6,
                    rms_norm_eps=1e-6, hidden_act="silu", tie_word_embeddings=False),
        "vit": dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                    patch_size=14, image_size=980, num_channels=3, layer_norm_eps=1e-6,
                    hidden_act="gelu_pytorch_tanh"),
    },
}
MODEL_DEFAULTS = dict(layer_module="Qwen2MoTDecoderLayer", qk_norm=True, tie_word_embeddings=False,
                      vit_select_layer=-2, vit_rope=False, latent_patch_size=2, max_latent_size=32,
                      vit_max_num_patch_per_side=70, connector_act="gelu_pytorch_tanh")
FLUX_AE = dict(resolution=256, in_channels=3, downsample=8, ch=128, out_ch=3, ch_mult=[1, 2, 4, 4],
               num_res_blocks=2, z_channels=16, scale_factor=0.3611, shift_factor=0.1159)
FULL_BYTES = 4 + 4 + 8 + 4   # parameter, gradient, AdamW (2 states), EMA: all fp32
FROZEN_BYTES = 4 + 4         # parameter and its EMA copy
GIB = 2 ** 30


def _configs(preset: str = None, model_path: str = None) -> Dict[str, Dict[str, Any]]:
    if preset is not None:
        if preset not in PRESETS:
            raise BadInput(f"--config {preset}: unknown; allowed: {', '.join(PRESETS)}")
        return PRESETS[preset]
    folder = pathlib.Path(model_path)
    out = {}
    for key, name in (("llm", "llm_config.json"), ("vit", "vit_config.json")):
        if not (folder / name).is_file():
            raise MissingInput(f"--model_path {folder}: no {name} (pass a released BAGEL model folder)")
        out[key] = json.loads((folder / name).read_text())
    return out


def build_meta_model(configs: Dict[str, Dict[str, Any]], bagel_root: str) -> nn.Module:
    """The checkout's ``Bagel`` (language model, ViT, connectors) on the meta device, as ``main()`` builds it."""
    checkout.add_to_sys_path(checkout.find_checkout(bagel_root))
    declare_torchvision_ops()
    apply_cpu_compat()
    bagel = importlib.import_module("modeling.bagel")
    autoencoder = importlib.import_module("modeling.autoencoder")
    d = MODEL_DEFAULTS
    llm_config = bagel.Qwen2Config(**{k: v for k, v in configs["llm"].items() if k not in ("architectures",)})
    llm_config.layer_module, llm_config.qk_norm = d["layer_module"], d["qk_norm"]
    llm_config.tie_word_embeddings, llm_config.freeze_und = d["tie_word_embeddings"], False
    vit_config = bagel.SiglipVisionConfig(**{k: v for k, v in configs["vit"].items() if k not in ("architectures",)})
    vit_config.num_hidden_layers = vit_config.num_hidden_layers + 1 + d["vit_select_layer"]
    vit_config.rope = d["vit_rope"]
    config = bagel.BagelConfig(visual_gen=True, visual_und=True, llm_config=llm_config, vit_config=vit_config,
                               vae_config=autoencoder.AutoEncoderParams(**FLUX_AE),
                               latent_patch_size=d["latent_patch_size"], max_latent_size=d["max_latent_size"],
                               vit_max_num_patch_per_side=d["vit_max_num_patch_per_side"],
                               connector_act=d["connector_act"], interpolate_pos=False, timestep_shift=1.0)
    with torch.device("meta"):
        model = bagel.Bagel(bagel.Qwen2ForCausalLM(llm_config), bagel.SiglipVisionModel(vit_config), config)
        model.vit_model.vision_model.embeddings.convert_conv2d_to_linear(vit_config, meta=True)
    return model


def adapter_params(model: nn.Module, rank: int, targets: str = "mot") -> int:
    """Parameters of rank-``rank`` LoRA on the targets: ``rank * (in + out)`` per adapted linear."""
    names = resolve_targets(model, LoraSettings(rank=rank, targets=targets).patterns)
    modules = dict(model.named_modules())
    return sum(rank * (modules[n].in_features + modules[n].out_features) for n in names)


@dataclass
class Row:
    method: str
    trainable: int
    frozen: int

    @property
    def state_bytes(self) -> int:  # AdamW: exp_avg + exp_avg_sq, fp32
        return 8 * self.trainable

    @property
    def grad_bytes(self) -> int:
        return 4 * self.trainable

    def per_gpu_gib(self, gpus: int) -> float:
        return (FULL_BYTES * self.trainable + FROZEN_BYTES * self.frozen) / gpus / GIB


def plan_rows(model: nn.Module, ranks: Sequence[int], targets: str = "mot") -> List[Row]:
    every = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)  # not the fixed position tables
    rows = [Row("full fine-tuning", trainable, every - trainable)]
    for rank in ranks:
        rows.append(Row(f"LoRA r={rank}", adapter_params(model, rank, targets), every))
    return rows


def render(rows: List[Row], gpus: Sequence[int], total: int) -> str:
    head = ["method", "trainable", "AdamW state", "gradients"] + [f"{g} GPU{'s' if g > 1 else ''}" for g in gpus]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r.method, f"{r.trainable / 1e6:,.1f} M ({100 * r.trainable / total:.2f}%)",
                 f"{r.state_bytes / GIB:,.2f} GiB", f"{r.grad_bytes / GIB:,.2f} GiB"]
        cells += [f"{r.per_gpu_gib(g):,.1f} GiB" for g in gpus]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(args: Any) -> int:
    root = args.bagel_root or os.environ.get("BAGEL_ROOT")
    if not root:
        raise MissingInput("plan builds the model with your checkout's classes: pass --bagel_root PATH (or BAGEL_ROOT)")
    try:
        ranks = [int(r) for r in args.ranks.split(",") if r.strip()]
        gpus = [int(g) for g in args.gpus.split(",") if g.strip()]
    except ValueError:
        raise BadInput(f"--ranks {args.ranks!r} / --gpus {args.gpus!r}: comma-separated integers") from None
    if not ranks or not gpus or min(ranks + gpus) <= 0:
        raise BadInput("--ranks and --gpus: comma-separated integers > 0")
    model = build_meta_model(_configs(args.config, args.model_path), root)
    total = sum(p.numel() for p in model.parameters())
    parts = {name: sum(p.numel() for p in child.parameters()) for name, child in model.named_children()}
    source = f"--config {args.config}" if args.config else f"--model_path {args.model_path}"
    print(f"BAGEL ({source}) on the meta device: {total / 1e9:.2f} B parameters ("
          + ", ".join(f"{n} {c / 1e9:.3f} B" for n, c in parts.items() if c) + f"); LoRA targets: {args.targets}")
    print("Per GPU: weights + gradients + AdamW + EMA under FSDP FULL_SHARD (activations not included).\n")
    print(render(plan_rows(model, ranks, args.targets), gpus, total))
    return 0
