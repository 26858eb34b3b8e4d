"""The dry run on the forks users bring: flags the checkout declares, CUDA mapped wherever it asks, one-line failures.

Without BAGEL: the flag filter, the CUDA mapping (``bagel_sr/smoke/cpu_cuda.py``) on real torch objects, the reading of a
launch log (``bagel_sr/smoke/launch_errors.py``). With BAGEL (``bagel``): the dry run to ``smoke: OK`` on forks generated
by ``tests/fork_checkout.py`` (``make_trait_fork``): an older base without upstream's MFU and wandb-project flags,
a script whose own FSDP helper asks CUDA itself and keeps the VAE in DDP, a DeepSpeed script started by
``deepspeed.init_distributed(dist_backend="nccl")``, and one fork with all three (whose default ``--layer_module``
its registry lacks); and a fork asking CUDA for something the dry run cannot map (one line naming its file:line).
"""
import dataclasses
import pathlib
import re
import subprocess
import sys
import textwrap
import types

import pytest
import torch
import torch.distributed as dist

import fake_checkout
from bagel_sr.patches import registry
from bagel_sr.smoke import checkout_flags, cpu_cuda, launch_errors
from bagel_sr.patches.checkout import MARKER_FILES
from bagel_tiny import requires_bagel, upstream_root

REPO = pathlib.Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------ flags the checkout declares

def _script_with_fields(**classes):
    module = types.ModuleType("fork_script")
    for name, fields in classes.items():
        setattr(module, name, dataclasses.make_dataclass(name, [(f, str, dataclasses.field(default="")) for f in fields]))
    return module


def test_only_the_flags_the_checkout_declares_are_passed_and_a_needed_one_stops_in_one_line():
    module = _script_with_fields(ModelArguments=["model_path"], DataArguments=["dataset_config_file"],
                                 TrainingArguments=["log_every", "lr"])
    accepted = checkout_flags.accepted_flags(module)
    assert accepted == {"model_path", "dataset_config_file", "log_every", "lr"}
    notes = []
    kept = checkout_flags.keep_accepted(
        {"model_path": "m", "peak_device_tflops": "1.0", "lr": "1e-4", "wandb_project": "p", "bagel_sr_datasets": "d"},
        accepted, needed=("model_path", "log_every"), exempt=("bagel_sr_datasets",), note=notes.append)
    assert kept == {"model_path": "m", "lr": "1e-4", "bagel_sr_datasets": "d"}
    assert len(notes) == 1 and "--peak_device_tflops, --wandb_project" in notes[0]
    with pytest.raises(checkout_flags.MissingCheckoutFlags, match=r"train/x\.py declares no --checkpoint_dir, --total_steps"):
        checkout_flags.keep_accepted({}, accepted, needed=("total_steps", "checkpoint_dir", "lr"), script="train/x.py")
    with pytest.raises(checkout_flags.MissingCheckoutFlags, match="no dataclass DataArguments"):
        checkout_flags.accepted_flags(_script_with_fields(ModelArguments=[], TrainingArguments=[]))


# --------------------------------------------------------------------------------------- CUDA mapped to the CPU

