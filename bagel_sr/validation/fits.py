"""The limits a val image must fit, checked when the model is built (before training): the model's latent and ViT
position tables and the token limit of one packed sample."""
from __future__ import annotations

from typing import Any, Optional, Sequence

from bagel_sr.errors import BadInput
from bagel_sr.patches.validation_set import ValSet

from .loop import pil_image


def check_fits(sets: Sequence[ValSet], transform_cls: Any, max_latent_size: int, latent_downsample: int,
               vit_max_patches: Optional[int] = None, max_tokens_per_sample: Optional[int] = None) -> None:
    """Refuse (one line) a val image whose latent or ViT grid exceeds the model's position tables, or whose edit
    sample (condition VAE + ViT tokens, target VAE tokens, about 64 text tokens) exceeds the token limit."""
    Image = pil_image()
    for s in sets:
        vae = transform_cls(s.vae_args.get("max_image_size", 1024), s.vae_args.get("min_image_size", 512),
                            s.vae_args.get("image_stride", 16))
        vit = transform_cls(s.vit_args.get("max_image_size", 980), s.vit_args.get("min_image_size", 224),
                            s.vit_args.get("image_stride", 14))
        for im in s.images:
            with Image.open(im.lr) as pil:
                pil = pil.convert("RGB")
                w, h = vae.resize_transform(pil).size
                vw, vh = vit.resize_transform(pil).size
            side = max(h, w) // latent_downsample
            if side > max_latent_size:
                raise BadInput(f"--bagel_sr_val_datasets: val image {im.lr} is {w}x{h} after the set's transform, "
                               f"{side} latent tokens a side, more than --max_latent_size {max_latent_size}; raise "
                               "--max_latent_size or validate on smaller images")
            stride = int(s.vit_args.get("image_stride", 14))
            vit_side = max(vh, vw) // stride
            if vit_max_patches and vit_side > vit_max_patches:
                raise BadInput(f"--bagel_sr_val_datasets: val image {im.lr} needs {vit_side} ViT patches a side, "
                               f"more than the model's {vit_max_patches}; lower the set's vit max_image_size")
            tokens = 2 * (h // latent_downsample) * (w // latent_downsample) + (vh // stride) * (vw // stride) + 64
            if max_tokens_per_sample and tokens > max_tokens_per_sample:
                raise BadInput(f"--bagel_sr_val_datasets: val image {im.lr} makes a sample of about {tokens} tokens, "
                               f"more than --max_num_tokens_per_sample {max_tokens_per_sample}; raise it or "
                               "validate on smaller images")
