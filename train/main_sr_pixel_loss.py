#!/usr/bin/env python
"""Train BAGEL with the bagel-sr pixel-fidelity loss through the checkout's own training loop.

    torchrun --nproc_per_node 8 train/main_sr_pixel_loss.py --bagel_root PATH <BAGEL's flags> [--pixel_loss_* ...]
    torchrun --nproc_per_node 8 -m bagel_sr.train.main_sr_pixel_loss ...      # the same from any folder

With a checkout (``--bagel_root`` or ``BAGEL_ROOT``) the wrapper (``bagel_sr.patches.launch``) patches its training
script and runs its own ``main()``. Without one it runs the embedded demo (``bagel_sr.embedded``) on CPU with the
same ``--pixel_loss_*`` flags. See the README for every flag.
"""
import sys
from typing import Any, Optional, Sequence

import bagel_sr.validation  # noqa: F401 (registers validation's rows for --bagel_sr_val_datasets)
from bagel_sr.config import CONSERVATIVE_DEFAULTS, DEMO_PIXEL_OVERRIDES, PixelLossConfig, flag_name
from bagel_sr.embedded import experiment
from bagel_sr.errors import UsageError, cli_main
from bagel_sr.patches import launch


def demo_help_preamble() -> str:
    """What ``--help`` says without a checkout: the wrapper's flags, then where the demo's defaults differ and why."""
    stock, differ = PixelLossConfig(**CONSERVATIVE_DEFAULTS), DEMO_PIXEL_OVERRIDES
    lines = ["Without a checkout this command runs the embedded demo (a small BAGEL-shaped model on CPU, built-in data);",
             "with --bagel_root PATH (or BAGEL_ROOT) it runs your checkout's training script and --help lists its flags.",
             "", launch.wrapper_help(), ""]
    if differ:
        lines.append("The demo's pixel-loss defaults differ from the wrapper's in the cost controls, because on its tiny "
                     "model one decoder pass costs about as much as a training step:")
        lines += [f"  --{flag_name(k)} {v} (wrapper: {getattr(stock, k)})" for k, v in differ.items()]
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> Any:
    """The main job: the wrapper on a checkout, or the embedded demo without one."""
    wargs = launch.parse_wrapper_args(sys.argv[1:] if argv is None else argv)
    if launch.checkout_root(wargs):
        return launch.run(wargs)
    launch.validation_settings(wargs)  # refuses val sets without a checkout, in one line
    if wargs.lora.enabled:
        raise UsageError("--bagel_sr_lora_rank needs a BAGEL checkout (--bagel_root PATH); the embedded demo trains "
                         "its small model in full")
    if wargs.help:
        print(demo_help_preamble() + "\n", flush=True)
    else:
        print("bagel-sr: no BAGEL checkout given; running the embedded default (a small BAGEL-shaped model on CPU).\n"
              + launch.HOW_TO_POINT, flush=True)
    return experiment.main(wargs.rest + wargs.pixel_flags)  # the demo parses them, over its own defaults


if __name__ == "__main__":
    sys.exit(cli_main(main))  # a user error: one line, exit 2
