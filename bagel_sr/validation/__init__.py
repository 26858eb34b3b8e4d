"""Validation inside BAGEL's own training loop (``--bagel_sr_val_datasets YAML[,YAML]``, ``--bagel_sr_val_every N``,
``--bagel_sr_val_images K``, ``--bagel_sr_val_start_t T0``, ``--bagel_sr_val_ema``): the one-step restoration of a
fixed val subset every N steps, scored with the evaluation's functions, logged as ``val_*`` keys by the loop itself.

Modules: ``loop`` (one validation and when it is due), ``fits`` (the limits a val image must fit), ``rows`` (the
registry rows that hook the script, added to :data:`bagel_sr.patches.registry.PATCHES` on import).  The settings
are :class:`bagel_sr.validation_config.ValidationConfig`; the val sets and their refusals
:mod:`bagel_sr.patches.validation_set`; the pure pieces :mod:`bagel_sr.validation_math`.
"""
from bagel_sr.patches import registry

from .rows import VALIDATION_PATCHES

registry.register(*VALIDATION_PATCHES)
