"""``python -m bagel_sr.lora merge``: on the checkout's tiny real Bagel, the merged ``ema.safetensors`` loads into
stock Bagel with ``strict=True`` and gives the outputs of base + adapter (peft's layers); a mismatched adapter is
one line (``bagel``: needs ``BAGEL_ROOT``; peft from the ``lora`` extra)."""
from __future__ import annotations

import re

import pytest
import torch
from safetensors.torch import load_file, save_file

from bagel_sr.errors import cli_main
from bagel_sr.lora.__main__ import main as lora_main
from bagel_sr.lora_settings import LoraSettings
from bagel_sr.testing.bagel_tiny import build_tiny_autoencoder, build_tiny_bagel, encode_batch, make_packed_batch, requires_bagel, run_forward

pytest.importorskip("peft", reason='install the lora extra: pip install -e ".[lora]"')

from bagel_sr.patches import lora, lora_files  # noqa: E402

pytestmark = [pytest.mark.bagel, requires_bagel]


def _adapted(rank=4, seed=1):
    """(stock base state, injected model with random nonzero adapters, adapter tensors, adapter_config)."""
    model = build_tiny_bagel(llm2vae_std=0.02)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    settings = LoraSettings(rank=rank, alpha=2.0 * rank)
    config = lora.lora_config(settings, lora.resolve_targets(model, settings.patterns))
    lora.inject(model, config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".lora_B." in name:
                param.copy_(0.2 * torch.randn(param.shape, generator=gen))
    _, adapters = lora_files.split_state(model.state_dict())
    return base, model, adapters, config.to_dict()


def _released(tmp_path, base):
    folder = tmp_path / "released"
    folder.mkdir()
    save_file(base, str(folder / "ema.safetensors"))
    (folder / "llm_config.json").write_text("{}")
    return folder


def _mse(model, batch):
    torch.manual_seed(0)  # the same flow noise for each model
    with torch.no_grad():
        return run_forward(model, batch)["mse"].float()


def test_merged_weights_load_strict_and_match_base_plus_adapter(tmp_path):
    base, adapted, adapters, config = _adapted()
    released = _released(tmp_path, base)
    ckpt = tmp_path / "ckpt"
    lora_files.save_adapter(ckpt / "adapter_ema", adapters, config)
    assert cli_main(lora_main, ["merge", "--model_path", str(released), "--adapter", str(ckpt),
                                "--out", str(tmp_path / "merged")]) == 0
    assert (tmp_path / "merged" / "llm_config.json").is_file()
    stock = build_tiny_bagel()
    stock.load_state_dict(load_file(str(tmp_path / "merged" / "ema.safetensors")), strict=True)

    batch = encode_batch(build_tiny_autoencoder(), make_packed_batch([{"kind": "edit"}, {"kind": "t2i"}], seed=3))
    with_adapter, merged = _mse(adapted, batch), _mse(stock, batch)
    stock.load_state_dict(base, strict=True)
    base_only = _mse(stock, batch)
    gap = (with_adapter - merged).abs().mean().item()
    effect = (with_adapter - base_only).abs().mean().item()
    print(f"mean |base+adapter - merged| {gap:.4g}; mean |base+adapter - base| {effect:.4g}")
    assert gap <= 0.05 * effect, (gap, effect)  # bf16 weights and autocast: equal within rounding


def test_merge_refuses_an_adapter_of_another_model(tmp_path, capsys):
    base, _, adapters, config = _adapted()
    name = next(k for k in base if k.endswith("self_attn.q_proj.weight"))
    base[name] = torch.zeros(base[name].shape[0] + 1, base[name].shape[1])
    released = _released(tmp_path, base)
    lora_files.save_adapter(tmp_path / "adapter", adapters, config)
    code = cli_main(lora_main, ["merge", "--model_path", str(released), "--adapter", str(tmp_path / "adapter"),
                                "--out", str(tmp_path / "merged")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error: adapter/base mismatch at") and "\n" not in err
    assert not (tmp_path / "merged").exists()


def test_an_adapter_merges_into_a_built_model_as_infer_loads_it(tmp_path):
    """``infer --adapter``: the adapter added in place to a stock model's weights (bf16, as dispatched) gives the
    weights ``merge`` writes, within bf16 rounding."""
    base, _, adapters, config = _adapted()
    released = _released(tmp_path, base)
    lora_files.save_adapter(tmp_path / "ckpt" / "adapter_ema", adapters, config)
    lora_main(["merge", "--model_path", str(released), "--adapter", str(tmp_path / "ckpt"), "--out", str(tmp_path / "m")])
    merged_file = load_file(str(tmp_path / "m" / "ema.safetensors"))
    stock = build_tiny_bagel()
    stock.load_state_dict(base, strict=True)
    assert lora_files.merge_into_model(stock, *lora_files.load_adapter(tmp_path / "ckpt")) == len(adapters) // 2
    for name, value in stock.state_dict().items():
        assert torch.allclose(value.float(), merged_file[name].float(), atol=2e-2, rtol=2e-2), name
    changed = [k for k in base if not torch.equal(base[k], merged_file[k])]
    assert changed and [k for k in changed if not re.search(r"proj(_moe_gen)?\.weight$", k)] == []
