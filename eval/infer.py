"""Restoration over a held-out set: a BAGEL checkout with a checkpoint (the embedded demo's runs: ``bagel_sr.embedded.infer``).

    python -m bagel_sr.eval.infer --inputs MANIFEST.jsonl|DIR --out OUTPUTS \
        --bagel_root PATH --model_path hf/BAGEL-7B-MoT [--checkpoint results/checkpoints/0005000/ema.safetensors]
    python -m bagel_sr.embedded.infer --inputs MANIFEST.jsonl|DIR --out OUTPUTS --embedded_run outputs/embedded/seed0/pixel

Outputs are ``OUTPUTS/<pair_id>.png`` (what ``bagel_sr.eval.evaluate`` reads).  Resumable: the folder's ledger
(``bagel_sr.outputs``) holds the sampling settings and a fingerprint of the weights; a rerun with the same ones
skips the outputs that exist, a rerun with other ones refuses (``--overwrite`` deletes only the outputs infer wrote
and redoes them).  Each output is written to a temporary name and renamed, so a kill loses at most the image in
flight.  With a checkout, restoration runs through the checkout's own ``InterleaveInferencer``
(editing with the condition image and the instruction), with its sampling flags.

Fidelity-aware sampling (:class:`FidelityArgs`, both restorers): ``--start_t T0`` starts from the input noised to
``T0`` (the checkout through the registry row ``patch_start_t``); ``--num_samples K --aggregate mean|median`` writes
the aggregate and a per-pixel standard deviation map (``OUTPUTS/std/<pair_id>.png`` scaled to its maximum for
looking, ``OUTPUTS/std/<pair_id>.npy`` float32 in [0, 1] image units for analysis); ``--data_consistency`` projects
the (aggregate) output onto the input's recorded degradation (``bagel_sr.data.consistency``, ``--dc_steps``).
"""
import argparse
import json
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple

from PIL import Image

from bagel_sr.errors import ArgumentParser, UserError, cli_main
from bagel_sr.outputs import Ledger, claim, file_fingerprint
from bagel_sr.patches import registry
from bagel_sr.patches.context import PatchContext
from bagel_sr.patches.released import load_checkout_inferencer

from .fidelity import (FidelityArgs, Restored, check_fidelity, posterior_restorer,  # noqa: F401 (re-exported)
                       project_on_input, save_std)

#: Flags naming weights (the embedded demo's run folder, a released model, a checkpoint): part of a folder's settings.
WEIGHT_FLAGS = ("embedded_run", "model_path", "checkpoint", "adapter")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
DEFAULT_INSTRUCTION = "Restore this image: remove the noise and recover the fine detail."


@dataclass
class SamplingArgs:
    """BAGEL's editing inference settings (names as in the checkout's ``InterleaveInferencer``)."""

    num_timesteps: int = 50
    timestep_shift: float = 3.0
    cfg_text_scale: float = 4.0
    cfg_img_scale: float = 2.0
    cfg_interval: float = 0.0
    cfg_renorm_min: float = 0.0
    cfg_renorm_type: str = "text_channel"


@dataclass
class Job:
    """One input to restore: where it is, what to call the output, which instruction to give, how it was degraded."""

    pair_id: str
    input_path: Path
    instruction: str
    degradations: Optional[list] = None


def jobs_from_manifest(path: Path, split: Optional[str], instruction: Optional[str]) -> List[Job]:
    """Held-out LR images of a ``bagel_sr.data`` build (rows with ``heldout.lr``), optionally one split."""
    jobs = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            row = json.loads(line)
            if split is not None and row.get("split") != split:
                continue
            lr = (row.get("heldout") or {}).get("lr") or row.get("lr_path")
            if lr is None:
                continue
            text = instruction or (row.get("instructions") or [DEFAULT_INSTRUCTION])[0]
            jobs.append(Job(str(row["pair_id"]), (path.parent / lr), text, list(row.get("degradations") or [])))
    if not jobs:
        raise UserError(
            f"{path}: no held-out inputs found{'' if split is None else f' for split {split!r}'}; the data builder "
            "writes them for the val and test splits (rows with heldout.lr)."
        )
    return jobs


