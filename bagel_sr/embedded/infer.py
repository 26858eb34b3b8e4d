"""Restoration with a run of the embedded demo on CPU, through the evaluation's ``infer`` (same flags, outputs and
ledger)::

    python -m bagel_sr.embedded.infer --inputs MANIFEST.jsonl|DIR --out OUTPUTS --embedded_run outputs/embedded/seed0/pixel
"""
import argparse
import sys
from typing import Optional, Sequence, Tuple

from bagel_sr.errors import ArgumentParser, cli_main
from bagel_sr.eval import infer
from bagel_sr.eval.fidelity import FidelityArgs

from . import inference


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = ArgumentParser(prog="python -m bagel_sr.embedded.infer", description=__doc__.split("\n\n")[0])
    infer.add_common_flags(p)
    p.add_argument("--embedded_run", required=True, help="a run folder of the embedded demo (e.g. outputs/embedded/seed0/pixel)")
    return p.parse_args(argv)


def demo_backend(args: argparse.Namespace, sampling: infer.SamplingArgs, fidelity: FidelityArgs):
    """``restore(image, instruction[, seed])`` with the run's EMA weights and the demo's sampler."""
    fidelity_aware = {**({"start_t": fidelity.start_t} if fidelity.start_t < 1.0 else {}),
                      **({"one_step": True} if fidelity.one_step else {})}
    return inference.embedded_restorer(args.embedded_run, num_timesteps=sampling.num_timesteps,
                                       timestep_shift=sampling.timestep_shift, seed=args.seed, **fidelity_aware)


def main(argv: Optional[Sequence[str]] = None) -> Tuple[int, int]:
    """Restore the inputs into ``--out`` with an embedded run; returns ``(restored, already there)``."""
    return infer.restore_all(parse_args(argv), demo_backend)


if __name__ == "__main__":
    sys.exit(cli_main(main))
