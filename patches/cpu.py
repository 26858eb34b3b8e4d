"""Run a BAGEL checkout on a CPU (tests, smoke runs): small, named, reversible runtime patches.

What each ``apply``/``install`` function replaces:

- ``install_flash_attn_stand_in()``: adds a module ``flash_attn`` to ``sys.modules`` (only when flash-attn is not
  installed) whose ``flash_attn_varlen_func`` is plain torch. BAGEL imports it at import time in
  ``modeling/bagel/qwen2_navit.py`` and ``modeling/bagel/siglip_navit.py``.
- ``allow_cpu_sdpa(module)``: replaces the module-level name ``sdpa_kernel`` of BAGEL's
  ``modeling.bagel.qwen2_navit`` with a wrapper that also allows ``SDPBackend.MATH``: the training attention asks
  for EFFICIENT_ATTENTION only, for which a CPU has no kernel.
- ``declare_torchvision_ops()``: where a torchvision wheel built for CUDA sits next to a CPU-only torch (its
  compiled operators cannot load, and ``import torchvision`` then fails in the meta registrations of ``nms``), declares
  the two operator schemas it registers against, so its pure-Python transforms (all BAGEL's data code uses) import.
  No-op when torchvision is absent, its operators load, or a ``torchvision`` operator namespace exists already.
- ``apply_cpu_compat()``: the flash_attn stand-in and the sdpa patch.

``patch_flash_attn`` and ``patch_sdpa`` are the same two as rows of :mod:`bagel_sr.patches.registry` (they take
a :class:`~bagel_sr.patches.context.PatchContext`).

What the patches do *not* do, and callers must (see ``bagel_sr/testing/bagel_tiny.py``): on a CPU the model must be cast to
bf16 (``model.to(torch.bfloat16)``, as FSDP's bf16 params are on a GPU) *and* its forward run under
``torch.autocast("cpu", dtype=torch.bfloat16)``. Without autocast the timestep embedder's fp32 sinusoidal
frequencies (and fp32 noised latents) meet bf16 linear weights ("mat1 and mat2 must have the same dtype"); with an
fp32 model under autocast the MoT attention writes bf16 projections into fp32 buffers ("Index put requires the
source and destination dtypes match"). No patch of the checkout is needed beyond the two below.

Every function returns an :class:`~bagel_sr.patches.undo.Undo`; calling a patch again while it is active changes
nothing and returns :data:`~bagel_sr.patches.undo.NOTHING` (the first caller owns the patch).
"""
from __future__ import annotations

import glob
import importlib
import importlib.machinery
import importlib.util
import os
import sys
from types import ModuleType
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend

from .undo import NOTHING, Undo, replace_attribute, replace_item


FLASH_ATTN_MODULE = "flash_attn"
QWEN2_NAVIT_MODULE = "modeling.bagel.qwen2_navit"
_WRAPPED_ATTR = "__bagel_sr_original__"  # set on our sdpa_kernel wrapper: the function it replaced
_STAND_IN_ATTR = "__bagel_sr_stand_in__"  # set on our flash_attn stand-in module


_noop = NOTHING  # the undo of a patch already in force


# ---------------------------------------------------------------------------------------------- flash_attn stand-in

def _varlen_mask(len_q: int, len_k: int, causal: bool, device: torch.device) -> torch.Tensor | None:
    """Boolean (len_q, len_k) mask, True = may attend, or None for full attention.

    Causal masks are aligned to the bottom right like flash-attn >= 2.1: query i sees keys j <= i + len_k - len_q.
    """
    if not causal:
        return None
    offset = len_k - len_q
    q_pos = torch.arange(len_q, device=device)[:, None]
    k_pos = torch.arange(len_k, device=device)[None, :]
    return k_pos <= q_pos + offset


