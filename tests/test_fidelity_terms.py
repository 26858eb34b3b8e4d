"""Fidelity terms: each term's value against a direct computation, its gradient against autograd on a
reference implementation, and its safety (gradient at v_hat bounded by the L2 term's on flat and textured targets)."""
import numpy as np
import pytest
import torch

from bagel_sr import PixelLossConfig, fidelity_terms, with_pixel_loss
from bagel_sr.embedded.train import TrainConfig, micro_step_loss
from bagel_sr.embedded.vae import load_vae
from bagel_sr.pixel_term import bound_gradients
from bagel_sr.config import DEFAULT_TERM_WEIGHTS
from bagel_sr.testing.contract_model import ContractModel, LinearDecoder, forward_kwargs, pack, set_timesteps
from eval.metrics import ssim as eval_ssim


@pytest.fixture(scope="module")
def vae():
    return load_vae()


def _images(seed=0, n=2, c=3, hw=(24, 20)):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand((n, c) + hw, generator=g) * 2 - 1
    y = (x + 0.3 * torch.randn(x.shape, generator=g)).clamp(-1, 1)
    return x, y


# -- values against direct computations ----------------------------------------------------------------------

@pytest.mark.parametrize("amplitude", [1.0, 0.05])  # at low contrast the constants and the covariance count
def test_ssim_equals_the_evaluation_ssim(amplitude):
    x, y = (a * amplitude for a in _images())
    got = fidelity_terms.ssim_per_image(y, x)
    for i in range(x.shape[0]):
        ref = eval_ssim(x[i].permute(1, 2, 0).double().numpy(), y[i].permute(1, 2, 0).double().numpy(),
                        data_range=2.0, window="uniform7", channel_axis=-1)
        assert float(got[i]) == pytest.approx(ref, abs=1e-6)
    assert fidelity_terms.ssim_loss(x, x).abs().max() < 1e-6


def test_grad_term_equals_numpy_finite_differences():
    x, y = _images(1)
    xn, yn = x.double().numpy(), y.double().numpy()
    ref = [0.5 * (np.abs(np.diff(yn[i], axis=-1) - np.diff(xn[i], axis=-1)).mean()
                  + np.abs(np.diff(yn[i], axis=-2) - np.diff(xn[i], axis=-2)).mean()) for i in range(2)]
    assert fidelity_terms.gradient_loss(y, x).tolist() == pytest.approx(ref, rel=1e-5)
    # a constant offset has the same gradients: zero loss
    assert fidelity_terms.gradient_loss(x + 0.5, x).abs().max() < 1e-6


def _lpl_reference(fh, f, q):
    """Loops over images, layers and channels in float64 numpy."""
    out = []
    for i in range(fh[0].shape[0]):
        total = 0.0
        for a_hat, a in zip(fh, f):
            a_hat, a = a_hat[i].double().numpy(), a[i].double().numpy()
            n_hat, n = np.empty_like(a), np.empty_like(a)
            for ch in range(a.shape[0]):
                mu, sd = a[ch].mean(), a[ch].std()
                n_hat[ch], n[ch] = (a_hat[ch] - mu) / (sd + 1e-6), (a[ch] - mu) / (sd + 1e-6)
            keep = np.abs(n) <= np.quantile(np.abs(n), 1 - q) if q > 0 else np.ones_like(n, bool)
            total += ((n_hat - n) ** 2)[keep].mean() / len(f)
        out.append(total)
    return out


@pytest.mark.parametrize("q", [0.0, 0.1])
def test_lpl_equals_a_loop_over_layers_and_channels(q):
    g = torch.Generator().manual_seed(3)
    f = [torch.randn(2, 4, 6, 5, generator=g) * 3 + 1, torch.randn(2, 3, 12, 10, generator=g)]
    fh = [a + 0.5 * torch.randn(a.shape, generator=g) for a in f]
    assert fidelity_terms.lpl_loss(fh, f, q).tolist() == pytest.approx(_lpl_reference(fh, f, q), rel=1e-4)


# -- gradients against autograd on reference implementations ---------------------------------------------------

