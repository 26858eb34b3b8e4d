"""What an armed model holds, in one object: the settings, the frozen VAE, the counters and the weight's state.

The model keeps it in ``model.__dict__`` (never as a submodule or buffer: checkpoints stay stock); ``deepcopy``
(e.g. BAGEL's EMA copy) shares it.  Written by :mod:`bagel_sr.pixel_term` (counters, the latest tensors) and by
:mod:`bagel_sr.weighting` (micro-step count, adaptive factor, gradient-norm logs); read by whoever logs.
"""
from dataclasses import dataclass, field
from typing import Any, Dict, Optional

import torch

from .config import PixelLossConfig

#: Prepended to the term's output keys when the host model returns one of them itself.
KEY_PREFIX = "bagel_sr_"


@dataclass
class CallTensors:
    """Tensors of one armed forward, kept for monitoring (gradient norms, adaptive weight).

    ``v_hat``: ``llm2vae``'s output ``(N_target_tokens, p*p*C)``, graph kept; ``hidden``: its input
    ``(N_target_tokens, D)``, detached; ``pixel_grad``: ``dL_pix/dv_hat`` of the unweighted, rank-normalised term,
    float32, detached (zeros when no image was used).  With several fidelity terms: ``term_grads``
    (``{term: dL_k/dv_hat}``, bounded, unweighted) and ``mix`` (the :class:`~bagel_sr.pixel_term.TermMix` whose
    per-term adaptive factors the weight controller sets).
    """

    v_hat: torch.Tensor
    hidden: torch.Tensor
    pixel_grad: torch.Tensor
    term_grads: Dict[str, torch.Tensor] = field(default_factory=dict)
    mix: Any = None


@dataclass
class PixelLossState:
    """The armed model's single state object.

    ``calls``: armed forwards so far; ``skipped_nonfinite``: micro-steps whose term was dropped as non-finite.
    ``current``: the :class:`CallTensors` of the latest forward while the config asks for them
    (``log_grad_norms_every`` or ``adaptive_weight``); its consumer takes them with :meth:`pop_call`.
    ``llm2vae_bias``: whether ``llm2vae`` has a bias (read at arming, before FSDP flattens parameters).
    ``no_image_watch``: warns once if the term admits no image in its first micro-steps.
    ``micro_steps``, ``adaptive_factor``, ``grad_logs``: the pixel-weight controller's state
    (:mod:`bagel_sr.weighting`): micro-steps weighted so far, the latest adaptive factor, the latest
    gradient-norm logs (repeated until the next measurement).  ``start_step``: the loop's optimizer step when this
    process weighted its first micro-step (a resumed run's step, 0 for a fresh one); the controller's clock is
    ``start_step + micro_steps // gradient_accumulation_steps``, the loop's optimizer step.
    ``key_prefix``: prepended to every key the term adds to the model's outputs, set (for good) when the host's own
    forward returns one of them (a fork with its own ``pixel``): a host key is never overwritten.
    """

    config: PixelLossConfig
    vae: Any
    llm2vae_bias: bool = True
    calls: int = 0
    skipped_nonfinite: int = 0
    current: Optional[CallTensors] = None
    micro_steps: int = 0
    start_step: int = 0
    adaptive_factor: Any = 1.0
    grad_logs: Dict[str, torch.Tensor] = field(default_factory=dict)
    no_image_watch: Any = None  # bagel_sr.monitoring.NoImageWatch, set at arming
    key_prefix: str = ""  # KEY_PREFIX once the host's forward returns one of our keys itself

    def key(self, name: str) -> str:
        """The output (and logged) key of ``name``: prefixed when the host model returns ``name`` itself."""
        return self.key_prefix + name

    def __deepcopy__(self, memo):
        return self

    @property
    def wants_call_tensors(self) -> bool:
        return self.config.log_grad_norms_every > 0 or self.config.adaptive_weight

    def pop_call(self) -> Optional[CallTensors]:
        """The latest forward's tensors (once), then None."""
        call, self.current = self.current, None
        return call
