"""CPU dry run of a checkout's own ``main()`` with the pixel term, before booking GPUs.

    python -m bagel_sr.smoke --bagel_root PATH [--model_path PATH] [--steps 4] [--nproc 2] [--save_at K]
                             [--workdir DIR] [--dataset_config_file YAML --bagel_sr_datasets YAML]
                             [BAGEL flags] [--pixel_loss_* flags]

It launches ``torchrun --nproc_per_node N`` twice on the wrapper (``train/main_sr_pixel_loss.py``'s logic) with
the ``dryrun`` rows of :mod:`bagel_sr.patches.registry` (:mod:`bagel_sr.smoke.cpu_main`): first to step ``K`` (checkpoint), then with
``--auto_resume True`` to ``--steps``. It then checks, from the loop's own log lines (:mod:`.log_checks`) and files:

1. the pixel term acted (``pixel_images > 0`` on some step) and its keys reached the loop's log lines;
2. every logged loss is finite;
3. the second launch resumed from the first one's checkpoint (BAGEL's convention: checkpoint ``K`` -> step K+1);
4. the last ``model.safetensors`` and ``ema.safetensors`` load into the checkout's stock ``Bagel`` with
   ``strict=True`` (a DeepSpeed loop's checkpoint, which has neither: its ``mp_rank_00_model_states.pt`` module
   states, strictly; no EMA is checked, and the OK line says so).

The last line is ``smoke: OK ...`` (exit 0) or ``smoke: FAILED: <what>`` (exit 1). Without ``--model_path`` a tiny
random model folder of the checkout's architecture is written (:mod:`.model`); without
``--dataset_config_file`` / ``--bagel_sr_datasets`` a tiny paired set is built (:mod:`.data`).

On your data, a preflight (:mod:`.preflight`) first checks what BAGEL's loader will do with your configs at
the dry run's ranks, workers and token limits, and adapts the dry run's own settings (one ``smoke:`` line each) or
stops with one line naming the fix. Each launch's log is capped and a launch without a new step for
``--stall_timeout`` seconds is stopped with the reason (:mod:`.watch`).

``--stock`` runs the checkout's ``main()`` without the wrapper (same CPU patches) and ``--no_resume`` makes one
launch only: together they compare stock and wrapped trajectories (tests).
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time
from typing import List, Optional, Sequence

from bagel_sr.argv import given as flag_given, value as flag_value
from bagel_sr.errors import ArgumentParser, cli_main
from bagel_sr.patches import checkout, launch

from . import checkout_flags, launch_errors
from . import data as smoke_data
from . import lora_checks as smoke_lora
from . import model as smoke_model
from . import preflight as smoke_preflight
from .log_checks import (LaunchLog, SmokeFailure, check_finite, check_pixel_term,  # noqa: F401 (re-exported)
                         check_resume)
from .validation_check import check_validation
from .watch import SmokeStop, watch

WORKER_MODULE = "bagel_sr.smoke"
#: What a DeepSpeed loop's ``engine.save_checkpoint`` writes in ``<checkpoint_dir>/<step>/`` for the model (ZeRO <= 2).
DEEPSPEED_MODEL_STATES = "mp_rank_00_model_states.pt"

#: BAGEL flags of a dry run on CPU (the user's own flags come after these and win).
DRY_RUN_FLAGS = {
    "finetune_from_hf": "True", "visual_gen": "True", "visual_und": "True", "sharding_strategy": "FULL_SHARD",
    "log_every": "1", "lr": "1e-4", "warmup_steps": "0", "peak_device_tflops": "1.0", "global_seed": "0",
    "data_seed": "0", "num_workers": "1", "prefetch_factor": "2", "expected_num_tokens": "320",
    "max_num_tokens": "640", "max_num_tokens_per_sample": "640", "prefer_buffer_before": "160",
    "max_buffer_size": "4", "wandb_offline": "True", "wandb_project": "bagel_sr_smoke", "wandb_name": "smoke",
}
#: The flags of those (and of the launches) a dry run cannot do without; the others are left out where the
#: checkout's script does not declare them (:mod:`.checkout_flags`).
NEEDED_FLAGS = ("finetune_from_hf", "visual_gen", "model_path", "dataset_config_file", "results_dir",
                "checkpoint_dir", "total_steps", "save_every", "log_every")


VISUAL_UND_HINT = (
    "the checkout's loop stopped at `assert not training_args.visual_und`: a micro-batch had no text-loss tokens "
    "(paired edit data have none) while --visual_und is True; keep a vlm_sft group with `is_mandatory: true` in "
    "your --dataset_config_file (one text-loss sample per packed batch), or pass --visual_und False (then "
    "upstream's resume fails: it pops the ViT's position table from every checkpoint)")


# --------------------------------------------------------------------------------------------- orchestration

def _parse(argv: Sequence[str]) -> tuple[argparse.Namespace, List[str]]:
    p = ArgumentParser(prog="python -m bagel_sr.smoke", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Every other flag (the --pixel_loss_* flags, the checkout's own) is passed on "
                                "to the checkout's main().")
    p.add_argument("--bagel_root", default=os.environ.get("BAGEL_ROOT"), help="your BAGEL checkout (or BAGEL_ROOT)")
    p.add_argument("--bagel_train_script", default=None, help="training script inside the checkout (autodetected)")
    p.add_argument("--model_path", default=None, help="a released model folder: its configs are shrunk to a few "
                   "narrow layers with random weights; its tokenizer and VAE are used as they are")
    p.add_argument("--steps", type=int, default=4, help="optimizer steps in all (default 4)")
    p.add_argument("--save_at", type=int, default=None, help="step of the checkpoint the second launch resumes "
                   "from (default steps // 2)")
    p.add_argument("--nproc", type=int, default=2, help="processes (ranks) of torchrun (default 2)")
    p.add_argument("--workdir", default=None, help="folder for the model, data, logs and checkpoints, reused when "
                   "present (default: a temporary folder, removed on success)")
    p.add_argument("--stock", action="store_true", help="run the checkout's main() without the bagel-sr wrapper")
    p.add_argument("--no_resume", action="store_true", help="one launch of --steps steps, no resume check")
    p.add_argument("--timeout", type=int, default=900, help="seconds per launch before it is stopped (default 900)")
    p.add_argument("--stall_timeout", type=int, default=120, help="seconds without a new step line after which a "
                   "launch is stopped, with the reason (default 120)")
    p.add_argument("--no_preflight", action="store_true", help="launch without checking the data configs first")
    smoke_preflight.add_data_flags(p)
    args, rest = p.parse_known_args(argv)
    rest = smoke_preflight.data_flags_back(args) + rest
    args.nproc_given = flag_value(argv, "nproc") is not None
    if not args.bagel_root:
        p.error("--bagel_root PATH (or BAGEL_ROOT=PATH) is required: the dry run runs your checkout's main()")
    if args.steps < 2 and not args.no_resume:
        p.error(f"--steps {args.steps}: needs at least 2 (one before the checkpoint, one after it)")
    if args.steps < 1:
        p.error(f"--steps {args.steps}: needs at least 1")
    if args.nproc < 1:
        p.error(f"--nproc {args.nproc}: needs at least 1")
    if args.save_at is None:
        args.save_at = max(1, args.steps // 2)
    if not args.no_resume and not 1 <= args.save_at < args.steps:
        p.error(f"--save_at {args.save_at}: must lie in [1, --steps) = [1, {args.steps})")
    return args, rest


def _preflight(args: argparse.Namespace):
    """Import the checkout and apply every patch of the launches once (then undo): a missing fact fails here,
    before any launch. Returns the checkout's ``load_ae``; ``args.accepted``: the flags its script declares."""
    module, handle = launch.prepare_checkout(args.bagel_root, args.bagel_train_script, pixel_loss=not args.stock,
                                             dry_run=True)
    try:
        args.accepted = checkout_flags.accepted_flags(module)
    finally:
        handle.undo()
    return sys.modules["modeling.autoencoder"].load_ae


