"""A DeepSpeed port of BAGEL's loop (ZeRO-2 on CPU, gloo, 2 ranks): the wrapper's model class and the integration
API for custom loops both give the gradients of the written-out loss ``flow + weight * pixel``; and (``bagel``)
the wrapper trains BAGEL's own script ported to DeepSpeed (tests/fork_checkout.py) through the CPU dry run.

The port: ``deepspeed.initialize``, ``engine(**data)``, the loop's own ``mse`` reduction, ``engine.backward(loss)``,
``engine.step()``.  Needs the ``deepspeed`` extra (``DS_ACCELERATOR=cpu`` is set for the ranks).
"""
import os
import pathlib
import re
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist

pytest.importorskip("deepspeed", reason="install the deepspeed extra: pip install -e '.[deepspeed]'")

from bagel_sr import PixelLossConfig, with_pixel_loss  # noqa: E402
from contract_model import ContractModel, LinearDecoder, forward_kwargs, pack, set_timesteps  # noqa: E402
from two_ranks import run_ranks  # noqa: E402
from bagel_tiny import requires_bagel, upstream_root  # noqa: E402

CONFIG = dict(weight=0.05, max_t=0.3, max_images=0)
DS_CONFIG = {
    "train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "steps_per_print": 10**9,
    "zero_optimization": {"stage": 2}, "zero_allow_untested_optimizer": True,
    "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}},
}


def _rank_batch(rank):
    if rank == 0:
        return set_timesteps(pack([[("cond", 2, 2), ("text", 2), ("target", 2, 2)],
                                   [("cond", 1, 2), ("text", 1), ("target", 1, 2)]], seed=10), [0, 0.1, 0, 0.25])
    return set_timesteps(pack([[("cond", 2, 2), ("text", 2), ("target", 2, 2)]], seed=11), [0, 0.2])


def _flow(out, kw):
    """The loop's flow term: ``mse.mean(-1).sum() * world / all-reduced token count`` (mse_weight 1)."""
    tokens = torch.tensor(float(len(kw["mse_loss_indexes"])))
    dist.all_reduce(tokens)
    return out["mse"].mean(dim=-1).sum() * dist.get_world_size() / tokens


def _engine(model):
    import deepspeed

    os.environ.update(LOCAL_RANK=str(dist.get_rank()), RANK=str(dist.get_rank()), WORLD_SIZE=str(dist.get_world_size()))
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=DS_CONFIG,
                                      dist_init_required=False)
    return engine


def _full_grads(engine):
    from deepspeed.utils import safe_get_full_grad

    return {n: safe_get_full_grad(p).clone() for n, p in engine.module.named_parameters()}


def _reference(rank, vae):
    """The written-out loss without DeepSpeed, gradients averaged over ranks as data parallelism does."""
    torch.manual_seed(0)
    model = with_pixel_loss(ContractModel)(hidden=16).attach_pixel_loss(PixelLossConfig(**CONFIG), vae)
    kw, images = forward_kwargs(_rank_batch(rank), vae)
    torch.manual_seed(100 + rank)
    out = model(**kw, padded_images=images)
    (_flow(out, kw) + CONFIG["weight"] * out["pixel"]).backward()
    grads = {}
    for n, p in model.named_parameters():
        g = p.grad if p.grad is not None else torch.zeros_like(p)
        dist.all_reduce(g)
        grads[n] = g / dist.get_world_size()
    return grads


def _wrapper_loop(rank, vae):
    """BAGEL's loop ported to DeepSpeed, on the wrapper's model class (the fold): not a line about the pixel term."""
    from bagel_sr.patches.context import RunState
    from bagel_sr.patches.training import PixelLossInputs, make_training_model_class

    run = RunState(config=PixelLossConfig(**CONFIG), vae=vae, training_args=SimpleNamespace(mse_weight=1.0))
    torch.manual_seed(0)
    engine = _engine(make_training_model_class(ContractModel, run)(hidden=16))
    kw, images = forward_kwargs(_rank_batch(rank), vae)
    torch.manual_seed(100 + rank)
    loss_dict = engine(**kw, pixel_loss_inputs=PixelLossInputs(images, None))
    engine.backward(_flow(loss_dict, kw))
    grads = _full_grads(engine)
    engine.step()
    return grads, float(loss_dict["pixel_images"])


