"""The pixel term's non-finite guard (bagel_sr.pixel_term): a decode whose value or gradient is not finite
never reaches the model or the logs."""
import logging

import pytest
import torch

from bagel_sr import PixelLossConfig, with_pixel_loss
from bagel_sr.testing.contract_model import ContractModel, LinearDecoder, forward_kwargs, pack, set_timesteps
from bagel_sr.testing.two_ranks import run_ranks

Extended = with_pixel_loss(ContractModel)
# two paired targets at t = 0.1 and 0.2: both eligible under max_t = 0.3
SPEC = [[("cond", 2, 2), ("text", 2), ("target", 2, 2)], [("cond", 1, 2), ("text", 1), ("target", 1, 2)]]
T = [0, 0.1, 0, 0.2]
CONFIG = dict(weight=0.5, max_t=0.3, max_images=0)


class _NanBackward(torch.autograd.Function):
    """Identity forward, NaN gradient."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return torch.full_like(grad, float("nan"))


class BrokenDecoder(LinearDecoder):
    """``how``: 'nan' / 'inf' in the decoded value, or 'nan_backward' (finite value, NaN gradient)."""

    def __init__(self, how: str):
        super().__init__()
        self.how, self.calls = how, 0

    def decode(self, z):
        self.calls += 1
        x = super().decode(z)
        if self.how == "nan_backward":
            return _NanBackward.apply(x)
        return x + float(self.how)  # x + nan / x + inf


class CountingDecoder(LinearDecoder):
    def __init__(self):
        super().__init__()
        self.calls = 0

    def decode(self, z):
        self.calls += 1
        return super().decode(z)


def _batch(t=T, seed=3):
    return set_timesteps(pack(SPEC, seed=seed), t)


def _step(vae, weight_term: bool, batch=None, config=CONFIG):
    """One forward/backward of ``mse_mean + weight * pixel`` (or the flow loss alone); returns (out, grads)."""
    torch.manual_seed(0)
    model = Extended(hidden=16)
    if weight_term:
        model.attach_pixel_loss(PixelLossConfig(**config), vae)
    batch = batch or _batch()
    kw, images = forward_kwargs(batch, vae)
    torch.manual_seed(1)
    out = model(**kw, padded_images=images) if weight_term else model(**kw)
    loss = out["mse"].mean()
    if weight_term:
        loss = loss + config["weight"] * out["pixel"]
    loss.backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, model


@pytest.mark.parametrize("how", ["nan", "inf", "nan_backward"])
def test_non_finite_term_leaves_flow_gradients_untouched(how, caplog):
    vae = BrokenDecoder(how)
    _, flow_grads, _ = _step(vae, weight_term=False)
    with caplog.at_level(logging.WARNING, logger="bagel_sr"):
        out, grads, model = _step(vae, weight_term=True)
    assert vae.calls == 2  # both images were decoded, then dropped
    assert float(out["pixel"]) == 0.0 and int(out["pixel_images"]) == 0
    assert int(out["pixel_skipped"]) == 1 and model.pixel_loss_state.skipped_nonfinite == 1
    assert grads.keys() == flow_grads.keys()
    for name, g in grads.items():
        assert torch.isfinite(g).all()
        assert torch.equal(g, flow_grads[name]), name
    assert "non-finite pixel term" in caplog.text and "dropped" in caplog.text


def test_finite_decoder_is_not_dropped():
    out, grads, model = _step(LinearDecoder(), weight_term=True)
    _, flow_grads, _ = _step(LinearDecoder(), weight_term=False)
    assert int(out["pixel_skipped"]) == 0 and int(out["pixel_images"]) == 2 and float(out["pixel"]) > 0
    assert not torch.equal(grads["llm2vae.weight"], flow_grads["llm2vae.weight"])


def test_counter_runs_and_warnings_are_rate_limited(caplog):
    vae = BrokenDecoder("nan")
    torch.manual_seed(0)
    model = Extended(hidden=16).attach_pixel_loss(PixelLossConfig(**CONFIG), vae)
    kw, images = forward_kwargs(_batch(), vae)
    with caplog.at_level(logging.WARNING, logger="bagel_sr"):
        counts = [int(model(**kw, padded_images=images)["pixel_skipped"]) for _ in range(5)]
    assert counts == [1, 2, 3, 4, 5]
    assert len([r for r in caplog.records if "non-finite" in r.getMessage()]) == 3  # 1st, 2nd, 4th


def test_no_decode_when_nothing_is_eligible():
    vae = CountingDecoder()
    out, grads, _ = _step(vae, weight_term=True, batch=_batch(t=[0, 0.8, 0, 0.9]))
    assert vae.calls == 0 and int(out["pixel_images"]) == 0 and float(out["pixel"]) == 0.0
    assert "llm2vae.weight" in grads


def test_eval_forward_without_grad_decodes_without_backward():
    vae = CountingDecoder()
    torch.manual_seed(0)
    model = Extended(hidden=16).attach_pixel_loss(PixelLossConfig(**CONFIG), vae)
    kw, images = forward_kwargs(_batch(), vae)
    with torch.no_grad():
        out = model(**kw, padded_images=images)
    assert vae.calls == 2 and float(out["pixel"]) > 0 and not out["pixel"].requires_grad


# -- two ranks: the broken rank drops its term, both ranks still run the count's all-reduce ----------------------

def _rank_result(rank):
    vae = BrokenDecoder("nan") if rank == 0 else LinearDecoder()
    torch.manual_seed(0)
    model = Extended(hidden=16).attach_pixel_loss(PixelLossConfig(**CONFIG), vae)
    kw, images = forward_kwargs(_batch(seed=3 + rank), vae)
    torch.manual_seed(1 + rank)
    out = model(**kw, padded_images=images)
    out["pixel"].backward()
    return {k: out[k].detach() for k in ("pixel", "pixel_images", "pixel_skipped")}


@pytest.mark.timeout(120)
def test_two_ranks_one_non_finite():
    r0, r1 = run_ranks(_rank_result)
    assert (int(r0["pixel_images"]), int(r0["pixel_skipped"]), float(r0["pixel"])) == (0, 1, 0.0)
    assert (int(r1["pixel_images"]), int(r1["pixel_skipped"])) == (2, 0)
    # rank 1 alone: its 2 images over the global count 2, times the world size 2 (the loop averages over ranks)
    torch.manual_seed(0)
    ref = Extended(hidden=16).attach_pixel_loss(PixelLossConfig(**CONFIG), LinearDecoder())
    kw, images = forward_kwargs(_batch(seed=4), ref.pixel_loss_state.vae)
    torch.manual_seed(2)
    local_mean = ref(**kw, padded_images=images)["pixel"].detach()
    torch.testing.assert_close(r1["pixel"], 2 * local_mean)
