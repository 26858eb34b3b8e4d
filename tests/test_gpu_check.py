"""The one-command GPU check (``python -m bagel_sr.gpu_check``) and its benchmark, on their CPU paths.

No GPU here: the ``bagel`` tests run the same script with ``--device cpu`` (the dry run's CPU patches, toy widths),
which proves the code paths (launches and checks, the benchmark's alternation, JSON/markdown, the arithmetic), not
the numbers. The arithmetic and the CUDA switch are tested on their own without a checkout.
"""
import argparse
import json
import os
import pathlib
import subprocess
import sys

import pytest
import torch

from bagel_sr.gpu_check import check as gpu_check
from bagel_sr.gpu_check import report as gpu_report
from bagel_sr.gpu_check import step as gpu_step
from bagel_sr.patches import launch
from bagel_sr.smoke import dry_run as smoke
from bagel_sr.smoke.dry_run import SmokeFailure
from bagel_tiny import bagel_root, requires_bagel

REPO = pathlib.Path(__file__).resolve().parents[1]


def depth(layers, flow, costs, peaks=None):
    """A benchmark depth: flow step ``flow`` s, each armed configuration ``flow + cost``; ``peaks`` GiB or None."""
    peaks = peaks or {}
    configs = {"flow": dict(time_s=flow, peak_gib=peaks.get("flow"), images=0.0)}
    for name, cost in costs.items():
        configs[name] = dict(time_s=flow + cost, peak_gib=peaks.get(name), images=4.0)
    return dict(layers=layers, configs=configs)


# ------------------------------------------------------------------------------------- arithmetic, no checkout

def test_extrapolation_is_linear_in_depth_and_the_ratio_is_the_mean_term_over_the_28_layer_step():
    depths = [depth(4, 1.5, {"pixel": 0.12}, {"flow": 10.0, "pixel": 11.5}),
              depth(2, 1.0, {"pixel": 0.10}, {"flow": 6.0, "pixel": 7.0})]
    out = gpu_report.extrapolate(depths)
    assert out["layers"] == [2, 4] and out["per_layer_s"] == pytest.approx(0.25)
    assert out["intercept_s"] == pytest.approx(0.5)
    assert out["flow_step_s"] == pytest.approx(0.5 + 28 * 0.25)            # 7.5 s
    pixel = out["configs"]["pixel"]
    assert pixel["cost_by_depth_s"] == pytest.approx([0.10, 0.12]) and pixel["flat"]
    assert pixel["ratio"] == pytest.approx(0.11 / 7.5)
    assert pixel["extra_peak_gib"] == pytest.approx(1.5)                    # the larger of 1.0 and 1.5
    assert pixel["extra_by_depth_gib"] == pytest.approx([1.0, 1.5])
    goals = gpu_report.goals(out)
    assert goals["ratio_met"] is True and goals["extra_met"] is True
    assert goals["gate_share"] == pytest.approx(0.198, abs=0.002)            # t <= 0.3 under shift 1
    assert goals["ratio_expected"] == pytest.approx(goals["ratio"] * goals["gate_share"])


def test_a_term_that_grows_with_depth_is_not_flat_and_the_goals_can_fail():
    out = gpu_report.extrapolate([depth(2, 1.0, {"pixel": 0.1}, {"flow": 5.0, "pixel": 8.0}),
                                  depth(4, 1.2, {"pixel": 0.3}, {"flow": 5.0, "pixel": 8.5})])
    assert not out["configs"]["pixel"]["flat"]
    goals = gpu_report.goals(out)
    assert goals["ratio_met"] is False and goals["extra_met"] is False      # 0.2 / 3.8 > 3%; 3.5 GiB > 2
    text = "\n".join(gpu_report.bench_markdown(
        dict(widths=gpu_step.asdict(gpu_step.TOY), device="cpu", tokens=1, samples=1, paired=1, image_px=64, crop=2,
             crop_margin=4, flash_attn="x", repeats=1, warmup=0, depths=[]), out))
    assert "| NO |" in text and "NOT MET" in text


def test_without_memory_figures_or_a_slower_deeper_model_the_goal_is_not_claimed():
    out = gpu_report.extrapolate([depth(2, 1.0, {"pixel": 0.01}), depth(4, 0.9, {"pixel": 0.01})])
    assert not out["slope_positive"]
    goals = gpu_report.goals(out)
    assert goals["ratio_met"] is None and goals["extra_met"] is None and goals["extra_peak_gib"] is None
    with pytest.raises(ValueError, match="two depths"):
        gpu_report.extrapolate([depth(2, 1.0, {"pixel": 0.1})])


