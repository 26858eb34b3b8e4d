"""What ``ablate plan`` checks before it writes anything, so that nothing fails after the training has run.

- commands: ``$VARS`` and ``~`` in ``base_command`` / ``eval.infer_command`` are expanded (an unset variable is
  refused); the default base command runs the wrapper as a module with this interpreter, so it works from any folder;
- flags: every training flag against ``BASE --help`` and every swept inference flag against ``INFER --help`` (both
  at once, while the eval block is checked; a ``torchrun`` launcher is asked through ``python`` directly: one
  process, no process group);
- the ``eval`` block: every refusal of ``ablate report`` (keys, settings, baseline, sort_by, plots, the manifest's
  split and references, ``hu_window`` against the units the references were stored in).

Progress goes to stderr, one line per step.
"""
from __future__ import annotations

import os
import re
import shlex
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Sequence

from bagel_sr.errors import BadInput, MissingInput

#: The wrapper (``train/main_sr_pixel_loss.py``) as a module of the installed package: runs from any folder.
WRAPPER_MODULE = "bagel_sr.train.main_sr_pixel_loss"
#: The two restoring commands (a checkout's model, the embedded demo's runs); both default to --split test.
INFER_MODULES = ("bagel_sr.eval.infer", "bagel_sr.embedded.infer")
#: Keys of a grid's ``eval`` block (``ablate report`` reads these; anything else is a typo).
EVAL_KEYS = ("infer_command", "outputs", "references", "manifest", "split", "data_range", "convention",
             "ssim_window", "hu_window", "color", "hallucination_threshold", "baseline", "n_boot", "grid_images",
             "data_consistency", "lpips_weights", "bits_stored", "lesions", "lesion_fp_per_image")
#: Metrics ``sort_by`` may name (``ssim`` is the settings' SSIM window).
SORTABLE = ("psnr", "ssim", "ssim_uniform7", "ssim_gaussian11", "nmse", "nrmse", "hfen", "lpips", "dc_psnr",
            "dc_nrmse", "dc_band_nrmse", "null_energy_fraction", "err_band_nrmse", "err_null_nrmse",
            "halluc_share", "bg_mean", "std_spearman", "std_within_2")
_UNSET = re.compile(r"\$(\{[A-Za-z_]\w*\}|[A-Za-z_]\w*)")
_TILDE = re.compile(r"(?<![^\s=])~(?=/|\s|$)")


def default_base_command() -> list[str]:
    """``python -m bagel_sr.train.main_sr_pixel_loss`` with the interpreter running ablate (embedded default without a
    checkout; ``--bagel_root``/``BAGEL_ROOT`` for a checkout)."""
    return [sys.executable, "-m", WRAPPER_MODULE]


def expand(command: str | Sequence[str]) -> str | list[str]:
    """``$VAR``/``${VAR}`` from the environment and a leading ``~`` (also after ``=``) in every word; an unset
    variable is left as written (:func:`check_expanded` refuses it at plan time)."""
    def one(text: str) -> str:
        return _TILDE.sub(lambda m: os.path.expanduser("~"), os.path.expandvars(text))

    return one(command) if isinstance(command, str) else [one(str(w)) for w in command]


def check_expanded(command: str | Sequence[str], what: str) -> None:
    """Refuse a command that still names an unset environment variable."""
    text = command if isinstance(command, str) else " ".join(command)
    found = _UNSET.search(text)
    if found:
        name = found.group(1).strip("{}")
        raise BadInput(f"{what} uses ${name}, which is not set in this shell; export {name}=... (e.g. "
                       f"export {name}=~/Bagel) or write the path itself")


def help_command(command: str | Sequence[str]) -> list[str]:
    """The command to ask for ``--help``: the command itself, or, for ``torchrun ... SCRIPT|-m MODULE ARGS``, the
    script or module run once by this interpreter (no processes per GPU, no rendezvous)."""
    words = shlex.split(command) if isinstance(command, str) else [str(w) for w in command]
    if not words or Path(words[0]).name != "torchrun":
        return words
    from torch.distributed.run import get_args_parser

    try:
        a = get_args_parser().parse_args(words[1:])
    except SystemExit:
        raise BadInput(f"base_command {shlex.join(words)!r}: torchrun cannot parse its options") from None
    if a.no_python:
        return [a.training_script, *a.training_script_args]
    return [sys.executable, *(["-m"] if a.module else []), a.training_script, *a.training_script_args]


