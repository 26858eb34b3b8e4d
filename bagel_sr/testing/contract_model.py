"""A minimal stand-in following BAGEL's training-forward contract, for math tests that need to control v_hat.

Tokens do not attend to each other (the "language model" is a per-token MLP), so a test can reason about each
target image alone.  Everything else is the contract: keyword arguments, timestep mapping, token layout, z_t,
velocity target, and ``time_embedder`` / ``vae2llm`` / ``llm2vae`` each called once.  The embedded backbone
(``bagel_sr.embedded``) and the real checkout are tested elsewhere.
"""
from typing import Dict, List, Sequence, Tuple

import torch
from torch import nn

from bagel_sr import flow, packing


class ContractModel(nn.Module):
    latent_patch_size = 2
    latent_channel = 16
    latent_downsample = 16  # VAE 8x times the 2x2 patch

    def __init__(self, hidden: int = 32, timestep_shift: float = 1.0, vocab: int = 16):
        super().__init__()
        self.timestep_shift = timestep_shift
        d = self.latent_patch_size**2 * self.latent_channel
        self.embed = nn.Embedding(vocab, hidden)
        self.time_embedder = nn.Linear(1, hidden)
        self.vae2llm = nn.Linear(d, hidden)
        self.llm = nn.Sequential(nn.Linear(hidden, hidden), nn.Tanh(), nn.Linear(hidden, hidden))
        self.llm2vae = nn.Linear(hidden, d)

    def forward(self, sequence_length, packed_text_ids, packed_text_indexes, sample_lens, packed_position_ids,
                padded_latent, patchified_vae_latent_shapes, packed_latent_position_ids, packed_vae_token_indexes,
                packed_timesteps, mse_loss_indexes, nested_attention_masks=None, split_lens=None, attn_modes=None,
                **unused):
        p = self.latent_patch_size
        seq = self.embed(packed_text_ids).new_zeros(sequence_length, self.embed.embedding_dim)
        seq[packed_text_indexes] = self.embed(packed_text_ids)
        z0 = torch.cat([packing.patchify_latent(lat, h, w, p) for lat, (h, w) in zip(padded_latent, patchified_vae_latent_shapes)])
        noise = torch.randn_like(z0)
        t = flow.raw_to_t(packed_timesteps, self.timestep_shift)
        z_t = flow.interpolate(z0, noise, t[:, None])
        seq[packed_vae_token_indexes] = self.vae2llm(z_t) + self.time_embedder(t[:, None])
        hidden = self.llm(seq)
        v_hat = self.llm2vae(hidden[mse_loss_indexes])
        target = flow.velocity(z0, noise)
        return dict(mse=(v_hat - target[t > 0]) ** 2, ce=None)


class LinearDecoder(nn.Module):
    """``decode(z)``: a frozen 8x transposed convolution, linear so that ``J_D`` is known exactly."""

    def __init__(self, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.up = nn.ConvTranspose2d(16, 3, kernel_size=8, stride=8)
        with torch.no_grad():
            self.up.weight.copy_(torch.randn(self.up.weight.shape, generator=g) * 0.05)
            self.up.bias.zero_()
        self.requires_grad_(False)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.up(z)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.avg_pool2d(x, 8).repeat(1, 6, 1, 1)[:, :16]


def pack(samples: Sequence[Sequence[tuple]], seed: int = 0, use_flex_pad: int = 0) -> Dict:
    """A packed batch from sample specs: ``("text", n)``, ``("cond", h, w)``, ``("target", h, w)``.

    ``(h, w)`` in tokens (16x16 pixels each).  Returns the forward kwargs plus ``padded_images`` (N, 3, H, W) in
    [-1, 1] (zero-padded) and ``batch_data_indexes``; raw timesteps are ``-inf`` for conditions and one N(0,1)
    draw per target.
    """
    g = torch.Generator().manual_seed(seed)
    curr, sample_lens = 0, []
    text_ids, text_idx, vae_idx, mse_idx, timesteps, shapes, images, pos_ids = [], [], [], [], [], [], [], []
    for spec in samples:
        start = curr
        for item in spec:
            if item[0] == "text":
                text_ids += torch.randint(0, 16, (item[1],), generator=g).tolist()
                text_idx += list(range(curr, curr + item[1]))
                curr += item[1]
            else:
                kind, h, w = item
                n = h * w
                vae_idx += list(range(curr, curr + n))
                if kind == "target":
                    mse_idx += list(range(curr, curr + n))
                    raw = float(torch.randn((), generator=g))
                else:
                    raw = float("-inf")
                timesteps += [raw] * n
                shapes.append((h, w))
                images.append(torch.rand((3, 16 * h, 16 * w), generator=g) * 2 - 1)
                curr += n
        sample_lens.append(curr - start)
    if use_flex_pad:
        sample_lens.append(use_flex_pad)
    hmax = max(im.shape[1] for im in images)
    wmax = max(im.shape[2] for im in images)
    padded = torch.zeros(len(images), 3, hmax, wmax)
    for i, im in enumerate(images):
        padded[i, :, : im.shape[1], : im.shape[2]] = im
    total = sum(sample_lens)
    return dict(
        sequence_length=total,
        packed_text_ids=torch.tensor(text_ids, dtype=torch.long),
        packed_text_indexes=torch.tensor(text_idx, dtype=torch.long),
        sample_lens=sample_lens,
        packed_position_ids=torch.arange(total),
        patchified_vae_latent_shapes=shapes,
        packed_latent_position_ids=torch.arange(len(vae_idx)),
        packed_vae_token_indexes=torch.tensor(vae_idx, dtype=torch.long),
        packed_timesteps=torch.tensor(timesteps),
        mse_loss_indexes=torch.tensor(mse_idx, dtype=torch.long),
        padded_images=padded,
        batch_data_indexes=[{"dataset_name": f"set{k % 2}"} for k in range(len(samples))],
    )


def set_timesteps(batch: Dict, t_per_image: List[float], shift: float = 1.0) -> Dict:
    """Overwrite the raw timesteps so each image gets flow time ``t`` (0 keeps it a clean condition)."""
    raw = []
    for (h, w), t in zip(batch["patchified_vae_latent_shapes"], t_per_image):
        if t <= 0:
            r = float("-inf")
        else:
            u = flow.unshift_timesteps(t, shift)
            r = float(torch.logit(torch.tensor(u, dtype=torch.float64)))
        raw += [r] * (h * w)
    batch["packed_timesteps"] = torch.tensor(raw)
    return batch


def forward_kwargs(batch: Dict, vae) -> Tuple[Dict, torch.Tensor]:
    """What BAGEL's loop passes: ``padded_latent = vae.encode(padded_images)``, the rest unchanged."""
    kw = {k: v for k, v in batch.items() if k not in ("padded_images", "batch_data_indexes")}
    with torch.no_grad():
        kw["padded_latent"] = vae.encode(batch["padded_images"])
    return kw, batch["padded_images"]