def _prepare_inputs(args: argparse.Namespace, rest: List[str], workdir: pathlib.Path, load_ae) -> List[str]:
    """Model folder and data set (unless the user gave theirs); returns the BAGEL flags of both launches."""
    flags = dict(DRY_RUN_FLAGS, results_dir=str(workdir / "results"), checkpoint_dir=str(workdir / "checkpoints"),
                 num_shard=str(args.nproc))
    model_dir = workdir / "model"
    if args.model_path:
        smoke_model.shrink_model_folder(args.model_path, model_dir)
    elif not (model_dir / "ae.safetensors").is_file():
        print("smoke: writing a tiny random model folder (configs, byte tokenizer, random VAE) ...", flush=True)
        smoke_model.write_tiny_model_folder(model_dir, load_ae)
    flags["model_path"] = str(model_dir)
    extra: List[str] = []
    if not flag_given(rest, "dataset_config_file") and not flag_given(rest, "bagel_sr_datasets"):
        data = workdir / "data"
        files = (data / "built" / "bagel_sr_dataset.yaml", data / "dataset_config.yaml", data / "chat_entry.json")
        if not all(f.is_file() for f in files):
            print("smoke: building a tiny paired set and a chat set from images shipped in scikit-image ...", flush=True)
            files = smoke_data.build_smoke_data(workdir)
        flags["bagel_sr_datasets"], flags["dataset_config_file"] = str(files[0]), str(files[1])
        extra = ["--register_chat", str(files[2])]
    flags = checkout_flags.keep_accepted(
        flags, args.accepted, needed=NEEDED_FLAGS + (() if args.no_resume else ("auto_resume",)),
        exempt=launch.WRAPPER_FLAGS, script=args.bagel_train_script or "the checkout's training script",
        note=lambda line: print("smoke: " + line, flush=True))
    out: List[str] = []
    for k, v in flags.items():
        out += [f"--{k}", v]
    return extra, out + list(rest)


