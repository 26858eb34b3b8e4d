"""The embedded bench's autoencoder: a linear 8x8 patch code plus a diffusers ``AutoencoderDC`` residual.

BAGEL's latent geometry (8x downsampling, 16 channels) on a CPU budget.  A plain small ``AutoencoderKL`` trained for
an hour here stays near 26 dB on held-out high-resolution patches, far below what a good tokenizer gives; the pixel
loss cannot beat that ceiling.  So the code has two paths that add up:

- a *linear* patch code: ``Conv2d(3, 16, 8, stride 8)`` in, ``ConvTranspose2d(16, 3, 8, stride 8)`` out, initialised
  to the top 16 principal components of 8x8 training patches (:func:`pca_init`), which alone reconstructs the bench's
  images at about 30 dB;
- a *nonlinear* residual: a small ``diffusers.AutoencoderDC`` (residual blocks, pixel-(un)shuffle resampling,
  Chen et al. 2024) whose encoder and decoder output convolutions start at zero, so training starts from the linear
  code and only adds to it.

``encode(x).latent`` is ``(N, 16, H/8, W/8)`` (deterministic: there is no posterior to sample) and
``decode(z).sample`` is ``(N, 3, H, W)`` in [-1, 1]: the output types of diffusers' autoencoders, so
:class:`bagel_sr.decoding.DiffusersVAE` wraps it like an ``AutoencoderKL``.  ``decoder`` is the ``AutoencoderDC``
decoder (its ``ResBlock`` s are what decoder checkpointing recomputes; the linear path is one cheap layer).
"""
from typing import Dict, Sequence

import torch
from torch import nn

PATCH = 8  # BAGEL's VAE downsampling factor
LATENT_CHANNELS = 16


def residual_config(block_out_channels: Sequence[int] = (32, 64, 128, 128)) -> Dict:
    """``AutoencoderDC`` keyword arguments for the residual: ``len(block_out_channels) - 1`` pixel-unshuffle steps
    (4 blocks = 8x), one ``ResBlock`` per block, no attention, no parameter-free shortcuts (the linear path is the
    shortcut)."""
    n = len(block_out_channels)
    if 2 ** (n - 1) != PATCH:
        raise ValueError(f"{n} blocks give {2 ** (n - 1)}x downsampling; BAGEL's geometry needs {PATCH}x (4 blocks)")
    return dict(
        in_channels=3,
        latent_channels=LATENT_CHANNELS,
        encoder_block_types="ResBlock",
        decoder_block_types="ResBlock",
        encoder_block_out_channels=list(block_out_channels),
        decoder_block_out_channels=list(block_out_channels),
        encoder_layers_per_block=[1] * n,
        decoder_layers_per_block=[1] * n,
        encoder_qkv_multiscales=[[]] * n,
        decoder_qkv_multiscales=[[]] * n,
        encoder_out_shortcut=False,
        decoder_in_shortcut=False,
    )


class LinearPlusResidualAutoencoder(nn.Module):
    """``z = E_lin(x) + E_res(x)``, ``x_hat = D_lin(z) + D_res(z)`` (module docstring)."""

    def __init__(self, residual: Dict):
        super().__init__()
        from diffusers import AutoencoderDC

        self.encode_linear = nn.Conv2d(3, LATENT_CHANNELS, PATCH, stride=PATCH)
        self.decode_linear = nn.ConvTranspose2d(LATENT_CHANNELS, 3, PATCH, stride=PATCH)
        self.residual = AutoencoderDC(**residual)
        for conv in (self.residual.encoder.conv_out, self.residual.decoder.conv_out):
            nn.init.zeros_(conv.weight)
            nn.init.zeros_(conv.bias)

    @property
    def decoder(self) -> nn.Module:
        return self.residual.decoder

    def encode(self, x: torch.Tensor):
        from diffusers.models.autoencoders.vae import EncoderOutput

        return EncoderOutput(latent=self.encode_linear(x) + self.residual.encode(x).latent)

    def decode(self, z: torch.Tensor):
        from diffusers.models.autoencoders.vae import DecoderOutput

        return DecoderOutput(sample=self.decode_linear(z) + self.residual.decode(z).sample)

    @torch.no_grad()
    def pca_init(self, gray: torch.Tensor) -> float:
        """Set the linear path to the top-16 principal components of the 8x8 patches of ``gray`` ((N, H, W) in
        [-1, 1], grayscale; the three input channels are averaged, the three outputs equal).  The mean is one scalar
        (a transposed convolution has one bias per channel), so the components are those of ``patches - mean``.
        Returns the share of that variance the 16 components keep."""
        patches = gray.unfold(-2, PATCH, PATCH).unfold(-2, PATCH, PATCH).reshape(-1, PATCH * PATCH).double()
        mean = patches.mean()
        _, s, vt = torch.linalg.svd(patches - mean, full_matrices=False)
        comps = vt[:LATENT_CHANNELS].float()  # (16, 64), orthonormal rows
        kernel = comps.reshape(LATENT_CHANNELS, 1, PATCH, PATCH)
        self.encode_linear.weight.copy_(kernel.expand(-1, 3, -1, -1) / 3)
        self.encode_linear.bias.copy_(-comps.sum(1) * float(mean))
        self.decode_linear.weight.copy_(kernel.expand(-1, 3, -1, -1))
        self.decode_linear.bias.fill_(float(mean))
        return float(s[:LATENT_CHANNELS].square().sum() / s.square().sum())
