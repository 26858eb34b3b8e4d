"""with_pixel_loss on a model that follows BAGEL's forward contract (CI has no checkout; see test_bagel_*.py)."""
import copy

import pytest
import torch

from bagel_sr import MissingGroundTruthError, PixelLossConfig, flow, packing, with_pixel_loss
from bagel_sr.testing.contract_model import ContractModel, LinearDecoder, forward_kwargs, pack, set_timesteps

Extended = with_pixel_loss(ContractModel)
# t2i | edit | edit with dropped condition | two-step chain
SAMPLES = [
    [("text", 3), ("target", 2, 2)],
    [("cond", 2, 3), ("text", 2), ("target", 2, 3)],
    [("text", 2), ("target", 1, 2)],
    [("cond", 1, 2), ("text", 1), ("target", 1, 2), ("cond", 1, 2), ("text", 2), ("target", 1, 2)],
]
T_PER_IMAGE = [0.1, 0, 0.2, 0.05, 0, 0.25, 0, 0.6]  # t2i, cond, edit, dropped, cond, chain1, cond, chain2


def _model(cls=Extended, seed=0):
    torch.manual_seed(seed)
    return cls(hidden=32)


def _batch(seed=0):
    return set_timesteps(pack(SAMPLES, seed=seed), T_PER_IMAGE)


def _run(model, batch, vae, seed=1, **extra):
    kw, images = forward_kwargs(batch, vae)
    torch.manual_seed(seed)
    return model(**kw, **extra), kw, images


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_off_is_bit_identical_to_parent():
    vae, batch = LinearDecoder(), _batch()
    base, ext = _model(ContractModel), _model()
    ext_zero = _model().attach_pixel_loss(PixelLossConfig(weight=0.0), vae)
    outs = []
    for m in (base, ext, ext_zero):
        out, _, _ = _run(m, batch, vae)
        out["mse"].mean().backward()
        outs.append((out, _grads(m)))
    for out, grads in outs[1:]:
        assert set(out) == {"mse", "ce"}
        assert torch.equal(out["mse"], outs[0][0]["mse"])
        assert grads.keys() == outs[0][1].keys()
        assert all(torch.equal(grads[k], outs[0][1][k]) for k in grads)
    assert not ext_zero.llm2vae._forward_hooks and not ext_zero.vae2llm._forward_hooks


def _expected_pixel(model, batch, vae, config, seed=1):
    """Recompute the term independently: regenerate the forward's noise, read v_hat with our own hook."""
    kw, images = forward_kwargs(batch, vae)
    captured = {}
    handle = model.llm2vae.register_forward_hook(lambda m, a, o: captured.setdefault("v", o))
    torch.manual_seed(seed)
    out = ContractModel.forward(model, **kw)
    handle.remove()
    torch.manual_seed(seed)
    p, c = 2, 16
    z0 = torch.cat([packing.patchify_latent(l, h, w, p) for l, (h, w) in zip(kw["padded_latent"], kw["patchified_vae_latent_shapes"])])
    noise = torch.randn_like(z0)
    t = flow.raw_to_t(kw["packed_timesteps"], model.timestep_shift)
    z_t = flow.interpolate(z0, noise, t[:, None])
    v_hat = captured["v"]
    terms, start, tstart = [], 0, 0
    for i, (h, w) in enumerate(kw["patchified_vae_latent_shapes"]):
        n = h * w
        ti = float(t[start])
        paired = any(T_PER_IMAGE[j] == 0 and _sample(j) == _sample(i) and j < i for j in range(len(T_PER_IMAGE)))
        if ti > 0:
            wgt = float(flow.gate_weight(torch.tensor(ti), config.max_t, config.schedule))
            if wgt > 0 and (paired or not config.paired_only):
                zh = packing.unpatchify(z_t[start:start + n] - ti * v_hat[tstart:tstart + n], h, w, p, c)
                x_hat = vae.decode(zh[None])[0]
                gt = images[i, :, : 16 * h, : 16 * w]
                terms.append(wgt * (x_hat - gt).square().mean())
            tstart += n
        start += n
    return torch.stack(terms).mean(), v_hat, out, len(terms)


