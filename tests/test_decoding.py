"""Decoding (bagel_sr.decoding): crop windows that align with the ground truth, the checkpointed decoder."""
import pytest
import torch

from bagel_sr import decoding


class _NearestDecoder(torch.nn.Module):
    """decode(z) = 8x nearest upsampling of channels 0..2: output pixel (y, x) comes from latent (y//8, x//8)."""

    def decode(self, z):
        return torch.nn.functional.interpolate(z[:, :3], scale_factor=8, mode="nearest")


@pytest.mark.parametrize("seed", range(5))
def test_crop_window_aligns_with_ground_truth(seed):
    g = torch.Generator().manual_seed(seed)
    hl, wl = 12, 10
    z = torch.randn(1, 16, hl, wl, generator=g)
    full = _NearestDecoder().decode(z)[0]
    win = decoding.crop_window(hl, wl, crop=4, margin=2, generator=g)
    top, left, bottom, right = win.outer
    part = _NearestDecoder().decode(z[:, :, top:bottom, left:right])[0]
    rs, cs = win.inner_in_outer(8)
    rows, cols = win.inner_pixels(8)
    torch.testing.assert_close(part[:, rs, cs], full[:, rows, cols])
    assert part[:, rs, cs].shape[-2:] == (32, 32)
    assert win.outer[0] <= win.inner[0] and win.outer[2] >= win.inner[2]


def test_crop_larger_than_latent_is_whole_image():
    win = decoding.crop_window(4, 6, crop=16, margin=3)
    assert win.inner == (0, 0, 4, 6) and win.outer == (0, 0, 4, 6)


def test_checkpointed_decoder_matches_plain_decode_and_gradients():
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    kl = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(8, 8, 8, 8),
                       down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                       layers_per_block=1, norm_num_groups=4)
    vae = decoding.DiffusersVAE(kl, 0.5, 0.1).requires_grad_(False)
    z = torch.randn(1, 16, 4, 4, requires_grad=True)
    a = decoding.decode(vae, z, checkpointing=False)
    (ga,) = torch.autograd.grad(a.square().sum(), z)
    with decoding.checkpointed_decoder(vae) as n:
        assert n >= 5  # mid block + 4 up blocks
    b = decoding.decode(vae, z, checkpointing=True)
    (gb,) = torch.autograd.grad(b.square().sum(), z)
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(ga, gb)
    assert not any("forward" in vars(m) for m in vae.modules())  # patches removed
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    assert decoding.decode(vae, vae.encode_mean(x)).shape == x.shape
