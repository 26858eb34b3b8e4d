"""The training-script patches on the fake checkout (the real one: test_bagel_*.py)."""
import dataclasses

import pytest
import torch

from bagel_sr.testing import fake_checkout
from bagel_sr import PixelLossConfig, with_pixel_loss
from bagel_sr.errors import UserError
from bagel_sr.patches import launch
from bagel_sr.patches.registry import apply_pixel_loss_training
from bagel_sr.patches.training import IncompatibleCheckoutError, banner
from bagel_sr.testing.contract_model import ContractModel, forward_kwargs, pack, set_timesteps

BATCH_SPEC = [[("cond", 2, 2), ("text", 2), ("target", 2, 2)], [("text", 3), ("target", 1, 2)],
              [("cond", 1, 2), ("text", 1), ("target", 1, 2)]]


@pytest.mark.parametrize("ga,mse_weight", [(1, 1.0), (4, 0.5)])
def test_patched_loop_gradients_equal_flow_plus_weighted_pixel(ga, mse_weight):
    module, batch_module = fake_checkout.script()
    handle = apply_pixel_loss_training(module, batch_module)
    try:
        parser = module.HfArgumentParser(module.TrainingArguments)
        (targs,) = parser.parse_args_into_dataclasses(  # the wrapper's defaults are the class's
            ["--gradient_accumulation_steps", str(ga), "--mse_weight", str(mse_weight), "--pixel_loss_max_images", "0"])
        vae, _ = module.load_ae("ae.safetensors")
        torch.manual_seed(0)
        model = module.Bagel(hidden=16)
        assert model.pixel_loss_state.vae is vae and handle.run.config.weight == 0.05
        assert type(model).__name__ == "ContractModelWithPixelLossFold"
        batch = set_timesteps(pack(BATCH_SPEC, seed=2), [0, 0.1, 0.2, 0, 0.15])
        loss_dict, _ = fake_checkout.loop_step(targs, vae, model, batch, batch_module.SimpleCustomBatch)
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    finally:
        handle.undo()
    assert module.Bagel is ContractModel and module.TrainingArguments is fake_checkout.TrainingArguments
    assert {"pixel", "pixel_images", "pixel_weight"} <= set(loss_dict)
    # reference: the extension alone, loss written out in full
    torch.manual_seed(0)
    ref = with_pixel_loss(ContractModel)(hidden=16).attach_pixel_loss(PixelLossConfig(weight=0.05, max_images=0), vae)
    kw, images = forward_kwargs(batch, vae)
    torch.manual_seed(5)
    out = ref(**kw, padded_images=images)
    mse = out["mse"].mean(-1).sum() / len(kw["mse_loss_indexes"])
    torch.testing.assert_close(loss_dict["mse"].mean(-1).sum() / len(kw["mse_loss_indexes"]), mse.detach())  # logged value unchanged
    ((mse * mse_weight + 0.05 * out["pixel"]) / ga).backward()
    assert int(out["pixel_images"]) == 2 and float(out["pixel"]) > 0
    for n, p in ref.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(grads[n], p.grad, rtol=1e-5, atol=1e-9)


def test_weight_zero_is_stock():
    module, batch_module = fake_checkout.script()
    handle = apply_pixel_loss_training(module, batch_module)
    try:
        module.HfArgumentParser(module.TrainingArguments).parse_args_into_dataclasses(["--pixel_loss_weight", "0"])
        module.load_ae()
        torch.manual_seed(0)
        model = module.Bagel(hidden=16)
        assert model.pixel_loss_state is None
        data = batch_module.SimpleCustomBatch(pack(BATCH_SPEC)).to_dict()
        assert "pixel_loss_inputs" not in data
    finally:
        handle.undo()


