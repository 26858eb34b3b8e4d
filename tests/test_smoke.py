"""The CPU dry run of a checkout's own ``main()`` (``python -m bagel_sr.smoke``) and the wrapper's early checks.

The ``bagel`` tests launch ``torchrun`` on the real checkout named by ``BAGEL_ROOT`` (2 ranks, gloo, a few steps).
"""
import json
import pathlib
import re
import shutil

import pytest
import torch
import torch.distributed.fsdp

from bagel_sr.patches import registry
from bagel_sr.smoke import cpu_main
from bagel_sr.smoke import model as smoke_model
from bagel_sr.testing import fake_checkout
from bagel_sr.smoke.dry_run import LaunchLog, SmokeFailure, check_finite, check_pixel_term, check_resume
from bagel_sr.testing.bagel_tiny import bagel_root, requires_bagel
from bagel_sr.testing.commands import last_line, run_python

REPO = pathlib.Path(__file__).resolve().parents[1]


def run_cli(*args, timeout=600, env=None):
    return run_python(*args, cwd=REPO, timeout=timeout, env=env)


# ---------------------------------------------------------------------------------------- patches, without BAGEL

DRY_RUN_ROWS = [p.name for p in registry.PATCHES if p.group == "dryrun"]


def test_dry_run_rows_map_each_cuda_call_and_the_handle_restores_every_name():
    ctx = fake_checkout.context(dry_run=True)
    script, fsdp = ctx.train_module, ctx.fsdp_module
    before = {m: dict(vars(m)) for m in (script, fsdp)}
    with registry.apply(ctx, groups=["dryrun"]) as handle:
        # the fake checkout has no files and no deepspeed: those two rows do not apply (tests/test_dry_run_forks.py)
        assert handle.applied == [p.name for p in registry.PATCHES if p.group == "dryrun" and p.when(ctx)]
        assert set(DRY_RUN_ROWS) - set(handle.applied) <= {"patch_checkout_torch", "patch_deepspeed_init"}
        assert len(DRY_RUN_ROWS) == 10
        assert script.torch.cuda.is_available() and fsdp.torch.cuda.is_available()
        assert 3 % script.torch.cuda.device_count() == torch.device("cpu")       # main()'s device id
        assert 1 % fsdp.torch.cuda.device_count() == torch.device("cpu")         # fsdp_wrapper's device_id
        with script.torch.amp.autocast("cuda", dtype=torch.bfloat16):
            assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
        assert script.torch.tensor(1.0).item() == 1.0                            # everything else is torch's
        assert fsdp.FullStateDictConfig(rank0_only=True, offload_to_cpu=True).offload_to_cpu is False
        assert fsdp.init_device_mesh("cuda", (1, 2))[0] == "cpu"
        assert script.dist.init_process_group is cpu_main.gloo_init_process_group
        assert torch.cuda.is_available is not script.torch.cuda.is_available   # torch itself untouched
    for module, names in before.items():
        assert dict(vars(module)) == names


def test_dry_run_rows_act_only_in_a_dry_run():
    ctx = fake_checkout.context()
    with registry.apply(ctx, groups=["dryrun"]) as handle:
        assert handle.applied == [] and ctx.train_module.torch is torch


def test_dry_run_refuses_a_script_without_dist_and_leaves_nothing_patched():
    ctx = fake_checkout.context(dry_run=True)
    del ctx.train_module.dist
    with pytest.raises(RuntimeError, match="has no module-level name `dist`.*nccl"):
        registry.apply(ctx, groups=["dryrun"])
    assert ctx.train_module.torch is torch and ctx.fsdp_module.torch is torch


def test_gloo_replaces_nccl_only(monkeypatch):
    seen = []
    monkeypatch.setattr(torch.distributed, "init_process_group", lambda backend, *a, **k: seen.append(backend))
    cpu_main.gloo_init_process_group("nccl")
    cpu_main.gloo_init_process_group("cpu:gloo,cuda:nccl")
    cpu_main.gloo_init_process_group("gloo")
    assert seen == ["gloo", "gloo", "gloo"]


LOG = """\
[2026-12-03 13:10:15] Training for 2 steps, starting at 0...
(step=0000000) Train Loss mse: 1.1914, Train Loss ce: 5.5596, Train Loss pixel: 0.4339, Train Loss pixel_images: 1.0000, Train Loss pixel_weight: 0.0500, Train Steps/Sec: 0.68,
(step=0000001) Train Loss mse: 1.1621, Train Loss ce: 5.5065, Train Loss pixel: 0.0000, Train Loss pixel_images: 0.0000, Train Loss pixel_weight: 0.0500, Train Steps/Sec: 0.68,
"""


