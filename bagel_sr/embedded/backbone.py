"""``TinyBagel``: a small model with the generation forward contract of BAGEL's ``Bagel`` (BAGEL_CONTRACT.md).

Same keyword arguments, same timestep mapping (``t = shift(sigmoid(raw))``), same token layout
``(c, h, p, w, q) -> (h, w, p, q, c)``, same velocity target ``noise - z0`` where ``t > 0``, and ``time_embedder``,
``vae2llm`` and ``llm2vae`` each called once per forward, so ``bagel_sr.with_pixel_loss`` wraps it as it wraps
``Bagel``.  The language model is ``transformers``' ``Qwen2ForCausalLM`` (a tiny configuration) run on
``inputs_embeds`` with additive 4-D attention masks: each packed sample sees only itself (run as a padded batch of
the samples by default, or as one sequence with a block-diagonal mask: the same computation), and within a sample
the causal / full / noise split semantics of BAGEL's packing.  Text and VAE tokens share its weights (BAGEL's
mixture-of-transformers variant keeps separate ones; the contract does not depend on it).  No ViT
(``visual_und=False``): ViT arguments are accepted and ignored, as ``Bagel`` does without a ViT.
"""
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional, Sequence, Tuple

from . import _compat  # noqa: F401  (import guard before transformers / diffusers)

import torch
import torch.nn.functional as F
from torch import nn

from ..packing import describe_vae_images
from .data import attention_mask_per_sample


@dataclass
class TinyBagelConfig:
    vocab_size: int = 64
    hidden_size: int = 128
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    intermediate_size: int = 384
    rope_theta: float = 10000.0
    latent_patch_size: int = 2  # p: a token is a p x p patch of the latent
    latent_channel: int = 16  # C: VAE latent channels
    vae_downsample: int = 8  # VAE spatial downsampling
    max_latent_size: int = 32  # side of the latent position table, in tokens
    timestep_shift: float = 1.0
    time_scale: float = 1000.0  # the sinusoidal time features see t * time_scale
    initializer_range: float = 0.02  # std of the language model's initial weights (Qwen2's default)
    aligned_condition: bool = False  # also add each target token's condition token (same grid cell) to its input
    per_sample_attention: bool = True  # run the samples as a padded batch (same outputs as the packed block mask)

    def to_dict(self) -> Dict:
        return asdict(self)


class TimestepEmbedder(nn.Module):
    """Flow time ``t`` in [0, 1], one per token, to a hidden vector (diffusers' sinusoidal features and MLP)."""

    def __init__(self, hidden_size: int, time_scale: float = 1000.0, frequency_embedding_size: int = 256):
        super().__init__()
        from diffusers.models.embeddings import TimestepEmbedding, Timesteps

        self.time_scale = time_scale
        self.features = Timesteps(frequency_embedding_size, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.mlp = TimestepEmbedding(frequency_embedding_size, hidden_size)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.features(t.float() * self.time_scale).to(self.mlp.linear_1.weight.dtype))


class LatentPositionEmbedding(nn.Module):
    """A fixed 2-D sine-cosine table over a ``max_size x max_size`` token grid, looked up by flattened position."""

    def __init__(self, max_size: int, hidden_size: int):
        super().__init__()
        from diffusers.models.embeddings import get_2d_sincos_pos_embed

        table = get_2d_sincos_pos_embed(hidden_size, max_size, base_size=max_size, output_type="pt")
        self.register_buffer("table", table.float(), persistent=False)

    def forward(self, position_ids: torch.Tensor) -> torch.Tensor:
        return self.table[position_ids]


def sample_attention_masks(sample_lens: Sequence[int], nested_attention_masks: Optional[Sequence[torch.Tensor]] = None,
                           split_lens: Optional[Sequence[int]] = None,
                           attn_modes: Optional[Sequence[str]] = None) -> List[torch.Tensor]:
    """The additive ``(n_i, n_i)`` mask of every packed sample: given (``nested_attention_masks``, BAGEL's non-flex
    path) or built from the flat ``split_lens`` / ``attn_modes`` (flex path, samples delimited by ``sample_lens``)."""
    if nested_attention_masks is not None:
        return list(nested_attention_masks)
    if split_lens is None or attn_modes is None:
        raise ValueError("pass nested_attention_masks, or split_lens and attn_modes")
    masks, k = [], 0
    for n in sample_lens:
        lens, modes, acc = [], [], 0
        while acc < n:
            lens.append(int(split_lens[k]))
            modes.append(attn_modes[k])
            acc, k = acc + int(split_lens[k]), k + 1
        masks.append(attention_mask_per_sample(lens, modes))
    return masks


