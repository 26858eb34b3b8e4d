"""The CPU compatibility patch, checkout discovery, and (with BAGEL_ROOT) a tiny Bagel training step on CPU."""
from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import math
import sys
import types
from unittest import mock

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from bagel_sr.patches import checkout, cpu
from bagel_tiny import (
    SPECIAL_TOKENS, TOKEN_DIM, build_tiny_autoencoder, build_tiny_bagel, encode_batch, import_bagel,
    make_packed_batch, num_target_tokens, requires_bagel, run_forward, sample_plan,
)

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

def fake_navit_module(with_name=True):
    module = types.ModuleType("fake_qwen2_navit")
    if with_name:
        module.sdpa_kernel = sdpa_kernel
    return module


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


# ------------------------------------------------------------------------------------------------- checkout

MAIN_THAT_MUST_NOT_RUN = "def main():\n    raise SystemExit(1)\n"


def make_fake_checkout(root, scripts=("train/pretrain_unified_navit.py",), body=MAIN_THAT_MUST_NOT_RUN):
    for rel in checkout.MARKER_FILES + tuple(scripts):
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(body if rel in scripts else "")
    return root


def test_find_checkout_missing_folder(tmp_path):
    with pytest.raises(checkout.CheckoutError, match="not a folder") as err:
        checkout.find_checkout(tmp_path / "nowhere")
    assert "--bagel_root PATH" in str(err.value) and "BAGEL_ROOT=PATH" in str(err.value)


def test_find_checkout_not_a_checkout_lists_missing_files(tmp_path):
    (tmp_path / "modeling").mkdir()
    (tmp_path / "modeling" / "autoencoder.py").write_text("")
    with pytest.raises(checkout.CheckoutError) as err:
        checkout.find_checkout(tmp_path)
    msg = str(err.value)
    assert "modeling/bagel/bagel.py" in msg and "data/dataset_base.py" in msg
    assert "modeling/autoencoder.py" not in msg


def test_find_checkout_from_env_and_unset(tmp_path, monkeypatch):
    make_fake_checkout(tmp_path)
    monkeypatch.setenv("BAGEL_ROOT", str(tmp_path))
    assert checkout.find_checkout(None) == tmp_path.resolve()
    monkeypatch.delenv("BAGEL_ROOT")
    with pytest.raises(checkout.CheckoutError, match="No BAGEL checkout given.*--bagel_root PATH.*BAGEL_ROOT=PATH"):
        checkout.find_checkout(None)


def test_find_training_script(tmp_path):
    root = make_fake_checkout(tmp_path, scripts=())
    with pytest.raises(checkout.CheckoutError) as err:
        checkout.find_training_script(root)
    assert "train/main.py" in str(err.value) and "train/pretrain_unified_navit.py" in str(err.value)
    make_fake_checkout(tmp_path, scripts=("train/pretrain_unified_navit.py",))
    assert checkout.find_training_script(root).name == "pretrain_unified_navit.py"
    make_fake_checkout(tmp_path, scripts=("train/main.py",))
    assert checkout.find_training_script(root).name == "main.py"  # forks' name wins
    assert checkout.find_training_script(root, "train/pretrain_unified_navit.py").name == "pretrain_unified_navit.py"
    with pytest.raises(checkout.CheckoutError, match="train/other.py"):
        checkout.find_training_script(root, "train/other.py")


def test_add_to_sys_path_is_idempotent(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "path", ["a", str(tmp_path), "b"])
    checkout.add_to_sys_path(tmp_path)
    checkout.add_to_sys_path(tmp_path)
    assert sys.path == [str(tmp_path), "a", "b"]


