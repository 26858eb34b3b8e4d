"""``python -m bagel_sr.gpu_check``: see :mod:`bagel_sr.gpu_check.check`."""
import sys

from .check import entry

sys.exit(entry())
