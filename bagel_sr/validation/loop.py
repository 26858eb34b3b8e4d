"""What one validation does inside BAGEL's own training loop (``--bagel_sr_val_*``), and when.

The loop is not changed: the model class the script builds (``<script>.Bagel``, already the pixel-loss fold) gains
a ``forward`` (:mod:`bagel_sr.validation.rows`) that, on the first micro-step of each optimizer step that is a
multiple of ``every`` and of the launch's first step (the baseline), first validates and then trains as before.
The step is the loop's own ``curr_step`` (:func:`loop_step`), else counted from the launch's first plus the step
``FSDPCheckpoint.try_load_train_state`` resumed at.  The latest ``val_psnr``,
``val_ssim`` and ``val_halluc`` join every returned dict, so the loop logs them (its log lines and wandb) like ``mse``.

One validation, on every rank: under ``no_grad``, the model in eval mode (each module's mode put back after), the
random states of torch, numpy and ``random`` saved and restored (training draws exactly what it would without
validation), each rank restores its round-robin share of the fixed seeded subset, padded so every rank runs the
same number of restorations; a restoration is the checkout's own ``InterleaveInferencer`` (editing with the
manifest's instruction) with :func:`bagel_sr.patches.inference.patch_start_t`: from the input noised to the first
grid time ``<= --bagel_sr_val_start_t``, one Euler step to 0 (what ``python -m bagel_sr.eval.infer --start_t T0
--one_step`` writes, with its default sampling settings :data:`SAMPLING` and seed).  Scores are
:mod:`bagel_sr.validation_math`'s (the evaluation's functions), summed over ranks by one all-reduce; the grid
images by one ``all_gather_object``.  Rank 0 appends ``validation.csv`` and writes ``validation/step_<N>.png``
(input | restoration | truth | error x4) in ``--results_dir``, and logs the grid to wandb when a run is open.

Running inside the root module's forward keeps FSDP's root parameters gathered; the checkout's layers switch to
their inference path in eval mode and are called through their FSDP wrappers.
"""
from __future__ import annotations

import importlib
import inspect
import os
import random
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional

import numpy as np
import torch
import torch.distributed as dist

from bagel_sr import validation_math as V
from bagel_sr.errors import UserError
from bagel_sr.validation_config import ValidationConfig

from bagel_sr.patches.context import PatchContext, RunState
from bagel_sr.patches.inference import patch_start_t
from bagel_sr.patches.training import require
from bagel_sr.patches.validation_set import ValSet

#: The checkout inferencer's settings of a validation: ``bagel_sr.eval.infer``'s defaults (a test keeps them equal).
SAMPLING = {"num_timesteps": 50, "timestep_shift": 3.0, "cfg_text_scale": 4.0, "cfg_img_scale": 2.0,
            "cfg_interval": 0.0, "cfg_renorm_min": 0.0, "cfg_renorm_type": "text_channel"}
CSV_FILE = "validation.csv"
GRID_DIR = "validation"


def pil_image() -> Any:
    """``PIL.Image`` (the ``data`` extra: ``pip install bagel-sr[data]``), or a one-line error naming it."""
    try:
        from PIL import Image
    except ImportError:
        raise UserError("validation during training reads and writes PNGs with Pillow: pip install 'bagel-sr[data]'") from None
    return Image


def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


@contextmanager
def preserved_random_state() -> Iterator[None]:
    """Restore torch's (CPU and CUDA), numpy's and ``random``'s generators on exit."""
    py, npy = random.getstate(), np.random.get_state()
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            random.setstate(py)
            np.random.set_state(npy)


@contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """``model.eval()`` inside; every module's own ``training`` flag put back on exit."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, mode in modes:
            m.training = mode


def restore_image(inferencer: Any, image: Any, instruction: str, seed: int) -> Any:
    """One restoration through the checkout's inferencer, as ``bagel_sr.eval.infer`` calls it (seed, CPU autocast,
    the input's size where the inferencer takes ``image_shapes``)."""
    hyper = dict(SAMPLING, cfg_interval=[SAMPLING["cfg_interval"], 1.0])
    method = getattr(inferencer, "interleave_inference", None)
    if method is not None and "image_shapes" in inspect.signature(method).parameters:
        hyper["image_shapes"] = (image.size[1], image.size[0])
    torch.manual_seed(seed)
    on_cpu = next(inferencer.model.parameters()).device.type == "cpu"
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=on_cpu):
        result = inferencer(image=image, text=instruction, think=False, **hyper)
    if result.get("image") is None:
        raise RuntimeError("bagel-sr validation: the checkout's inferencer returned no image")
    return result["image"]