def test_import_training_module_does_not_run_main(tmp_path, monkeypatch):
    body = "import helper_mod\nVALUE = helper_mod.X\ndef main():\n    raise SystemExit(1)\n"
    root = make_fake_checkout(tmp_path, scripts=("train/main.py",), body=body)
    (root / "helper_mod.py").write_text("X = 7\n")
    monkeypatch.setattr(sys, "path", list(sys.path))
    saved = {name: sys.modules.pop(name, None) for name in ("bagel_train_main", "helper_mod")}
    try:
        module = checkout.import_training_module(root)
        assert module.__name__ == "bagel_train_main" and module.VALUE == 7 and callable(module.main)
        assert sys.path[0] == str(root.resolve())
        assert checkout.import_training_module(root) is module
    finally:
        for name, old in saved.items():
            sys.modules.pop(name, None)
            if old is not None:
                sys.modules[name] = old


def test_import_training_module_names_missing_dependency(tmp_path, monkeypatch):
    root = make_fake_checkout(tmp_path, body="import surely_not_installed_pkg\n")
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.delitem(sys.modules, "bagel_train_main", raising=False)
    with pytest.raises(checkout.CheckoutError, match="surely_not_installed_pkg.*pip install"):
        checkout.import_training_module(root)
    assert "bagel_train_main" not in sys.modules


# ------------------------------------------------------------------------------- real checkout, tiny model

@pytest.mark.bagel
@requires_bagel
def test_real_checkout_is_found_and_patched():
    mods = import_bagel()
    assert checkout.find_training_script(mods.root).name in ("main.py", "pretrain_unified_navit.py")
    assert hasattr(mods.qwen2_navit.sdpa_kernel, cpu._WRAPPED_ATTR)
    assert mods.qwen2_navit.flash_attn_varlen_func is cpu.flash_attn_varlen_func or not cpu.is_stand_in_installed()


@pytest.mark.bagel
@requires_bagel
@pytest.mark.parametrize("layer_module", ["Qwen2MoTDecoderLayer", "Qwen2DecoderLayer"])
def test_tiny_bagel_forward_backward_on_cpu(layer_module):
    model = build_tiny_bagel(seed=0, layer_module=layer_module)
    ae = build_tiny_autoencoder(seed=0)
    batch = make_packed_batch([
        {"kind": "edit", "cond_hw": (2, 2), "target_hw": (2, 2), "text_len": 3},
        {"kind": "t2i", "target_hw": (2, 3), "text_len": 4},
    ])
    batch = encode_batch(ae, batch)
    assert batch["padded_latent"].shape == (3, 16, 4, 6)
    out = run_forward(model, batch)
    assert out["ce"] is None
    mse = out["mse"]
    assert mse.shape == (num_target_tokens(batch), TOKEN_DIM) == (2 * 2 + 2 * 3, 2 * 2 * 16)
    assert torch.isfinite(mse).all()
    mse.float().mean(-1).sum().backward()
    assert model.llm2vae.weight.grad is not None and model.llm2vae.weight.grad.abs().sum() > 0


@pytest.mark.bagel
@requires_bagel
def test_gradients_reach_the_language_model_with_a_nonzero_head():
    model = build_tiny_bagel(seed=1, llm2vae_std=0.02)
    batch = encode_batch(build_tiny_autoencoder(), make_packed_batch([{"kind": "chain"}, {"kind": "edit_dropped"}]))
    run_forward(model, batch)["mse"].float().mean(-1).sum().backward()
    for name in ("vae2llm", "time_embedder", "language_model"):
        grads = [p.grad for p in getattr(model, name).parameters() if p.grad is not None]
        assert grads and any(g.abs().sum() > 0 for g in grads), name


# ------------------------------------------------------------- make_packed_batch against BAGEL's own packer

class _Stub(types.ModuleType):
    """Stands in for an optional dependency of data.dataset_base that packing never touches."""

    def __init__(self, name):
        super().__init__(name)
        self.__spec__ = importlib.machinery.ModuleSpec(name, loader=None)

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return mock.MagicMock(name=f"{self.__name__}.{name}")


def _imports(name: str) -> bool:
    try:
        importlib.import_module(name)
        return True
    except Exception:
        return False


