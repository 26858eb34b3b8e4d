"""Gradient norms of the flow and pixel terms on ``llm2vae``, and the adaptive pixel weight built from them.

Both terms reach the model only through ``v_hat = llm2vae(hidden)``, so their gradients on ``llm2vae``'s parameters
follow from their gradients w.r.t. its output ``G = dL/dv_hat`` (``(N, C)``) and its input ``H`` (``(N, D)``):
``grad_W = G^T H`` (``(C, D)``) and ``grad_b = G.sum(0)``.  This works under FSDP, where ``llm2vae.weight`` is a
flattened shard: nothing here reads a parameter.  Across ranks the local gradients are summed and divided by the
world size (what FSDP's gradient reduction does), then their norms are taken: the norms of the gradient the optimizer
sees for one micro-batch, before the division by the gradient-accumulation steps (the ratio does not depend on it).

Cost when computed: one ``autograd.grad`` of the flow term w.r.t. ``v_hat`` (elementwise ops only), two
``(C, N) x (N, D)`` products and one all-reduce of ``2 * (C*D + C)`` floats (BAGEL-7B: C = 64, D = 3584, 1.8 MB).
The pixel term's gradient w.r.t. ``v_hat`` is already known (the extension back-propagates the decoder inside its
forward), so neither the norms nor the adaptive weight cost another pass through the decoder.
"""
from dataclasses import dataclass
from typing import Any, Dict, Optional, Sequence, Union

import torch

from . import distributed

Weight = Union[float, torch.Tensor]


@dataclass
class GradNorms:
    """Norms (0-dim float32 tensors) of the flow term's, the weighted and the unweighted pixel term's gradients."""

    flow: torch.Tensor
    pixel: torch.Tensor
    pixel_unweighted: torch.Tensor

    @property
    def ratio(self) -> torch.Tensor:
        """``||grad weight*L_pix|| / ||grad L_flow||``."""
        return self.pixel / self.flow.clamp(min=1e-30)

    def as_log(self) -> Dict[str, torch.Tensor]:
        """The keys BAGEL's loop logs: ``grad_norm_flow``, ``grad_norm_pixel`` (weighted), ``grad_norm_ratio``."""
        return {"grad_norm_flow": self.flow, "grad_norm_pixel": self.pixel, "grad_norm_ratio": self.ratio}


def flow_term(mse_rows: torch.Tensor, num_tokens_global: Union[int, torch.Tensor], mse_weight: float) -> torch.Tensor:
    """The flow term as BAGEL's loop weights it: ``mse_rows.mean(-1).sum() * W / N_tokens_global * mse_weight``."""
    return mse_rows.float().mean(-1).sum() * (distributed.world() * float(mse_weight)) / num_tokens_global


def output_gradient(loss: torch.Tensor, v_hat: torch.Tensor) -> torch.Tensor:
    """``dloss/dv_hat`` (float32), keeping the graph for the loop's own backward."""
    (grad,) = torch.autograd.grad(loss, v_hat, retain_graph=True)
    return grad.float()


def linear_parameter_gradients(hidden: torch.Tensor, output_grads: Sequence[torch.Tensor], bias: bool = True) -> torch.Tensor:
    """``(K, C*D [+ C])``: the flattened weight (and bias) gradients of a Linear, one row per output gradient.

    ``hidden`` ``(N, D)`` is the Linear's input, each output gradient ``(N, C)``.  Local to this rank.
    """
    h = hidden.detach().float()
    rows = []
    for g in output_grads:
        g = g.detach().float()
        parts = [(g.t() @ h).reshape(-1)]
        if bias:
            parts.append(g.sum(0))
        rows.append(torch.cat(parts))
    return torch.stack(rows)


def llm2vae_norms(hidden: torch.Tensor, output_grads: Sequence[torch.Tensor], bias: bool = True) -> torch.Tensor:
    """``(K,)``: norms of the ``llm2vae`` gradients of each output gradient ``(N, C)``, averaged over ranks
    (a collective when distributed)."""
    grads = linear_parameter_gradients(hidden, output_grads, bias=bias)
    world = distributed.world()
    if world > 1:
        grads = distributed.sum_over_ranks(grads) / world
    return grads.norm(dim=1)


def llm2vae_grad_norms(hidden: torch.Tensor, flow_grad: torch.Tensor, pixel_grad: torch.Tensor,
                       pixel_weight: Weight, bias: bool = True) -> GradNorms:
    """Norms of the ``llm2vae`` gradients of the flow term and of ``pixel_weight * L_pix``, averaged over ranks.

    ``flow_grad``, ``pixel_grad``: ``dL/dv_hat`` ``(N, C)`` of the flow term and of the unweighted pixel term.
    A collective when distributed: call it on every rank at the same micro-steps.
    """
    flow, pixel = llm2vae_norms(hidden, [flow_grad, pixel_grad], bias=bias)
    weight = torch.as_tensor(pixel_weight, dtype=torch.float32, device=pixel.device).detach()
    return GradNorms(flow=flow, pixel=weight.abs() * pixel, pixel_unweighted=pixel)


def adaptive_factor(norms: GradNorms, max_factor: float) -> torch.Tensor:
    """``min(||grad L_flow|| / ||grad L_pix||, max_factor)``, detached (``max_factor`` when the pixel gradient is 0)."""
    ratio = norms.flow / norms.pixel_unweighted.clamp(min=1e-30)
    return ratio.clamp(max=float(max_factor)).detach()


class NoImageWatch:
    """Warns once, loudly, when the pixel term has admitted no image in its first ``steps`` micro-steps although
    its weight is positive (a typo in ``--pixel_loss_datasets``, unpaired data, ``--visual_gen`` off ...)."""

    def __init__(self, steps: int = 200):
        self.steps, self.seen, self.images, self.done = steps, 0, 0, steps <= 0

    def observe(self, images: float, weight: float, datasets: Any = None) -> Optional[str]:
        """Record one micro-step; returns the warning text the one time it is due (and logs it)."""
        if self.done:
            return None
        self.seen += 1
        self.images += int(images)
        if self.images > 0:
            self.done = True
            return None
        if self.seen < self.steps or weight <= 0:
            return None
        self.done = True
        import warnings

        msg = (f"bagel-sr: WARNING: the pixel term admitted no image in the first {self.seen} micro-steps although "
               f"its weight is {weight:g}: check --pixel_loss_datasets ({datasets or 'unset'}), that the data is "
               "paired (--pixel_loss_paired_only) and --pixel_loss_max_t; the run is training on the flow loss only")
        warnings.warn(msg, RuntimeWarning, stacklevel=2)
        return msg
