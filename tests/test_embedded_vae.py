"""The shipped VAE: BAGEL's latent geometry, a round trip above 30 dB on held-out images, and its training command."""
import json
import os

import torch

from bagel_sr.embedded import vae as V


def test_shipped_vae_geometry_and_round_trip():
    vae = V.load_vae()
    meta = V.load_meta()
    x = V.split_images("heldout")
    z = vae.encode(x[:2])
    assert z.shape == (2, 16, 8, 8)  # 8x downsampling, 16 channels
    assert abs(float(z.std()) - 1) < 0.5  # scaled latents have about unit std
    psnr = V.reconstruction_psnr(vae, x)
    assert len(psnr) == meta["heldout_images"]
    assert float(psnr.mean()) >= 30.0, float(psnr.mean())
    assert abs(float(psnr.mean()) - meta["heldout_psnr"]) < 0.5  # what the json says is what ships
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
    assert meta["config"]["latent_channels"] == 16
    reloaded = V.load_vae(str(tmp_path))
    assert reloaded.encode(torch.zeros(1, 3, 64, 64)).shape == (1, 16, 8, 8)