def packed_attention_mask(sample_lens: Sequence[int], nested_attention_masks: Optional[Sequence[torch.Tensor]] = None,
                          split_lens: Optional[Sequence[int]] = None, attn_modes: Optional[Sequence[str]] = None,
                          device=None, dtype=torch.float32) -> torch.Tensor:
    """The additive ``(1, 1, L, L)`` mask of a packed sequence: each sample sees only itself, with its own mask
    (the samples as :func:`sample_attention_masks` reads them)."""
    total = int(sum(sample_lens))
    mask = torch.full((total, total), float("-inf"), device=device, dtype=dtype)
    nested_attention_masks = sample_attention_masks(sample_lens, nested_attention_masks, split_lens, attn_modes)
    start = 0
    for n, sample_mask in zip(sample_lens, nested_attention_masks):
        mask[start : start + n, start : start + n] = sample_mask.to(device=device, dtype=dtype)
        start += n
    return mask[None, None]


def per_sample_batch(sequence: torch.Tensor, position_ids: torch.Tensor, sample_lens: Sequence[int],
                     masks: Sequence[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The packed ``(L, D)`` sequence as a padded batch of its samples, for attention that costs ``sum n_i^2``
    instead of ``L^2``: ``(B, n_max, D)`` embeddings, ``(B, 1, n_max, n_max)`` additive masks (a padding token sees
    only itself, no real token sees it), ``(B, n_max)`` positions, and the ``(L,)`` flat indexes of the real tokens
    in the ``B * n_max`` batch (to read the packed order back)."""
    b, n_max = len(sample_lens), max(int(n) for n in sample_lens)
    batch = sequence.new_zeros(b, n_max, sequence.shape[-1])
    mask = torch.full((b, 1, n_max, n_max), float("-inf"), device=sequence.device, dtype=sequence.dtype)
    mask[:, 0].diagonal(dim1=-2, dim2=-1).zero_()
    positions = position_ids.new_zeros(b, n_max)
    rows, start = [], 0
    for i, (n, sample_mask) in enumerate(zip(sample_lens, masks)):
        n = int(n)
        batch[i, :n] = sequence[start : start + n]
        mask[i, 0, :n, :n] = sample_mask.to(device=sequence.device, dtype=sequence.dtype)
        positions[i, :n] = position_ids[start : start + n]
        rows.append(torch.arange(n, device=sequence.device) + i * n_max)
        start += n
    return batch, mask, positions, torch.cat(rows)


def aligned_condition_tokens(z: torch.Tensor, t: torch.Tensor, shapes: Sequence[Tuple[int, int]],
                             packed_vae_token_indexes: torch.Tensor, sample_lens: Sequence[int]) -> torch.Tensor:
    """``(N_vae, p*p*C)``: for every token of a target image, the token in the same grid cell of the clean condition
    image just before it in its sample (same grid); zeros for conditions, unpaired targets and dropped conditions."""
    out = torch.zeros_like(z)
    images = describe_vae_images(shapes, packed_vae_token_indexes, t, sample_lens)
    for prev, image in zip(images, images[1:]):
        if image.is_target and not prev.is_target and prev.sample == image.sample and (prev.h, prev.w) == (image.h, image.w):
            n = image.num_tokens
            out[image.token_start : image.token_start + n] = z[prev.token_start : prev.token_start + n]
    return out


class TinyBagel(nn.Module):
    """A few-layer BAGEL-shaped generator: text embeddings and VAE tokens in one packed sequence, a Qwen2 decoder,
    ``llm2vae`` reading the velocity of the target tokens."""

    def __init__(self, config: TinyBagelConfig):
        super().__init__()
        from transformers import Qwen2Config, Qwen2ForCausalLM

        self.config = config
        llm_config = Qwen2Config(
            vocab_size=config.vocab_size,
            hidden_size=config.hidden_size,
            intermediate_size=config.intermediate_size,
            num_hidden_layers=config.num_hidden_layers,
            num_attention_heads=config.num_attention_heads,
            num_key_value_heads=config.num_key_value_heads,
            max_position_embeddings=4096,
            rope_theta=config.rope_theta,
            tie_word_embeddings=True,
            use_sliding_window=False,
            sliding_window=None,
            use_cache=False,
            attn_implementation="sdpa",
            initializer_range=config.initializer_range,
        )
        self.language_model = Qwen2ForCausalLM(llm_config)
        self.hidden_size = config.hidden_size
        self.latent_patch_size = config.latent_patch_size
        self.latent_channel = config.latent_channel
        self.latent_downsample = config.vae_downsample * config.latent_patch_size
        self.max_latent_size = config.max_latent_size
        self.timestep_shift = config.timestep_shift
        self.patch_latent_dim = config.latent_patch_size ** 2 * config.latent_channel
        self.time_embedder = TimestepEmbedder(config.hidden_size, config.time_scale)
        self.vae2llm = nn.Linear(self.patch_latent_dim, config.hidden_size)
        self.llm2vae = nn.Linear(config.hidden_size, self.patch_latent_dim)
        self.latent_pos_embed = LatentPositionEmbedding(config.max_latent_size, config.hidden_size)
        nn.init.zeros_(self.llm2vae.weight)  # a fresh model predicts v = 0, as Bagel._init_weights
        nn.init.zeros_(self.llm2vae.bias)
        # SR3-style conditioning that BAGEL lacks (it sees the condition through attention only): starts at zero
        self.cond2llm = nn.Linear(self.patch_latent_dim, config.hidden_size, bias=False) if config.aligned_condition else None
        if self.cond2llm is not None:
            nn.init.zeros_(self.cond2llm.weight)

    # -- conventions ----------------------------------------------------------------------------------------------
    def map_timesteps(self, raw: torch.Tensor) -> torch.Tensor:
        """Raw packed timesteps (logits; ``-inf`` = clean) to flow time: sigmoid, then the shift."""
        t = torch.sigmoid(raw)
        return self.timestep_shift * t / (1 + (self.timestep_shift - 1) * t)

    def patchify(self, padded_latent: torch.Tensor, shapes: Sequence[Tuple[int, int]]) -> torch.Tensor:
        """``(N, C, H, W)`` padded latents -> ``(sum h*w, p*p*C)`` tokens, image by image, layout ``hwpqc``."""
        p, c = self.latent_patch_size, self.latent_channel
        tokens = []
        for latent, (h, w) in zip(padded_latent, shapes):
            grid = latent[:, : h * p, : w * p].reshape(c, h, p, w, p)
            tokens.append(torch.einsum("chpwq->hwpqc", grid).reshape(h * w, p * p * c))
        return torch.cat(tokens, dim=0)

    def unpatchify(self, tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """Inverse of :meth:`patchify` for one image: ``(h*w, p*p*C)`` -> ``(C, h*p, w*p)``."""
        p, c = self.latent_patch_size, self.latent_channel
        return torch.einsum("hwpqc->chpwq", tokens.reshape(h, w, p, p, c)).reshape(c, h * p, w * p)

    # -- the shared body: sequence in, hidden states and velocities out --------------------------------------------
    def run(self, z_t: torch.Tensor, t: torch.Tensor, *, sequence_length: int, packed_text_ids: torch.Tensor,
            packed_text_indexes: torch.Tensor, sample_lens: List[int], packed_position_ids: torch.Tensor,
            nested_attention_masks: Optional[List[torch.Tensor]] = None, split_lens: Optional[List[int]] = None,
            attn_modes: Optional[List[str]] = None, packed_latent_position_ids: torch.Tensor,
            packed_vae_token_indexes: torch.Tensor, mse_loss_indexes: torch.Tensor,
            patchified_vae_latent_shapes: Optional[Sequence[Tuple[int, int]]] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """Embed text and the VAE tokens ``z_t`` at flow times ``t``, run the decoder, return
        ``(hidden (L, D), v_hat (rows of mse_loss_indexes, p*p*C))``.  One call each of the three contract modules."""
        text = self.language_model.model.embed_tokens(packed_text_ids)
        sequence = text.new_zeros(sequence_length, self.hidden_size)
        sequence[packed_text_indexes] = text
        vae_tokens = self.vae2llm(z_t) + self.time_embedder(t) + self.latent_pos_embed(packed_latent_position_ids)
        if self.cond2llm is not None:
            if patchified_vae_latent_shapes is None:
                raise ValueError("aligned_condition needs patchified_vae_latent_shapes")
            vae_tokens = vae_tokens + self.cond2llm(aligned_condition_tokens(
                z_t, t, patchified_vae_latent_shapes, packed_vae_token_indexes, sample_lens))
        sequence[packed_vae_token_indexes] = vae_tokens.to(sequence.dtype)
        if int(sum(sample_lens)) != sequence_length:  # flex-style padding sample beyond the real tokens
            raise ValueError(f"sample_lens cover {int(sum(sample_lens))} tokens but sequence_length is {sequence_length}")
        masks = sample_attention_masks(sample_lens, nested_attention_masks, split_lens, attn_modes)
        if self.config.per_sample_attention:
            batch, mask, positions, rows = per_sample_batch(sequence, packed_position_ids, sample_lens, masks)
            hidden = self.language_model.model(
                inputs_embeds=batch, attention_mask=mask, position_ids=positions, use_cache=False
            ).last_hidden_state.flatten(0, 1)[rows]
        else:
            mask = packed_attention_mask(sample_lens, masks, device=sequence.device, dtype=sequence.dtype)
            hidden = self.language_model.model(
                inputs_embeds=sequence[None], attention_mask=mask, position_ids=packed_position_ids[None],
                use_cache=False,
            ).last_hidden_state[0]
        return hidden, self.llm2vae(hidden[mse_loss_indexes])

    # -- BAGEL's training forward ---------------------------------------------------------------------------------
    def forward(
        self,
        sequence_length: int,
        packed_text_ids: torch.LongTensor,
        packed_text_indexes: torch.LongTensor,
        sample_lens: List[int],
        packed_position_ids: torch.LongTensor,
        nested_attention_masks: Optional[List[torch.Tensor]] = None,
        split_lens: Optional[List[int]] = None,
        attn_modes: Optional[List[str]] = None,
        # understanding inputs of BAGEL's signature (text loss, ViT tokens): accepted, the bench has no ViT
        ce_loss_indexes: Optional[torch.Tensor] = None, packed_label_ids: Optional[torch.Tensor] = None,
        packed_vit_tokens: Optional[torch.Tensor] = None, packed_vit_token_indexes: Optional[torch.Tensor] = None,
        packed_vit_position_ids: Optional[torch.Tensor] = None, vit_token_seqlens: Optional[torch.Tensor] = None,
        # generation inputs
        padded_latent: Optional[torch.Tensor] = None,
        patchified_vae_latent_shapes: Optional[Sequence[Tuple[int, int]]] = None,
        packed_latent_position_ids: Optional[torch.Tensor] = None,
        packed_vae_token_indexes: Optional[torch.Tensor] = None,
        packed_timesteps: Optional[torch.Tensor] = None,
        mse_loss_indexes: Optional[torch.Tensor] = None,
    ) -> Dict[str, Optional[torch.Tensor]]:
        """``dict(mse=(num_target_tokens, p*p*C) squared error of the velocity, ce=per-token CE or None)``."""
        z0 = self.patchify(padded_latent, patchified_vae_latent_shapes)
        noise = torch.randn_like(z0)
        t = self.map_timesteps(packed_timesteps.to(z0.dtype))
        z_t = (1 - t[:, None]) * z0 + t[:, None] * noise
        hidden, v_hat = self.run(
            z_t, t, sequence_length=sequence_length, packed_text_ids=packed_text_ids,
            packed_text_indexes=packed_text_indexes, sample_lens=sample_lens, packed_position_ids=packed_position_ids,
            nested_attention_masks=nested_attention_masks, split_lens=split_lens, attn_modes=attn_modes,
            packed_latent_position_ids=packed_latent_position_ids, packed_vae_token_indexes=packed_vae_token_indexes,
            mse_loss_indexes=mse_loss_indexes, patchified_vae_latent_shapes=patchified_vae_latent_shapes,
        )
        target = noise - z0  # the velocity points from data to noise
        mse = (v_hat - target[t > 0]) ** 2
        ce = None
        if ce_loss_indexes is not None:
            logits = self.language_model.lm_head(hidden[ce_loss_indexes])
            ce = F.cross_entropy(logits, packed_label_ids, reduction="none")
        return dict(mse=mse, ce=ce)

    # -- inference ------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def predict_velocity(self, z_t: torch.Tensor, t: torch.Tensor, batch: Dict) -> torch.Tensor:
        """Velocity of the target tokens for given VAE tokens ``z_t`` (all images, conditions clean at ``t = 0``)."""
        keys = ("sequence_length", "packed_text_ids", "packed_text_indexes", "sample_lens", "packed_position_ids",
                "nested_attention_masks", "split_lens", "attn_modes", "packed_latent_position_ids",
                "packed_vae_token_indexes", "mse_loss_indexes", "patchified_vae_latent_shapes")
        return self.run(z_t, t, **{k: batch[k] for k in keys if k in batch})[1]
