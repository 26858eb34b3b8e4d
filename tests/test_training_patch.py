"""The training-script patches on a stand-in script that has the contract's names (the real one: test_bagel_*.py)."""
import dataclasses
import sys
import types
from dataclasses import dataclass

import pytest
import torch
from transformers import HfArgumentParser

from bagel_sr import PixelLossConfig, with_pixel_loss
from bagel_sr.patches import launch
from bagel_sr.patches.training import IncompatibleCheckoutError, apply_pixel_loss_training, banner, warmup_factor
from contract_model import ContractModel, LinearDecoder, forward_kwargs, pack, set_timesteps


@dataclass
class TrainingArguments:
    mse_weight: float = 1.0
    ce_weight: float = 1.0
    timestep_shift: float = 1.0
    visual_gen: bool = True
    gradient_accumulation_steps: int = 1


class SimpleCustomBatch:
    def __init__(self, data):
        self.padded_images = data["padded_images"]
        self.batch_data_indexes = data["batch_data_indexes"]
        self.rest = {k: v for k, v in data.items() if k not in ("padded_images", "batch_data_indexes")}

    def to_dict(self):
        return dict(self.rest, padded_images=self.padded_images, batch_data_indexes=self.batch_data_indexes)


def _script():
    module = types.ModuleType("fake_train")
    module.TrainingArguments = TrainingArguments
    module.HfArgumentParser = HfArgumentParser
    module.load_ae = lambda path=None: (LinearDecoder(), {"downsample": 8})
    module.Bagel = ContractModel
    module.main = lambda: None
    batch_module = types.ModuleType("fake_dataset_base")
    batch_module.SimpleCustomBatch = SimpleCustomBatch
    return module, batch_module


def _loop_step(module, training_args, vae, model, batch):
    """BAGEL's loop for one micro-step (re-expressed): pop, encode, forward, reduce, scale, backward."""
    data = SimpleCustomBatch(batch).to_dict()
    data.pop("batch_data_indexes", None)
    images = data.pop("padded_images")
    with torch.no_grad():
        data["padded_latent"] = vae.encode(images)
    torch.manual_seed(5)
    loss_dict = model(**data)
    mse = loss_dict["mse"]
    mse = mse.mean(dim=-1).sum() / len(data["mse_loss_indexes"])
    loss = mse * training_args.mse_weight / training_args.gradient_accumulation_steps
    loss.backward()
    return loss_dict


BATCH_SPEC = [[("cond", 2, 2), ("text", 2), ("target", 2, 2)], [("text", 3), ("target", 1, 2)],
              [("cond", 1, 2), ("text", 1), ("target", 1, 2)]]


@pytest.mark.parametrize("ga,mse_weight", [(1, 1.0), (4, 0.5)])
def test_patched_loop_gradients_equal_flow_plus_weighted_pixel(ga, mse_weight):
    module, batch_module = _script()
    state = apply_pixel_loss_training(module, batch_module)
    try:
        parser = module.HfArgumentParser(module.TrainingArguments)
        (targs,) = parser.parse_args_into_dataclasses(
            launch.inject_defaults(["--gradient_accumulation_steps", str(ga), "--mse_weight", str(mse_weight),
                                    "--pixel_loss_max_images", "0"]))
        vae, _ = module.load_ae("ae.safetensors")
        torch.manual_seed(0)
        model = module.Bagel(hidden=16)
        assert model.pixel_loss_state.vae is vae and state.config.weight == 0.05
        batch = set_timesteps(pack(BATCH_SPEC, seed=2), [0, 0.1, 0.2, 0, 0.15])
        loss_dict = _loop_step(module, targs, vae, model, batch)
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    finally:
        state.restore()
    assert module.Bagel is ContractModel and module.TrainingArguments is TrainingArguments
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
    module, batch_module = _script()
    state = apply_pixel_loss_training(module, batch_module)
    try:
        (targs,) = module.HfArgumentParser(module.TrainingArguments).parse_args_into_dataclasses(["--pixel_loss_weight", "0"])
        vae, _ = module.load_ae()
        torch.manual_seed(0)
        model = module.Bagel(hidden=16)
        assert model.pixel_loss_state is None
        data = SimpleCustomBatch(pack(BATCH_SPEC)).to_dict()
        assert "pixel_loss_inputs" not in data
    finally:
        state.restore()


def test_bad_values_and_missing_facts_fail_early():
    module, batch_module = _script()
    state = apply_pixel_loss_training(module, batch_module)
    try:
        parser = module.HfArgumentParser(module.TrainingArguments)
        with pytest.raises(ValueError, match="--pixel_loss_weight: got -1.0"):
            parser.parse_args_into_dataclasses(["--pixel_loss_weight", "-1"])
        with pytest.raises(ValueError, match="--pixel_loss_schedule"):
            parser.parse_args_into_dataclasses(["--pixel_loss_schedule", "cosine"])
        with pytest.raises(ValueError, match="--mse_weight > 0"):
            parser.parse_args_into_dataclasses(["--pixel_loss_weight", "0.1", "--mse_weight", "0"])
    finally:
        state.restore()
    del module.load_ae
    with pytest.raises(IncompatibleCheckoutError, match="load_ae"):
        apply_pixel_loss_training(module, batch_module)


def test_wrapper_flags_and_defaults():
    wargs, rest = launch.split_wrapper_args(["--bagel_root=/x", "--lr", "1e-5", "--bagel_train_script", "train/main.py",
                                             "--pixel_loss_weight", "0.2"])
    assert (wargs.bagel_root, wargs.bagel_train_script) == ("/x", "train/main.py")
    argv = launch.inject_defaults(rest)
    assert argv[:4] == ["--lr", "1e-5", "--pixel_loss_weight", "0.2"]
    assert "--pixel_loss_type" in argv and argv.count("--pixel_loss_weight") == 1
    assert argv[argv.index("--pixel_loss_max_t") + 1] == "0.3" and argv[argv.index("--pixel_loss_paired_only") + 1] == "True"
    with pytest.raises(SystemExit, match="bagel_root"):
        launch.split_wrapper_args(["--bagel_root"])


def test_banner_reports_gate_share():
    text = banner(PixelLossConfig(weight=0.05, max_t=0.3), 1.0)
    assert "19.8%" in text and "--pixel_loss_weight 0.05" in text
    assert "2.6%" in banner(PixelLossConfig(weight=0.05, max_t=0.3), 3.0)


def test_warmup_factor():
    assert [warmup_factor(s, 4) for s in (0, 1, 4, 9)] == [0.0, 0.25, 1.0, 1.0]
    assert warmup_factor(0, 0) == 1.0