def _launch(args: argparse.Namespace, flags: List[str], total_steps: int, save_every: int, log_path: pathlib.Path,
            extra: Sequence[str] = ()) -> LaunchLog:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}",
           "-m", WORKER_MODULE, "worker", "--bagel_root", args.bagel_root]
    if args.bagel_train_script:
        cmd += ["--bagel_train_script", args.bagel_train_script]
    if args.stock:
        cmd.append("--stock")
    cmd += list(extra) + list(args.worker_extra) + ["--"] + flags + ["--total_steps", str(total_steps), "--save_every", str(save_every)]
    env = dict(os.environ, WANDB_MODE="offline", WANDB_SILENT="true", WANDB_DIR=str(log_path.parent),
               DS_ACCELERATOR=os.environ.get("DS_ACCELERATOR", "cpu"),
               OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), TOKENIZERS_PARALLELISM="false",
               PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True)  # a stopped launch takes its ranks with it
    watch(proc, log_path, stall_s=args.stall_timeout, timeout_s=args.timeout,
          echo=lambda line: print("  " + line.rstrip()[:200], flush=True))
    code = proc.returncode
    if code != 0:
        if "assert not training_args.visual_und" in log_path.read_text():
            raise SmokeFailure(VISUAL_UND_HINT + f" (log: {log_path})")
        reason = launch_errors.explain_log(log_path.read_text(), checkout.find_checkout(args.bagel_root))
        raise SmokeFailure(f"torchrun exited with code {code}: {reason} (log: {log_path})")
    return LaunchLog.parse(log_path.read_text())


