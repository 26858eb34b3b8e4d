"""Gradient-norm logging, the adaptive weight and the warm-up schedule through the patched training model."""
import os

import pytest
import torch

from bagel_sr.testing import fake_checkout
from bagel_sr import PixelLossConfig, monitoring, with_pixel_loss
from bagel_sr.monitoring import NoImageWatch
from bagel_sr.patches.registry import apply_pixel_loss_training
from bagel_sr.weighting import grad_norms_due
from bagel_sr.testing.contract_model import ContractModel, LinearDecoder, forward_kwargs, pack, set_timesteps
from bagel_sr.testing.two_ranks import run_ranks

SPEC = [[("cond", 2, 2), ("text", 2), ("target", 2, 2)], [("text", 3), ("target", 1, 2)],
        [("cond", 1, 2), ("text", 1), ("target", 1, 2)]]
T = [0, 0.1, 0.2, 0, 0.15]  # two paired eligible targets, one unpaired


def _patched_model(argv):
    """The fake script patched, parsed with ``argv``; returns (run state, targs, model)."""
    module, batch_module = fake_checkout.script()
    with apply_pixel_loss_training(module, batch_module) as handle:
        (targs,) = module.HfArgumentParser(module.TrainingArguments).parse_args_into_dataclasses(argv)
        module.load_ae()
        torch.manual_seed(0)
        model = module.Bagel(hidden=16)
    return handle.run, targs, model


def _loop_forward(model, batch, vae, seed=5):
    """What BAGEL's loop hands the model: the batch dict with the pixel-loss inputs, padded_latent encoded."""
    data = fake_checkout.model_inputs(batch, vae, seed=seed)
    return model(**data), data


_loop_loss = fake_checkout.loop_loss


def _reference_norms(vae, weight, mse_weight, seed=5):
    """Parameter-gradient norms on llm2vae of the flow term and of ``weight * pixel``, by plain autograd."""
    torch.manual_seed(0)
    ref = with_pixel_loss(ContractModel)(hidden=16).attach_pixel_loss(PixelLossConfig(weight=1.0, max_images=0), vae)
    kw, images = forward_kwargs(set_timesteps(pack(SPEC, seed=2), T), vae)
    torch.manual_seed(seed)
    out = ref(**kw, padded_images=images)
    params = [ref.llm2vae.weight, ref.llm2vae.bias]
    flow = out["mse"].mean(-1).sum() / len(kw["mse_loss_indexes"]) * mse_weight
    g_flow = torch.autograd.grad(flow, params, retain_graph=True)
    g_pix = torch.autograd.grad(out["pixel"], params, retain_graph=True)
    norm = lambda gs: torch.cat([g.reshape(-1) for g in gs]).norm()
    return norm(g_flow), weight * norm(g_pix), norm(g_pix), (ref, out, kw)


def _batch():
    return set_timesteps(pack(SPEC, seed=2), T)