def progress_printer(enabled: bool) -> Callable[[str], None]:
    """``say(text)``: one line on stderr with the seconds since the first line (nothing when disabled)."""
    start = time.monotonic()

    def say(text: str) -> None:
        if enabled:
            print(f"ablate plan [{time.monotonic() - start:5.1f}s] {text}", file=sys.stderr, flush=True)

    return say


def start_flag_checks(cfg: dict[str, Any], base: str | Sequence[str], infer: str | Sequence[str] | None,
                      workdir: Path, say: Callable[[str], None]) -> Callable[[], None]:
    """Start ``BASE --help`` and ``INFER --help`` side by side (other checks run meanwhile); returns ``finish()``,
    which waits for them and checks the grid's training and inference flags against what they list."""
    from .ablate import check_flags, target_flags
    from .ablate_infer import check_infer_flags, program_words

    check_expanded(base, "base_command")
    if infer:
        check_expanded(infer, "eval.infer_command")
    base_help = help_command(base)
    infer_help = program_words(infer) if infer else None
    say(f"asking {shlex.join(program_words(base_help) or base_help)} ... --help for the training flags"
        + (f" and {shlex.join(infer_help)} --help for the inference flags" if infer_help else ""))
    pool = ThreadPoolExecutor(max_workers=2)
    train = pool.submit(target_flags, base_help, workdir)
    inf = pool.submit(target_flags, infer_help, workdir, what="eval.infer_command") if infer_help else None
    pool.shutdown(wait=False)

    embedded = (WRAPPER_MODULE in base_help or any(w.endswith("main_sr_pixel_loss.py") for w in base_help)) and not (
        any(w.split("=")[0] == "--bagel_root" for w in base_help) or os.environ.get("BAGEL_ROOT"))

    def finish() -> None:
        try:
            check_flags(cfg, train.result())
        except BadInput as e:
            if not embedded:
                raise
            raise BadInput(f"{e} (no checkout is named, so the base command runs the embedded default, whose flags "
                           "differ: set BAGEL_ROOT or add --bagel_root PATH to base_command)") from None
        if infer is not None:
            check_infer_flags(cfg, inf.result() if inf else set())
        say("flags accepted")

    return finish


