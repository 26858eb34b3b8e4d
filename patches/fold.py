"""The loss fold: ``weight * pixel`` enters BAGEL's unchanged loop through the ``mse`` it reduces.

One zero-valued row ``k * (P - P.detach())`` with ``k = weight * N_tokens / (W * mse_weight)`` is appended to the
returned ``mse``; the derivation (why its value is 0 and its gradient that of ``weight * pixel / GA``) is in
docs/loss_fold.md.
"""
import torch

from bagel_sr import distributed


def global_token_count(num_tokens_local: int, device: torch.device) -> torch.Tensor:
    """The loop's ``total_mse_tokens``: the target tokens of all ranks (a collective when distributed)."""
    return distributed.sum_over_ranks(torch.tensor(float(num_tokens_local), device=device))


def fold_into_mse(mse: torch.Tensor, pixel: torch.Tensor, weight, mse_weight: float,
                  num_tokens_global: torch.Tensor) -> torch.Tensor:
    """``mse`` ``(N, D)`` with one more row carrying ``weight * pixel``'s gradient through the loop's reduction.

    ``weight``: a float or a detached 0-dim tensor; ``num_tokens_global``: :func:`global_token_count`.
    """
    k = weight * num_tokens_global / (distributed.world() * mse_weight)
    carrier = (k * (pixel - pixel.detach())).to(mse.dtype)
    return torch.cat([mse, carrier.reshape(1, 1).expand(1, mse.shape[-1])], dim=0)