@pytest.fixture
def dataset_base(monkeypatch):
    """BAGEL's data.dataset_base, importable without decord/cv2/torchvision (stubbed while it loads if absent or
    broken: packing never uses them)."""
    import_bagel()
    broken = {top for top in ("decord", "cv2", "torchvision") if not _imports(top)}
    for name in ("decord", "cv2", "torchvision", "torchvision.transforms", "torchvision.transforms.functional"):
        if name.split(".")[0] in broken:
            monkeypatch.setitem(sys.modules, name, _Stub(name))
    before = set(sys.modules)
    import data.dataset_base as module

    yield module
    for name in set(sys.modules) - before:  # do not leave stub-backed modules behind for other tests
        if name == "data" or name.startswith("data."):
            sys.modules.pop(name, None)


def bagel_sample(plan):
    """Our packing plan in the sample format of BAGEL's datasets (sequence_plan, text_ids_list, images)."""
    sample = dict(sequence_plan=[], text_ids_list=[], image_tensor_list=[], num_tokens=0)
    for item in plan:
        common = dict(special_token_loss=0, special_token_label=None)
        if item["type"] == "text":
            sample["text_ids_list"].append(list(item["ids"]))
            sample["sequence_plan"].append(dict(type="text", enable_cfg=1, loss=0, **common))
        else:
            loss = item.get("loss", 0)
            image = item.get("image", torch.zeros(3, 32, 32))
            sample["image_tensor_list"].append(image)
            sample["sequence_plan"].append(dict(type="vae_image", enable_cfg=1 - loss, loss=loss, **common))
    return sample


@pytest.mark.bagel
@requires_bagel
def test_make_packed_batch_matches_bagel_pack_sequence(dataset_base):
    du = import_bagel().data_utils
    specs = [{"kind": "edit", "cond_hw": (2, 3), "target_hw": (3, 2)}, {"kind": "t2i", "target_hw": (2, 3)},
             {"kind": "edit_dropped", "target_hw": (1, 2)}, {"kind": "chain", "target_hws": [(2, 2), (1, 3)]}]
    ours = make_packed_batch(specs, seed=5)

    gen = torch.Generator().manual_seed(5)
    packer = types.SimpleNamespace(
        use_flex=False, get_flattened_position_ids=du.get_flattened_position_ids_extrapolate, **SPECIAL_TOKENS,
        data_config=types.SimpleNamespace(text_cond_dropout_prob=0.0, vit_cond_dropout_prob=0.0,
                                          vae_image_downsample=16, max_latent_size=8))
    status = dataset_base.PackedDataset.set_sequence_status(packer)
    for spec in specs:
        packer.data_config.vae_cond_dropout_prob = 1.0 if spec["kind"] == "edit_dropped" else 0.0
        status = dataset_base.PackedDataset.pack_sequence(packer, bagel_sample(sample_plan(spec, gen)), status)
    ref = dataset_base.PackedDataset.to_tensor(packer, status)

    assert set(ours) - {"batch_data_indexes"} == set(ref)
    for key, value in ref.items():
        if key == "packed_timesteps":
            assert torch.equal(torch.isinf(ours[key]), torch.isinf(value))  # finite draws differ (numpy vs torch)
        elif key == "nested_attention_masks":
            assert all(torch.equal(a, b) for a, b in zip(ours[key], value)) and len(ours[key]) == len(value)
        elif torch.is_tensor(value):
            assert torch.equal(ours[key], value), key
        else:
            assert ours[key] == value, key
    assert [d["dataset_name"] for d in ours["batch_data_indexes"]] == ["unified_edit", "t2i_pretrain"] + [
        "unified_edit"] * 2


@pytest.mark.bagel
@requires_bagel
def test_real_training_script_imports_without_running_main(monkeypatch):
    root = import_bagel().root
    monkeypatch.delitem(sys.modules, checkout.TRAINING_MODULE_NAME, raising=False)
    try:
        module = checkout.import_training_module(root)
    except checkout.CheckoutError as err:
        if "not installed" in str(err):
            pytest.skip(f"training script dependency missing here: {err}")
        raise
    for name in ("ModelArguments", "DataArguments", "TrainingArguments", "main", "Bagel", "load_ae",
                 "PackedDataset", "collate_wrapper", "HfArgumentParser"):
        assert hasattr(module, name), name