def _sample(i):
    return [0, 1, 1, 2, 3, 3, 3, 3][i]


@pytest.mark.parametrize("paired_only,schedule", [(True, "hard"), (False, "hard"), (True, "ramp")])
def test_pixel_term_matches_independent_computation(paired_only, schedule):
    vae, batch = LinearDecoder(), _batch()
    config = PixelLossConfig(weight=0.05, max_t=0.3, paired_only=paired_only, schedule=schedule, max_images=0)
    model = _model().attach_pixel_loss(config, vae)
    out, _, images = _run(model, batch, vae, padded_images=batch["padded_images"])
    expected, _, parent_out, n = _expected_pixel(model, batch, vae, config)
    assert torch.equal(out["mse"], parent_out["mse"])  # parent's outputs unchanged
    assert int(out["pixel_images"]) == n == {(True, "hard"): 2, (False, "hard"): 4, (True, "ramp"): 2}[(paired_only, schedule)]
    torch.testing.assert_close(out["pixel"], expected, rtol=1e-5, atol=1e-7)
    assert out["pixel"].dim() == 0 and out["pixel"].requires_grad


def test_gradient_wrt_v_hat_is_minus_t_times_decoder_adjoint():
    """dL/dv_hat = -t * J_D^T dL/dx0_hat, with J_D^T the adjoint of the linear decoder (a strided convolution)."""
    vae = LinearDecoder()
    batch = set_timesteps(pack([[("cond", 2, 2), ("text", 2), ("target", 2, 2)]], seed=3), [0, 0.2])
    config = PixelLossConfig(weight=1.0, max_t=0.3)
    model = _model().attach_pixel_loss(config, vae)
    v_store = {}
    h = model.llm2vae.register_forward_hook(lambda m, a, o: v_store.setdefault("v", o))
    out, kw, images = _run(model, batch, vae, padded_images=batch["padded_images"])
    h.remove()
    (g,) = torch.autograd.grad(out["pixel"], v_store["v"])
    # rebuild z0_hat exactly as the forward did (same seed, so the same noise), then the analytic gradient:
    # x_hat = D(z0_hat), dL/dx_hat = 2 (x_hat - x) / numel, J_D^T = conv2d with the decoder's kernel
    torch.manual_seed(1)
    z0_all = torch.cat([packing.patchify_latent(l, 2, 2, 2) for l in kw["padded_latent"]])
    noise = torch.randn_like(z0_all)
    t_all = flow.raw_to_t(kw["packed_timesteps"], 1.0)[:, None]
    zt_all = flow.interpolate(z0_all, noise, t_all)
    z0_hat = packing.unpatchify(zt_all[4:] - t_all[4:] * v_store["v"].detach(), 2, 2, 2, 16)
    x_hat = vae.decode(z0_hat[None])
    dl_dx = 2 * (x_hat - images[1:2, :, :32, :32]) / x_hat.numel()
    adjoint = torch.nn.functional.conv2d(dl_dx, vae.up.weight, stride=8)  # (1, 16, 4, 4) = J_D^T dL/dx
    expected = -float(t_all[4]) * packing.patchify_latent(adjoint[0], 2, 2, 2)
    torch.testing.assert_close(g, expected, rtol=1e-4, atol=1e-8)
    assert float(t_all[4]) == pytest.approx(0.2, abs=1e-6)


def test_no_eligible_image_gives_zero_with_graph_intact():
    vae = LinearDecoder()
    batch = set_timesteps(pack([[("cond", 2, 2), ("text", 2), ("target", 2, 2)]], seed=3), [0, 0.9])
    model = _model().attach_pixel_loss(PixelLossConfig(weight=0.05, max_t=0.3), vae)
    out, _, _ = _run(model, batch, vae, padded_images=batch["padded_images"])
    assert float(out["pixel"].detach()) == 0.0 and int(out["pixel_images"]) == 0
    (out["mse"].mean() + out["pixel"]).backward()
    assert model.llm2vae.weight.grad is not None


