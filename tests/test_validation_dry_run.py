"""Validation inside BAGEL's own loop, on the CPU dry run of the real checkout (``bagel``): it runs at the expected
steps on upstream and on a fork shape, logs ``val_*`` through the loop, writes validation.csv and the grid; it
leaves training bit for bit unchanged; and its val_psnr equals the same restoration done offline from the saved
checkpoint (the checkout's inferencer loaded the way ``bagel_sr.eval.infer`` loads it, scored by ``evaluate``).
"""
import csv
import json
import os
import pathlib
import shutil
import subprocess
import sys

import pytest
import torch

from bagel_sr.testing.bagel_tiny import requires_bagel, upstream_root
from bagel_sr.testing.validation_sets import build_val_set

pytestmark = [pytest.mark.bagel, requires_bagel]
REPO = pathlib.Path(__file__).resolve().parents[1]
VAL_FLAGS = ("--bagel_sr_val_every", "2", "--bagel_sr_val_images", "4")


def dry_run(root, workdir, *flags, timeout=900):
    proc = subprocess.run([sys.executable, "-m", "bagel_sr.smoke", "--bagel_root", str(root), "--workdir",
                           str(workdir), *flags], cwd=REPO, capture_output=True, text=True, timeout=timeout)
    out = proc.stdout + proc.stderr
    return proc.returncode, out, [x for x in out.splitlines() if x.strip()][-1]


@pytest.fixture(scope="module")
def val_yaml(tmp_path_factory):
    return build_val_set(tmp_path_factory.mktemp("val"), "valset")


@pytest.fixture(scope="module")
def upstream_run(tmp_path_factory, val_yaml):
    """One dry run on upstream with validation: 2 ranks, 4 steps, resumed after the checkpoint at step 2."""
    workdir = tmp_path_factory.mktemp("val_upstream")
    code, out, line = dry_run(upstream_root(), workdir, "--steps", "4", "--nproc", "2",
                              "--bagel_sr_val_datasets", str(val_yaml), *VAL_FLAGS)
    assert code == 0 and line.startswith("smoke: OK"), out[-4000:]
    return workdir, out, line


def _rows(workdir):
    with open(workdir / "results" / "validation.csv") as f:
        return list(csv.DictReader(f))


def _check_run(workdir, line):
    # launch 1 runs steps 0..1 (validates at 0), launch 2 resumes at 3 (validates at its first step)
    assert "validated at steps [0, 3]" in line and "language-model forwards per validation" in line, line
    rows = _rows(workdir)
    assert [int(r["step"]) for r in rows] == [0, 3] and all(int(r["images"]) == 4 for r in rows)
    assert all(0 < float(r["val_ssim"]) < 1 and 0 <= float(r["val_halluc"]) <= 1 for r in rows)
    for step in (0, 3):
        assert (workdir / "results" / "validation" / f"step_{step:07d}.png").is_file()
    for log in ("launch1.log", "launch2.log"):
        text = (workdir / log).read_text()
        assert "Train Loss val_psnr" in text and "Train Loss val_ssim" in text and "Train Loss val_halluc" in text


def test_upstream_validates_at_the_first_step_and_every_n_and_writes_csv_and_grid(upstream_run):
    workdir, out, line = upstream_run
    _check_run(workdir, line)
    assert "bagel-sr validation: 4 val image(s) of 8 every 2 step(s)" in out   # the cost, printed at start
    from PIL import Image

    with Image.open(workdir / "results" / "validation" / "step_0000000.png") as grid:
        assert grid.size == (4 * 66 + 2, 4 * 66 + 2)                            # 4 images x (input|out|truth|error)


def test_a_fork_shape_validates_the_same_way_here_its_ema(tmp_path, val_yaml):
    """The fork shape of tests/fork_checkout.py (train/main.py, its own pixel term), validating the EMA weights
    (the EMA model is called through its own FSDP root)."""
    from bagel_sr.testing.fork_checkout import make_fork

    root = make_fork(upstream_root(), tmp_path / "fork")
    code, out, line = dry_run(root, tmp_path / "work", "--steps", "4", "--nproc", "2",
                              "--bagel_sr_val_datasets", str(val_yaml), *VAL_FLAGS, "--bagel_sr_val_ema")
    assert code == 0 and line.startswith("smoke: OK"), out[-4000:]
    assert "(EMA weights)" in out
    _check_run(tmp_path / "work", line)


def test_validation_leaves_training_bit_for_bit_unchanged(tmp_path, val_yaml):
    """The same 3-step run with a validation before every step and without: equal logged losses, equal weights."""
    from safetensors.torch import load_file

    from bagel_sr.smoke.dry_run import LaunchLog

    runs = {}
    for name, flags in (("on", ["--bagel_sr_val_datasets", str(val_yaml), "--bagel_sr_val_every", "1",
                                "--bagel_sr_val_images", "2"]), ("off", [])):
        workdir = tmp_path / name
        code, out, line = dry_run(upstream_root(), workdir, "--no_resume", "--steps", "3", "--nproc", "2", *flags)
        assert code == 0 and line.startswith("smoke: OK"), out[-4000:]
        log = LaunchLog.parse((workdir / "launch1.log").read_text())
        losses = {s: {k: v for k, v in items.items() if not k.startswith("val_")} for s, items in log.steps.items()}
        folder = max((workdir / "checkpoints").iterdir())
        runs[name] = (losses, load_file(str(folder / "model.safetensors")), load_file(str(folder / "ema.safetensors")),
                      line)
    assert "validated at steps [0, 1, 2]" in runs["on"][3]
    assert len(runs["on"][0]) == 3 and runs["on"][0] == runs["off"][0]        # every logged loss, step by step
    for i in (1, 2):                                                          # the trained weights and the EMA
        assert runs["on"][i].keys() == runs["off"][i].keys()
        assert all(torch.equal(runs["on"][i][k], runs["off"][i][k]) for k in runs["off"][i])