def _ssim_reference(x, y):
    """SSIM with explicit 7x7 windows (unfold), float64."""
    x, y = x.double(), y.double()
    ux, uy = [torch.nn.functional.unfold(a.flatten(0, 1)[:, None], 7) for a in (x, y)]  # (N*C, 49, L)
    mx, my = ux.mean(1), uy.mean(1)
    vx = ((ux - mx[:, None]) ** 2).sum(1) / 48
    vy = ((uy - my[:, None]) ** 2).sum(1) / 48
    cxy = ((ux - mx[:, None]) * (uy - my[:, None])).sum(1) / 48
    c1, c2 = 0.02 ** 2, 0.06 ** 2
    s = (2 * mx * my + c1) * (2 * cxy + c2) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2))
    return 1 - s.reshape(x.shape[0], -1).mean(1)


@pytest.mark.parametrize("name", ["ssim", "grad"])
def test_image_term_gradients_match_a_reference(name):
    x, y = _images(2)
    ours, ref = y.clone().requires_grad_(True), y.double().clone().requires_grad_(True)
    if name == "ssim":
        fidelity_terms.ssim_loss(ours, x).sum().backward()
        _ssim_reference(ref, x).sum().backward()
    else:
        fidelity_terms.gradient_loss(ours, x).sum().backward()
        (0.5 * (torch.diff(ref, dim=-1) - torch.diff(x.double(), dim=-1)).abs().mean((1, 2, 3))
         + 0.5 * (torch.diff(ref, dim=-2) - torch.diff(x.double(), dim=-2)).abs().mean((1, 2, 3))).sum().backward()
    assert torch.allclose(ours.grad.double(), ref.grad, rtol=1e-4, atol=1e-7)


def test_lpl_gradient_matches_a_reference():
    g = torch.Generator().manual_seed(4)
    f = [torch.randn(1, 3, 5, 5, generator=g), torch.randn(1, 2, 10, 10, generator=g)]
    fh = [(a + torch.randn(a.shape, generator=g)).requires_grad_(True) for a in f]
    fidelity_terms.lpl_loss(fh, f).sum().backward()
    ref = [a.detach().double().requires_grad_(True) for a in fh]
    total = 0
    for a_hat, a in zip(ref, f):
        a = a.double()
        mu, sd = a.mean((2, 3), keepdim=True), a.std((2, 3), unbiased=False, keepdim=True) + 1e-6
        total = total + (((a_hat - mu) / sd - (a - mu) / sd) ** 2).mean() / 2
    total.backward()
    for ours, theirs in zip(fh, ref):
        assert torch.allclose(ours.grad.double(), theirs.grad, rtol=1e-4, atol=1e-8)


# -- through the pixel term: one decode, mixture, bound, logging ------------------------------------------------

SPEC = [[("cond", 2, 2), ("text", 2), ("target", 2, 2)], [("cond", 2, 2), ("text", 1), ("target", 2, 2)]]


def _forward(vae, terms, bound=1.0, flat=False, seed=0, **config):
    torch.manual_seed(0)
    model = with_pixel_loss(ContractModel)(hidden=16)
    model.attach_pixel_loss(PixelLossConfig(weight=1.0, terms=terms, term_grad_bound=bound, max_images=0, **config), vae)
    batch = set_timesteps(pack(SPEC, seed=seed), [0, 0.1, 0, 0.2])
    if flat:
        batch["padded_images"] = torch.full_like(batch["padded_images"], 0.2)
    kw, images = forward_kwargs(batch, vae)
    captured = {}
    handle = model.llm2vae.register_forward_hook(lambda m, a, o: captured.update(v=o))
    torch.manual_seed(5)
    out = model(**kw, padded_images=images)
    handle.remove()
    return model, out, captured["v"], kw


def _v_grad(out, v):
    return torch.autograd.grad(out["pixel"], v, retain_graph=True)[0]


@pytest.mark.parametrize("name", ["ssim", "grad", "lpl"])
def test_mixture_value_and_gradient_are_the_weighted_sum_of_single_terms(vae, name):
    terms = f"l2:1,{name}:0.3"
    _, mixed, v, _ = _forward(vae, terms, bound=1e9)
    singles = {}
    for k, a in (("l2", 1.0), (name, 0.3)):
        _, out, v_k, _ = _forward(vae, f"{k}:1", bound=1e9)
        singles[k] = (a, float(out["pixel"]), _v_grad(out, v_k))
    assert float(mixed["pixel"]) == pytest.approx(sum(a * val for a, val, _ in singles.values()), rel=1e-5)
    assert float(mixed[f"pixel_{name}"]) == pytest.approx(singles[name][1], rel=1e-5)
    assert float(mixed["pixel_l2"]) == pytest.approx(singles["l2"][1], rel=1e-5)
    expected = sum(a * g for a, _, g in singles.values())
    assert torch.allclose(_v_grad(mixed, v), expected, rtol=1e-4, atol=1e-9)
    assert float(mixed["pixel_images"]) == 2


