"""The CPU compatibility patch: the flash-attn stand-in against a dense reference, the sdpa fallback, undo."""
from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import math
import os
import sys
import types
from unittest import mock

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from bagel_sr.patches import cpu
from bagel_sr.testing.fake_checkout import navit_module as fake_navit_module

real_flash_attn = pytest.mark.skipif(
    importlib.util.find_spec("flash_attn") is not None and not cpu.is_stand_in_installed(),
    reason="real flash-attn is installed: the stand-in is not used",
)


# ------------------------------------------------------------------------------------- stand-in attention

def dense_reference(q, k, v, lens_q, lens_k, causal, scale=None):
    """Attention over the whole packed batch with an explicit (total_q, total_k) mask, in float64."""
    q, k, v = q.double(), k.double(), v.double()
    heads, kv_heads = q.shape[1], k.shape[1]
    k = torch.stack([k[:, h * kv_heads // heads] for h in range(heads)], dim=1)
    v = torch.stack([v[:, h * kv_heads // heads] for h in range(heads)], dim=1)
    allowed = torch.zeros(q.shape[0], k.shape[0], dtype=torch.bool)
    q0 = k0 = 0
    for lq, lk in zip(lens_q, lens_k):
        for i in range(lq):
            for j in range(lk):
                allowed[q0 + i, k0 + j] = (not causal) or j <= i + (lk - lq)
        q0, k0 = q0 + lq, k0 + lk
    scale = scale if scale is not None else 1 / math.sqrt(q.shape[-1])
    scores = torch.einsum("qhd,khd->hqk", q, k) * scale
    scores = scores.masked_fill(~allowed, float("-inf"))
    probs = torch.nan_to_num(scores.softmax(-1), nan=0.0)  # rows without keys -> 0, like flash-attn
    return torch.einsum("hqk,khd->qhd", probs, v)


def packed(lens, heads, dim, gen):
    return torch.randn(sum(lens), heads, dim, generator=gen)


def cu(lens):
    return torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2), (6, 1)])
def test_stand_in_matches_dense_reference(causal, heads, kv_heads):
    gen = torch.Generator().manual_seed(0)
    lens = [3, 7, 1, 5]
    q, k, v = packed(lens, heads, 8, gen), packed(lens, kv_heads, 8, gen), packed(lens, kv_heads, 8, gen)
    out = cpu.flash_attn_varlen_func(q, k, v, cu(lens), cu(lens), max(lens), max(lens), causal=causal)
    assert out.shape == q.shape and out.dtype == q.dtype
    torch.testing.assert_close(out.double(), dense_reference(q, k, v, lens, lens, causal), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("causal", [False, True])
def test_stand_in_query_shorter_than_keys_is_bottom_right_aligned(causal):
    """KV-cache shape (inference): new queries see the whole cache plus the causal part of themselves."""
    gen = torch.Generator().manual_seed(1)
    lens_q, lens_k = [2, 1, 4], [5, 3, 4]
    q, k, v = packed(lens_q, 4, 8, gen), packed(lens_k, 2, 8, gen), packed(lens_k, 2, 8, gen)
    out = cpu.flash_attn_varlen_func(q, k, v, cu(lens_q), cu(lens_k), 4, 5, softmax_scale=0.3, causal=causal)
    ref = dense_reference(q, k, v, lens_q, lens_k, causal, scale=0.3)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)


def test_stand_in_rows_without_keys_are_zero():
    gen = torch.Generator().manual_seed(2)
    q, k, v = packed([3], 2, 4, gen), packed([1], 2, 4, gen), packed([1], 2, 4, gen)
    out = cpu.flash_attn_varlen_func(q, k, v, cu([3]), cu([1]), 3, 1, causal=True)
    assert torch.isfinite(out).all()
    assert out[:2].abs().max() == 0 and out[2].abs().max() > 0


def test_stand_in_bf16_and_unsupported_options():
    gen = torch.Generator().manual_seed(3)
    q = packed([4, 2], 2, 8, gen).bfloat16()
    out = cpu.flash_attn_varlen_func(q, q, q, cu([4, 2]), cu([4, 2]), 4, 4, causal=True, window_size=(-1, -1))
    assert out.dtype == torch.bfloat16
    ref = dense_reference(q.float(), q.float(), q.float(), [4, 2], [4, 2], True)
    torch.testing.assert_close(out.double(), ref, atol=2e-2, rtol=2e-2)
    with pytest.raises(NotImplementedError, match="window_size"):
        cpu.flash_attn_varlen_func(q, q, q, cu([6]), cu([6]), 6, 6, window_size=(2, 0))
    with pytest.raises(ValueError, match="multiple"):
        cpu.flash_attn_varlen_func(q, q[:, :1].expand(-1, 3, -1), q[:, :1].expand(-1, 3, -1), cu([6]), cu([6]), 6, 6)


@real_flash_attn
def test_stand_in_has_spec_and_transformers_probe_survives():
    from transformers.utils import import_utils

    was_installed = cpu.is_stand_in_installed()  # e.g. by an earlier test that imported the checkout
    undo = cpu.install_flash_attn_stand_in()
    try:
        module = sys.modules["flash_attn"]
        assert isinstance(module.__spec__, importlib.machinery.ModuleSpec)
        assert importlib.util.find_spec("flash_attn") is module.__spec__
        from flash_attn import flash_attn_varlen_func

        assert flash_attn_varlen_func is cpu.flash_attn_varlen_func
        assert import_utils.is_flash_attn_2_available() is False  # no distribution metadata: reported absent
        assert import_utils.is_flash_attn_greater_or_equal("2.1.0") is False
        assert cpu.install_flash_attn_stand_in() is cpu._noop  # idempotent
    finally:
        undo()
    assert cpu.is_stand_in_installed() == was_installed


@real_flash_attn
def test_plain_module_without_spec_breaks_the_probe():
    """Why the stand-in needs a spec (BAGEL_CONTRACT, CPU paragraph)."""
    from transformers.utils import import_utils

    with mock.patch.dict(sys.modules, {"flash_attn": types.ModuleType("flash_attn")}):
        with pytest.raises(ValueError):
            import_utils.is_flash_attn_2_available()


# ----------------------------------------------------------------------------------------------- sdpa patch

def efficient_only_attention(module):
    q = torch.randn(1, 2, 5, 8, dtype=torch.bfloat16)
    mask = torch.zeros(1, 5, 5, dtype=torch.bfloat16)
    with module.sdpa_kernel(backends=[SDPBackend.EFFICIENT_ATTENTION]):
        return torch.nn.functional.scaled_dot_product_attention(q, q, q, mask)


def test_allow_cpu_sdpa_adds_math_and_undoes():
    module = fake_navit_module()
    with pytest.raises(RuntimeError, match="No viable backend"):
        efficient_only_attention(module)  # the fact the patch exists for
    undo = cpu.allow_cpu_sdpa(module)
    assert module.sdpa_kernel is not sdpa_kernel
    assert efficient_only_attention(module).shape == (1, 2, 5, 8)
    assert cpu.allow_cpu_sdpa(module) is cpu._noop  # idempotent
    undo()
    assert module.sdpa_kernel is sdpa_kernel


def test_with_math_keeps_requested_backends_first():
    assert cpu._with_math([SDPBackend.EFFICIENT_ATTENTION]) == [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    assert cpu._with_math(SDPBackend.FLASH_ATTENTION) == [SDPBackend.FLASH_ATTENTION, SDPBackend.MATH]
    assert cpu._with_math([SDPBackend.MATH, SDPBackend.CUDNN_ATTENTION]) == [SDPBackend.MATH,
                                                                              SDPBackend.CUDNN_ATTENTION]


def test_allow_cpu_sdpa_names_the_missing_fact():
    with pytest.raises(RuntimeError, match="no module-level name 'sdpa_kernel'"):
        cpu.allow_cpu_sdpa(fake_navit_module(with_name=False))


@real_flash_attn
def test_apply_cpu_compat_is_idempotent_and_reversible():
    module = fake_navit_module()
    was_installed = cpu.is_stand_in_installed()
    handle = cpu.apply_cpu_compat(module)
    assert cpu.is_stand_in_installed() and module.sdpa_kernel is not sdpa_kernel
    assert cpu.apply_cpu_compat(module).applied == []
    handle.undo()
    assert module.sdpa_kernel is sdpa_kernel
    assert cpu.is_stand_in_installed() == was_installed


# ------------------------------------------------------------------------------------------- torchvision on CPU

TORCHVISION_SCRIPT = """
import torch
if {other!r} != "none":
    other = torch.library.Library("torchvision", "DEF")  # another library declared the namespace first
    if {other!r} == "with_ops":
        other.define("roi_stub(Tensor x) -> Tensor")
from bagel_sr.patches import cpu
undo = cpu.declare_torchvision_ops()
print(undo.changed, hasattr(torch.ops.torchvision, "nms"))
undo()
print(hasattr(torch.ops.torchvision, "nms"))
"""


@pytest.mark.parametrize("other, expected", [("none", "True True\nFalse"), ("with_ops", "False False\nFalse"),
                                             ("namespace_only", "False False\nFalse")])
def test_declare_torchvision_ops_declares_once_and_leaves_an_existing_namespace_alone(tmp_path, other, expected):
    """A fresh process each (operators are process-wide): without a namespace the two schemas are declared and
    undone; with one declared by another library, nothing is declared and nothing crashes."""
    import subprocess

    (tmp_path / "torchvision").mkdir()
    (tmp_path / "torchvision" / "__init__.py").write_text("")
    (tmp_path / "torchvision" / "_C.so").write_bytes(b"not a shared library")
    script = TORCHVISION_SCRIPT.format(other=other)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), *sys.path]))  # a torchvision whose compiled
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env)  # operators cannot load
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == expected
