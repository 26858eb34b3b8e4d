"""``python -m bagel_sr.lora merge ...`` and ``python -m bagel_sr.lora plan ...`` (see :mod:`.merge`, :mod:`.plan`)."""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from bagel_sr.errors import cli_main


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bagel_sr.lora", description="LoRA adapters of BAGEL: merge one into "
                                "a released model folder, or compute what LoRA saves in memory.")
    sub = p.add_subparsers(dest="command", required=True)
    m = sub.add_parser("merge", help="write a model folder with an adapter merged into its ema.safetensors")
    m.add_argument("--model_path", required=True, help="the released model folder the adapter was trained on")
    m.add_argument("--adapter", required=True, help="a LoRA run's checkpoint folder or an adapter folder")
    m.add_argument("--out", required=True, help="the new model folder to write")
    m.add_argument("--live", action="store_true", help="merge the live adapter of a checkpoint, not its EMA")
    q = sub.add_parser("plan", help="trainable parameters and per-GPU memory: full fine-tuning vs LoRA")
    src = q.add_mutually_exclusive_group(required=True)
    src.add_argument("--config", help="a built-in preset of released configs (7b-mot)")
    src.add_argument("--model_path", help="a released model folder (its llm_config.json, vit_config.json)")
    q.add_argument("--bagel_root", default=None, help="your BAGEL checkout (or BAGEL_ROOT): its classes build the model")
    q.add_argument("--ranks", default="8,16,64", help="comma-separated LoRA ranks to compare")
    q.add_argument("--gpus", default="1,2,4,8", help="comma-separated GPU counts (FULL_SHARD)")
    q.add_argument("--targets", default="mot", help="LoRA targets: a preset (mot, gen) or module-name globs")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "merge":
        from .merge import merge

        out = merge(args.model_path, args.adapter, args.out, live=args.live)
        print(f"merged: {out}/ema.safetensors (loads into stock BAGEL with strict=True)")
        return 0
    from .plan import main as plan_main

    return plan_main(args)


if __name__ == "__main__":
    sys.exit(cli_main(main))
