"""The embedded bench: a small BAGEL-shaped model, a tiny VAE and built-in medical data, so that the pixel loss can be
tried and measured without a BAGEL checkout, a checkpoint or a GPU (``python train/main_sr_pixel_loss.py``).

Modules: ``sources`` (images shipped in pip packages, split by source), ``data`` (pairs, tokenizer, packing),
``backbone`` (``TinyBagel``, BAGEL's forward contract), ``autoencoder`` (a linear patch code plus an ``AutoencoderDC``
residual), ``vae`` (its training command and loader), ``train`` (the loop), ``sampling`` (Euler sampler, metrics),
``modes`` (the sampler's inference modes), ``experiment`` (the default run), ``experiment_settings`` (its arguments
and pixel-loss defaults), ``experiment_report`` (its tables and grid), ``lesion_bench`` (its lesion line).
"""
from ._compat import guard_broken_torchvision

guard_broken_torchvision()
