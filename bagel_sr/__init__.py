"""bagel-sr: pixel-fidelity losses for BAGEL's rectified-flow training.

Importing this package never imports a BAGEL checkout; the patches in ``bagel_sr.patches`` do that at run time.
"""
from .config import CONSERVATIVE_DEFAULTS, PixelLossConfig, pixel_loss_arguments_class
from .extension import MissingGroundTruthError, PixelLossState, with_pixel_loss

__version__ = "0.1.0"
__all__ = [
    "CONSERVATIVE_DEFAULTS",
    "MissingGroundTruthError",
    "PixelLossConfig",
    "PixelLossState",
    "pixel_loss_arguments_class",
    "with_pixel_loss",
]
