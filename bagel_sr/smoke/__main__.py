"""``python -m bagel_sr.smoke``: see :mod:`bagel_sr.smoke.dry_run`."""
import sys

from .dry_run import main

sys.exit(main())