@pytest.fixture
def gloo_group(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the mapping on a CPU-only torch")
def test_a_forks_own_cuda_calls_run_on_cpu_and_nothing_stays_patched(gloo_group):
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.nn.parallel import DistributedDataParallel as DDP

    inits = cpu_cuda.parallel_inits()
    with cpu_cuda.cuda_mapped():
        model = torch.nn.Linear(3, 2).cuda(1)                                  # Module.cuda(i)
        vae = torch.nn.Linear(2, 2).to("cuda:1")                               # Module.to("cuda:N")
        ddp = DDP(vae, device_ids=[1], output_device=1)                        # DDP's device ids
        fsdp = FSDP(torch.nn.Linear(2, 2), device_id=torch.device("cuda", 1))  # FSDP's device_id
        x = torch.zeros(2, 3, device=torch.device("cuda", 0)) + torch.ones(3).cuda() + torch.ones(3).to(0)
        x = x.pin_memory().to("cuda", torch.float64, non_blocking=True).float()
        y = fsdp(ddp(model(x.to(device="cuda"))))
        assert model.weight.device.type == vae.weight.device.type == x.device.type == y.device.type == "cpu"
        assert y.shape == (2, 2)
    assert cpu_cuda.parallel_inits() == inits and cpu_cuda.function_modes() == {"modes": ()}
    with pytest.raises((AssertionError, RuntimeError)):                       # torch's own behaviour is back
        torch.ones(1).cuda()
    with pytest.raises(ValueError, match="device_ids"):
        DDP(torch.nn.Linear(2, 2), device_ids=[0])


def test_nccl_through_torch_and_deepspeed_becomes_gloo_and_is_undone(monkeypatch):
    seen = []
    monkeypatch.setattr(dist, "init_process_group", lambda backend=None, device_id=None, **k: seen.append((backend, device_id)))
    fake_deepspeed = types.ModuleType("deepspeed")
    fake_deepspeed.init_distributed = lambda dist_backend=None, **k: seen.append(dist_backend)
    monkeypatch.setitem(sys.modules, "deepspeed", fake_deepspeed)
    ctx = fake_checkout.context(dry_run=True)
    names = ["patch_process_group_backend", "patch_deepspeed_init"]
    before = {p.name: p.read(ctx) for p in registry.select(names=names)}
    with registry.apply(ctx, names=names) as handle:
        assert handle.applied == names
        dist.init_process_group("nccl", device_id=torch.device("cuda", 0))
        dist.init_process_group(backend="cpu:gloo,cuda:nccl")
        fake_deepspeed.init_distributed(dist_backend="nccl")
        fake_deepspeed.init_distributed("gloo")
    assert seen == [("gloo", None), ("gloo", None), "gloo", "gloo"]
    assert {p.name: p.read(ctx) for p in registry.select(names=names)} == before


def test_every_checkout_module_sees_the_dry_runs_torch_cuda(tmp_path):
    root = tmp_path / "fork"
    for rel in (*MARKER_FILES, "train/helpers.py", "train/x.py"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text("import torch\n")
    helper = types.ModuleType("fork_helpers_for_test")
    helper.__file__, helper.torch = str(root / "train/helpers.py"), torch
    script = fake_checkout.script()[0]
    script.__file__ = str(root / "train/x.py")
    sys.modules[helper.__name__] = helper
    try:
        ctx = fake_checkout.context(dry_run=True, train_module=script)
        with registry.apply(ctx, names=["patch_checkout_torch"]) as handle:
            assert handle.applied == ["patch_checkout_torch"]
            assert helper.torch.cuda.is_available() and helper.torch.cuda.set_device(3) is None
            with helper.torch.autocast(device_type="cuda", dtype=torch.bfloat16):
                assert torch.is_autocast_enabled("cpu")
        assert helper.torch is torch and script.torch is torch
    finally:
        del sys.modules[helper.__name__]


def test_the_scripts_cuda_autocast_in_both_spellings_is_cpu_autocast():
    ctx = fake_checkout.context(dry_run=True)
    with registry.apply(ctx, names=["patch_cuda_autocast"]):
        for autocast in (ctx.train_module.torch.amp.autocast, ctx.train_module.torch.autocast):
            with autocast(device_type="cuda", dtype=torch.bfloat16):
                assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
    assert ctx.train_module.torch is torch


# ------------------------------------------------------------------------------------ a failed launch, one line

def _log(root: pathlib.Path, frame_file: str, line: int, code: str, error: str) -> str:
    """A torchrun log: two ranks' tracebacks (prefixed as torchrun prints them), then torchrun's own trace."""
    one = textwrap.dedent(f"""\
        Traceback (most recent call last):
          File "{REPO}/patches/smoke.py", line 300, in worker
            launch.main(wrapper_argv)
          File "{root}/train/main.py", line 552, in main
            fsdp_model = fsdp_wrapper_with_ddp(model, fsdp_config)
          File "{root}/{frame_file}", line {line}, in helper
            {code}
            ^^^^^^
          File "/usr/lib/python3/site-packages/torch/cuda/__init__.py", line 400, in _lazy_init
            raise AssertionError("x")
        {error}
        """)
    ranks = "".join(f"[rank{r}]: {line}\n" for r in (0, 1) for line in one.splitlines())
    ranks = ranks.replace("\n", "\n[2026-12-06 02:38:21] Training arguments TrainingArguments(lr=0.1)\n", 1)  # rank 1 logs
    return ("W1206 starting\n" + ranks + "Traceback (most recent call last):\n  File \"/bin/torchrun\", line 8\n"
            "torch.distributed.elastic.multiprocessing.errors.ChildFailedError: \nmain FAILED\n")


def test_a_failed_launch_reads_as_the_checkouts_first_exception(tmp_path):
    root = tmp_path / "fork"
    text = _log(root, "train/fsdp_utils.py", 93, "original_model = original_model.cuda(device_id)",
                "RuntimeError: Invalid device, must be cuda device")
    exc = launch_errors.first_exception(text)
    assert (exc.type, exc.message, len(exc.frames)) == ("RuntimeError", "Invalid device, must be cuda device", 4)
    line = launch_errors.explain(exc, root)
    assert line == ("the checkout needs a GPU at train/fsdp_utils.py:93 (`original_model = original_model.cuda("
                    "device_id)`), which the dry run does not map to the CPU: RuntimeError: Invalid device, must be "
                    "cuda device")
    other = launch_errors.explain_log(_log(root, "train/main.py", 410, "parser.parse_args_into_dataclasses()",
                                           "ValueError: Some specified arguments are not used: ['--x']"), root)
    assert other == ("ValueError: Some specified arguments are not used: ['--x'] at train/main.py:410 "
                     "(`parser.parse_args_into_dataclasses()`)")
    assert launch_errors.explain_log("no traceback\nlast words\n", root).endswith("last words\n")


def test_a_key_error_on_a_registry_lists_the_keys_the_checkout_knows(tmp_path, monkeypatch):
    root = tmp_path / "fork"
    (root / "modeling").mkdir(parents=True)
    (root / "modeling" / "layers_for_test.py").write_text(
        "LAYERS = {'DenseLayer': 1, 'MoTLayer': 2}\n\ndef build(config):\n    return LAYERS[config.layer_module]\n")
    monkeypatch.syspath_prepend(str(root))
    monkeypatch.delitem(sys.modules, "modeling", raising=False)
    monkeypatch.delitem(sys.modules, "modeling.layers_for_test", raising=False)
    text = _log(root, "modeling/layers_for_test.py", 4, "return LAYERS[config.layer_module]", "KeyError: 'MedLayer'")
    line = launch_errors.explain_log(text, root)
    assert line == ("KeyError: 'MedLayer' at modeling/layers_for_test.py:4 (`return LAYERS[config.layer_module]`): "
                    "'MedLayer' is not a key of the checkout's `LAYERS`; it knows DenseLayer, MoTLayer; pass "
                    "--layer_module with one of them")


# ---------------------------------------------------------------------------------- the dry run on fork traits

def _dry_run(root, *flags, script=None, timeout=900):
    cmd = [sys.executable, "-m", "bagel_sr.smoke", "--bagel_root", str(root), *flags]
    if script:
        cmd += ["--bagel_train_script", script]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    out = proc.stdout + proc.stderr
    return proc.returncode, out, [x for x in out.splitlines() if x.strip()][-1]


@pytest.fixture(scope="module")
def traits_workdir(tmp_path_factory):
    """One work folder whose tiny model and data the dry runs of this module share (built by the first)."""
    return tmp_path_factory.mktemp("traits")


@pytest.fixture(scope="module")
def all_traits_fork(tmp_path_factory):
    from fork_checkout import make_trait_fork

    if upstream_root() is None:
        pytest.skip("set BAGEL_ROOT to a BAGEL checkout to run")
    return make_trait_fork(upstream_root(), tmp_path_factory.mktemp("all_traits") / "fork")


#: name: (traits, script, extra flags). The older base alone is not run here: the fork with all three traits is
#: that older base (both of its scripts run below, each checked for the flags left out).
TRAIT_RUNS = {
    "own_wrapper": (("own_wrapper",), None, ("--freeze_vae", "False")),
    "deepspeed_init": (("deepspeed_init",), "train/main_deepspeed.py", ()),
}


def _assert_ok(code, out, line, workdir, traits, deepspeed):
    assert code == 0 and line.startswith("smoke: OK"), out[-3000:]
    assert "resumed from checkpoint 0000001 at step 2" in line and "pixel term acted on 1/1 steps" in line
    assert ("mp_rank_00_model_states.pt (DeepSpeed's module states)" if deepspeed else
            "0000002/model.safetensors and 0000002/ema.safetensors load into stock Bagel (strict)") in line
    assert ("has no --peak_device_tflops, --wandb_project: those dry-run settings are left out" in out) == (
        "old_base" in traits)
    if "own_wrapper" in traits:  # the fork's DDP branch ran (on the CPU)
        assert "fork: the VAE is trained, kept in sync by DDP on device" in (workdir / "launch1.log").read_text()


@pytest.mark.bagel
@requires_bagel
@pytest.mark.parametrize("name", list(TRAIT_RUNS))
def test_dry_run_passes_on_each_fork_trait(tmp_path, traits_workdir, name):
    from fork_checkout import make_trait_fork

    traits, script, flags = TRAIT_RUNS[name]
    root = make_trait_fork(upstream_root(), tmp_path / "fork", traits)
    code, out, line = _dry_run(root, "--workdir", str(traits_workdir), "--steps", "2", *flags, script=script)
    _assert_ok(code, out, line, traits_workdir, traits, script is not None)


@pytest.mark.bagel
@requires_bagel
def test_a_call_that_needs_a_gpu_stops_in_one_line_naming_the_forks_line(tmp_path, traits_workdir):
    from fork_checkout import GPU_ONLY_LINE, GPU_ONLY_TRAIT, make_trait_fork

    root = make_trait_fork(upstream_root(), tmp_path / "fork", (GPU_ONLY_TRAIT,))
    code, out, line = _dry_run(root, "--workdir", str(traits_workdir), "--steps", "1", "--no_resume")
    assert code == 1, out[-3000:]
    assert re.match(r"smoke: FAILED: torchrun exited with code 1: the checkout needs a GPU at "
                    rf"train/pretrain_unified_navit\.py:\d+ \(`{re.escape(GPU_ONLY_LINE)} # fork: [^`]*`\), which the "
                    r"dry run does not map to the CPU: AssertionError: Torch not compiled with CUDA enabled \(log: ",
                    line), line


@pytest.mark.bagel
@requires_bagel
def test_a_default_layer_module_missing_from_the_registry_fails_in_one_line(all_traits_fork, traits_workdir):
    code, out, line = _dry_run(all_traits_fork, "--workdir", str(traits_workdir), "--steps", "1", "--no_resume")
    assert code == 1 and "Traceback" not in line, out[-3000:]
    assert re.match(r"smoke: FAILED: torchrun exited with code 1: KeyError: 'Qwen2MoTDecoderLayerMed' at "
                    r"modeling/bagel/qwen2_navit\.py:\d+ \(`layer_module = Decoder_layer_dict\[config\.layer_module\]`\)"
                    r": 'Qwen2MoTDecoderLayerMed' is not a key of the checkout's `Decoder_layer_dict`; it knows "
                    r"Qwen2DecoderLayer, Qwen2MoEDecoderLayer, Qwen2MoTDecoderLayer; pass --layer_module with one of "
                    r"them \(log: ", line), line


@pytest.mark.bagel
@requires_bagel
@pytest.mark.parametrize("script", [None, "train/main_deepspeed.py"])
def test_dry_run_passes_on_a_fork_with_all_three_traits(all_traits_fork, traits_workdir, script):
    flags = () if script else ("--freeze_vae", "False")  # the fork trains its VAE: its DDP branch runs
    code, out, line = _dry_run(all_traits_fork, "--workdir", str(traits_workdir), "--steps", "2",
                               "--layer_module", "Qwen2MoTDecoderLayer", *flags, script=script)
    traits = ("old_base", "deepspeed_init") if script else ("old_base", "own_wrapper")
    _assert_ok(code, out, line, traits_workdir, traits, script is not None)