def run(argv: Sequence[str]) -> int:
    args, rest = _parse(argv)
    started = time.time()
    own_workdir = args.workdir is None
    workdir = pathlib.Path(args.workdir or tempfile.mkdtemp(prefix="bagel_sr_smoke_")).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        load_ae = _preflight(args)
        args.worker_extra, flags = _prepare_inputs(args, rest, workdir, load_ae)
        if not args.no_preflight:
            plan = smoke_preflight.plan_dry_run(flags, rest, args.worker_extra, args.nproc, args.nproc_given, workdir)
            for note in plan.notes:
                print(f"smoke: {note}", flush=True)
            flags, args.worker_extra, args.nproc = plan.flags, plan.extra, plan.nproc
        for old in ("checkpoints", "results"):
            shutil.rmtree(workdir / old, ignore_errors=True)
        logs, notes = [], []
        load_check = workdir / "load_check.json"
        check_args = ["--load_check", str(load_check)]
        if args.no_resume:
            print(f"smoke: one launch, {args.steps} steps, {args.nproc} ranks", flush=True)
            logs.append(_launch(args, flags, args.steps, args.steps, workdir / "launch1.log", check_args))
        else:
            print(f"smoke: launch 1 of 2, steps 0..{args.save_at - 1}, checkpoint {args.save_at:07d}", flush=True)
            logs.append(_launch(args, flags, args.save_at, args.save_at, workdir / "launch1.log"))
            print(f"smoke: launch 2 of 2, auto-resume, to step {args.steps}", flush=True)
            logs.append(_launch(args, flags + ["--auto_resume", "True"], args.steps, args.steps,
                                workdir / "launch2.log", check_args))
            notes.append(check_resume(logs[0], logs[1], args.save_at))
        check_finite(logs)
        if not args.stock and not _pixel_off(flags):
            notes.insert(0, check_pixel_term(logs))
        if not args.stock and flag_given(rest, "bagel_sr_val_datasets"):
            texts = [(workdir / f"launch{i + 1}.log").read_text() for i in range(len(logs))]
            notes.append(check_validation(logs, texts, pathlib.Path(flag_value(flags, "results_dir")), rest))
        result = json.loads(load_check.read_text()) if load_check.is_file() else {"error": "no result written"}
        if result.get("error"):
            raise SmokeFailure(f"loading the checkpoint into stock Bagel: {result['error']}")
        notes.append(f"{' and '.join(result['loaded'])} load into stock Bagel (strict)")
        if result.get("skipped"):
            notes.append(result["skipped"])
        if smoke_lora.lora_rank(flags):
            try:
                notes += smoke_lora.read_check(workdir / smoke_lora.RESULT)
            except RuntimeError as error:
                raise SmokeFailure(str(error)) from None
        (workdir / "trajectory.json").write_text(json.dumps([log.trajectory() for log in logs]))
    except SmokeStop as failure:
        print(f"smoke: FAILED: {failure} (work folder kept: {workdir})", flush=True)
        return 1
    except Exception as error:  # a checkout that lacks a fact, a bad flag: one line, named
        print(f"smoke: FAILED: {type(error).__name__}: {error}", flush=True)
        return 1
    if own_workdir:
        shutil.rmtree(workdir, ignore_errors=True)
    print(f"smoke: OK in {time.time() - started:.0f} s: " + "; ".join(notes), flush=True)
    return 0


def _pixel_off(flags: Sequence[str]) -> bool:
    weight = flag_value(flags, "pixel_loss_weight")
    return weight is not None and float(weight) == 0.0


# -------------------------------------------------------------------------------------------------- the worker

