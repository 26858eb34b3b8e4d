"""A tiny real Bagel on CPU through the CPU patch, and the test batches against BAGEL's own packer (BAGEL_ROOT)."""
from __future__ import annotations

import importlib
import importlib.machinery
import sys
import types
from unittest import mock

import pytest
import torch

from bagel_sr.patches import checkout, cpu
from bagel_sr.testing.bagel_tiny import (
    SPECIAL_TOKENS, TOKEN_DIM, build_tiny_autoencoder, build_tiny_bagel, encode_batch, import_bagel,
    make_packed_batch, num_target_tokens, requires_bagel, run_forward, sample_plan,
)


# ------------------------------------------------------------------------------- real checkout, tiny model

@pytest.mark.bagel
@requires_bagel
@pytest.mark.usefixtures("checkout_shape")
def test_real_checkout_is_found_and_patched():
    mods = import_bagel()
    assert checkout.find_training_script(mods.root).name in ("main.py", "pretrain_unified_navit.py")
    assert hasattr(mods.qwen2_navit.sdpa_kernel, cpu._WRAPPED_ATTR)
    assert mods.qwen2_navit.flash_attn_varlen_func is cpu.flash_attn_varlen_func or not cpu.is_stand_in_installed()


@pytest.mark.bagel
@requires_bagel
@pytest.mark.parametrize("layer_module", ["Qwen2MoTDecoderLayer", "Qwen2DecoderLayer"])
@pytest.mark.usefixtures("checkout_shape")
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
@pytest.mark.usefixtures("checkout_shape")
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
@pytest.mark.usefixtures("checkout_shape")
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