# ------------------------------------------------------------------------------------------ the CUDA switch

BANNER = "  patches in force: patch_flash_attn (sys.modules['flash_attn']), patch_model_class (<script>.Bagel){}\n"
CPU_ROWS = ", patch_cuda_queries (<script>.torch, train.fsdp_utils.torch), patch_nccl (<script>.dist)"


def test_the_banner_check_refuses_cpu_patches_on_cuda_and_their_absence_on_cpu():
    assert "no CPU patch" in gpu_check.banner_check(BANNER.format(""), "cuda")
    with pytest.raises(SmokeFailure, match="patch_cuda_queries, patch_nccl"):
        gpu_check.banner_check(BANNER.format(CPU_ROWS), "cuda")
    assert "patch_nccl" in gpu_check.banner_check(BANNER.format(CPU_ROWS), "cpu")
    with pytest.raises(SmokeFailure, match="none of the dry run's CPU patches"):
        gpu_check.banner_check(BANNER.format(""), "cpu")
    with pytest.raises(SmokeFailure, match="no start-up banner"):
        gpu_check.banner_check("(step=0000001) Train Loss mse: 1.0,\n", "cuda")


@pytest.mark.parametrize("device, dry_run", [("cuda", False), ("cpu", True)])
def test_the_worker_runs_the_dry_runs_worker_with_cpu_patches_only_on_cpu(monkeypatch, device, dry_run):
    seen = {}

    def fake_launch_main(argv, **kwargs):
        seen.update(kwargs, argv=argv)

    monkeypatch.setattr(launch, "main", fake_launch_main)
    monkeypatch.setenv(gpu_check.DEVICE_ENV, device)
    gpu_check.worker(["--bagel_root", "/nowhere", "--", "--lr", "1"])
    assert seen["dry_run"] is dry_run and seen["pixel_loss"] is True
    assert seen["argv"][:2] == ["--bagel_root", "/nowhere"] and "--lr" in seen["argv"]
    assert launch.main is fake_launch_main                                   # restored after the worker


def test_launches_go_through_this_worker_while_the_check_runs_and_back_after(monkeypatch):
    monkeypatch.delenv(gpu_check.DEVICE_ENV, raising=False)
    with gpu_check._smoke_through_this_worker(smoke, "cuda"):
        assert smoke.WORKER_MODULE == gpu_check.WORKER_MODULE and os.environ[gpu_check.DEVICE_ENV] == "cuda"
    assert smoke.WORKER_MODULE == "bagel_sr.smoke" and gpu_check.DEVICE_ENV not in os.environ


def test_a_part_that_hangs_is_killed_at_its_deadline_and_one_that_ends_is_left_alone():
    import time

    with gpu_check.deadline(1.0) as expired:
        started = time.time()
        hung = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        code = hung.wait(timeout=30)
    assert expired.is_set() and code == -9 and time.time() - started < 20
    with gpu_check.deadline(30.0) as expired:
        quick = subprocess.run([sys.executable, "-c", "print('ok')"], capture_output=True, text=True)
    assert not expired.is_set() and quick.returncode == 0 and quick.stdout == "ok\n"


