"""The pixel loss on a real BAGEL checkout (``BAGEL_ROOT``), on CPU through the compatibility patch.

A tiny random-config Bagel and a small BAGEL AutoEncoder stand in for the released weights.
"""
import sys

import pytest
import torch

from bagel_sr import PixelLossConfig, with_pixel_loss
from bagel_sr.testing.bagel_tiny import (build_tiny_autoencoder, build_tiny_bagel, checkout_shape, encode_batch,
                                         forward_kwargs, import_bagel, import_training_script, make_packed_batch,
                                         requires_bagel)

#: Every test runs on upstream and on the fork shape (bagel_sr/testing/fork_checkout.py: a decoder that checkpoints its own
#: levels, a forward with its own pixel term and outputs, no --gradient_accumulation_steps).
pytestmark = [pytest.mark.bagel, requires_bagel, pytest.mark.usefixtures("checkout_shape")]

SPECS = [
    {"kind": "edit", "cond_hw": (2, 2), "target_hw": (2, 2), "timesteps": [-1.5]},
    {"kind": "t2i", "target_hw": (2, 3), "timesteps": [-2.0]},
    {"kind": "edit_dropped", "cond_hw": (1, 2), "timesteps": [-1.0]},
    {"kind": "chain", "cond_hw": (1, 2), "target_hws": [(1, 2), (2, 2)], "timesteps": [-1.2, 0.5]},
]


def _extended():
    return with_pixel_loss(import_bagel().bagel.Bagel)


def _forward(model, batch, seed=3, **extra):
    torch.manual_seed(seed)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        return model(**forward_kwargs(batch, **extra))


def _loss(out, batch):
    return out["mse"].float().mean(-1).sum() / len(batch["mse_loss_indexes"])


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("decode_dtype", ["autocast", "fp32"])
def test_armed_forward_backward_reaches_the_model(decode_dtype):
    """With decoder checkpointing on (the default), also when the checkout's decoder checkpoints itself (fork)."""
    ae = build_tiny_autoencoder()
    batch = encode_batch(ae, make_packed_batch(SPECS, seed=1))
    model = build_tiny_bagel(cls=_extended(), llm2vae_std=0.02)
    model.attach_pixel_loss(PixelLossConfig(weight=0.05, max_t=0.3, max_images=0, decode_dtype=decode_dtype), ae)
    out = _forward(model, batch, padded_images=batch["padded_images"], batch_data_indexes=batch["batch_data_indexes"])
    out = {k.replace(model.pixel_loss_state.key_prefix, ""): v for k, v in out.items()
           if k.startswith(model.pixel_loss_state.key_prefix) or k in ("mse", "ce")}  # the fork returns its own pixel
    # sigmoid(-1.5)=0.18 edit, sigmoid(-1.2)=0.23 chain step 1; t2i (0.12) and dropped (0.27) are unpaired;
    # chain step 2 (0.62) is above max_t
    assert int(out["pixel_images"]) == 2
    assert torch.isfinite(out["pixel"]) and float(out["pixel"]) > 0
    (_loss(out, batch) + 0.05 * out["pixel"]).backward()
    grads = _grads(model)
    assert grads["llm2vae.weight"].abs().sum() > 0
    assert any(k.startswith("language_model.") and v.abs().sum() > 0 for k, v in grads.items())
    assert all(p.grad is None for p in ae.parameters())


def test_pixel_gradient_flows_only_through_v_hat():
    """With the flow loss removed, the pixel term's gradient on llm2vae is non-zero and on vae2llm zero."""
    ae = build_tiny_autoencoder()
    batch = encode_batch(ae, make_packed_batch(SPECS[:1], seed=2))
    model = build_tiny_bagel(cls=_extended(), llm2vae_std=0.02)
    model.attach_pixel_loss(PixelLossConfig(weight=1.0, max_t=0.3), ae)
    out = _forward(model, batch, padded_images=batch["padded_images"])
    out[model.pixel_loss_state.key("pixel")].backward()
    assert model.llm2vae.weight.grad.abs().sum() > 0
    # z_t and t are detached: vae2llm and time_embedder only matter through the language model's input,
    # which is reached through v_hat's dependence on them, so their gradients exist but the VAE gets none
    assert all(p.grad is None for p in ae.parameters())


@pytest.mark.parametrize("how", ["unarmed", "weight0"])
def test_off_is_bit_identical_to_stock_bagel(how):
    ae = build_tiny_autoencoder()
    batch = encode_batch(ae, make_packed_batch(SPECS, seed=4))
    results = []
    for cls in (None, _extended()):
        model = build_tiny_bagel(cls=cls, llm2vae_std=0.02)
        if cls is not None and how == "weight0":
            model.attach_pixel_loss(PixelLossConfig(weight=0.0), ae)
        out = _forward(model, batch)
        _loss(out, batch).backward()
        results.append((out, _grads(model)))
    (out_a, g_a), (out_b, g_b) = results
    assert set(out_b) == set(out_a) <= {"mse", "ce", "pixel", "ssim"}  # the fork returns its pixel and ssim too
    assert torch.equal(out_a["mse"], out_b["mse"])
    assert g_a.keys() == g_b.keys() and all(torch.equal(g_a[k], g_b[k]) for k in g_a)