def flash_attn_varlen_func(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    causal: bool = False,
    **kw,
) -> torch.Tensor:
    """Plain-torch stand-in for ``flash_attn.flash_attn_varlen_func`` (same layout, slower).

    q: (total_q, H, D); k, v: (total_k, H_kv, D) with H % H_kv == 0 (GQA: query head h reads kv head
    h // (H / H_kv)); cu_seqlens_*: (B + 1,) int offsets of the packed sequences. Returns (total_q, H, D) in q's
    dtype. ``max_seqlen_*`` are accepted for compatibility and unused. Query rows that see no key (causal with
    len_q > len_k) return zeros, as flash-attn does.
    """
    _check_unsupported(kw)
    heads, kv_heads = q.shape[1], k.shape[1]
    if heads % kv_heads:
        raise ValueError(f"query heads ({heads}) must be a multiple of key/value heads ({kv_heads})")
    if kv_heads != heads:
        k = k.repeat_interleave(heads // kv_heads, dim=1)
        v = v.repeat_interleave(heads // kv_heads, dim=1)
    bounds_q, bounds_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    outputs = []
    for (q0, q1), (k0, k1) in zip(zip(bounds_q, bounds_q[1:]), zip(bounds_k, bounds_k[1:])):
        outputs.append(_attend_one(q[q0:q1], k[k0:k1], v[k0:k1], causal, dropout_p, softmax_scale))
    return torch.cat(outputs, dim=0) if outputs else q.new_zeros(q.shape)


def _attend_one(q, k, v, causal: bool, dropout_p: float, scale: float | None) -> torch.Tensor:
    """Attention of one sequence; q: (Lq, H, D), k, v: (Lk, H, D) -> (Lq, H, D)."""
    len_q, len_k = q.shape[0], k.shape[0]
    if len_q == 0:
        return q
    mask = _varlen_mask(len_q, len_k, causal, q.device)
    blind = None
    if mask is not None:
        blind = ~mask.any(dim=1)  # rows with no visible key: give them one, zero them afterwards
        mask = mask | blind[:, None]
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
        attn_mask=mask, dropout_p=dropout_p, scale=scale,
    ).transpose(0, 1)
    if blind is not None and bool(blind.any()):
        out = out.masked_fill(blind[:, None, None], 0.0)
    return out


def _check_unsupported(kw: dict) -> None:
    """Refuse flash-attn options the stand-in does not implement instead of silently ignoring them."""
    window = kw.pop("window_size", (-1, -1))
    if tuple(window) != (-1, -1):
        raise NotImplementedError("flash_attn stand-in: window_size (local attention) is not supported")
    if kw.pop("alibi_slopes", None) is not None:
        raise NotImplementedError("flash_attn stand-in: alibi_slopes is not supported")
    if kw.pop("return_attn_probs", False):
        raise NotImplementedError("flash_attn stand-in: return_attn_probs is not supported")
    if float(kw.pop("softcap", 0.0)) != 0.0:
        raise NotImplementedError("flash_attn stand-in: softcap is not supported")
    kw.pop("deterministic", None)
    kw.pop("block_table", None)
    if kw:
        raise TypeError(f"flash_attn stand-in: unexpected arguments {sorted(kw)}")


def _make_stand_in() -> ModuleType:
    """A ``flash_attn`` module with a real ``__spec__`` (transformers' probe calls find_spec on it)."""
    module = ModuleType(FLASH_ATTN_MODULE, "CPU stand-in for flash-attn, installed by bagel_sr.patches.cpu.")
    module.__spec__ = importlib.machinery.ModuleSpec(FLASH_ATTN_MODULE, loader=None, origin="bagel_sr.patches.cpu")
    module.__version__ = "0.0.0"  # importlib.metadata knows no such distribution: transformers reports it absent
    module.flash_attn_varlen_func = flash_attn_varlen_func
    setattr(module, _STAND_IN_ATTR, True)
    return module


def is_stand_in_installed() -> bool:
    """True if ``sys.modules['flash_attn']`` is our stand-in."""
    return getattr(sys.modules.get(FLASH_ATTN_MODULE), _STAND_IN_ATTR, False)


def install_flash_attn_stand_in() -> Undo:
    """Register the plain-torch ``flash_attn`` in ``sys.modules`` if flash-attn is not installed.

    Replaces: ``sys.modules['flash_attn']`` (absent before). No-op when real flash-attn is importable or the
    stand-in is already installed. Returns an undo that removes it.
    """
    if is_stand_in_installed() or importlib.util.find_spec(FLASH_ATTN_MODULE) is not None:
        return _noop
    return replace_item(sys.modules, FLASH_ATTN_MODULE, _make_stand_in())


# --------------------------------------------------------------------------------------------------- sdpa on CPU

def _with_math(backends: SDPBackend | Iterable[SDPBackend]) -> list[SDPBackend]:
    """The requested backends, in order, followed by MATH if it was not among them."""
    chosen = [backends] if isinstance(backends, SDPBackend) else list(backends)
    return chosen if SDPBackend.MATH in chosen else chosen + [SDPBackend.MATH]


def _math_allowing(original: Callable) -> Callable:
    """Wrap a ``torch.nn.attention.sdpa_kernel``-like context factory so that MATH is always allowed."""

    def sdpa_kernel(backends, *args, **kwargs):
        return original(_with_math(backends), *args, **kwargs)

    sdpa_kernel.__doc__ = "bagel_sr CPU patch: torch's sdpa_kernel with SDPBackend.MATH added to the backends."
    setattr(sdpa_kernel, _WRAPPED_ATTR, original)
    return sdpa_kernel


def allow_cpu_sdpa(module: ModuleType | None = None) -> Undo:
    """Replace ``module.sdpa_kernel`` (default: BAGEL's ``modeling.bagel.qwen2_navit``) with a wrapper that adds
    ``SDPBackend.MATH`` after the requested backends. Returns an undo restoring the original."""
    if module is None:
        module = _import_qwen2_navit()
    current = getattr(module, "sdpa_kernel", None)
    if current is None:
        raise RuntimeError(
            f"CPU patch: {module.__name__} has no module-level name 'sdpa_kernel'. BAGEL_CONTRACT: the training "
            "attention of modeling/bagel/qwen2_navit.py runs inside `sdpa_kernel(backends=[...])` imported from "
            "torch.nn.attention; this checkout differs, so the CPU patch cannot allow the MATH backend."
        )
    if hasattr(current, _WRAPPED_ATTR):
        return _noop
    return replace_attribute(module, "sdpa_kernel", _math_allowing(current))


def _import_qwen2_navit() -> ModuleType:
    try:
        return importlib.import_module(QWEN2_NAVIT_MODULE)
    except ImportError as err:
        raise RuntimeError(
            f"CPU patch: cannot import {QWEN2_NAVIT_MODULE} ({err}). Put the BAGEL checkout on sys.path first "
            "(bagel_sr.patches.checkout.add_to_sys_path) or pass the module explicitly."
        ) from err


# ------------------------------------------------------------------------------------------- torchvision on CPU

_TORCHVISION_LIB = None
_TORCHVISION_SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor qdets, float dets_scale, int dets_zero_point, Tensor qscores, float scores_scale, "
    "int scores_zero_point, float iou_threshold) -> Tensor",
)


