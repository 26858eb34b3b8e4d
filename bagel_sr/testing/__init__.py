"""Test support shared by ``tests/`` and ``benchmarks/`` (like ``torch.testing``): fakes and small inputs.

- :mod:`.contract_model`: a minimal model that follows BAGEL's training-forward contract (math tests);
- :mod:`.fake_checkout`: a training-script-shaped module around it, for the patches without a checkout;
- :mod:`.bagel_tiny`: a tiny random BAGEL built from the real checkout at ``$BAGEL_ROOT`` (``requires_bagel``);
- :mod:`.fork_checkout`: fork-shaped checkouts generated from that checkout by small named edits;
- :mod:`.two_ranks`: run a function on two CPU ranks (gloo);
- :mod:`.user_pngs`: synthetic CT/MR exports as users bring them;
- :mod:`.builder_inputs`: tiny image trees, DICOM series, build configs and evaluation folders;
- :mod:`.ablate_grids`: an ablation grid whose training and inference are stand-in scripts;
- :mod:`.commands`: run the project's commands as a user does;
- :mod:`.validation_sets`: a tiny built set with a val split, sized for the dry run's model.

The top layer of the package: nothing in ``bagel_sr`` imports it. It needs ``pytest`` and the ``data`` extra.
"""
