"""The one-command GPU check of a checkout (``python -m bagel_sr.gpu_check --bagel_root PATH --out DIR``).

Modules: ``check`` (the CLI: the dry run's launches on CUDA, then the step benchmark), ``step`` (one training step
of the pixel term at BAGEL-7B's widths), ``report`` (the estimate and the report), ``env`` (what the machine has).
"""
