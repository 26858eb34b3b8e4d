"""One pixel-weight controller for every loop: the embedded loop's loss is flow + weight * pixel, and warm-up and
adaptive factor come out the same through the BAGEL training patch and the embedded loop."""
import dataclasses

import pytest
import torch

from bagel_sr.testing import fake_checkout
from bagel_sr import PixelLossConfig, with_pixel_loss
from bagel_sr.embedded.train import TrainConfig, micro_step_loss
from bagel_sr.patches.registry import apply_pixel_loss_training
from bagel_sr.weighting import warmup_factor
from bagel_sr.testing.contract_model import ContractModel, LinearDecoder, forward_kwargs, pack, set_timesteps

SPEC = [[("cond", 2, 2), ("text", 2), ("target", 2, 2)], [("text", 3), ("target", 1, 2)],
        [("cond", 1, 2), ("text", 1), ("target", 1, 2)]]
T = [0, 0.1, 0.2, 0, 0.15]  # two paired eligible targets, one unpaired
VAE = LinearDecoder()


def _batch():
    return set_timesteps(pack(SPEC, seed=2), T)


def _reference(mse_weight: float):
    """``(model, flow, pixel)``: the extension alone on the batch, the loop's flow term and the unweighted term."""
    torch.manual_seed(0)
    ref = with_pixel_loss(ContractModel)(hidden=16).attach_pixel_loss(PixelLossConfig(weight=1.0, max_images=0), VAE)
    kw, images = forward_kwargs(_batch(), VAE)
    torch.manual_seed(5)
    out = ref(**kw, padded_images=images)
    return ref, out["mse"].mean(-1).sum() / len(kw["mse_loss_indexes"]) * mse_weight, out["pixel"]


def _llm2vae_grad(loss, model):
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, [model.llm2vae.weight, model.llm2vae.bias],
                                                                  retain_graph=True)])


def _adaptive_factor(max_factor: float, mse_weight: float) -> float:
    ref, flow, pixel = _reference(mse_weight)
    return min(float(_llm2vae_grad(flow, ref).norm() / _llm2vae_grad(pixel, ref).norm()), max_factor)


# -- the two loops, one micro-step each: (pixel weight in force, llm2vae gradient of the loop's loss) ------------

class EmbeddedLoop:
    def __init__(self, config: PixelLossConfig, mse_weight: float, ga: int):
        torch.manual_seed(0)
        self.model = with_pixel_loss(ContractModel)(hidden=16).attach_pixel_loss(config, VAE)
        self.cfg = TrainConfig(mse_weight=mse_weight, gradient_accumulation_steps=ga)

    def step(self):
        kw, images = forward_kwargs(_batch(), VAE)
        torch.manual_seed(5)
        out = self.model(**kw, padded_images=images)
        loss, logs = micro_step_loss(self.model, out, kw, self.cfg)
        return float(logs["pixel_weight"]), _llm2vae_grad(loss, self.model)


class BagelPatchLoop:
    def __init__(self, config: PixelLossConfig, mse_weight: float, ga: int, resume_from: str = ""):
        module, self.batch_module = fake_checkout.script()
        flags = sum(([f"--{k}", str(v)] for k, v in config.to_flags().items() if v is not None), [])
        with apply_pixel_loss_training(module, self.batch_module):
            (self.targs,) = module.HfArgumentParser(module.TrainingArguments).parse_args_into_dataclasses(
                flags + ["--mse_weight", str(mse_weight), "--gradient_accumulation_steps", str(ga)])
            module.load_ae()
            torch.manual_seed(0)
            self.model = module.Bagel(hidden=16)
            if resume_from:  # as BAGEL's main(): after the model, before the loop
                module.FSDPCheckpoint.try_load_train_state(resume_from, None, None, None)
        self.model.pixel_loss_state.vae = VAE

    def step(self):
        data = fake_checkout.model_inputs(_batch(), VAE)
        out = self.model(**data)
        loss = fake_checkout.loop_loss(out, data, self.targs) * self.targs.gradient_accumulation_steps
        return float(out["pixel_weight"]), _llm2vae_grad(loss, self.model)


LOOPS = [EmbeddedLoop, BagelPatchLoop]


@pytest.mark.parametrize("adaptive", [False, True])
def test_a_resumed_run_goes_on_with_the_warm_up_of_the_uninterrupted_run(adaptive):
    """The weight's clock is the loop's optimizer step: a run stopped after optimizer step 1 (checkpoint 0000001)
    and resumed by the patched loop at step 2 gets the weights the uninterrupted run gets from there on."""
    config = PixelLossConfig(weight=0.4, max_images=0, warmup_steps=5, adaptive_weight=adaptive, log_grad_norms_every=2)
    ga, mse_weight = 2, 1.0
    whole = BagelPatchLoop(config, mse_weight, ga)
    uninterrupted = [whole.step()[0] for _ in range(8)]
    assert uninterrupted[3] < uninterrupted[4] < uninterrupted[6]  # still warming up at the resume
    resumed = BagelPatchLoop(config, mse_weight, ga, resume_from="checkpoints/0000001")
    assert [resumed.step()[0] for _ in range(4)] == pytest.approx(uninterrupted[4:], rel=1e-6)
    custom = EmbeddedLoop(config, mse_weight, ga)  # a custom loop tells the model itself
    custom.model.resume_pixel_loss_at(2)
    assert [custom.step()[0] for _ in range(4)] == pytest.approx(uninterrupted[4:], rel=1e-5)
    restarted = BagelPatchLoop(config, mse_weight, ga)  # what a resume gave before: the warm-up again from 0
    assert restarted.step()[0] < uninterrupted[4]


@pytest.mark.parametrize("mse_weight", [1.0, 0.5])
def test_embedded_loop_loss_is_flow_plus_weighted_pixel(mse_weight):
    loop = EmbeddedLoop(PixelLossConfig(weight=0.2, max_images=0), mse_weight, ga=1)
    weight, grad = loop.step()
    ref, flow, pixel = _reference(mse_weight)
    assert weight == pytest.approx(0.2)
    torch.testing.assert_close(grad, _llm2vae_grad(flow + 0.2 * pixel, ref), rtol=1e-5, atol=1e-9)
    assert not torch.allclose(grad, _llm2vae_grad(flow, ref), rtol=1e-3, atol=0)  # the pixel term does count


@pytest.mark.parametrize("loop_cls", LOOPS, ids=lambda c: c.__name__)
@pytest.mark.parametrize("adaptive", [False, True])
def test_warmup_and_adaptive_factor_are_the_same_in_every_loop(loop_cls, adaptive):
    weight, warmup, ga, max_factor, mse_weight = 0.4, 2, 2, 1e6, 0.5
    config = PixelLossConfig(weight=weight, max_images=0, warmup_steps=warmup, adaptive_weight=adaptive,
                             adaptive_weight_max=max_factor)
    factor = _adaptive_factor(max_factor, mse_weight) if adaptive else 1.0
    if adaptive:
        assert abs(factor - 1.0) > 0.1  # a factor that would be missed if ignored
    loop = loop_cls(config, mse_weight, ga)
    ref, flow, pixel = _reference(mse_weight)
    for micro in range(6):
        expected = weight * warmup_factor(micro // ga, warmup) * factor
        got, grad = loop.step()
        assert got == pytest.approx(expected, rel=1e-5), f"micro-step {micro}"
        torch.testing.assert_close(grad, _llm2vae_grad(flow + expected * pixel, ref), rtol=1e-4, atol=1e-9)
