"""The main job (``bagel_sr.train``): ``python train/main_sr_pixel_loss.py`` or, from any folder,
``python -m bagel_sr.train.main_sr_pixel_loss``."""