def test_logged_norms_equal_parameter_gradient_norms():
    state, targs, model = _patched_model(["--pixel_loss_weight", "0.2", "--pixel_loss_max_images", "0",
                                          "--mse_weight", "0.5", "--pixel_loss_log_grad_norms_every", "1"])
    out, _ = _loop_forward(model, _batch(), state.vae)
    flow, pixel, _, _ = _reference_norms(state.vae, 0.2, 0.5)
    torch.testing.assert_close(out["grad_norm_flow"], flow, rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(out["grad_norm_pixel"], pixel, rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(out["grad_norm_ratio"], pixel / flow, rtol=1e-5, atol=1e-9)
    assert all(out[k].dim() == 0 and not out[k].requires_grad for k in ("grad_norm_flow", "grad_norm_pixel"))
    assert model.pixel_loss_state.current is None  # taken by the training model, nothing kept


def test_norms_are_measured_every_n_optimizer_steps_and_repeated_between(monkeypatch):
    calls = []
    original = monitoring.llm2vae_grad_norms

    def counting(*args, **kwargs):
        calls.append(model.pixel_loss_state.micro_steps - 1)
        return original(*args, **kwargs)

    monkeypatch.setattr(monitoring, "llm2vae_grad_norms", counting)
    state, targs, model = _patched_model(["--pixel_loss_weight", "0.2", "--pixel_loss_log_grad_norms_every", "2",
                                          "--gradient_accumulation_steps", "2"])
    logged = []
    for micro in range(9):
        out, data = _loop_forward(model, set_timesteps(pack(SPEC, seed=micro), T), state.vae)
        _loop_loss(out, data, targs).backward()
        logged.append(float(out["grad_norm_flow"]))
    assert calls == [0, 4, 8]  # first micro-step of optimizer steps 0, 2, 4
    assert logged[0] == logged[1] == logged[2] == logged[3] != logged[4]
    assert [grad_norms_due(PixelLossConfig(weight=1, adaptive_weight=True), m, 4) for m in range(3)] == [True] * 3


def test_monitoring_off_adds_no_keys_and_keeps_no_tensors():
    state, _, model = _patched_model(["--pixel_loss_weight", "0.2"])
    out, _ = _loop_forward(model, _batch(), state.vae)
    assert not any(k.startswith("grad_norm") or k == "pixel_adaptive_factor" for k in out)
    assert model.pixel_loss_state.current is None


@pytest.mark.parametrize("max_factor", [1e6, 0.5])
def test_adaptive_weight_scales_the_pixel_gradient(max_factor):
    weight = 0.2
    state, targs, model = _patched_model(["--pixel_loss_weight", str(weight), "--pixel_loss_max_images", "0",
                                          "--pixel_loss_adaptive_weight", "True", "--pixel_loss_log_grad_norms_every", "1",
                                          "--pixel_loss_adaptive_weight_max", str(max_factor)])
    out, data = _loop_forward(model, _batch(), state.vae)
    _loop_loss(out, data, targs).backward()
    flow, _, pixel_unweighted, (ref, ref_out, kw) = _reference_norms(state.vae, weight, 1.0)
    factor = min(float(flow / pixel_unweighted), max_factor)
    assert float(out["pixel_adaptive_factor"]) == pytest.approx(factor, rel=1e-5)
    assert float(out["pixel_weight"]) == pytest.approx(weight * factor, rel=1e-5)
    if max_factor > 1e3:  # unclamped: the weighted pixel gradient is `weight` times the flow gradient
        assert float(out["grad_norm_ratio"]) == pytest.approx(weight, rel=1e-5)
    else:
        assert factor == max_factor
    flow_loss = ref_out["mse"].mean(-1).sum() / len(kw["mse_loss_indexes"])
    (flow_loss + weight * factor * ref_out["pixel"]).backward()
    for name, p in ref.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(dict(model.named_parameters())[name].grad, p.grad, rtol=1e-4, atol=1e-9)


def test_warmup_schedule_over_optimizer_steps():
    weight = 0.4
    state, targs, model = _patched_model(["--pixel_loss_weight", str(weight), "--pixel_loss_warmup_steps", "2",
                                          "--gradient_accumulation_steps", "2", "--pixel_loss_max_images", "0"])
    weights = []
    for micro in range(6):
        out, data = _loop_forward(model, _batch(), state.vae)
        loss = _loop_loss(out, data, targs)
        if micro == 0:  # weight 0: exactly the flow-only gradient
            grads = torch.autograd.grad(loss, [model.llm2vae.weight])
            torch.manual_seed(0)
            flow_model = ContractModel(hidden=16)
            kw, _ = forward_kwargs(_batch(), state.vae)
            torch.manual_seed(5)
            flow_out = flow_model(**kw)
            (flow_grad,) = torch.autograd.grad(flow_out["mse"].mean(-1).sum() / len(kw["mse_loss_indexes"]) / 2,
                                               [flow_model.llm2vae.weight])
            torch.testing.assert_close(grads[0], flow_grad, rtol=0, atol=0)
        weights.append(float(out["pixel_weight"]))
    assert weights == pytest.approx([0.0, 0.0, weight / 2, weight / 2, weight, weight])


def test_loop_with_a_nan_decode_logs_finite_values_and_flow_only_gradients():
    class NanDecoder(LinearDecoder):
        def decode(self, z):
            return super().decode(z) * float("nan")

    state, targs, model = _patched_model(["--pixel_loss_weight", "0.2", "--pixel_loss_log_grad_norms_every", "1"])
    model.pixel_loss_state.vae = vae = NanDecoder()
    out, data = _loop_forward(model, _batch(), vae)
    _loop_loss(out, data, targs).backward()
    assert int(out["pixel_skipped"]) == 1 and int(out["pixel_images"]) == 0
    assert all(torch.isfinite(v).all() for k, v in out.items() if torch.is_tensor(v))  # what the loop logs
    assert float(out["grad_norm_pixel"]) == 0.0
    torch.manual_seed(0)
    stock = ContractModel(hidden=16)
    kw, _ = forward_kwargs(_batch(), vae)
    torch.manual_seed(5)
    (stock(**kw)["mse"].mean(-1).sum() / len(kw["mse_loss_indexes"])).backward()
    for name, p in stock.named_parameters():
        torch.testing.assert_close(dict(model.named_parameters())[name].grad, p.grad, rtol=0, atol=0)


# -- two ranks: the norms are those of the rank-averaged gradient -----------------------------------------------

def _rank_tensors(rank):
    g = torch.Generator().manual_seed(rank)
    return torch.randn(5 + rank, 8, generator=g), torch.randn(5 + rank, 3, generator=g), torch.randn(5 + rank, 3, generator=g)


def _rank_norms(rank):
    norms = monitoring.llm2vae_grad_norms(*_rank_tensors(rank), pixel_weight=0.3)
    return [norms.flow, norms.pixel, norms.pixel_unweighted]


@pytest.mark.timeout(120)
def test_distributed_norms_are_of_the_averaged_gradient():
    results = run_ranks(_rank_norms)
    grads = sum(monitoring.linear_parameter_gradients(h, [gf, gp]) for h, gf, gp in map(_rank_tensors, range(2))) / 2
    flow, pixel = grads.norm(dim=1)
    for r in results:
        torch.testing.assert_close(r[0], flow)
        torch.testing.assert_close(r[1], 0.3 * pixel)
        torch.testing.assert_close(r[2], pixel)


# -- a real checkout (BAGEL_ROOT): bf16 model under autocast, the patched class of the training script ----------

@pytest.mark.bagel
@pytest.mark.skipif(not os.environ.get("BAGEL_ROOT"), reason="set BAGEL_ROOT to a BAGEL checkout to run")
@pytest.mark.usefixtures("checkout_shape")
def test_real_bagel_logged_norms_match_parameter_gradients():
    import sys

    from bagel_sr.patches import checkout
    from bagel_sr.testing.bagel_tiny import (build_tiny_autoencoder, build_tiny_bagel, checkout_shape, encode_batch,
                                             import_bagel, make_packed_batch)

    root = import_bagel().root
    sys.modules.pop(checkout.TRAINING_MODULE_NAME, None)
    try:
        module = checkout.import_training_module(root)
    except checkout.CheckoutError as err:
        pytest.skip(f"the training script's dependencies are missing here: {err}")
    with apply_pixel_loss_training(module) as handle:
        parser = module.HfArgumentParser((module.ModelArguments, module.DataArguments, module.TrainingArguments))
        parser.parse_args_into_dataclasses(["--pixel_loss_weight", "0.2", "--pixel_loss_max_images", "0",
                                            "--pixel_loss_log_grad_norms_every", "1"])
        handle.run.vae = ae = build_tiny_autoencoder()
        model = build_tiny_bagel(cls=module.Bagel, llm2vae_std=0.02)
    specs = [{"kind": "edit", "cond_hw": (2, 2), "target_hw": (2, 2), "timesteps": [-1.5]},
             {"kind": "chain", "cond_hw": (1, 2), "target_hws": [(1, 2), (2, 2)], "timesteps": [-1.2, 0.5]}]
    batch = encode_batch(ae, make_packed_batch(specs, seed=1))
    from bagel_sr.patches.training import PixelLossInputs

    kwargs = {k: v for k, v in batch.items() if k not in ("padded_images", "batch_data_indexes")}
    torch.manual_seed(3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(**kwargs, pixel_loss_inputs=PixelLossInputs(batch["padded_images"], None))
    key = model.pixel_loss_state.key  # the fork's forward returns pixel itself: ours are bagel_sr_pixel, ...
    assert (key("pixel") == "pixel") == (checkout_shape() == "upstream")
    assert int(out[key("pixel_images")]) == 2 and int(out[key("pixel_skipped")]) == 0
    n = len(batch["mse_loss_indexes"])
    flow = out["mse"][:-1].float().mean(-1).sum() / n  # without the zero-valued carrier row
    params = [model.llm2vae.weight, model.llm2vae.bias]
    g_flow = torch.autograd.grad(flow, params, retain_graph=True)
    carrier_loss = out["mse"].float().mean(-1).sum() / n - flow  # value 0, gradient of 0.2 * pixel
    g_pix = torch.autograd.grad(carrier_loss, params)
    norm = lambda gs: torch.cat([g.float().reshape(-1) for g in gs]).norm()
    # bf16 parameters and gradients: a few per cent
    torch.testing.assert_close(out[key("grad_norm_flow")], norm(g_flow), rtol=3e-2, atol=0)
    torch.testing.assert_close(out[key("grad_norm_pixel")], norm(g_pix), rtol=3e-2, atol=0)


@pytest.mark.parametrize("images, weight, warns", [([0] * 8, 0.05, True), ([0, 0, 1, 0, 0, 0, 0, 0], 0.05, False),
                                                   ([0] * 8, 0.0, False), ([0] * 4, 0.05, False)])
def test_no_image_admitted_warns_once(images, weight, warns):
    watch = NoImageWatch(steps=5)
    with pytest.warns(RuntimeWarning, match="admitted no image in the first 5") if warns else _no_warning():
        msgs = [watch.observe(n, weight, "typo") for n in images]
    assert sum(m is not None for m in msgs) == int(warns)   # once only


class _no_warning:
    def __enter__(self):
        import warnings
        self.c = warnings.catch_warnings()
        self.c.__enter__()
        warnings.simplefilter("error")

    def __exit__(self, *exc):
        self.c.__exit__(*exc)
