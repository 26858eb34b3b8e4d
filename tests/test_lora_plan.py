"""``python -m bagel_sr.lora plan``: the checkout's Bagel at BAGEL-7B-MoT's widths on the meta device; its LoRA
parameter count equals the one written out from the widths, and the memory rows follow the bytes per parameter
(``bagel``: the checkout's classes build the model)."""
from __future__ import annotations

import json
import re

import pytest

from bagel_sr.errors import cli_main
from bagel_sr.lora import plan
from bagel_sr.lora.__main__ import main as lora_main
from bagel_sr.testing.bagel_tiny import requires_bagel, upstream_root

pytestmark = [pytest.mark.bagel, requires_bagel]


def _written_out_lora(rank: int) -> int:
    """rank * (in + out) over q, k, v, o and gate, up, down of both experts in each of the 28 layers."""
    h, i, kv = 3584, 18944, 4 * (3584 // 28)
    attention = (h + h) + (h + kv) + (h + kv) + (h + h)
    mlp = 3 * (h + i)
    return rank * 28 * 2 * (attention + mlp)


def test_plan_for_7b_mot_counts_what_the_widths_say(capsys):
    assert cli_main(lora_main, ["plan", "--config", "7b-mot", "--bagel_root", upstream_root()]) == 0
    out = capsys.readouterr().out
    total = float(re.search(r"meta device: ([\d.]+) B parameters", out).group(1))
    assert 14.0 < total < 15.0  # "about 14B": Qwen2.5-7B with the MoT expert's duplicated projections, and the ViT
    model = plan.build_meta_model(plan.PRESETS["7b-mot"], upstream_root())
    assert plan.adapter_params(model, 8) == _written_out_lora(8) == 40_370_176
    assert plan.adapter_params(model, 8, "gen") * 2 == _written_out_lora(8)
    rows = {r.method: r for r in plan.plan_rows(model, [8, 16, 64])}
    full, lora8 = rows["full fine-tuning"], rows["LoRA r=8"]
    every = sum(p.numel() for p in model.parameters())
    assert lora8.per_gpu_gib(1) == pytest.approx((20 * lora8.trainable + 8 * every) / 2 ** 30)
    assert full.per_gpu_gib(8) == pytest.approx(full.per_gpu_gib(1) / 8)
    assert f"| LoRA r=8 | 40.4 M (0.28%) | {lora8.state_bytes / 2 ** 30:,.2f} GiB |" in out


def test_plan_reads_a_released_folders_configs(tmp_path, capsys):
    for key, name in (("llm", "llm_config.json"), ("vit", "vit_config.json")):
        (tmp_path / name).write_text(json.dumps(plan.PRESETS["7b-mot"][key]))
    assert cli_main(lora_main, ["plan", "--model_path", str(tmp_path), "--bagel_root", upstream_root(),
                                "--ranks", "8", "--gpus", "2"]) == 0
    assert "| LoRA r=8 | 40.4 M" in capsys.readouterr().out


def test_plan_refuses_bad_input_in_one_line(tmp_path, capsys):
    assert cli_main(lora_main, ["plan", "--config", "70b", "--bagel_root", upstream_root()]) == 2
    assert cli_main(lora_main, ["plan", "--model_path", str(tmp_path), "--bagel_root", upstream_root()]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].startswith("error: --config 70b: unknown; allowed: 7b-mot")
    assert err[1].startswith(f"error: --model_path {tmp_path}: no llm_config.json")
