"""The pixel-weight controller: the one place that decides ``lambda`` of a micro-step, for every loop.

``lambda = --pixel_loss_weight * warmup(step) [* adaptive factor]`` where ``step`` is the loop's optimizer step
(:func:`optimizer_step`: the step the loop resumed from, ``state.start_step``, plus this process's
``micro_step // gradient_accumulation_steps``; a resumed run does not warm up again) and the adaptive factor is
``min(||grad L_flow|| / ||grad L_pix||, adaptive_weight_max)`` on ``llm2vae`` (:mod:`bagel_sr.monitoring`),
measured on every micro-step with ``--pixel_loss_adaptive_weight``, and on the first micro-step of every N-th
optimizer step for ``--pixel_loss_log_grad_norms_every N`` (the norms are logged).  The BAGEL training patch, the
embedded loop and a custom loop all call :func:`next_weight` (or ``model.next_pixel_weight``) once per armed
forward, after it and before the backward; its clock and its adaptive factor live in the model's
:class:`~bagel_sr.state.PixelLossState`.
"""
from dataclasses import dataclass, field
from typing import Dict, Optional, Union

import torch

from . import monitoring
from .config import PixelLossConfig
from .state import CallTensors, PixelLossState

Weight = Union[float, torch.Tensor]


@dataclass
class WeightStep:
    """``weight``: lambda of this micro-step (a float, or a detached 0-dim tensor with the adaptive factor);
    ``logs``: what was measured this micro-step (``pixel_adaptive_factor``, ``grad_norm_*``), empty otherwise."""

    weight: Weight
    logs: Dict[str, torch.Tensor] = field(default_factory=dict)


def warmup_factor(step: int, warmup_steps: int) -> float:
    """Linear ramp of the weight from 0 over ``warmup_steps`` optimizer steps (1 afterwards or when 0)."""
    if warmup_steps <= 0:
        return 1.0
    return min(1.0, step / warmup_steps)


def grad_norms_due(config: PixelLossConfig, micro_step: int, gradient_accumulation_steps: int,
                   start_step: int = 0) -> bool:
    """Every micro-step with the adaptive weight; else the first micro-step of every N-th optimizer step of the
    loop (``start_step``: its step at this process's first micro-step)."""
    if config.adaptive_weight:
        return True
    every = config.log_grad_norms_every
    ga = max(1, gradient_accumulation_steps)
    return every > 0 and micro_step % ga == 0 and (start_step + micro_step // ga) % every == 0


def optimizer_step(state: PixelLossState, gradient_accumulation_steps: int = 1) -> int:
    """The loop's optimizer step of the micro-step about to be weighted: ``state.start_step`` (where the loop
    resumed) plus the optimizer steps this process has made."""
    return int(state.start_step) + state.micro_steps // max(1, int(gradient_accumulation_steps))


def next_weight(state: PixelLossState, flow_loss: Optional[torch.Tensor],
                gradient_accumulation_steps: int = 1) -> WeightStep:
    """The weight of the pixel term for the forward that just ran; advances the state's micro-step clock.

    ``flow_loss``: the flow term exactly as the loop weights it (0-dim, graph kept; only differentiated w.r.t.
    ``v_hat`` when a measurement is due).  Without it (or without a graph) nothing is measured and the latest
    adaptive factor applies.
    """
    config = state.config
    ga = max(1, int(gradient_accumulation_steps))
    micro, step = state.micro_steps, optimizer_step(state, ga)
    state.micro_steps += 1
    weight = config.weight * warmup_factor(step, config.warmup_steps)
    call = state.pop_call()
    measurable = call is not None and flow_loss is not None and flow_loss.requires_grad
    if measurable and grad_norms_due(config, micro, ga, state.start_step):
        return _measure(state, call, flow_loss, weight)
    if config.adaptive_weight:
        weight = weight * state.adaptive_factor
    return WeightStep(weight)


def _measure(state: PixelLossState, call: CallTensors, flow_loss: torch.Tensor, weight: Weight) -> WeightStep:
    """Gradient norms of both terms on ``llm2vae``; the adaptive factor from them if asked (a collective)."""
    config = state.config
    flow_grad = monitoring.output_gradient(flow_loss, call.v_hat)
    if call.term_grads:
        return _measure_terms(state, call, flow_grad, weight)
    norms = monitoring.llm2vae_grad_norms(call.hidden, flow_grad, call.pixel_grad, weight, bias=state.llm2vae_bias)
    logs = {}
    if config.adaptive_weight:
        state.adaptive_factor = monitoring.adaptive_factor(norms, config.adaptive_weight_max)
        weight = weight * state.adaptive_factor
        norms.pixel = weight * norms.pixel_unweighted
        logs["pixel_adaptive_factor"] = state.adaptive_factor
    if config.log_grad_norms_every > 0:
        logs.update(norms.as_log())
    state.grad_logs = {k: v.detach() for k, v in logs.items()}
    return WeightStep(weight, dict(state.grad_logs))


def _measure_terms(state: PixelLossState, call: CallTensors, flow_grad: torch.Tensor, weight: Weight) -> WeightStep:
    """Several fidelity terms: norms per term (``grad_norm_pixel_<term>``, weighted) and, with the adaptive weight,
    one factor per term ``f_k = min(||grad L_flow|| / ||grad L_k||, max)`` (``pixel_adaptive_factor_<term>``),
    written into the forward's :class:`~bagel_sr.pixel_term.TermMix` so the backward uses ``sum_k a_k f_k g_k``;
    the returned weight is ``lambda * warmup``.  ``grad_norm_pixel`` is the weighted sum's norm (a collective)."""
    config, names = state.config, list(call.term_grads)
    grads = [flow_grad] + [call.term_grads[n] for n in names]
    norms = monitoring.llm2vae_norms(call.hidden, grads, bias=state.llm2vae_bias)
    flow_norm, term_norms = norms[0], dict(zip(names, norms[1:]))
    logs = {}
    if config.adaptive_weight:
        factors = {n: (flow_norm / term_norms[n].clamp(min=1e-30)).clamp(max=float(config.adaptive_weight_max)).detach()
                   for n in names}
        call.mix.factors = factors
        logs.update({f"pixel_adaptive_factor_{n}": f for n, f in factors.items()})
    if config.log_grad_norms_every > 0:
        w = torch.as_tensor(weight, dtype=torch.float32, device=flow_norm.device).detach().abs()
        mixed = monitoring.llm2vae_norms(call.hidden, [call.mix.gradient()], bias=state.llm2vae_bias)[0]
        logs.update(grad_norm_flow=flow_norm, grad_norm_pixel=w * mixed,
                    grad_norm_ratio=w * mixed / flow_norm.clamp(min=1e-30))
        for n in names:
            a = call.mix.weights[n] * float(call.mix.factors.get(n, 1.0))
            logs[f"grad_norm_pixel_{n}"] = w * a * term_norms[n]
    state.grad_logs = {k: v.detach() for k, v in logs.items()}
    return WeightStep(weight, dict(state.grad_logs))