def test_bad_values_and_missing_facts_fail_early():
    module, batch_module = fake_checkout.script()
    handle = apply_pixel_loss_training(module, batch_module)
    try:
        parser = module.HfArgumentParser(module.TrainingArguments)
        with pytest.raises(ValueError, match="--pixel_loss_weight: got -1.0"):
            parser.parse_args_into_dataclasses(["--pixel_loss_weight", "-1"])
        with pytest.raises(ValueError, match="--pixel_loss_schedule"):
            parser.parse_args_into_dataclasses(["--pixel_loss_schedule", "cosine"])
        with pytest.raises(ValueError, match="--mse_weight > 0"):
            parser.parse_args_into_dataclasses(["--pixel_loss_weight", "0.1", "--mse_weight", "0"])
    finally:
        handle.undo()
    del module.load_ae
    bagel, arguments = module.Bagel, module.TrainingArguments
    with pytest.raises(IncompatibleCheckoutError, match="load_ae"):
        apply_pixel_loss_training(module, batch_module)
    assert (module.Bagel, module.TrainingArguments) == (bagel, arguments)  # nothing left half-patched


def test_wrapper_flags_are_parsed_once_and_the_settings_go_in_as_the_arguments_class_defaults():
    wargs = launch.parse_wrapper_args(["--bagel_root=/x", "--lr", "1e-5", "--bagel_train_script", "train/main.py",
                                       "--pixel_loss_weight", "0.2", "--pixel_loss_type=mse", "--visual_gen", "-h"])
    assert (wargs.bagel_root, wargs.bagel_train_script, wargs.help) == ("/x", "train/main.py", True)
    assert wargs.rest == ["--lr", "1e-5", "--visual_gen", "-h"]  # the checkout's words, as given
    assert wargs.pixel_flags == ["--pixel_loss_weight", "0.2", "--pixel_loss_type=mse"]
    settings = launch.pixel_settings(wargs)
    assert (settings.weight, settings.loss_type, settings.max_t) == (0.2, "l2", 0.3)  # the wrapper's defaults below
    assert launch.checkout_argv(wargs) == wargs.rest  # the checkout's parser never sees them again
    keep = launch.parse_wrapper_args(["--bagel_sr_host_pixel_loss", "keep", "--pixel_loss_weight", "0.2"])
    assert launch.pixel_settings(keep) is None and launch.checkout_argv(keep) == ["--pixel_loss_weight", "0.2"]
    with pytest.raises(UserError, match="bagel_root needs a value"):
        launch.parse_wrapper_args(["--bagel_root"])
    with pytest.raises(UserError, match="invalid int value: 'many'"):
        launch.pixel_settings(launch.parse_wrapper_args(["--pixel_loss_max_images", "many"]))
    with pytest.raises(UserError, match=r"--pixel_loss_max_t: got 1.5; allowed: a number in \(0, 1\]"):
        launch.pixel_settings(launch.parse_wrapper_args(["--pixel_loss_max_t", "1.5"]))
    with pytest.raises(UserError, match="not used by the HfArgumentParser.*pixel_loss_bogus"):
        launch.pixel_settings(launch.parse_wrapper_args(["--pixel_loss_bogus", "1"]))
    module, batch_module = fake_checkout.script()
    with apply_pixel_loss_training(module, batch_module):
        parser = module.HfArgumentParser(module.TrainingArguments)
        (targs,) = parser.parse_args_into_dataclasses(["--pixel_loss_weight", "0.2"])
        assert (targs.pixel_loss_weight, targs.pixel_loss_max_t, targs.pixel_loss_paired_only) == (0.2, 0.3, True)
        assert "(default: 0.05)" in " ".join(parser.format_help().split())
    with apply_pixel_loss_training(module, batch_module, defaults=dataclasses.asdict(settings)):  # as the wrapper does
        (targs,) = module.HfArgumentParser(module.TrainingArguments).parse_args_into_dataclasses([])
        assert PixelLossConfig.from_namespace(targs) == settings
    with apply_pixel_loss_training(module, batch_module, defaults={}):  # the library's defaults: off
        (targs,) = module.HfArgumentParser(module.TrainingArguments).parse_args_into_dataclasses([])
        assert targs.pixel_loss_weight == 0.0


def test_banner_reports_gate_share_and_patches():
    text = banner(PixelLossConfig(weight=0.05, max_t=0.3), 1.0, {"patch_model_class": "<script>.Bagel"})
    assert "19.8%" in text and "--pixel_loss_weight 0.05" in text and "patch_model_class (<script>.Bagel)" in text
    assert "2.6%" in banner(PixelLossConfig(weight=0.05, max_t=0.3), 3.0)
