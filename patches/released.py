"""A released BAGEL (``hf/BAGEL-7B-MoT``-shaped folder) built from the user's checkout, for inference on GPUs.

The checkout's own classes build the model; the released folder gives the configs, tokenizer and
``ae.safetensors``, a checkpoint the weights. ``accelerate`` (which BAGEL's checkout needs anyway) places them.
"""
import importlib
from pathlib import Path
from typing import Optional

import torch

from bagel_sr.errors import UserError

from . import checkout, cpu, lora_files


class NeedsGpu(UserError):
    """A released BAGEL cannot run here (no CUDA)."""


def load_checkout_inferencer(bagel_root: str, model_path: str, checkpoint: Optional[str] = None,
                             max_latent_size: int = 64, adapter: Optional[str] = None):
    """Build BAGEL from ``model_path`` (configs, tokenizer, ``ae.safetensors``) with weights from ``checkpoint``
    (default: ``model_path/ema.safetensors``; a fine-tuned ``ema.safetensors`` has the same keys) on the GPUs,
    and return the checkout's ``InterleaveInferencer``.  Mirrors the checkout's own demo set-up.  ``adapter``: a
    LoRA run's checkpoint folder (its ``adapter_ema/``) or a peft adapter folder, merged into the weights."""
    from accelerate import infer_auto_device_map, init_empty_weights, load_checkpoint_and_dispatch

    root = checkout.find_checkout(bagel_root)
    checkout.add_to_sys_path(root)
    cpu.install_flash_attn_stand_in()
    if not torch.cuda.is_available():
        raise NeedsGpu("inference with a released BAGEL needs a GPU; the embedded demo restores on CPU "
                       "(python -m bagel_sr.embedded.infer)")
    bagel = importlib.import_module("modeling.bagel")
    ae_mod = importlib.import_module("modeling.autoencoder")
    qwen2 = importlib.import_module("modeling.qwen2")
    data_utils = importlib.import_module("data.data_utils")
    transforms = importlib.import_module("data.transforms")
    inferencer_mod = importlib.import_module("inferencer")

    mp = Path(model_path)
    llm_config = bagel.Qwen2Config.from_json_file(str(mp / "llm_config.json"))
    llm_config.qk_norm, llm_config.tie_word_embeddings = True, False
    llm_config.layer_module = "Qwen2MoTDecoderLayer"
    vit_config = bagel.SiglipVisionConfig.from_json_file(str(mp / "vit_config.json"))
    vit_config.rope = False
    vit_config.num_hidden_layers -= 1
    vae_model, vae_config = ae_mod.load_ae(local_path=str(mp / "ae.safetensors"))
    config = bagel.BagelConfig(
        visual_gen=True, visual_und=True, llm_config=llm_config, vit_config=vit_config, vae_config=vae_config,
        vit_max_num_patch_per_side=70, connector_act="gelu_pytorch_tanh", latent_patch_size=2,
        max_latent_size=max_latent_size,
    )
    with init_empty_weights():
        model = bagel.Bagel(bagel.Qwen2ForCausalLM(llm_config), bagel.SiglipVisionModel(vit_config), config)
        model.vit_model.vision_model.embeddings.convert_conv2d_to_linear(vit_config, meta=True)
    tokenizer = qwen2.Qwen2Tokenizer.from_pretrained(str(mp))
    tokenizer, new_token_ids, _ = data_utils.add_special_tokens(tokenizer)
    device_map = infer_auto_device_map(model, no_split_module_classes=["Bagel", "Qwen2MoTDecoderLayer"])
    first = next(iter(device_map.values())) if device_map else "cuda:0"
    for name in ("language_model.model.embed_tokens", "time_embedder", "latent_pos_embed", "vae2llm", "llm2vae",
                 "connector", "vit_pos_embed"):
        device_map[name] = device_map.get("language_model.model.embed_tokens", first)
    model = load_checkpoint_and_dispatch(
        model, checkpoint=checkpoint or str(mp / "ema.safetensors"), device_map=device_map,
        offload_buffers=True, dtype=torch.bfloat16, force_hooks=True,
    ).eval()
    if adapter:
        lora_files.merge_into_model(model, *lora_files.load_adapter(adapter))
    vae_model = vae_model.to(next(model.llm2vae.parameters()).device).eval()
    return inferencer_mod.InterleaveInferencer(
        model=model, vae_model=vae_model, tokenizer=tokenizer,
        vae_transform=transforms.ImageTransform(1024, 512, 16), vit_transform=transforms.ImageTransform(980, 224, 14),
        new_token_ids=new_token_ids,
    )