def test_terms_flag_with_one_pointwise_term_is_todays_loss_type(vae):
    _, a, va, _ = _forward(vae, None, loss_type="l1")
    _, b, vb, _ = _forward(vae, "l1:1")
    assert float(a["pixel"]) == float(b["pixel"]) and torch.equal(_v_grad(a, va), _v_grad(b, vb))
    assert "pixel_l1" not in a and "pixel_l1" in b  # today's flags: today's log keys


def test_bound_clips_structural_terms_only():
    g = {"l2": torch.tensor([3.0, 4.0]), "ssim": torch.tensor([30.0, 40.0]), "l1": torch.tensor([0.0, 100.0])}
    out = bound_gradients(g, 0.5)
    assert float(out["ssim"].norm()) == pytest.approx(2.5) and torch.equal(out["l1"], g["l1"])
    assert torch.equal(bound_gradients({"ssim": g["ssim"], "l2": g["l2"] * 100}, 0.5)["ssim"], g["ssim"])


@pytest.mark.parametrize("flat", [True, False], ids=["flat", "textured"])
@pytest.mark.parametrize("name", ["ssim", "grad", "lpl"])
def test_safety_each_term_gradient_within_its_weight_times_l2(vae, name, flat):
    """At the default weights, ||a_k grad L_k|| <= a_k * bound * ||grad L2|| at v_hat (bound 1): flat regions
    cannot make a structural term dominate."""
    a = DEFAULT_TERM_WEIGHTS[name]
    _, l2, v2, _ = _forward(vae, "l2:1", flat=flat)
    _, term, vk, _ = _forward(vae, f"{name}:{a}", flat=flat)
    ratio = float(_v_grad(term, vk).norm() / _v_grad(l2, v2).norm())
    assert 0 < ratio <= a * (1 + 1e-5)


def test_without_the_bound_ssim_on_a_flat_target_dwarfs_l2(vae):
    """Why the bound exists: unbounded, 1 - SSIM on a constant target has a gradient far above L2's."""
    _, l2, v2, _ = _forward(vae, "l2:1", flat=True)
    _, term, vk, _ = _forward(vae, "ssim:1", bound=1e9, flat=True)
    assert float(_v_grad(term, vk).norm() / _v_grad(l2, v2).norm()) > 10


def test_lpl_needs_a_decoder_with_up_blocks():
    model = with_pixel_loss(ContractModel)(hidden=16)
    with pytest.raises(ValueError, match="lpl"):
        model.attach_pixel_loss(PixelLossConfig(weight=1.0, terms="l2,lpl"), LinearDecoder())


def test_lpl_with_crops_reads_the_inner_window(vae):
    _, out, v, _ = _forward(vae, "lpl:1", crop=1, crop_margin=1)
    assert torch.isfinite(out["pixel"]) and float(out["pixel_lpl"]) > 0 and _v_grad(out, v).abs().sum() > 0


def test_flags_parse_and_reject():
    from transformers import HfArgumentParser
    from bagel_sr.config import pixel_loss_arguments_class

    parser = HfArgumentParser(pixel_loss_arguments_class())
    (args,) = parser.parse_args_into_dataclasses(["--pixel_loss_terms", "l2:1,ssim,grad:0.2"])
    assert PixelLossConfig.from_namespace(args).term_weights == {"l2": 1.0, "ssim": 0.1, "grad": 0.2}
    for bad in ("ssim:-1", "l2,l2", "psnr:1", "l2:0"):
        with pytest.raises(ValueError, match="--pixel_loss_terms"):
            PixelLossConfig(terms=bad)


# -- per-term gradient norms and adaptive factors at llm2vae ---------------------------------------------------

def _llm2vae_grad(loss, model):
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, [model.llm2vae.weight, model.llm2vae.bias],
                                                                  retain_graph=True)])


