"""Model folders for the dry run: tiny and random, in the layout ``main()`` reads with ``--finetune_from_hf True``.

``main()`` reads ``llm_config.json`` (Qwen2Config), ``vit_config.json`` (SiglipVisionConfig), the tokenizer
(``Qwen2Tokenizer.from_pretrained``: ``vocab.json`` + ``merges.txt``) and ``ae.safetensors`` (``load_ae``), and with
``--resume_from`` a ``model.safetensors`` / ``ema.safetensors``; the dry run starts from random weights, so none.

- :func:`write_tiny_model_folder`: our own configs, a byte-level tokenizer we make ourselves (256 byte tokens, no
  merges), and a random VAE written by the checkout's own ``load_ae`` geometry.
- :func:`shrink_model_folder`: a user's released folder with its configs cut to a few narrow layers (every other
  key kept), its tokenizer files and ``ae.safetensors`` linked, so their configs, tokenizer and VAE are exercised.
"""
from __future__ import annotations

import json
import os
import pathlib
import shutil
from typing import Any, Dict

import torch

#: Language model of the dry run: 2 layers, hidden 64 (BAGEL's MoT layer doubles it per expert).
TINY_LLM = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2)
#: SigLIP of the dry run. ``main()`` keeps ``num_hidden_layers + 1 + vit_select_layer`` layers (2 + 1 - 2 = 1).
TINY_VIT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "generation_config.json")


def byte_unicode_table() -> Dict[int, str]:
    """GPT-2's reversible byte -> printable character table (the alphabet of byte-level BPE vocabularies)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def write_byte_tokenizer(folder: pathlib.Path) -> int:
    """A Qwen2-compatible byte-level tokenizer with no merges (one token per byte). Returns its base vocab size."""
    vocab = {ch: i for i, ch in enumerate(byte_unicode_table().values())}
    vocab["<|endoftext|>"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "model_max_length": 32768, "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
        "unk_token": None, "bos_token": None, "errors": "replace",
    }))
    return len(vocab)


def tiny_llm_config(vocab_size: int) -> Dict[str, Any]:
    return dict(model_type="qwen2", architectures=["Qwen2ForCausalLM"], vocab_size=vocab_size,
                max_position_embeddings=4096, rope_theta=10000.0, rms_norm_eps=1e-6, hidden_act="silu",
                tie_word_embeddings=False, torch_dtype="bfloat16", use_cache=True, **TINY_LLM)


def tiny_vit_config() -> Dict[str, Any]:
    return dict(model_type="siglip_vision_model", image_size=980, patch_size=14, num_channels=3,
                hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6, attention_dropout=0.0, **TINY_VIT)


def write_random_vae(load_ae, path: pathlib.Path, seed: int = 0) -> None:
    """Save a randomly initialised VAE of the checkout's ``load_ae`` geometry (``load_ae(None)`` builds it)."""
    from safetensors.torch import save_file

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        ae, _params = load_ae(None)
    save_file({k: v.contiguous() for k, v in ae.state_dict().items()}, str(path))


def write_tiny_model_folder(folder: str | os.PathLike, load_ae) -> pathlib.Path:
    """Write a complete tiny model folder; ``load_ae`` is the checkout's ``modeling.autoencoder.load_ae``."""
    folder = pathlib.Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab = write_byte_tokenizer(folder)
    (folder / "llm_config.json").write_text(json.dumps(tiny_llm_config(vocab), indent=1))
    (folder / "vit_config.json").write_text(json.dumps(tiny_vit_config(), indent=1))
    write_random_vae(load_ae, folder / "ae.safetensors")
    return folder


def _shrunk(config: Dict[str, Any], sizes: Dict[str, Any]) -> Dict[str, Any]:
    out = dict(config)
    out.update({k: v for k, v in sizes.items()})
    return out


def shrink_model_folder(source: str | os.PathLike, folder: str | os.PathLike) -> pathlib.Path:
    """Copy a released model folder's configs cut to :data:`TINY_LLM` / :data:`TINY_VIT` sizes (all other keys
    kept: vocabulary, rope, norms, activation), and link its tokenizer files and ``ae.safetensors``."""
    source, folder = pathlib.Path(source).expanduser().resolve(), pathlib.Path(folder)
    missing = [n for n in ("llm_config.json", "ae.safetensors", "vocab.json") if not (source / n).is_file()]
    if missing:
        raise FileNotFoundError(
            f"--model_path {source} lacks {', '.join(missing)}: a released BAGEL folder (e.g. BAGEL-7B-MoT) holds "
            "llm_config.json, vit_config.json, ae.safetensors and the Qwen2 tokenizer files."
        )
    folder.mkdir(parents=True, exist_ok=True)
    llm = json.loads((source / "llm_config.json").read_text())
    (folder / "llm_config.json").write_text(json.dumps(_shrunk(llm, TINY_LLM), indent=1))
    if (source / "vit_config.json").is_file():
        vit = json.loads((source / "vit_config.json").read_text())
        (folder / "vit_config.json").write_text(json.dumps(_shrunk(vit, TINY_VIT), indent=1))
    for name in TOKENIZER_FILES + ("ae.safetensors",):
        if (source / name).is_file():
            target = folder / name
            if target.exists() or target.is_symlink():
                target.unlink()
            try:
                target.symlink_to(source / name)
            except OSError:
                shutil.copy2(source / name, target)
    return folder
