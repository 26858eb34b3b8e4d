#!/usr/bin/env python
"""Train BAGEL with the bagel-sr pixel-fidelity loss through the checkout's own training loop.

    torchrun --nproc_per_node 8 train/main_sr_pixel_loss.py --bagel_root PATH <BAGEL's flags> [--pixel_loss_* ...]

Without a checkout (no --bagel_root, no BAGEL_ROOT) it runs the embedded default experiment on CPU.
The logic lives in ``bagel_sr.patches.launch``; see the README for every flag.
"""
import sys

from bagel_sr.errors import cli_main
from bagel_sr.patches.launch import main

if __name__ == "__main__":
    sys.exit(cli_main(main))  # a user error: one line, exit 2