def _custom_loop(rank, vae):
    """A custom DeepSpeed loop through the integration API: ``loss = flow + model.next_pixel_weight(flow).weight *
    out["pixel"]``."""
    torch.manual_seed(0)
    model = with_pixel_loss(ContractModel)(hidden=16).attach_pixel_loss(PixelLossConfig(**CONFIG), vae)
    engine = _engine(model)
    kw, images = forward_kwargs(_rank_batch(rank), vae)
    torch.manual_seed(100 + rank)
    out = engine(**kw, padded_images=images)
    flow = _flow(out, kw)
    weight = engine.module.next_pixel_weight(flow).weight
    engine.backward(flow + weight * out["pixel"])
    grads = _full_grads(engine)
    engine.step()
    return grads


def _rank_result(rank):
    vae = LinearDecoder()
    return {"reference": _reference(rank, vae), "wrapper": _wrapper_loop(rank, vae), "custom": _custom_loop(rank, vae)}


def test_zero2_gradients_equal_the_written_out_loss(monkeypatch):
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    results = run_ranks(_rank_result)
    for r in results:
        (wrapper, images), custom, ref = r["wrapper"], r["custom"], r["reference"]
        assert images > 0  # the term acted
        assert wrapper.keys() == ref.keys() == custom.keys()
        assert ref["llm2vae.weight"].abs().sum() > 0
        for name in ref:
            torch.testing.assert_close(wrapper[name], ref[name], rtol=1e-4, atol=1e-6)
            torch.testing.assert_close(custom[name], ref[name], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(results[0]["wrapper"][0]["llm.0.weight"], results[1]["wrapper"][0]["llm.0.weight"])


# ---------------------------------------------------------------- BAGEL's own script, ported to DeepSpeed

@pytest.mark.bagel
@requires_bagel
def test_wrapper_trains_bagels_script_ported_to_deepspeed_with_the_pixel_term(tmp_path):
    from bagel_sr.smoke.dry_run import LaunchLog
    from fork_checkout import DEEPSPEED_SCRIPT, make_deepspeed_fork

    root = make_deepspeed_fork(upstream_root(), tmp_path / "checkout")  # each edit matches once, or it fails
    script = (root / DEEPSPEED_SCRIPT).read_text()
    assert "deepspeed.initialize(" in script and "fsdp_wrapper(" not in script and "loss.backward()" not in script
    work = tmp_path / "work"
    proc = subprocess.run(
        [sys.executable, "-m", "bagel_sr.smoke", "--bagel_root", str(root), "--bagel_train_script", DEEPSPEED_SCRIPT,
         "--workdir", str(work), "--no_resume", "--steps", "2", "--nproc", "2"],
        cwd=pathlib.Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=300,
        env=dict(os.environ, DS_ACCELERATOR="cpu"))
    out = proc.stdout + proc.stderr
    line = [x for x in out.splitlines() if x.strip()][-1]
    assert proc.returncode == 0 and line.startswith("smoke: OK"), out[-3000:]
    assert re.search(r"pixel term acted on [1-9]/2 steps", line), line
    assert "0000002/mp_rank_00_model_states.pt (DeepSpeed's module states) load into stock Bagel (strict)" in line
    assert "no EMA checked" in line
    log_text = (work / "launch1.log").read_text()
    log = LaunchLog.parse(log_text)
    assert sorted(log.steps) == [0, 1]
    assert all({"mse", "ce", "pixel", "pixel_images", "pixel_weight"} <= set(items) for items in log.steps.values())
    assert any(items["pixel_images"] > 0 and items["pixel"] > 0 for items in log.steps.values())
    assert all(items["pixel_weight"] == 0.05 for items in log.steps.values())  # the wrapper's default weight
    # The engine trained it: DeepSpeed's checkpoint, one ZeRO optimizer shard per rank.
    saved = sorted(f.name for f in (work / "checkpoints" / "0000002").iterdir())
    assert saved == ["bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt", "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt",
                     "mp_rank_00_model_states.pt"], saved
