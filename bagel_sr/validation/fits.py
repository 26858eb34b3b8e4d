"""The limits a val image must fit, checked when the model is built (before training): the model's latent and ViT
position tables, for the image as its set's transforms (the ones training uses) size it.  Validation restores one image per call of
the inferencer (no packing), so the loader's ``--max_num_tokens*`` limits do not bind it; the tables do."""
from __future__ import annotations

from typing import Any, Optional, Sequence

from bagel_sr.errors import BadInput
from bagel_sr.patches.validation_set import ValSet

from .loop import pil_image, set_transforms


def check_fits(sets: Sequence[ValSet], transform_cls: Any, max_latent_size: int, latent_downsample: int,
               vit_max_patches: Optional[int] = None) -> None:
    """Refuse (one line) a val image whose latent or ViT grid exceeds the model's position tables.
    ``transform_cls``: the checkout's ``ImageTransform`` (built from each set's transform arguments)."""
    Image = pil_image()
    for s in sets:
        vae_transform, vit_transform = set_transforms(s, transform_cls)
        stride = int(s.vit_args.get("image_stride", 14))
        for im in s.images:
            with Image.open(im.lr) as pil:
                pil = pil.convert("RGB")
                w, h = vae_transform.resize_transform(pil).size
                vw, vh = vit_transform.resize_transform(pil).size
            side = max(h, w) // latent_downsample
            if side > max_latent_size:
                raise BadInput(f"--bagel_sr_val_datasets: val image {im.lr} is {w}x{h} after its set's transform, "
                               f"{side} latent tokens a side, more than --max_latent_size {max_latent_size}; raise "
                               "--max_latent_size or validate on smaller images")
            vit_side = max(vh, vw) // stride
            if vit_max_patches and vit_side > vit_max_patches:
                raise BadInput(f"--bagel_sr_val_datasets: val image {im.lr} needs {vit_side} ViT patches a side, "
                               f"more than the model's {vit_max_patches}; validate on smaller images")