def test_missing_ground_truth_is_a_clear_error():
    vae = LinearDecoder()
    model = _model().attach_pixel_loss(PixelLossConfig(weight=0.05), vae)
    kw, _ = forward_kwargs(_batch(), vae)
    with pytest.raises(MissingGroundTruthError, match="padded_images"):
        model(**kw)


def test_max_images_choice_is_bounded_and_reproducible():
    vae, batch = LinearDecoder(), _batch()
    counts, values = [], []
    for _ in range(2):
        model = _model().attach_pixel_loss(PixelLossConfig(weight=0.05, max_t=1.0, paired_only=False, max_images=2, seed=7), vae)
        row = []
        for _ in range(4):
            out, _, _ = _run(model, batch, vae, padded_images=batch["padded_images"])
            counts.append(int(out["pixel_images"]))
            row.append(float(out["pixel"]))
        values.append(row)
    assert set(counts) == {2}
    assert values[0] == values[1]  # same seed, same calls: same choice
    assert len(set(values[0])) > 1  # the choice changes from call to call


def test_dataset_filter():
    vae, batch = LinearDecoder(), _batch()
    # samples alternate set0, set1: edit (sample 1) is set1, chain (sample 3) is set1, t2i set0
    config = PixelLossConfig(weight=0.05, max_t=1.0, paired_only=False, max_images=0, datasets="set0")
    model = _model().attach_pixel_loss(config, vae)
    out, _, _ = _run(model, batch, vae, padded_images=batch["padded_images"], batch_data_indexes=batch["batch_data_indexes"])
    assert int(out["pixel_images"]) == 2  # t2i and dropped-condition edit (samples 0 and 2)
    with pytest.raises(ValueError, match="batch_data_indexes"):
        _run(model, batch, vae, padded_images=batch["padded_images"])


def test_no_parameters_buffers_or_submodules_added_and_deepcopy_shares_vae():
    vae = LinearDecoder()
    base, ext = _model(ContractModel), _model().attach_pixel_loss(PixelLossConfig(weight=0.05), vae)
    assert list(base.state_dict()) == list(ext.state_dict())
    assert [n for n, _ in base.named_modules()] == [n for n, _ in ext.named_modules()]
    ext.load_state_dict(base.state_dict(), strict=True)
    base.load_state_dict(ext.state_dict(), strict=True)
    ema = copy.deepcopy(ext)
    assert ema.pixel_loss_state is ext.pixel_loss_state and ema.pixel_loss_state.vae is vae
    ext.detach_pixel_loss()
    assert ext.pixel_loss_state is None


def test_attach_validates_its_inputs():
    model = _model()
    with pytest.raises(TypeError, match="decode"):
        model.attach_pixel_loss(PixelLossConfig(weight=0.05), object())
    with pytest.raises(TypeError, match="PixelLossConfig"):
        model.attach_pixel_loss({"weight": 0.05}, LinearDecoder())
    assert with_pixel_loss(Extended) is Extended


def test_an_armed_model_warns_once_when_its_filter_admits_no_image():
    from bagel_sr.monitoring import NoImageWatch

    vae, batch = LinearDecoder(), _batch()
    config = PixelLossConfig(weight=0.05, max_t=1.0, paired_only=False, max_images=0, datasets="set7")  # a typo
    model = _model().attach_pixel_loss(config, vae)
    model.pixel_loss_state.no_image_watch = NoImageWatch(steps=3)   # the default waits 200 micro-steps
    kwargs = dict(padded_images=batch["padded_images"], batch_data_indexes=batch["batch_data_indexes"])
    with pytest.warns(RuntimeWarning, match="admitted no image in the first 3 micro-steps.*set7"):
        for _ in range(3):
            out, _, _ = _run(model, batch, vae, **kwargs)
    assert int(out["pixel_images"]) == 0 and model.pixel_loss_state.no_image_watch.done
    fine = _model().attach_pixel_loss(PixelLossConfig(weight=0.05, max_t=1.0, paired_only=False, datasets="set0"), vae)
    fine.pixel_loss_state.no_image_watch = NoImageWatch(steps=3)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        for _ in range(3):
            _run(fine, batch, vae, **kwargs)