def loop_step(script_file: Optional[str]) -> Optional[int]:
    """The ``curr_step`` local of the training script's frame that called the model (BAGEL's loop and the forks
    derived from it name the step so), or None when no such frame is on the stack."""
    if not script_file:
        return None
    target = os.path.realpath(script_file)
    frame = sys._getframe(1)
    while frame is not None:
        if "curr_step" in frame.f_locals and os.path.realpath(frame.f_code.co_filename) == target:
            value = frame.f_locals["curr_step"]
            return int(value) if isinstance(value, int) else None
        frame = frame.f_back
    return None


def _first_layer(model: torch.nn.Module) -> torch.nn.Module:
    """The language model's first decoder layer (called once per forward pass of the LLM, training or inference)."""
    layers = getattr(getattr(model.language_model, "model", None), "layers", None)
    require(layers is not None and len(layers) > 0, "`Bagel.language_model.model.layers` is missing")
    return layers[0]


def set_transforms(s: ValSet, transform_cls: Any) -> tuple:
    """The checkout's ``ImageTransform`` of a set's VAE and ViT images, from its ``dataset_config.yaml`` (the
    transforms training uses; BAGEL's 1024/512/16 and 980/224/14 where the set names none)."""
    vae = transform_cls(s.vae_args.get("max_image_size", 1024), s.vae_args.get("min_image_size", 512),
                        s.vae_args.get("image_stride", 16))
    vit = transform_cls(s.vit_args.get("max_image_size", 980), s.vit_args.get("min_image_size", 224),
                        s.vit_args.get("image_stride", 14))
    return vae, vit