def test_launch_log_parsing_and_checks():
    log = LaunchLog.parse(LOG)
    assert log.start == 0 and sorted(log.steps) == [0, 1]
    assert log.steps[0] == {"mse": 1.1914, "ce": 5.5596, "pixel": 0.4339, "pixel_images": 1.0, "pixel_weight": 0.05}
    assert check_pixel_term([log]) == "pixel term acted on 1/2 steps"
    resumed = LaunchLog.parse(LOG.replace("starting at 0", "starting at 3").replace("step=0000000", "step=0000003")
                              .replace("step=0000001", "step=0000004"))
    assert check_resume(log, resumed, 2) == "resumed from checkpoint 0000002 at step 3"
    with pytest.raises(SmokeFailure, match="started at step 3, expected 2"):
        check_resume(log, resumed, 1)
    with pytest.raises(SmokeFailure, match="admitted no image"):
        check_pixel_term([LaunchLog.parse(LOG.replace("pixel_images: 1.0000", "pixel_images: 0.0000"))])
    with pytest.raises(SmokeFailure, match="lack pixel_weight"):
        check_pixel_term([LaunchLog.parse(LOG.replace("Train Loss pixel_weight", "Train Loss other"))])
    with pytest.raises(SmokeFailure, match="non-finite mse at step 1"):
        check_finite([LaunchLog.parse(LOG.replace("mse: 1.1621", "mse: nan"))])


# --------------------------------------------------------------------------- flags checked before main() runs

@pytest.mark.parametrize("flag, value, expected", [
    ("--pixel_loss_type", "bogus", "--pixel_loss_type: got 'bogus'; allowed: one of ('l2', 'l1', 'charbonnier') (or the aliases mse = l2, mae = l1)."),
    ("--pixel_loss_max_t", "1.5", "--pixel_loss_max_t: got 1.5; allowed: a number in (0, 1]."),
    ("--pixel_loss_max_images", "many", "invalid int value: 'many'"),
])
def test_a_bad_flag_stops_the_wrapper_in_one_line_before_the_checkout_runs(tmp_path, flag, value, expected):
    # the checkout named does not even exist: the flag is refused before anything else happens
    code, out = run_cli("train/main_sr_pixel_loss.py", "--bagel_root", str(tmp_path / "nowhere"), flag, value)
    assert code == 2
    assert expected in last_line(out) and last_line(out).startswith("error: ")
    assert "Traceback" not in out


@pytest.mark.bagel
@requires_bagel
def test_a_missing_dataset_yaml_stops_the_wrapper_in_one_line(tmp_path):
    code, out = run_cli("train/main_sr_pixel_loss.py", "--bagel_root", bagel_root(),
                        "--bagel_sr_datasets", str(tmp_path / "missing.yaml"))
    assert code == 2 and "Traceback" not in out
    assert last_line(out).startswith("error: no built bagel-sr set at")


# ------------------------------------------------------------------------------------- the dry run on BAGEL

@pytest.fixture(scope="module")
def smoke_workdir(tmp_path_factory):
    """A work folder whose tiny model and data the dry runs of this module share (built by the first one)."""
    return tmp_path_factory.mktemp("smoke")


@pytest.mark.bagel
@requires_bagel
@pytest.mark.parametrize("shape", ["upstream", "fork"])
def test_dry_run_of_the_checkouts_main_passes(smoke_workdir, tmp_path, shape):
    """Upstream, and the fork shape of bagel_sr/testing/fork_checkout.py (its own pixel/SSIM term, which ours switches off;
    its forward returns ``pixel`` itself, so ours is logged as ``bagel_sr_pixel``; no GA flag; train/main.py)."""
    from bagel_sr.testing.fork_checkout import make_fork

    root = bagel_root() if shape == "upstream" else str(make_fork(bagel_root(), tmp_path / "fork"))
    code, out = run_cli("-m", "bagel_sr.smoke", "--bagel_root", root, "--workdir", str(smoke_workdir),
                        "--steps", "4", "--nproc", "2")
    line = last_line(out)
    assert code == 0, out[-3000:]
    assert line.startswith("smoke: OK"), line
    assert re.search(r"pixel term acted on [1-9]\d*/3 steps", line)
    assert ("(as bagel_sr_*" in line) == (shape == "fork")
    assert "resumed from checkpoint 0000002 at step 3" in line
    assert "0000004/model.safetensors and 0000004/ema.safetensors load into stock Bagel (strict)" in line
    key = "bagel_sr_pixel_images" if shape == "fork" else "pixel_images"
    assert f"Train Loss {key}" in (smoke_workdir / "launch2.log").read_text()