def _torchvision_namespace_exists() -> bool:
    """Whether some library already registered an operator under ``torchvision::`` in this process."""
    return any(name.startswith("torchvision::") for name in torch._C._dispatch_get_all_op_names())


def declare_torchvision_ops() -> Undo:
    """Declare ``torchvision::nms``/``qnms`` when torchvision's compiled operators cannot load (see module doc).

    A ``torchvision`` operator namespace that exists already (torchvision's own, or another library's
    declaration) is left alone: torch allows one ``DEF`` library per namespace.
    """
    global _TORCHVISION_LIB
    spec = importlib.util.find_spec("torchvision")
    if _TORCHVISION_LIB is not None or spec is None or not spec.submodule_search_locations:
        return _noop
    if _torchvision_namespace_exists():
        return _noop
    libs = glob.glob(os.path.join(list(spec.submodule_search_locations)[0], "_C*.so"))
    try:
        if libs:
            torch.ops.load_library(libs[0])
            return _noop
    except OSError:
        pass
    try:
        library = torch.library.Library("torchvision", "DEF")
    except RuntimeError as err:  # a library that declared the namespace without operators yet
        if "Only a single TORCH_LIBRARY" in str(err):
            return _noop
        raise
    for schema in _TORCHVISION_SCHEMAS:
        library.define(schema)
    _TORCHVISION_LIB = library

    def undo() -> None:
        global _TORCHVISION_LIB
        if _TORCHVISION_LIB is library:
            library._destroy()
            _TORCHVISION_LIB = None

    return Undo(undo, "torchvision")


# ----------------------------------------------------------------------------------------------- registry rows

def patch_flash_attn(ctx=None) -> Undo:
    """Registry row: :func:`install_flash_attn_stand_in` (a no-op where flash-attn is installed)."""
    return install_flash_attn_stand_in()


def patch_torchvision_ops(ctx=None) -> Undo:
    """Registry row: :func:`declare_torchvision_ops`."""
    return declare_torchvision_ops()


def patch_sdpa(ctx=None) -> Undo:
    """Registry row: :func:`allow_cpu_sdpa` on ``ctx.navit_module`` (imported from the checkout when unset)."""
    return allow_cpu_sdpa(ctx.module("navit_module", QWEN2_NAVIT_MODULE) if ctx is not None else None)


# -------------------------------------------------------------------------------------------------------- together

def apply_cpu_compat(navit_module: ModuleType | None = None, *, flash_attn: bool = True, sdpa: bool = True
                     ) -> Undo:
    """Make a BAGEL checkout importable and trainable on a CPU.

    flash_attn: install the plain-torch ``flash_attn`` stand-in (when flash-attn is not installed).
    sdpa: let the training attention fall back to ``SDPBackend.MATH``; patches ``navit_module`` or, by default,
        ``modeling.bagel.qwen2_navit`` imported from the checkout, which must be on ``sys.path``.
    Callers still cast the model to bf16 and run its forward under ``torch.autocast("cpu", dtype=torch.bfloat16)``
    (see the module docstring). Idempotent: parts already applied are skipped (absent from ``handle.applied``).
    """
    handle = Undo()
    try:
        if flash_attn:
            handle.add("sys.modules['flash_attn'] (stand-in)", install_flash_attn_stand_in())
        if sdpa:
            module = navit_module if navit_module is not None else _import_qwen2_navit()
            handle.add(f"{module.__name__}.sdpa_kernel", allow_cpu_sdpa(module))
    except BaseException:
        handle.undo()
        raise
    return handle