class Validator:
    """What one run's validations share: the subset, the checkout objects, the latest scores, the clocks."""

    def __init__(self, config: ValidationConfig, sets: List[ValSet], run: RunState):
        self.config, self.sets, self.run = config, sets, run
        self.images = [(s, im) for s in sets for im in s.images]
        self.subset = V.choose_subset(len(self.images), config.images, config.seed)
        self.grid_ids = self.subset[:V.GRID_IMAGES]
        self.calls, self.validations, self.start_step = 0, 0, 0
        self.last_step: Optional[int] = None
        self.latest: Dict[str, float] = {}
        self.tokenizer: Any = None
        self.new_token_ids: Any = None
        self.ema: Any = None
        self.model_forwards = 0
        self.train_since: Optional[float] = None
        self.rows: List[dict] = []

    # -- when -------------------------------------------------------------------------------------------------
    def due(self, loop_step: Optional[int] = None) -> Optional[int]:
        """Count one micro-step; the loop's optimizer step when a validation is due (the launch's first step, and
        every step that is a multiple of ``every``, at its first micro-step), else None.  ``loop_step``: the loop's
        own ``curr_step`` when it could be read (:func:`loop_step`); else the step is counted from the launch's
        first, plus the resumed step :attr:`start_step`."""
        micro, self.calls = self.calls, self.calls + 1
        if loop_step is None:
            gas = self.run.gradient_accumulation_steps
            step, first_micro = self.start_step + micro // gas, micro % gas == 0
        else:
            step, first_micro = int(loop_step), int(loop_step) != self.last_step
        self.last_step = step
        return step if first_micro and (micro == 0 or step % self.config.every == 0) else None

    def start_line(self) -> str:
        per_rank = -(-len(self.subset) // _rank_world()[1])
        return (f"bagel-sr validation: {len(self.subset)} val image(s) of {len(self.images)} every "
                f"{self.config.every} step(s) and at the first, one-step restoration from T0 "
                f"{self.config.start_t:g} ({'EMA' if self.config.ema else 'live'} weights): {per_rank} restoration(s) "
                "per rank per validation, each the checkout inferencer's context passes and one velocity evaluation "
                f"(x3 with classifier-free guidance); writes {CSV_FILE} and {GRID_DIR}/ in --results_dir")

    # -- what -------------------------------------------------------------------------------------------------
    def inferencer(self, model: torch.nn.Module, s: ValSet) -> Any:
        """The checkout's ``InterleaveInferencer`` on ``model`` with the set's own image transforms (training's)."""
        inferencer_mod = importlib.import_module("inferencer")
        vae, vit = set_transforms(s, importlib.import_module("data.transforms").ImageTransform)
        return inferencer_mod.InterleaveInferencer(model=model, vae_model=self.run.vae, tokenizer=self.tokenizer,
                                                   vae_transform=vae, vit_transform=vit,
                                                   new_token_ids=self.new_token_ids)

    def _restore_all(self, model: torch.nn.Module) -> tuple[list, dict]:
        Image = pil_image()
        rank, world = _rank_world()
        slots = V.shard(self.subset, rank, world)
        rows, panels = [], {}
        counter = _first_layer(model).register_forward_hook(lambda *a: self._count())
        try:
            for slot in slots:
                idx = slot if slot is not None else self.subset[0]
                s, im = self.images[idx]
                inferencer = self.inferencer(model, s)
                undo = patch_start_t(PatchContext(inferencer=inferencer, start_t=self.config.start_t, one_step=True))
                try:
                    with Image.open(im.lr) as pil:
                        lr = pil.convert("RGB")
                    out = restore_image(inferencer, lr, im.instruction, self.config.seed)
                finally:
                    undo()
                if slot is None:
                    continue
                with Image.open(im.hr) as pil:
                    hr = np.asarray(pil)
                if out.size != (hr.shape[1], hr.shape[0]):
                    out = out.resize((hr.shape[1], hr.shape[0]), Image.BICUBIC)
                ref, pred = V.comparable(hr, np.asarray(out), im.intensity)
                rows.append(V.scores(ref, pred))
                if idx in self.grid_ids:
                    low = V.comparable(hr, np.asarray(lr.resize(out.size, Image.BICUBIC)), im.intensity)[1]
                    panels[idx] = [low, pred, ref, V.error_map(ref, pred)]
        finally:
            counter.remove()
        return rows, panels

    def _count(self) -> None:
        self.model_forwards += 1

    def validate(self, model: torch.nn.Module, step: int) -> Dict[str, float]:
        """One validation of ``model`` (or the EMA) at ``step``; returns the means over ranks (every rank)."""
        began = time.perf_counter()
        with preserved_random_state(), torch.no_grad(), eval_mode(model):
            rows, panels = self._restore_all(model)
        summed = V.totals(rows)
        gathered = [panels]
        rank, world = _rank_world()
        if world > 1:
            device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
            summed_dev = summed.to(device)
            dist.all_reduce(summed_dev)
            summed = summed_dev.cpu()
            gathered = [None] * world
            dist.all_gather_object(gathered, panels)
        scores = V.means(summed)
        seconds = time.perf_counter() - began
        train = None if self.train_since is None else began - self.train_since
        self.validations += 1
        if rank == 0:
            self._write(step, scores, int(summed[0]), seconds, train, {k: v for g in gathered for k, v in g.items()})
        self.train_since = time.perf_counter()
        self.latest = scores
        return scores

    def _write(self, step: int, scores: Dict[str, float], images: int, seconds: float, train: Optional[float],
               panels: dict) -> None:
        Image = pil_image()
        share = "" if not train else round(seconds / (seconds + train), 4)
        row = {"step": step, **{k: round(v, 6) for k, v in scores.items()}, "images": images,
               "model_forwards": self.model_forwards, "seconds": round(seconds, 3),
               "train_seconds_since_last": "" if train is None else round(train, 3), "share_of_time": share}
        self.model_forwards = 0
        self.rows.append(row)
        out = Path(getattr(self.run.training_args, "results_dir", None) or ".")
        out.mkdir(parents=True, exist_ok=True)
        V.append_csv(out / CSV_FILE, row)
        picture = out / GRID_DIR / f"step_{step:07d}.png"
        picture.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(V.grid([panels[i] for i in self.grid_ids if i in panels])).save(picture)
        print(f"bagel-sr validation (step={step:07d}) " + ", ".join(f"{k} {v:.4f}" for k, v in scores.items())
              + f", {images} images, {row['model_forwards']} language-model forwards on rank 0, {seconds:.2f}s"
              + (f" ({100 * share:.1f}% of the time since the last validation)" if share != "" else ""), flush=True)
        wandb = sys.modules.get("wandb")
        if wandb is not None and getattr(wandb, "run", None) is not None:
            wandb.log({"val_grid": wandb.Image(str(picture))}, step=step)

    def log_values(self, device: torch.device) -> Dict[str, torch.Tensor]:
        return {k: torch.tensor(v, dtype=torch.float32, device=device) for k, v in self.latest.items()}