def _final_state(workdir: pathlib.Path) -> dict:
    from safetensors.torch import load_file

    folder = max((workdir / "checkpoints").iterdir())
    return load_file(str(folder / "model.safetensors"))


@pytest.mark.bagel
@requires_bagel
def test_weight_zero_through_the_wrapper_equals_the_stock_main(smoke_workdir):
    runs = {}
    for name, flags in (("wrapper", ["--pixel_loss_weight", "0"]), ("stock", ["--stock"])):
        code, out = run_cli("-m", "bagel_sr.smoke", "--bagel_root", bagel_root(), "--workdir", str(smoke_workdir),
                            "--no_resume", "--steps", "3", *flags)
        assert code == 0 and last_line(out).startswith("smoke: OK"), out[-3000:]
        runs[name] = (json.loads((smoke_workdir / "trajectory.json").read_text()), _final_state(smoke_workdir))
    (wrapped, wrapped_state), (stock, stock_state) = runs["wrapper"], runs["stock"]
    assert len(wrapped[0]) == 3 and wrapped == stock                        # logged mse and ce, step by step
    assert wrapped_state.keys() == stock_state.keys()
    assert all(torch.equal(wrapped_state[k], stock_state[k]) for k in stock_state)  # and the trained weights


def _broken_checkout(tmp_path: pathlib.Path, rel: str, pattern: str, replacement: str) -> pathlib.Path:
    root = tmp_path / "bagel"
    shutil.copytree(bagel_root(), root)
    path = root / rel
    text = path.read_text()
    edited = re.sub(pattern, replacement, text, count=1, flags=re.M)
    assert edited != text, f"the edit {pattern!r} did not apply to {rel}"
    path.write_text(edited)
    return root


@pytest.mark.bagel
@requires_bagel
@pytest.mark.parametrize("rel, pattern, replacement, named", [
    ("train/pretrain_unified_navit.py", r"^def main\(\):", "def run_training():",
     "the training script does not define or import `main`"),
    ("modeling/bagel/bagel.py", r"packed_timesteps: Optional", "packed_noise_levels: Optional",
     "`Bagel.forward` takes no `packed_timesteps` argument"),
    ("train/pretrain_unified_navit.py", r"^import torch.distributed as dist", "import torch.distributed as tdist",
     "has no module-level name `dist`"),
])
def test_a_checkout_without_a_fact_fails_before_any_launch(tmp_path, rel, pattern, replacement, named):
    root = _broken_checkout(tmp_path, rel, pattern, replacement)
    code, out = run_cli("-m", "bagel_sr.smoke", "--bagel_root", str(root), "--workdir", str(tmp_path / "w"),
                        timeout=120)
    assert code == 1
    line = last_line(out)
    assert line.startswith("smoke: FAILED: ") and named in line, line
    assert not (tmp_path / "w" / "launch1.log").exists()                    # failed before launching torchrun


def test_shrink_model_folder_cuts_sizes_keeps_the_rest_and_links_tokenizer_and_vae(tmp_path):
    released = tmp_path / "released"
    released.mkdir()
    llm = dict(smoke_model.tiny_llm_config(152064), hidden_size=3584, num_hidden_layers=28, rope_theta=1e6)
    (released / "llm_config.json").write_text(json.dumps(llm))
    (released / "vit_config.json").write_text(json.dumps(dict(smoke_model.tiny_vit_config(), hidden_size=1152, num_hidden_layers=27)))
    for name in ("vocab.json", "merges.txt", "ae.safetensors"):
        (released / name).write_text(name)
    out = smoke_model.shrink_model_folder(released, tmp_path / "shrunk")
    shrunk = json.loads((out / "llm_config.json").read_text())
    assert shrunk == dict(llm, **smoke_model.TINY_LLM)                     # sizes cut, vocabulary and rope kept
    assert shrunk["vocab_size"] == 152064 and shrunk["rope_theta"] == 1e6
    assert json.loads((out / "vit_config.json").read_text())["num_hidden_layers"] == 2
    assert (out / "ae.safetensors").resolve() == (released / "ae.safetensors").resolve()
    assert (out / "vocab.json").read_text() == "vocab.json"
    (released / "ae.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="lacks ae.safetensors"):
        smoke_model.shrink_model_folder(released, tmp_path / "again")


def test_byte_tokenizer_round_trips_through_transformers(tmp_path):
    from transformers import GPT2Tokenizer

    vocab = smoke_model.write_byte_tokenizer(tmp_path)
    tokenizer = GPT2Tokenizer(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt"))
    ids = tokenizer.encode("A tile of the camera picture. µ")
    assert vocab == 257 and max(ids) < 256 and len(ids) == len("A tile of the camera picture. µ".encode())
    assert tokenizer.decode(ids) == "A tile of the camera picture. µ"
