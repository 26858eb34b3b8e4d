"""The shipped VAE: BAGEL's latent geometry, a round trip above 30 dB on held-out images, and its training command."""
import json
import os

import numpy as np
import pytest
import torch

from bagel_sr.embedded import vae as V


def test_shipped_vae_geometry_and_round_trip():
    vae = V.load_vae()
    meta = V.load_meta()
    targets = V.split_images("heldout", hr_only=True)  # the images every restoration metric is measured against
    z = vae.encode(targets[:2])
    assert z.shape == (2, 16, 8, 8)  # 8x downsampling, 16 channels
    assert abs(float(z.std()) - 1) < 0.5  # scaled latents have about unit std
    psnr = V.reconstruction_psnr(vae, targets)
    assert len(psnr) == meta["heldout_images"] == 24
    assert float(psnr.mean()) >= 30.0, float(psnr.mean())  # the ceiling of the bench's PSNR
    assert abs(float(psnr.mean()) - meta["heldout_psnr"]) < 0.05  # what the json says is what ships (fp16 weights)
    both = V.reconstruction_psnr(vae, V.split_images("heldout"))  # with the LR inputs the model is conditioned on
    assert float(both.mean()) >= 30.0 and abs(float(both.mean()) - meta["heldout_psnr_with_lr_inputs"]) < 0.05
    assert not any(p.requires_grad for p in vae.parameters())
    size = os.path.getsize(os.path.join(V.ASSETS, V.WEIGHTS_NAME))
    assert size < 5 * 2**20


def test_decode_has_gradients_to_the_latent():
    vae = V.load_vae()
    z = torch.zeros(1, 16, 8, 8, requires_grad=True)
    vae.decode(z).square().mean().backward()
    assert z.grad is not None and float(z.grad.abs().sum()) > 0


def test_two_step_training_command(tmp_path):
    meta = V.main(["train", "--out", str(tmp_path), "--steps", "2", "--batch_size", "2", "--eval_every", "100",
                   "--num_threads", "1"])
    assert (tmp_path / V.WEIGHTS_NAME).exists()
    saved = json.loads((tmp_path / V.META_NAME).read_text())
    assert saved["train_steps"] == 2 and "heldout_psnr" in saved and saved["scale_factor"] > 0
    assert meta["config"]["residual"]["latent_channels"] == 16
    reloaded = V.load_vae(str(tmp_path))
    assert reloaded.encode(torch.zeros(1, 3, 64, 64)).shape == (1, 16, 8, 8)


def test_linear_path_starts_as_the_principal_components_and_the_residual_at_zero():
    from bagel_sr.embedded.autoencoder import LinearPlusResidualAutoencoder, residual_config

    torch.manual_seed(0)
    ae = LinearPlusResidualAutoencoder(residual_config((8, 8, 8, 8)))
    gray = torch.rand(6, 32, 32) * 2 - 1
    gray[:, :, :16] = gray[:, :, :16].cumsum(-1) / 16  # some structure, so that a few components dominate
    kept = ae.pca_init(gray)
    # the same projection written with numpy: 8x8 patches minus their scalar mean onto the top-16 right singular vectors
    patches = gray.numpy().reshape(6, 4, 8, 4, 8).transpose(0, 1, 3, 2, 4).reshape(-1, 64).astype(np.float64)
    mean = patches.mean()
    _, s, vt = np.linalg.svd(patches - mean, full_matrices=False)
    expected = (patches - mean) @ vt[:16].T @ vt[:16] + mean
    assert abs(kept - (s[:16] ** 2).sum() / (s ** 2).sum()) < 1e-6
    x = gray[:, None].expand(-1, 3, -1, -1)
    with torch.no_grad():
        z = ae.encode(x).latent
        out = ae.decode(z).sample
    assert z.shape == (6, 16, 4, 4)
    got = out.numpy().reshape(6, 3, 4, 8, 4, 8).transpose(0, 1, 2, 4, 3, 5).reshape(6, 3, -1, 64)
    for c in range(3):  # three equal output channels
        np.testing.assert_allclose(got[:, c].reshape(-1, 64), expected, atol=1e-4)
    with torch.no_grad():  # the residual adds exactly nothing until it is trained
        assert float(ae.residual.decode(z).sample.abs().max()) == 0.0
        assert float(ae.residual.encode(x).latent.abs().max()) == 0.0


def test_shipped_decoder_checkpointing_gives_the_same_values_and_gradients():
    from bagel_sr import decoding

    vae = V.load_vae()
    z = torch.randn(2, 16, 4, 4, requires_grad=True)
    a = decoding.decode(vae, z, checkpointing=False)
    (ga,) = torch.autograd.grad(a.square().sum(), z)
    with decoding.checkpointed_decoder(vae) as n:
        assert n >= 7  # the AutoencoderDC decoder's residual and upsampling blocks
    b = decoding.decode(vae, z, checkpointing=True)
    (gb,) = torch.autograd.grad(b.square().sum(), z)
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(ga, gb)


def test_crop_must_fit_the_patch(tmp_path):
    with pytest.raises(ValueError, match="multiple of 8"):
        V.train(str(tmp_path), steps=1, crop=20, progress=False)


def test_old_configuration_is_refused_with_a_retrain_hint():
    with pytest.raises(ValueError, match="retrain"):
        V.build_autoencoder({"block_out_channels": [32, 64, 64, 64]})


def test_channel_gains_of_an_orthonormal_linear_code_are_equal_and_known():
    from bagel_sr.decoding import DiffusersVAE
    from bagel_sr.embedded.autoencoder import LinearPlusResidualAutoencoder, residual_config

    torch.manual_seed(0)
    ae = LinearPlusResidualAutoencoder(residual_config((8, 8, 8, 8)))
    ae.pca_init(torch.rand(4, 32, 32) * 2 - 1)  # residual still zero: decode is D_lin, orthonormal 8x8 components
    vae = DiffusersVAE(ae.eval(), 2.0, 0.0)
    gains = V.decoder_channel_gains(vae, torch.rand(3, 3, 32, 32) * 2 - 1)
    # a scaled-latent unit is 1/2 raw unit, spread with unit norm over 64 pixels: pixel MSE / latent MSE = 1/(4*64)
    torch.testing.assert_close(gains, torch.full((16,), 1 / 256), rtol=1e-4, atol=1e-7)
    ae.decode_linear.weight.data[3] *= 3  # one component amplified 3x: 9x the pixel cost of its latent error
    gains = V.decoder_channel_gains(vae, torch.rand(3, 3, 32, 32) * 2 - 1)
    assert abs(float(gains[3] / gains[0]) - 9) < 1e-3
