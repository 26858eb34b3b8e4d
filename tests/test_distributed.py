"""Two CPU processes (gloo): one rank has no eligible image; both finish and match the global mean."""
import pytest
import torch
import torch.distributed as dist

from bagel_sr import PixelLossConfig, with_pixel_loss
from bagel_sr.testing.contract_model import ContractModel, LinearDecoder, forward_kwargs, pack, set_timesteps
from bagel_sr.testing.two_ranks import run_ranks

CONFIG = dict(weight=0.05, max_t=0.3, max_images=0)


def _rank_batch(rank):
    if rank == 0:  # two eligible paired targets
        return set_timesteps(pack([[("cond", 2, 2), ("text", 2), ("target", 2, 2)],
                                   [("cond", 1, 2), ("text", 1), ("target", 1, 2)]], seed=10), [0, 0.1, 0, 0.25])
    return set_timesteps(pack([[("cond", 2, 2), ("text", 2), ("target", 2, 2)]], seed=11), [0, 0.8])  # t > max_t


def _model():
    torch.manual_seed(0)
    return with_pixel_loss(ContractModel)(hidden=16).attach_pixel_loss(PixelLossConfig(**CONFIG), LinearDecoder())


def _local(model, rank):
    batch = _rank_batch(rank)
    kw, images = forward_kwargs(batch, model.pixel_loss_state.vae)
    torch.manual_seed(100 + rank)
    return model(**kw, padded_images=images)


def _rank_result(rank):
    world = dist.get_world_size()
    model = _model()
    out = _local(model, rank)
    out["pixel"].backward()
    for p in model.parameters():  # what DDP/FSDP do: average gradients over ranks
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad /= world
    value = out["pixel"].detach().clone()
    dist.all_reduce(value)  # the loop logs the rank average
    return {"pixel_avg": value / world, "count": out["pixel_images"],
            "grads": {n: p.grad for n, p in model.named_parameters() if p.grad is not None}}


@pytest.mark.timeout(120)
def test_two_ranks_one_without_eligible_images_match_global_mean():
    results = run_ranks(_rank_result)
    assert [int(r["count"]) for r in results] == [2, 0]
    # reference in one process: sum of w*loss over every eligible image of both ranks / their count
    model = _model()
    sums, n = [], 0
    for rank in range(2):
        out = _local(model, rank)
        k = int(out["pixel_images"])
        sums.append(out["pixel"] * k)
        n += k
    reference = sum(sums) / n
    reference.backward()
    torch.testing.assert_close(results[0]["pixel_avg"], reference.detach(), rtol=1e-5, atol=1e-8)
    for r in results:
        assert r["grads"].keys() == {n for n, p in model.named_parameters() if p.grad is not None}
        for name, g in r["grads"].items():
            torch.testing.assert_close(g, dict(model.named_parameters())[name].grad, rtol=1e-4, atol=1e-8)