def run_cli(*args, timeout=900):
    proc = subprocess.run([sys.executable, "-m", "bagel_sr.gpu_check", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout)
    return proc.returncode, proc.stdout + proc.stderr


@pytest.mark.parametrize("args, expected", [
    (["--parts", "smoke,train"], "--parts smoke,train: give smoke, bench or smoke,bench"),
    (["--layers", "4"], "needs two depths"),
    (["--bagel_root", "/no/such/folder"], "no such folder"),
])
def test_bad_flags_stop_the_check_in_one_line(tmp_path, args, expected):
    code, out = run_cli("--bagel_root", str(tmp_path), "--device", "cpu", "--out", str(tmp_path / "o"), *args)
    assert code == 2 and out.strip().splitlines()[-1].startswith("error: ") and expected in out


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is visible")
def test_without_cuda_the_gpu_check_stops_at_once_and_names_the_cpu_test(tmp_path):
    code, out = run_cli("--bagel_root", str(tmp_path), "--out", str(tmp_path / "o"))
    assert code == 2 and "sees no CUDA device" in out and "--device cpu" in out
    assert not (tmp_path / "o").exists()                                     # nothing started


# ----------------------------------------------------------------------------------- with a checkout, on CPU

def toy_args(**kw):
    args = dict(bagel_root=bagel_root(), device="cpu", widths="toy", layers=[1, 2], tokens=120, paired=2,
                image_px=64, crop=0, warmup=0, repeats=1, json=None)
    args.update(kw)
    return argparse.Namespace(**args)


@pytest.mark.bagel
@requires_bagel
def test_the_benchmark_packs_a_real_batch_and_measures_every_configuration_at_each_depth(tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a busy shared CPU stalls oversubscribed threads
    try:
        out = gpu_step.run(toy_args(json=str(tmp_path / "b.json")), log=lambda *a: None)
    finally:
        torch.set_num_threads(threads)
    assert json.loads((tmp_path / "b.json").read_text()) == json.loads(json.dumps(out))
    assert out["tokens"] >= 120 and out["samples"] >= 3 and out["paired"] == 2
    assert [d["layers"] for d in out["depths"]] == [1, 2]
    assert out["depths"][0]["parameters"] < out["depths"][1]["parameters"]
    for d in out["depths"]:
        assert list(d["configs"]) == list(gpu_step.CONFIGS)
        assert d["configs"]["flow"]["images"] == 0
        assert all(d["configs"][n]["images"] == 2 for n in gpu_report.ARMED)   # both paired targets, no filler
        assert all(c["time_s"] > 0 and c["peak_gib"] is None for c in d["configs"].values())


@pytest.mark.bagel
@requires_bagel
def test_the_packed_batch_has_the_loaders_layout():
    mods = gpu_step.import_checkout(bagel_root())
    batch = gpu_step.pack_batch(mods["data_utils"], gpu_step.TOY, tokens=150, paired=2, image_px=32,
                                max_latent_size=64, device=torch.device("cpu"))
    assert batch["sequence_length"] == sum(batch["sample_lens"]) == len(batch["packed_position_ids"]) >= 150
    assert [m.shape[0] for m in batch["nested_attention_masks"]] == batch["sample_lens"]
    # 2 edit samples (condition + target), the rest text-to-image (one target): 4 tokens per 32-px image
    images = len(batch["patchified_vae_latent_shapes"])
    assert images == 2 * 2 + (len(batch["sample_lens"]) - 2) == batch["padded_images"].shape[0]
    assert len(batch["mse_loss_indexes"]) == 4 * (images - 2)               # conditions carry no flow loss
    t = batch["packed_timesteps"]
    assert (t == float("-inf")).sum() == 8 and (t == gpu_step.PAIRED_RAW_T).sum() >= 8
    names = [i["dataset_name"] for i in batch["batch_data_indexes"]]
    assert names[:2] == ["unified_edit"] * 2 and set(names[2:]) == {"t2i_pretrain"}


@pytest.mark.bagel
@requires_bagel
def test_the_gpu_check_runs_end_to_end_on_cpu_and_writes_its_table(tmp_path):
    """The whole script through its CPU path: the dry run's two launches (CPU patches in force, checked in the
    banner), the toy benchmark at two depths, the extrapolation, gpu_check.json / .md and the logs."""
    out = tmp_path / "out"
    code, text = run_cli("--bagel_root", bagel_root(), "--device", "cpu", "--out", str(out), "--tokens", "120",
                         "--repeats", "1", "--warmup", "0")
    assert code == 0, text[-3000:]
    assert text.strip().splitlines()[-1].startswith("gpu_check: OK")
    result = json.loads((out / "gpu_check.json").read_text())
    assert result["smoke"]["ok"] and result["smoke"]["line"].startswith("smoke: OK")
    assert all("CPU patches in force" in c and "patch_nccl" in c for c in result["smoke"]["checks"])
    assert len(result["smoke"]["checks"]) == 2
    assert result["environment"]["device"] == "cpu" and result["environment"]["torch"] == torch.__version__
    assert [d["layers"] for d in result["bench"]["depths"]] == [2, 4] and "error" not in result["bench"]
    assert set(result["extrapolation"]["configs"]) == set(gpu_report.ARMED)
    assert result["goals"]["extra_met"] is None                               # no memory figures on a CPU
    md = (out / "gpu_check.md").read_text()
    assert "| layers | configuration | step (fwd+bwd) |" in md and "extrapolated to 28 layers" in md
    assert md in text                                                         # the same table on stdout
    assert {p.name for p in out.iterdir()} == {"gpu_check.json", "gpu_check.md", "gpu_step.json", "gpu_step.log",
                                               "smoke_launch1.log", "smoke_launch2.log"}
