"""The ``--bagel_sr_lora_*`` settings: parsing, validation and the one-line errors before any launch; target
patterns against module names; which adapters BAGEL's ``--freeze_*`` flags leave trainable."""
from __future__ import annotations

import sys
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from bagel_sr.errors import UsageError
from bagel_sr.lora_settings import TARGET_PRESETS, LoraSettings, LoraSettingsError, settings_from_flags
from bagel_sr.patches import launch, lora


def _mot_like(layers: int = 2) -> nn.Module:
    """Module names as in BAGEL's MoT language model (tiny widths), plus a connector and a ViT layer."""
    def expert():
        return nn.ModuleDict({n: nn.Linear(4, 4) for n in ("gate_proj", "up_proj", "down_proj")})

    def layer():
        attn = nn.ModuleDict({f"{p}{s}": nn.Linear(4, 4) for p in ("q_proj", "k_proj", "v_proj", "o_proj")
                              for s in ("", "_moe_gen")})
        return nn.ModuleDict({"self_attn": attn, "mlp": expert(), "mlp_moe_gen": expert()})

    llm = nn.ModuleDict({"model": nn.ModuleDict({"layers": nn.ModuleList(layer() for _ in range(layers))})})
    vit = nn.ModuleDict({"fc1": nn.Linear(4, 4)})
    return nn.ModuleDict({"language_model": llm, "vit_model": vit, "llm2vae": nn.Linear(4, 4)})


def test_defaults_are_off_and_flags_parse_with_their_types():
    assert not settings_from_flags({}).enabled
    s = settings_from_flags({"bagel_sr_lora_rank": "16", "bagel_sr_lora_alpha": "32", "bagel_sr_lora_dropout": "0.1"})
    assert (s.rank, s.lora_alpha, s.scale, s.dropout, s.targets) == (16, 32.0, 2.0, 0.1, "mot")
    assert LoraSettings(rank=8).scale == 1.0  # alpha unset = rank


@pytest.mark.parametrize("flags, needle", [
    ({"bagel_sr_lora_alpha": "16"}, "--bagel_sr_lora_alpha given but --bagel_sr_lora_rank is 0"),
    ({"bagel_sr_lora_rank": "0", "bagel_sr_lora_targets": "gen"}, "--bagel_sr_lora_targets given but"),
    ({"bagel_sr_lora_rank": "-4"}, "--bagel_sr_lora_rank: got -4"),
    ({"bagel_sr_lora_rank": "eight"}, "--bagel_sr_lora_rank: got 'eight'"),
    ({"bagel_sr_lora_rank": "8", "bagel_sr_lora_dropout": "1.5"}, "--bagel_sr_lora_dropout: got 1.5"),
    ({"bagel_sr_lora_rank": "8", "bagel_sr_lora_targets": " , "}, "--bagel_sr_lora_targets: got"),
])
def test_bad_settings_are_one_line_naming_the_flag(flags, needle):
    with pytest.raises(LoraSettingsError) as err:
        settings_from_flags(flags)
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_the_wrapper_takes_the_flags_and_stops_before_any_launch(capsys):
    wargs = launch.parse_wrapper_args(["--bagel_sr_lora_rank", "8", "--bagel_sr_lora_targets=gen", "--lr", "1e-4"])
    assert wargs.rest == ["--lr", "1e-4"] and wargs.lora.rank == 8 and wargs.lora.targets == "gen"
    with pytest.raises(UsageError) as stop:
        launch.parse_wrapper_args(["--bagel_sr_lora_alpha", "16"])
    assert str(stop.value).startswith("--bagel_sr_lora_alpha given but --bagel_sr_lora_rank is 0")


def test_missing_peft_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "peft", None)  # import peft raises ImportError
    with pytest.raises(lora.MissingExtra, match=r'pip install -e "\.\[lora\]"'):
        lora.require_peft()
    with pytest.raises(lora.MissingExtra, match=r'--bagel_sr_lora_rank needs peft.*\.\[lora\]'):
        launch.parse_wrapper_args(["--bagel_sr_lora_rank", "8"])


def test_presets_resolve_to_both_experts_or_the_generation_expert():
    model = _mot_like()
    both = lora.resolve_targets(model, TARGET_PRESETS["mot"])
    gen = lora.resolve_targets(model, TARGET_PRESETS["gen"])
    assert len(both) == 2 * 14 and len(gen) == 2 * 7
    assert all("moe_gen" in n for n in gen) and sum("moe_gen" in n for n in both) == len(gen)
    assert lora.resolve_targets(model, ["llm2vae", "vit_model.*"]) == ["llm2vae", "vit_model.fc1"]


def test_a_pattern_matching_nothing_names_close_matches():
    with pytest.raises(lora.BadInput) as err:
        lora.resolve_targets(_mot_like(), ["q_proj", "qproj_moe_gen"])
    message = str(err.value)
    assert "'qproj_moe_gen' matches no linear module" in message and "q_proj_moe_gen" in message
    assert "\n" not in message


@pytest.mark.parametrize("freeze, trainable", [
    ({}, 28 + 1),
    ({"freeze_und": True}, 14 + 1),  # only the generation expert's adapters (and the connector's) train
    ({"freeze_llm": True}, 1),
])
def test_freeze_flags_keep_their_meaning_for_adapters(freeze, trainable):
    pytest.importorskip("peft", reason='install the lora extra: pip install -e ".[lora]"')
    model = _mot_like()
    targets = lora.resolve_targets(model, list(TARGET_PRESETS["mot"]) + ["llm2vae"])
    lora.inject(model, lora.lora_config(LoraSettings(rank=2), targets))
    lora.set_trainable(model, SimpleNamespace(**freeze))
    train = {n.split(".lora_")[0] for n, p in model.named_parameters() if p.requires_grad}
    assert len(train) == trainable and all(".lora_" in n for n, p in model.named_parameters() if p.requires_grad)
    assert "llm2vae" in train


def test_nothing_left_to_train_is_a_clear_error():
    pytest.importorskip("peft", reason='install the lora extra: pip install -e ".[lora]"')
    model = _mot_like()
    lora.inject(model, lora.lora_config(LoraSettings(rank=2), lora.resolve_targets(model, TARGET_PRESETS["gen"])))
    with pytest.raises(lora.BadInput, match="no adapter is trainable"):
        lora.set_trainable(model, SimpleNamespace(freeze_llm=True))


def test_adapters_start_the_same_whatever_the_global_seed():
    pytest.importorskip("peft", reason='install the lora extra: pip install -e ".[lora]"')
    states = []
    for seed in (1, 2):  # BAGEL seeds each rank differently before building the model
        torch.manual_seed(seed)
        model = _mot_like()
        lora.inject(model, lora.lora_config(LoraSettings(rank=2), lora.resolve_targets(model, ["q_proj"])))
        states.append({k: v for k, v in model.state_dict().items() if ".lora_" in k})
    assert states[0].keys() == states[1].keys() and all(torch.equal(states[0][k], states[1][k]) for k in states[0])
