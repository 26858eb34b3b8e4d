"""The patch registry: one table lists every patch, ``apply`` puts them in force, one handle undoes them all."""
import dataclasses
import inspect
import sys
import types

import pytest

from bagel_sr.testing import fake_checkout
from bagel_sr.lora_settings import LoraSettings
from bagel_sr.patches import cpu, datasets, inference, lora, lora_deepspeed, registry, training
from bagel_sr.smoke import cpu_cuda, cpu_main
from bagel_sr.smoke import rows as smoke_rows
from bagel_sr.validation import rows as validation_rows
from bagel_sr.config import PixelLossConfig
from bagel_sr.patches.context import PatchContext


def _snapshot(ctx, rows):
    return {p.name: p.read(ctx) for p in rows}


def test_every_patch_function_has_a_row_and_the_dry_run_adds_its_own():
    functions = {name for mod in (cpu, cpu_cuda, cpu_main, training, datasets, inference, lora, lora_deepspeed,
                                  validation_rows)
                 for name, fn in inspect.getmembers(mod, inspect.isfunction)
                 if fn.__module__ == mod.__name__ and (name.startswith("patch_") or name == "register_datasets")}
    rows = {p.name: p for p in registry.PATCHES}
    assert functions == set(rows)
    assert all(rows[name].apply.__name__ == name for name in rows)  # the row runs the function of its name
    assert {p.name for p in rows.values() if p.group == "dryrun"} == {p.name for p in smoke_rows.DRY_RUN_PATCHES}
    assert {n for n in rows if n.startswith("patch_val_")} == {p.name for p in validation_rows.VALIDATION_PATCHES}
    registry.register(*smoke_rows.DRY_RUN_PATCHES)  # the same rows again: left alone
    assert len(registry.PATCHES) == len(rows)
    with pytest.raises(ValueError, match="already registered by another row"):
        registry.register(dataclasses.replace(rows["patch_nccl"], does="something else"))
    for p in registry.PATCHES:
        assert p.stage in registry.STAGES


def test_one_handle_undoes_every_replaced_name_cpu_patches_included(tmp_path, monkeypatch):
    monkeypatch.delitem(sys.modules, cpu.FLASH_ATTN_MODULE, raising=False)  # as on a machine without flash-attn
    monkeypatch.setattr(registry.torch.cuda, "is_available", lambda: False)
    ctx = fake_checkout.context(dataset_yamls=[fake_checkout.built_set(tmp_path)], dry_run=True,
                                lora=LoraSettings(rank=8))
    # torchvision's operator schemas are declared once per process (tests/conftest.py), so that row is a no-op here
    # the inference rows patch an inferencer (tests/test_eval_infer.py)
    # three rows need a real checkout's files or a DeepSpeed script (tests/test_dry_run_forks.py): here where they hold
    # validation's rows need a val set (tests/test_validation_rows.py)
    rows = [p for p in registry.PATCHES if p.name != "patch_torchvision_ops" and p.group != "inference"
            and p not in validation_rows.VALIDATION_PATCHES
            and (p.name not in ("patch_checkout_torch", "patch_deepspeed_init", "patch_lora_deepspeed") or p.when(ctx))]
    before = _snapshot(ctx, rows)
    handle = registry.apply(ctx, stage="checkout")
    registry.apply(ctx, stage="script", handle=handle)
    assert handle.applied == [p.name for p in rows]  # every row applied here, in table order
    during = _snapshot(ctx, rows)
    assert [n for n in before if during[n] is before[n] or during[n] == before[n]] == []  # each replaced its name
    assert dict(ctx.run.applied) == {p.name: p.target for p in rows}
    handle.undo()
    after = _snapshot(ctx, rows)
    for name in before:
        assert after[name] is before[name] or (isinstance(before[name], dict) and after[name] == before[name]), name
    assert handle.applied == [] and ctx.run.applied == {}


def _not_applied(ctx, handle, before):
    """The rows the handle lists as in force whose replaced name still reads as before (they did not apply)."""
    rows = {p.name: p for p in registry.PATCHES}
    return [n for n in handle.applied if rows[n].read(ctx) is before[n] or rows[n].read(ctx) == before[n]]


@pytest.mark.parametrize("fsdp", ["names_missing", "absent"])
def test_a_row_is_listed_in_force_only_when_it_replaced_its_name(monkeypatch, fsdp):
    """A dry run of a loop without FSDP (a DeepSpeed port): the FSDP rows change nothing and are not listed."""
    monkeypatch.setattr(registry.torch.cuda, "is_available", lambda: False)
    empty = types.ModuleType("train.fsdp_utils")  # a checkout's fsdp_utils without the names the dry run maps
    if fsdp == "absent":
        monkeypatch.setattr(cpu_main, "fsdp_module", lambda ctx: None)
    ctx = fake_checkout.context(dry_run=True, fsdp_module=empty)
    rows = registry.select(stage="script")
    before = _snapshot(ctx, rows)
    with registry.apply(ctx, stage="script") as handle:
        assert _not_applied(ctx, handle, before) == []
        assert "patch_nccl" in handle.applied and "patch_device_mesh" not in handle.applied
        assert "patch_state_dict_offload" not in handle.applied and set(ctx.run.applied) == set(handle.applied)
        assert "patch_state_dict_offload" not in training.banner(PixelLossConfig(), 1.0, ctx.run.applied)
    assert ctx.run.applied == {} and _snapshot(ctx, rows) == before


def test_a_failing_patch_undoes_what_was_applied(monkeypatch):
    monkeypatch.setattr(registry.torch.cuda, "is_available", lambda: False)
    ctx = fake_checkout.context()
    ctx.batch_module.SimpleCustomBatch = type("SimpleCustomBatch", (), {})  # patch_batch's fact is missing
    before = _snapshot(ctx, [p for p in registry.PATCHES if p.group == "training" and p.name != "patch_batch"
                             and p not in validation_rows.VALIDATION_PATCHES])
    assert len(before) == 5
    with pytest.raises(training.IncompatibleCheckoutError, match="SimpleCustomBatch.to_dict"):
        registry.apply(ctx, groups=("training",))
    assert _snapshot(ctx, [p for p in registry.PATCHES if p.name in before]) == before


def test_selection_by_name_group_and_unknown_names():
    ctx = fake_checkout.context()
    with registry.apply(ctx, names=["patch_load_ae"]) as handle:
        assert handle.applied == ["patch_load_ae"] and ctx.train_module.load_ae.__name__ == "load_ae"
        assert vars(ctx.train_module)["Bagel"] is fake_checkout.ContractModel
    with pytest.raises(ValueError, match="unknown patch"):
        registry.select(names=["patch_everything"])
    assert [p.name for p in registry.select(groups=("cpu",))] == ["patch_torchvision_ops", "patch_flash_attn", "patch_sdpa"]
    assert isinstance(ctx, PatchContext)
