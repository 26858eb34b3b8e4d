"""Where each VAE image of a packed BAGEL batch lives: its tokens, its sample, its role.

Token layout (BAGEL's): image ``i`` with a grid of ``(h, w)`` tokens owns ``h*w`` consecutive VAE tokens, each of
size ``p*p*C``, flattened as ``(c, h, p, w, q) -> (h, w, p, q, c)``.  VAE images appear in the order of
``patchified_vae_latent_shapes`` (= ``padded_images`` = the tokens of ``packed_vae_token_indexes``).
A *condition* image has flow time 0 (raw ``-inf``); a *target* has t > 0 and its tokens are rows of ``llm2vae``'s
output in sequence order.
"""
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch


@dataclass(frozen=True)
class VaeImage:
    """One VAE image of a packed batch."""

    index: int  # position in padded_images / patchified_vae_latent_shapes
    h: int  # token grid height
    w: int  # token grid width
    token_start: int  # first row among all VAE tokens (z_t, t)
    position: int  # sequence index of its first token
    sample: int  # index of the packed sample holding it
    t: float  # flow time of its tokens (0 for a clean condition)
    target_start: Optional[int] = None  # first row among target tokens (v_hat), None for conditions

    @property
    def num_tokens(self) -> int:
        return self.h * self.w

    @property
    def is_target(self) -> bool:
        return self.target_start is not None


def patchify_latent(latent: torch.Tensor, h: int, w: int, p: int) -> torch.Tensor:
    """``(C, >=h*p, >=w*p)`` latent -> ``(h*w, p*p*C)`` tokens in BAGEL's layout (the top-left crop is used)."""
    c = latent.shape[0]
    x = latent[:, : h * p, : w * p].reshape(c, h, p, w, p)
    return torch.einsum("chpwq->hwpqc", x).reshape(h * w, p * p * c)


def unpatchify(tokens: torch.Tensor, h: int, w: int, p: int, c: int) -> torch.Tensor:
    """Inverse of :func:`patchify_latent`: ``(h*w, p*p*C)`` tokens -> ``(C, h*p, w*p)`` latent."""
    x = tokens.reshape(h, w, p, p, c)
    return torch.einsum("hwpqc->chpwq", x).reshape(c, h * p, w * p)


def sample_of_positions(positions: torch.Tensor, sample_lens: Sequence[int]) -> torch.Tensor:
    """Index of the packed sample holding each sequence position (samples are packed back to back)."""
    ends = torch.cumsum(torch.as_tensor(list(sample_lens), dtype=torch.long), 0)
    return torch.searchsorted(ends, positions.to(torch.long).cpu(), right=True)


def describe_vae_images(
    shapes: Sequence[Tuple[int, int]],
    packed_vae_token_indexes: torch.Tensor,
    t_per_token: torch.Tensor,
    sample_lens: Sequence[int],
) -> List[VaeImage]:
    """List the VAE images of a packed batch with their token offsets, sample and flow time.

    ``t_per_token``: flow time of every VAE token (after sigmoid and shift), shape ``(N_vae_tokens,)``.
    """
    counts = [int(h) * int(w) for h, w in shapes]
    if sum(counts) != len(packed_vae_token_indexes) or sum(counts) != len(t_per_token):
        raise ValueError(
            f"the batch is inconsistent: patchified_vae_latent_shapes cover {sum(counts)} tokens, "
            f"packed_vae_token_indexes has {len(packed_vae_token_indexes)}, timesteps {len(t_per_token)}"
        )
    starts = [0]
    for n in counts[:-1]:
        starts.append(starts[-1] + n)
    first_positions = packed_vae_token_indexes.detach().cpu()[torch.as_tensor(starts, dtype=torch.long)] if counts else None
    samples = sample_of_positions(first_positions, sample_lens).tolist() if counts else []
    t_first = t_per_token.detach().float().cpu()[starts].tolist() if counts else []
    images, target_row = [], 0
    for i, ((h, w), start) in enumerate(zip(shapes, starts)):
        t = float(t_first[i])
        is_target = t > 0
        images.append(
            VaeImage(
                index=i, h=int(h), w=int(w), token_start=start, position=int(first_positions[i]),
                sample=int(samples[i]), t=t, target_start=target_row if is_target else None,
            )
        )
        if is_target:
            target_row += counts[i]
    return images


def is_paired(image: VaeImage, images: Sequence[VaeImage]) -> bool:
    """A target is paired when its sample holds a clean condition image *before* it."""
    return image.is_target and any(
        (not other.is_target) and other.sample == image.sample and other.position < image.position for other in images
    )


def dataset_of_samples(batch_data_indexes: Optional[Sequence]) -> Optional[List[Optional[str]]]:
    """``dataset_name`` of each packed sample from the loop's ``batch_data_indexes`` (None when absent)."""
    if batch_data_indexes is None:
        return None
    out = []
    for entry in batch_data_indexes:
        name = entry.get("dataset_name") if isinstance(entry, dict) else getattr(entry, "dataset_name", None)
        out.append(name)
    return out