def test_in_loop_val_psnr_equals_the_offline_restoration_of_the_saved_checkpoint(upstream_run, val_yaml, tmp_path,
                                                                                 monkeypatch):
    """Launch 2 validated at step 3 with the weights it resumed from checkpoint 0000002.  Offline: the checkout's
    inferencer loaded from that checkpoint by ``bagel_sr.patches.released.load_checkout_inferencer`` (infer's
    loader; here on the CPU, with the tiny model's position table and the set's image transforms), the
    ``patch_start_t`` row with one step from T0 0.3, infer's ``checkout_restorer`` and ``run_jobs`` (seed 0),
    then ``bagel_sr.eval.evaluate`` on the written PNGs: the same four images' mean PSNR/SSIM."""
    from safetensors.torch import load_file

    from bagel_sr import validation_math
    from bagel_sr.eval import infer
    from bagel_sr.patches import registry, released
    from bagel_sr.patches.context import PatchContext
    from bagel_sr.patches.validation_set import load_val_set
    from bagel_sr.validation.loop import SAMPLING, set_transforms
    from bagel_sr.testing.bagel_tiny import import_bagel

    workdir, _, _ = upstream_run
    in_loop = {int(r["step"]): r for r in _rows(workdir)}[3]
    checkpoint = workdir / "checkpoints" / "0000002" / "model.safetensors"
    weights = load_file(str(checkpoint))
    table = weights["latent_pos_embed.pos_embed"].shape[0]
    # a released folder's llm_config counts BAGEL's added tokens; the dry run's tiny folder does not (main() resizes)
    model_dir = tmp_path / "model"
    shutil.copytree(workdir / "model", model_dir)
    llm = json.loads((model_dir / "llm_config.json").read_text())
    llm["vocab_size"] = weights["language_model.model.embed_tokens.weight"].shape[0]
    (model_dir / "llm_config.json").write_text(json.dumps(llm))
    import_bagel()                                                              # the CPU compatibility patches
    monkeypatch.setattr(released.torch.cuda, "is_available", lambda: True)     # infer's loader refuses a CPU
    inferencer = released.load_checkout_inferencer(upstream_root(), str(model_dir), str(checkpoint),
                                                   max_latent_size=int(round(table ** 0.5)))
    monkeypatch.undo()
    val = load_val_set(val_yaml)
    transforms = sys.modules["data.transforms"]
    inferencer.vae_transform, inferencer.vit_transform = set_transforms(val, transforms.ImageTransform)
    registry.apply(PatchContext(inferencer=inferencer, start_t=0.3, one_step=True), groups=("inference",))
    restore = infer.checkout_restorer(inferencer, infer.SamplingArgs(**SAMPLING), seed=0)
    chosen = {val.images[i].pair_id for i in validation_math.choose_subset(len(val.images), 4, 0)}
    manifest = val_yaml.parent / "manifest.jsonl"
    jobs = [j for j in infer.jobs_from_manifest(manifest, "val", None) if j.pair_id in chosen]
    assert len(jobs) == 4
    infer.run_jobs(jobs, tmp_path / "out", restore, progress=False, resize=True)
    report = tmp_path / "report"
    proc = subprocess.run([sys.executable, "-m", "bagel_sr.eval.evaluate", "--outputs", str(tmp_path / "out"),
                           "--manifest", str(manifest), "--split", "val", "--allow_missing", "--color", "luma",
                           "--no_progress", "--worst", "0", "--n_boot", "10", "--out", str(report)],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    with open(report / "per_image.csv") as f:
        per_image = list(csv.DictReader(f))
    assert {r["pair_id"] for r in per_image} == chosen
    offline_psnr = sum(float(r["psnr"]) for r in per_image) / 4
    offline_ssim = sum(float(r["ssim_uniform7"]) for r in per_image) / 4
    print(json.dumps({"in_loop": in_loop, "offline_psnr": offline_psnr, "offline_ssim": offline_ssim}))
    assert abs(float(in_loop["val_psnr"]) - offline_psnr) < 0.05
    assert abs(float(in_loop["val_ssim"]) - offline_ssim) < 0.005


def test_the_deepspeed_port_validates_through_its_engine(tmp_path, val_yaml):
    """The DeepSpeed port of tests/fork_checkout.py (ZeRO-2 engine, its own resume): the step comes from its loop."""
    from bagel_sr.testing.fork_checkout import make_trait_fork

    root = make_trait_fork(upstream_root(), tmp_path / "fork", ("deepspeed_init",))
    code, out, line = dry_run(root, tmp_path / "work", "--steps", "4", "--nproc", "2", "--bagel_train_script",
                              "train/main_deepspeed.py", "--bagel_sr_val_datasets", str(val_yaml), *VAL_FLAGS)
    assert code == 0 and line.startswith("smoke: OK"), out[-4000:]
    assert "DeepSpeed's module states" in line
    _check_run(tmp_path / "work", line)