def test_checkpoints_load_both_ways_strictly(tmp_path):
    from safetensors.torch import load_file, save_file

    ae = build_tiny_autoencoder()
    stock = build_tiny_bagel(seed=1)
    ours = build_tiny_bagel(seed=2, cls=_extended()).attach_pixel_loss(PixelLossConfig(weight=0.05), ae)
    assert list(stock.state_dict()) == list(ours.state_dict())
    assert sum(1 for _ in stock.parameters()) == sum(1 for _ in ours.parameters())
    assert [n for n, _ in stock.named_buffers()] == [n for n, _ in ours.named_buffers()]
    for src, dst, name in ((ours, stock, "ema.safetensors"), (stock, ours, "model.safetensors")):
        path = tmp_path / name
        save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(path))
        dst.load_state_dict(load_file(str(path)), strict=True)
        assert all(torch.equal(a, b) for a, b in zip(src.state_dict().values(), dst.state_dict().values()))


def _training_module():
    from bagel_sr.patches.registry import apply_pixel_loss_training

    module = import_training_script()
    return module, apply_pixel_loss_training(module)


def test_patched_training_arguments_parse_inject_and_reject(capsys):
    module, handle = _training_module()
    try:
        parser = module.HfArgumentParser((module.ModelArguments, module.DataArguments, module.TrainingArguments))
        _, _, targs = parser.parse_args_into_dataclasses(["--timestep_shift", "3.0"])
        config = handle.run.config  # the fork's own weight fields read 0 after parsing: ours took over
        assert (config.weight, targs.pixel_loss_type, targs.pixel_loss_max_t, targs.pixel_loss_paired_only) == (
            0.05, "l2", 0.3, True)
        assert "2.6% of target images" in capsys.readouterr().out
        _, _, targs = parser.parse_args_into_dataclasses(["--pixel_loss_weight", "0.5", "--pixel_loss_type", "l1"])
        assert (handle.run.config.weight, targs.pixel_loss_type) == (0.5, "l1")
        assert handle.run.config.weight == 0.5 and targs.lr > 0  # the script's own fields are still there
        for bad in (["--pixel_loss_weight", "-0.1"], ["--pixel_loss_max_t", "0"], ["--pixel_loss_type", "ssim"]):
            with pytest.raises(ValueError, match=bad[0]):
                parser.parse_args_into_dataclasses(bad)
        help_text = parser.format_help()
        assert "--pixel_loss_max_t" in help_text and "--pixel_loss_schedule" in help_text
    finally:
        handle.undo()


def test_patched_loop_step_gradients_equal_the_written_out_loss():
    """The real SimpleCustomBatch, the patched Bagel and the loop's own loss arithmetic, against the extension."""
    module, handle = _training_module()
    dataset_base = sys.modules["data.dataset_base"]
    try:
        parser = module.HfArgumentParser((module.ModelArguments, module.DataArguments, module.TrainingArguments))
        has_ga = hasattr(module.TrainingArguments(), "gradient_accumulation_steps")  # the fork has no such flag
        ga = 2 if has_ga else 1
        _, _, targs = parser.parse_args_into_dataclasses(
            ["--pixel_loss_weight", "0.2", "--pixel_loss_max_images", "0", "--mse_weight", "0.5"]
            + (["--gradient_accumulation_steps", "2"] if has_ga else []))
        assert has_ga == (checkout_shape() == "upstream")
        ae = build_tiny_autoencoder()
        handle.run.vae = ae  # what the patched load_ae records in main()
        model = build_tiny_bagel(cls=module.Bagel, llm2vae_std=0.02)
        raw = make_packed_batch(SPECS, seed=5)
        data = dataset_base.SimpleCustomBatch([raw]).to_dict()
        assert "pixel_loss_inputs" in data
        data.pop("batch_data_indexes", None)
        torch.manual_seed(11)  # BAGEL's encode samples the posterior
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            data["padded_latent"] = ae.encode(data.pop("padded_images"))
        torch.manual_seed(3)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss_dict = model(**data)
        mse = loss_dict["mse"].mean(dim=-1).sum() / len(data["mse_loss_indexes"])
        (mse * targs.mse_weight / ga).backward()
        grads = _grads(model)
        key = model.pixel_loss_state.key
        assert float(loss_dict[key("pixel")]) > 0 and int(loss_dict[key("pixel_images")]) == 2
    finally:
        handle.undo()
    ref = build_tiny_bagel(cls=_extended(), llm2vae_std=0.02)
    ref.attach_pixel_loss(PixelLossConfig(weight=0.2, max_images=0), ae)
    torch.manual_seed(11)
    batch = encode_batch(ae, raw)
    out = _forward(ref, batch, padded_images=batch["padded_images"])
    ref_mse = out["mse"].mean(dim=-1).sum() / len(batch["mse_loss_indexes"])
    torch.testing.assert_close(mse.detach().float(), ref_mse.detach().float())  # logged mse unchanged
    ((ref_mse * 0.5 + 0.2 * out[ref.pixel_loss_state.key("pixel")]) / ga).backward()
    ref_grads = _grads(ref)
    assert grads.keys() == ref_grads.keys()
    for k in grads:  # bf16 model: the fold's scalar passes through bf16 arithmetic like the flow loss does
        torch.testing.assert_close(grads[k].float(), ref_grads[k].float(), rtol=2e-2, atol=1e-5)