def jobs_from_folder(path: Path, instruction: Optional[str]) -> List[Job]:
    """Every image in a folder; the output is named by the file's stem."""
    files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise UserError(f"{path}: no images ({', '.join(IMAGE_SUFFIXES)}) to restore")
    return [Job(p.stem, p, instruction or DEFAULT_INSTRUCTION) for p in files]


def pending(jobs: Sequence[Job], out: Path) -> List[Job]:
    """Jobs whose output does not exist yet."""
    return [j for j in jobs if not (out / f"{j.pair_id}.png").exists()]


def save_atomically(image: Image.Image, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    image.save(tmp, format="PNG")
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _read_input(job: Job) -> Image.Image:
    try:
        with Image.open(job.input_path) as im:
            return im.convert("RGB")
    except FileNotFoundError:
        raise UserError(f"input {job.input_path} (pair {job.pair_id}) does not exist") from None
    except OSError as e:
        raise UserError(f"input {job.input_path} (pair {job.pair_id}) is not a readable image: {e}") from None


def fit_size(result: Image.Image, image: Image.Image, job: Job, resize: bool) -> Image.Image:
    """``result`` at the input's size: as generated, resized (bicubic) only with ``--resize_output``, else refused."""
    if result.size == image.size:
        return result
    if not resize:
        raise UserError(
            f"pair {job.pair_id}: the inferencer generated {result.size[0]}x{result.size[1]} for a "
            f"{image.size[0]}x{image.size[1]} input; pass --resize_output to resize outputs to the input size "
            "(bicubic, recorded in the output folder's settings)")
    return result.resize(image.size, Image.BICUBIC)


def run_jobs(jobs: Sequence[Job], out: Path, restore: Callable[[Image.Image, str], Image.Image],
             progress: bool = True, ledger: Optional[Ledger] = None, resize: bool = False, dc_steps: int = 0
             ) -> Tuple[int, int]:
    """Restore every pending job with ``restore(image, instruction)``; returns ``(done, skipped)``.

    ``ledger``: where each output is recorded before it is written (see ``bagel_sr.outputs``); ``resize``: an
    output of another size than its input is resized to it (else :func:`fit_size` refuses).  ``restore`` may
    return a :class:`Restored` (its std map goes to ``out/std/``).  ``dc_steps > 0``: project each output onto its
    job's recorded degradations (:func:`project_on_input`).
    """
    from tqdm import tqdm

    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob(".*.png.tmp"):  # a killed run's image in flight
        stale.unlink()
    todo = pending(jobs, out)
    for job in tqdm(todo, desc="restoring", unit="image", disable=not progress):
        image = _read_input(job)
        result = restore(image, job.instruction)
        std = None
        if isinstance(result, Restored):
            result, std = result.image, result.std
        result = fit_size(result, image, job, resize)
        if dc_steps > 0 and job.degradations:
            result, _ = project_on_input(result, image, job.degradations, dc_steps)
        if std is not None:
            save_std(std, out, job.pair_id, ledger)
        if ledger is not None:
            ledger.record(f"{job.pair_id}.png")
        save_atomically(result, out / f"{job.pair_id}.png")
    if ledger is not None and not ledger.complete:
        ledger.mark_complete()
    return len(todo), len(jobs) - len(todo)


def run_settings(args: argparse.Namespace) -> Tuple[dict, Optional[str]]:
    """What an output folder's outputs depend on (flags) and a fingerprint of the weights they came from."""
    keys = ["inputs", "split", "instruction", "seed", *WEIGHT_FLAGS, "resize_output",
            *asdict(SamplingArgs()), *asdict(FidelityArgs())]
    settings = {k: getattr(args, k, None) for k in keys}
    if not settings["one_step"]:  # added later: off, folders made before it existed still resume
        del settings["one_step"]
    if not settings["adapter"]:  # the same
        del settings["adapter"]
    settings["inputs"] = str(Path(args.inputs).absolute())
    model_path, checkpoint = getattr(args, "model_path", None), getattr(args, "checkpoint", None)
    weights = getattr(args, "embedded_run", None) or checkpoint or (
        str(Path(model_path) / "ema.safetensors") if model_path else None)
    fingerprint = file_fingerprint(weights) if weights and Path(weights).exists() else None
    return settings, fingerprint


# ------------------------------------------------------------------------------------------------ a checkout

def takes_image_shapes(inferencer) -> bool:
    """Whether the inferencer's generation takes ``image_shapes`` (then the input's size is passed: a fork whose
    inferencer ignores the input image's size generates at it too)."""
    import inspect

    method = getattr(inferencer, "interleave_inference", None)
    return method is not None and "image_shapes" in inspect.signature(method).parameters


def checkout_restorer(inferencer, sampling: SamplingArgs, seed: int = 0) -> Callable[[Image.Image, str], Image.Image]:
    """``restore(image, instruction[, seed])`` through the checkout's ``InterleaveInferencer`` (editing mode),
    asking for the input's size (``image_shapes``, height first) when the inferencer takes it."""
    import torch

    hyper = dict(asdict(sampling), cfg_interval=[sampling.cfg_interval, 1.0])  # start of the CFG window, end fixed at 1
    pass_size = takes_image_shapes(inferencer)
    default_seed = seed

    def restore(image: Image.Image, instruction: str, seed: Optional[int] = None) -> Image.Image:
        torch.manual_seed(default_seed if seed is None else seed)
        on_cpu = next(inferencer.model.parameters()).device.type == "cpu"
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=on_cpu):  # the inferencer autocasts CUDA only
            size = {"image_shapes": (image.size[1], image.size[0])} if pass_size else {}
            result = inferencer(image=image, text=instruction, think=False, **hyper, **size)
        if result.get("image") is None:
            raise RuntimeError("the checkout's inferencer returned no image; is visual generation enabled?")
        return result["image"]

    return restore


