"""``python -m bagel_sr.data build CONFIG.yaml [--overwrite] [--output-dir DIR] [--no-progress] [--world_size N]
[--num_workers K] [--vlm_sft_from JSONL [--vlm_sft_images DIR]]``;
``python -m bagel_sr.data template NAME --input DIR --output DIR [-o FILE]`` (a ready build config).

Exit codes: 0 built, 1 no pairs produced, 2 bad config or an output that must not be touched.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Sequence

from . import text_group
from .build import build_dataset
from .config import load_build_config
from ..errors import ArgumentParser, cli_main as _cli_main
from . import template
from .errors import BuildError, ConfigError


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` and build; a user error prints one line and returns 2 (no pairs: 1)."""
    return _cli_main(_main, argv)


def _main(argv: Sequence[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m bagel_sr.data", description="Build paired restoration datasets in BAGEL's editing format.")
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="build (or resume) a paired restoration set from a YAML config")
    b.add_argument("config", help="build config YAML (see bagel_sr/data/templates/*.yaml)")
    b.add_argument("--overwrite", action="store_true", help="delete an existing build in output_dir and start again")
    b.add_argument("--output-dir", help="override output_dir (relative to the current directory)")
    b.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    b.add_argument("--world_size", type=int, default=None, help="GPUs (ranks) the train row groups must feed "
                   "(default: bagel.world_size, 2 = the dry run's ranks)")
    b.add_argument("--num_workers", type=int, default=None, help="data-loader workers per rank the row groups must "
                   "feed (default: bagel.num_workers, 1)")
    b.add_argument("--vlm_sft_from", metavar="JSONL", help="your chat set (BAGEL's vlm_sft jsonl), added to the "
                   "dataset config as the mandatory text group that --visual_und True needs")
    b.add_argument("--vlm_sft_images", metavar="DIR", help="folder the chat set's image paths are relative to "
                   "(default: the jsonl's folder)")
    t = sub.add_parser("template", help="write a packaged build config with your paths filled in",
                       description="Templates:\n" + template.describe(),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    t.add_argument("name", nargs="?", help="template name (run without one to list them)")
    t.add_argument("--input", help="your folder (or file) of scans: sets input.path")
    t.add_argument("--output", help="where the build writes the set: sets output_dir")
    t.add_argument("-o", "--out_file", help="write the config here (default: print it); refuses to replace a file")
    args = parser.parse_args(argv)
    if args.command == "template":
        return _template(args)

    cfg = load_build_config(args.config)
    if args.output_dir:
        cfg.data["output_dir"] = os.path.abspath(args.output_dir)
    for key in ("world_size", "num_workers"):
        value = getattr(args, key)
        if value is not None:
            if value < 1:
                raise ConfigError(f"--{key} {value}: must be an integer >= 1")
            cfg.data["bagel"][key] = value
    if args.vlm_sft_from:  # checked before the build, added after it
        text_group.check_chat_jsonl(Path(args.vlm_sft_from).absolute(), Path(
            args.vlm_sft_images or Path(args.vlm_sft_from).absolute().parent).absolute())
    try:
        summary = build_dataset(cfg, overwrite=args.overwrite, progress=not args.no_progress)
    except BuildError as e:
        if getattr(e, "summary", None) is not None:
            print(e.summary.format())
        raise
    if args.vlm_sft_from:
        print(text_group.add_text_group(summary.output_dir, summary.name, args.vlm_sft_from, args.vlm_sft_images))
    print(summary.format())
    return 0


def _template(args: argparse.Namespace) -> int:
    if not args.name:
        print("Templates (python -m bagel_sr.data template NAME --input DIR --output DIR -o FILE):\n"
              + template.describe())
        return 0
    config_dir = os.path.dirname(os.path.abspath(args.out_file)) if args.out_file else None
    text = template.render(args.name, args.input, args.output, config_dir)
    if not args.out_file:
        sys.stdout.write(text)
        return 0
    if os.path.exists(args.out_file):
        raise ConfigError(f"-o {args.out_file} exists; remove it or choose another file")
    os.makedirs(config_dir, exist_ok=True)
    with open(args.out_file, "w", encoding="utf-8") as f:
        f.write(text)
    print(f"wrote {args.out_file}; check it, then: python -m bagel_sr.data build {args.out_file}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
