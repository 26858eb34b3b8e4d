"""The math of the pixel term on plain tensors: flow conventions, token layout, gates, losses, crop windows."""
import math

import pytest
import torch

from bagel_sr import decoding, flow, losses, packing


def test_z0_hat_equals_z0_when_velocity_is_exact():
    g = torch.Generator().manual_seed(0)
    z0, noise = torch.randn(10, 64, generator=g), torch.randn(10, 64, generator=g)
    t = torch.rand(10, 1, generator=g)
    z_t = flow.interpolate(z0, noise, t)
    torch.testing.assert_close(flow.z0_from_velocity(z_t, t, flow.velocity(z0, noise)), z0, atol=1e-6, rtol=0)


@pytest.mark.parametrize("hw", [(4, 4), (2, 5), (3, 7), (1, 1), (5, 2)])
def test_unpatchify_inverts_bagel_layout(hw):
    h, w = hw
    p, c = 2, 16
    latent = torch.randn(c, h * p + 3, w * p + 1)  # padded latents are cropped top-left
    tokens = packing.patchify_latent(latent, h, w, p)
    assert tokens.shape == (h * w, p * p * c)
    # layout (c, h, p, w, q) -> (h, w, p, q, c): token (i, j) row i*w + j, entry (a, b, ch) at (a*p + b)*c + ch
    i, j, a, b, ch = h - 1, w - 1, 1, 0, 5
    assert tokens[i * w + j, (a * p + b) * c + ch] == latent[ch, i * p + a, j * p + b]
    torch.testing.assert_close(packing.unpatchify(tokens, h, w, p, c), latent[:, : h * p, : w * p])


def test_shift_and_inverse():
    t = torch.linspace(0, 1, 11)
    for s in (1.0, 3.0, 0.5):
        torch.testing.assert_close(flow.unshift_timesteps(flow.shift_timesteps(t, s), s), t)
    assert flow.shift_timesteps(0.5, 3.0) == pytest.approx(0.75)
    assert float(flow.raw_to_t(torch.tensor(float("-inf")), 3.0)) == 0.0


def test_gates():
    t = torch.tensor([0.0, 0.1, 0.3, 0.31, 0.9])
    assert flow.gate_weight(t, 0.3, "hard").tolist() == [1, 1, 1, 0, 0]
    torch.testing.assert_close(flow.gate_weight(t, 0.3, "ramp"), torch.tensor([1.0, 2 / 3, 0.0, 0.0, 0.0]))
    with pytest.raises(ValueError, match="schedule"):
        flow.gate_weight(t, 0.3, "cosine")


@pytest.mark.parametrize("shift,expected", [(1.0, 0.20), (3.0, 0.03)])
def test_admitted_share_matches_known_values_and_monte_carlo(shift, expected):
    share = flow.admitted_share(0.3, shift)
    assert share == pytest.approx(expected, abs=0.01)
    raw = torch.randn(400_000, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    mc = float((flow.raw_to_t(raw, shift) <= 0.3).double().mean())
    assert share == pytest.approx(mc, abs=0.003)
    assert flow.mean_gate_weight(0.3, shift, "hard") == pytest.approx(share, abs=1e-3)
    assert flow.mean_gate_weight(0.3, shift, "ramp") < share


def test_per_image_losses():
    x = torch.zeros(2, 3, 4, 4)
    y = torch.zeros(2, 3, 4, 4)
    y[0] = 0.5
    y[1, 0, 0, 0] = -2.0
    assert losses.per_image_loss(y, x, "l2").tolist() == pytest.approx([0.25, 4.0 / 48])
    assert losses.per_image_loss(y, x, "l1").tolist() == pytest.approx([0.5, 2.0 / 48])
    ch = losses.per_image_loss(y, x, "charbonnier", eps=1e-3)
    assert ch[0] == pytest.approx(math.sqrt(0.25 + 1e-6) - 1e-3)
    assert float(losses.per_image_loss(x, x, "charbonnier")[0]) == 0.0
    with pytest.raises(ValueError, match="l2"):
        losses.per_image_loss(x, x, "l4")


def _mixed_batch_images():
    # samples: t2i | edit | edit whose condition was dropped | two-step chain | flex padding sample
    shapes = [(2, 2), (2, 2), (3, 2), (2, 3), (1, 2), (1, 2), (1, 2), (1, 2)]
    roles = ["T", "C", "T", "T", "C", "T", "C", "T"]
    lens_tokens = []
    positions, pos = [], 0
    sample_of = [0, 1, 1, 2, 3, 3, 3, 3]
    layout = {0: [("text", 3), 0], 1: [1, ("text", 2), 2], 2: [("text", 4), 3], 3: [4, ("text", 1), 5, 6, ("text", 2), 7]}
    sample_lens = []
    for s in range(4):
        start = pos
        for item in layout[s]:
            if isinstance(item, tuple):
                pos += item[1]
            else:
                h, w = shapes[item]
                positions += list(range(pos, pos + h * w))
                pos += h * w
        sample_lens.append(pos - start)
    sample_lens.append(7)  # flex padding
    t = []
    for (h, w), r in zip(shapes, roles):
        t += [0.0 if r == "C" else 0.2] * (h * w)
    return packing.describe_vae_images(shapes, torch.tensor(positions), torch.tensor(t), sample_lens), sample_of


def test_pairing_on_a_mixed_packed_batch():
    images, sample_of = _mixed_batch_images()
    assert [im.sample for im in images] == sample_of
    paired = [packing.is_paired(im, images) for im in images]
    #          t2i    cond   edit  dropped cond  chain1 cond(chain1) chain2
    assert paired == [False, False, True, False, False, True, False, True]
    targets = [im for im in images if im.is_target]
    assert [im.target_start for im in targets] == [0, 4, 10, 16, 18]


def test_describe_rejects_inconsistent_batches():
    with pytest.raises(ValueError, match="inconsistent"):
        packing.describe_vae_images([(2, 2)], torch.arange(3), torch.zeros(3), [3])


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


def test_a_condition_after_its_target_does_not_pair_it():
    """Pairing needs the clean condition *before* the target in the same sample (a chain re-adds targets as
    conditions after themselves: those are not their ground truth's inputs)."""
    #         sample 0: target, text, condition       sample 1: condition, text, target
    shapes, positions = [(1, 2), (1, 2), (1, 2), (1, 2)], [0, 1, 4, 5, 8, 9, 12, 13]
    t = torch.tensor([0.2, 0.2, 0.0, 0.0, 0.0, 0.0, 0.2, 0.2])
    images = packing.describe_vae_images(shapes, torch.tensor(positions), t, [8, 8])
    assert [(im.sample, im.is_target) for im in images] == [(0, True), (0, False), (1, False), (1, True)]
    assert [packing.is_paired(im, images) for im in images] == [False, False, False, True]