def check_eval_block(cfg: dict[str, Any], row_names: Sequence[str], run_names: Sequence[str], workdir: Path,
                     say: Callable[[str], None]) -> None:
    """Every refusal of ``ablate report`` that does not need the outputs, now (paths relative to ``workdir``)."""
    from .ablate_report import eval_settings

    ev = cfg.get("eval") or {}
    unknown = sorted(set(ev) - set(EVAL_KEYS))
    if unknown:
        raise BadInput(f"eval: unknown keys {unknown}; known keys: {', '.join(EVAL_KEYS)}")
    if not ev.get("references") and not ev.get("manifest"):
        raise BadInput("eval: the report needs eval.references (a folder of ground-truth images) or eval.manifest "
                       "(the data builder's manifest.jsonl)")
    hu = ev.get("hu_window")
    if hu is not None and not (isinstance(hu, (list, tuple)) and len(hu) == 2
                               and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in hu)):
        raise BadInput(f"eval.hu_window {hu!r}: expected [level, width] in HU, e.g. [40, 400]")
    if ev.get("lesions") is not None and not (workdir / str(ev["lesions"])).is_file():
        raise BadInput(f"eval.lesions {ev['lesions']!r}: no such file (the lesions.json a build with a lesions block "
                       "writes next to its manifest)")
    for key, kind, low in (("n_boot", int, 1), ("grid_images", int, 0), ("bits_stored", int, 1),
                           ("hallucination_threshold", float, 0), ("data_range", float, 0),
                           ("lesion_fp_per_image", float, 0)):
        v = ev.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or (kind is int and v != int(v))
                              or v < low or (key == "data_range" and v == 0)):
            raise BadInput(f"eval.{key} {v!r}: expected {'an integer' if kind is int else 'a number'} "
                           f"{'>' if key == 'data_range' else '>='} {low}")
    try:
        settings = eval_settings(ev)
    except (ValueError, KeyError) as e:
        raise BadInput(f"eval: {e}") from None
    sort_by = cfg.get("sort_by", "psnr")
    if sort_by not in SORTABLE:
        raise BadInput(f"sort_by {sort_by!r} is not a metric of the report; choose one of {', '.join(SORTABLE)}")
    baseline = ev.get("baseline")
    if baseline is not None and str(baseline) not in set(row_names) | set(run_names):
        raise BadInput(f"eval.baseline {baseline!r} names no run; runs: {', '.join(run_names)}")
    swept = {str(k).removeprefix("--") for k in (cfg.get("grid") or {})} | {
        str(k).removeprefix("--") for k in (cfg.get("infer_grid") or {})}
    swept |= {str(k).removeprefix("--") for r in cfg.get("runs") or [] for k in r if k not in ("name", "infer_flags")}
    for p in cfg.get("plots") or []:
        if str(p).removeprefix("--") not in swept:
            raise BadInput(f"plots: {p!r} is not a flag the grid varies; choose from {', '.join(sorted(swept))}")
    infer_words = shlex.split(ev["infer_command"]) if isinstance(ev.get("infer_command"), str) else [
        str(w) for w in ev.get("infer_command") or []]
    infer_split = next((infer_words[i + 1] for i, w in enumerate(infer_words[:-1]) if w == "--split"),
                       "test" if any(w in INFER_MODULES for w in infer_words) else None)  # infer's default split
    if ev.get("manifest") and infer_split and ev.get("split") and infer_split != ev.get("split"):
        raise BadInput(f"eval.split {ev['split']!r} differs from --split {infer_split} of eval.infer_command: the "
                       "report would look for outputs infer does not write")
    if ev.get("manifest"):
        _check_manifest(workdir / ev["manifest"], ev.get("split"), settings, say)
    else:
        _check_references(workdir / ev["references"], settings, say)


def _check_manifest(path: Path, split: str | None, settings, say: Callable[[str], None]) -> None:
    from . import hu
    from .pairs import Pair, _row_paths, read_manifest

    say(f"checking eval.manifest {path} ...")
    rows = [r for r in read_manifest(path) if split is None or r.get("split") == split]
    if not rows:
        splits = sorted({str(r.get("split")) for r in read_manifest(path)})
        raise BadInput(f"eval.manifest {path} has no rows" + (f" with split {split!r} (splits: {', '.join(splits)})"
                                                             if split else ""))
    unheld = sorted({str(r.get("split")) for r in rows if not (r.get("heldout") or r.get("hr_path"))})
    if unheld:
        raise BadInput(f"eval.manifest {path}: rows of split {', '.join(unheld)} have no reference images (the builder "
                       "writes them for val and test); set eval.split: test (the split infer restores)")
    pairs, missing = [], []
    for r in rows:
        ref, _ = _row_paths(r, path.parent)
        if not ref.is_file():
            missing.append(str(ref))
        pairs.append(Pair(str(r.get("pair_id")), Path(), ref, intensity=r.get("intensity")))
    if missing:
        raise MissingInput(f"eval.manifest {path}: {len(missing)} reference image(s) missing, e.g. {missing[0]}")
    hu.check_pairs(pairs, settings.hu_window)
    if not settings.hu_window and settings.convention == "plain" and settings.data_range is None and any(
            p.reference.suffix.lower() == ".npy" for p in pairs):
        raise BadInput("eval: references are float arrays (.npy); give eval.data_range, eval.hu_window or "
                       "eval.convention: fastmri")
    say(f"eval block matches the data ({len(pairs)} reference(s)"
        + (f", HU window {settings.hu_window[0]:g}/{settings.hu_window[1]:g}" if settings.hu_window else "") + ")")


def _check_references(folder: Path, settings, say: Callable[[str], None]) -> None:
    from . import hu
    from .images import list_images
    from .pairs import Pair

    say(f"checking eval.references {folder} ...")
    refs = list_images(folder)
    if not refs:
        raise MissingInput(f"eval.references {folder}: no images (.png, .tif, .tiff, .npy)")
    hu.check_pairs([Pair(k, Path(), p) for k, p in refs.items()], settings.hu_window)
    say(f"eval block matches the data ({len(refs)} reference(s))")