def worker(argv: Sequence[str]) -> None:
    """One rank of a launch: the wrapper (or the stock script) with the CPU patches of ``main()`` applied."""
    p = ArgumentParser(prog=f"{WORKER_MODULE} worker")
    p.add_argument("--bagel_root", required=True)
    p.add_argument("--bagel_train_script", default=None)
    p.add_argument("--stock", action="store_true")
    p.add_argument("--load_check", default=None)
    p.add_argument("--register_chat", default=None)
    argv = list(argv)
    own, rest = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    args = p.parse_args(own)
    recorded: dict = {}

    def before_main(module) -> None:
        if args.register_chat:
            smoke_data.register_chat_entry(args.register_chat)
        _record_model_config(module, recorded)
        if smoke_lora.lora_rank(rest):
            smoke_lora.record_initial(module, flag_value(rest, "checkpoint_dir"))

    wrapper_argv = ["--bagel_root", args.bagel_root] + (
        ["--bagel_train_script", args.bagel_train_script] if args.bagel_train_script else []) + list(rest)
    launch.main(wrapper_argv, before_main=before_main, pixel_loss=not args.stock, dry_run=True)
    if args.load_check and int(os.environ.get("RANK", "0")) == 0:
        _write_load_check(pathlib.Path(args.load_check), recorded, flag_value(rest, "checkpoint_dir"))
        if smoke_lora.lora_rank(rest):
            smoke_lora.write_check(pathlib.Path(args.load_check).parent / smoke_lora.RESULT,
                                   lambda: smoke_lora.stock_model(recorded.get("config")),
                                   flag_value(rest, "checkpoint_dir"))


def _record_model_config(module, recorded: dict) -> None:
    """Dry-run only: remember the ``BagelConfig`` main() builds its model from (for the strict-load check)."""
    model_cls = module.Bagel

    def Bagel(*args, **kwargs):  # noqa: N802 (the name it replaces)
        recorded["config"] = kwargs.get("config", args[2] if len(args) > 2 else None)
        return model_cls(*args, **kwargs)

    module.Bagel = Bagel


def _write_load_check(out: pathlib.Path, recorded: dict, checkpoint_dir: Optional[str]) -> None:
    """Build the checkout's stock ``Bagel`` from the recorded config and load the last checkpoint, strictly."""
    result: dict = {"loaded": []}
    try:
        import importlib

        from safetensors.torch import load_file

        config = recorded.get("config")
        if config is None or checkpoint_dir is None:
            raise RuntimeError("main() built no model or has no --checkpoint_dir")
        steps = sorted(int(d) for d in os.listdir(checkpoint_dir) if d.isdigit())
        if not steps:
            raise RuntimeError(f"no checkpoint folder in {checkpoint_dir}")
        folder = pathlib.Path(checkpoint_dir) / f"{steps[-1]:07d}"
        stock = importlib.import_module("modeling.bagel")
        vit = stock.SiglipVisionModel(config.vit_config) if config.visual_und else None
        model = stock.Bagel(stock.Qwen2ForCausalLM(config.llm_config), vit, config)
        if config.visual_und:  # as main() and BAGEL's inference do after building the model
            model.vit_model.vision_model.embeddings.convert_conv2d_to_linear(config.vit_config)
        if (folder / "model.safetensors").is_file() or not (folder / DEEPSPEED_MODEL_STATES).is_file():
            for name in ("model.safetensors", "ema.safetensors"):
                model.load_state_dict(load_file(str(folder / name)), strict=True)
                result["loaded"].append(f"{folder.name}/{name}")
        else:  # a DeepSpeed loop: engine.save_checkpoint's module states (our own file: not weights-only)
            import torch

            states = torch.load(folder / DEEPSPEED_MODEL_STATES, map_location="cpu", weights_only=False)
            model.load_state_dict(states["module"], strict=True)
            result["loaded"].append(f"{folder.name}/{DEEPSPEED_MODEL_STATES} (DeepSpeed's module states)")
            result["skipped"] = "no EMA checked: the DeepSpeed checkpoint holds no model.safetensors/ema.safetensors"
    except Exception as error:
        result["error"] = f"{type(error).__name__}: {error}"
    out.write_text(json.dumps(result))


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["worker"]:  # one rank of a launch: an exception reaches the log with its traceback
        worker(argv[1:])
        return 0
    return cli_main(run, argv)


if __name__ == "__main__":
    sys.exit(main())
