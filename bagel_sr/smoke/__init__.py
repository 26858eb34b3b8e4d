"""The CPU dry run of a checkout's own ``main()`` (``python -m bagel_sr.smoke --bagel_root PATH ...``).

Modules: ``dry_run`` (the CLI, the two launches and their checks), ``preflight`` and ``feed`` (what the loader will
get from your data), ``watch`` (capped logs, stall stop), ``checkout_flags`` (the flags a fork's script declares),
``launch_errors`` (a failed launch in one line), ``data`` / ``model`` (the tiny set and model folder it makes
without yours), ``cpu_main`` / ``cpu_cuda`` (the CPU mapping of CUDA calls) and ``rows`` (those as registry rows,
added to :data:`bagel_sr.patches.registry.PATCHES` on import).
"""
from bagel_sr.patches import registry

from .rows import DRY_RUN_PATCHES

registry.register(*DRY_RUN_PATCHES)
