"""LoRA adapters of BAGEL as patches to released checkpoints: ``python -m bagel_sr.lora merge|plan``.

Training with adapters is the wrapper's ``--bagel_sr_lora_rank R`` (rows of :mod:`bagel_sr.patches.lora`); here:
:mod:`.merge` writes a released model folder with an adapter merged in, :mod:`.plan` computes what LoRA saves.
"""