# ------------------------------------------------------------------------------------------------------ CLI

def add_common_flags(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The flags every restorer shares: inputs, outputs, sampling and fidelity-aware sampling."""
    p.add_argument("--inputs", required=True, help="manifest.jsonl of a bagel_sr.data build, or a folder of images")
    p.add_argument("--split", default="test", help="manifest split to restore (default test; 'all' for every held-out row)")
    p.add_argument("--out", required=True, help="folder for <pair_id>.png outputs")
    p.add_argument("--instruction", default=None, help="instruction for every input (default: the manifest's first variant)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampling noise (default 0)")
    p.add_argument("--no_progress", action="store_true", help="hide the progress bar")
    p.add_argument("--resize_output", action="store_true",
                   help="resize an output generated at another size to its input's size (bicubic); without it such "
                   "an output stops infer")
    p.add_argument("--overwrite", action="store_true",
                   help="redo a folder made with other settings or weights (deletes only the outputs infer wrote)")
    for name, value in asdict(SamplingArgs()).items():
        p.add_argument(f"--{name}", type=type(value), default=value, help=f"BAGEL's inference setting {name} (default {value})")
    g = p.add_argument_group("fidelity-aware sampling")
    g.add_argument("--start_t", type=float, default=1.0,
                   help="start from the input noised to this flow time (1 = from pure noise, the stock sampler)")
    g.add_argument("--one_step", action="store_true",
                   help="one Euler step from the start to 0 (the model's clean estimate z_t - t v_hat)")
    g.add_argument("--num_samples", type=int, default=1, help="samples per input; >1 writes the aggregate and std/")
    g.add_argument("--aggregate", choices=("mean", "median"), default="mean", help="how K samples are combined")
    g.add_argument("--data_consistency", action="store_true",
                   help="project each output onto its input's recorded degradation (manifest rows)")
    g.add_argument("--dc_steps", type=int, default=10, help="back-projection steps of --data_consistency")
    return p


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = ArgumentParser(prog="python -m bagel_sr.eval.infer", description=__doc__.split("\n\n")[0])
    add_common_flags(p)
    p.add_argument("--bagel_root", default=os.environ.get("BAGEL_ROOT"), help="BAGEL checkout (or BAGEL_ROOT)")
    p.add_argument("--model_path", default=None, help="released model folder (configs, tokenizer, ae.safetensors)")
    p.add_argument("--checkpoint", default=None, help="weights to use (default MODEL_PATH/ema.safetensors)")
    p.add_argument("--adapter", default=None, help="a LoRA run's checkpoint folder or a peft adapter folder, merged "
                   "into the weights at load")
    return p.parse_args(argv)


#: ``make_restorer(args, sampling, fidelity) -> restore(image, instruction[, seed])``: what restores.
MakeRestorer = Callable[[argparse.Namespace, SamplingArgs, FidelityArgs], Callable[..., Image.Image]]


def restore_all(args: argparse.Namespace, make_restorer: MakeRestorer,
                check_restorer: Callable[[argparse.Namespace], None] = lambda args: None) -> Tuple[int, int]:
    """Check the flags (``check_restorer``: the restorer's own), claim ``--out``, restore every pending input;
    returns ``(restored, already there)``."""
    inputs = Path(args.inputs)
    if not inputs.exists():
        raise UserError(f"--inputs {inputs}: no such file or folder")
    if args.num_timesteps < 1:
        raise UserError(f"--num_timesteps {args.num_timesteps}: expected an integer >= 1")
    for flag in WEIGHT_FLAGS:
        if getattr(args, flag, None) and not Path(getattr(args, flag)).exists():
            raise UserError(f"--{flag} {getattr(args, flag)}: no such file or folder")
    split = None if args.split == "all" else args.split
    jobs = jobs_from_manifest(inputs, split, args.instruction) if inputs.is_file() else jobs_from_folder(inputs, args.instruction)
    sampling = SamplingArgs(**{k: getattr(args, k) for k in asdict(SamplingArgs())})
    check_restorer(args)
    fidelity = FidelityArgs(**{k: getattr(args, k) for k in asdict(FidelityArgs())})
    check_fidelity(fidelity)
    if fidelity.data_consistency and not inputs.is_file():
        print("note: --data_consistency needs the degradations a manifest records; a folder of images has none")
    settings, fingerprint = run_settings(args)
    ledger, _ = claim(args.out, "bagel_sr.eval.infer", settings, fingerprint, args.overwrite)
    restore = make_restorer(args, sampling, fidelity)
    if fidelity.num_samples > 1:
        restore = posterior_restorer(restore, fidelity.num_samples, fidelity.aggregate, args.seed)
    done, skipped = run_jobs(jobs, Path(args.out), restore, progress=not args.no_progress, ledger=ledger,
                             resize=args.resize_output, dc_steps=fidelity.dc_steps if fidelity.data_consistency else 0)
    print(f"restored {done} image(s), {skipped} already there, into {args.out}")
    return done, skipped


def checkout_backend(args: argparse.Namespace, sampling: SamplingArgs, fidelity: FidelityArgs):
    """The released model through the checkout's inferencer, with the ``inference`` rows for --start_t/--one_step."""
    inferencer = load_checkout_inferencer(args.bagel_root, args.model_path, args.checkpoint, adapter=args.adapter)
    if fidelity.start_t < 1.0 or fidelity.one_step:
        registry.apply(PatchContext(inferencer=inferencer, start_t=fidelity.start_t, one_step=fidelity.one_step),
                       groups=("inference",))
    return checkout_restorer(inferencer, sampling, args.seed)


def check_checkout_flags(args: argparse.Namespace) -> None:
    if not (args.bagel_root and args.model_path):
        raise UserError("say what restores: --bagel_root PATH --model_path DIR [--checkpoint FILE] "
                        "(the embedded demo's runs: python -m bagel_sr.embedded.infer --embedded_run DIR)")


def main(argv: Optional[Sequence[str]] = None) -> Tuple[int, int]:
    """Restore the inputs into ``--out`` with a checkout; returns ``(restored, already there)``."""
    return restore_all(parse_args(argv), checkout_backend, check_checkout_flags)


if __name__ == "__main__":
    sys.exit(cli_main(main))