def test_adaptive_weight_and_norms_per_term(vae):
    cfg = TrainConfig(mse_weight=1.0)
    extra = dict(adaptive_weight=True, adaptive_weight_max=1e6, log_grad_norms_every=1)
    model, out, _, kw = _forward(vae, "l2:1,grad:0.1", bound=1e9, **extra)
    loss, logs = micro_step_loss(model, out, kw, cfg)
    got = _llm2vae_grad(loss, model)
    # references: the flow term and each term alone, same seed, same v_hat
    ref_model, ref_out, _, _ = _forward(vae, "l2:1", bound=1e9)
    flow = ref_out["mse"].mean(-1).sum() / len(kw["mse_loss_indexes"])
    g_flow = _llm2vae_grad(flow, ref_model)
    g_terms = {"l2": _llm2vae_grad(ref_out["pixel"], ref_model)}
    m, o, _, _ = _forward(vae, "grad:1", bound=1e9)
    g_terms["grad"] = _llm2vae_grad(o["pixel"], m)
    expected = g_flow.clone()
    for name, a in (("l2", 1.0), ("grad", 0.1)):
        f = float(g_flow.norm() / g_terms[name].norm())
        assert float(logs[f"pixel_adaptive_factor_{name}"]) == pytest.approx(f, rel=1e-4)
        assert float(logs[f"grad_norm_pixel_{name}"]) == pytest.approx(a * f * float(g_terms[name].norm()), rel=1e-4)
        expected += a * f * g_terms[name]
    assert torch.allclose(got, expected, rtol=1e-4, atol=1e-9)
    assert float(logs["grad_norm_flow"]) == pytest.approx(float(g_flow.norm()), rel=1e-5)


# -- lpl on BAGEL's own AutoEncoder ---------------------------------------------------------------------------

@pytest.mark.bagel
@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.usefixtures("checkout_shape")
def test_lpl_taps_each_level_of_bagels_autoencoder_once(checkpointing):
    from bagel_sr.testing import bagel_tiny
    from bagel_sr import decoding

    if bagel_tiny.bagel_root() is None:
        pytest.skip(bagel_tiny.REQUIRES_BAGEL_REASON)
    ae = bagel_tiny.build_tiny_autoencoder()
    z = torch.randn(1, bagel_tiny.Z_CHANNELS, 4, 4, requires_grad=True)
    with fidelity_terms.FeatureTap(ae.decoder) as tap:
        x = decoding.decode(ae, z, dtype="fp32", checkpointing=checkpointing)
    sides = [f.shape[-1] for f in tap.features]
    # one map per resolution level, coarse to fine, the last at the image's resolution
    assert len(sides) == len(ae.decoder.up) and sides == sorted(sides) and sides[-1] == x.shape[-1]
    with torch.no_grad(), tap:
        decoding.decode(ae, z.detach() + 0.1, dtype="fp32")
    loss = fidelity_terms.lpl_loss([f for f in tap.features], tap.features)
    assert float(loss) == 0.0
    target = [f.detach() for f in tap.features]
    with tap:
        decoding.decode(ae, z, dtype="fp32", checkpointing=checkpointing)
    loss = fidelity_terms.lpl_loss(tap.features, target)
    (g,) = torch.autograd.grad(loss.sum(), z)
    assert float(loss) > 0 and torch.isfinite(g).all() and g.abs().sum() > 0


def test_a_non_finite_structural_term_drops_all_terms_of_the_micro_step(vae):
    torch.manual_seed(0)
    model = with_pixel_loss(ContractModel)(hidden=16)
    model.attach_pixel_loss(PixelLossConfig(weight=1.0, terms="l2:1,ssim:0.1,lpl:0.05", max_images=0), vae)
    kw, images = forward_kwargs(set_timesteps(pack(SPEC, seed=0), [0, 0.1, 0, 0.2]), vae)
    images = images.clone()
    images[1, 0, 0, 0] = float("nan")  # one ground-truth pixel of the second target
    out = model(**kw, padded_images=images)
    assert float(out["pixel_images"]) == 0 and float(out["pixel_skipped"]) == 1
    assert all(float(out[f"pixel_{k}"]) == 0 for k in ("l2", "ssim", "lpl"))
    (g,) = torch.autograd.grad(out["pixel"] + out["mse"].sum(), model.llm2vae.weight)
    assert torch.isfinite(g).all()
