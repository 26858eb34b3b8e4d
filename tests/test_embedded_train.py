"""Two-step runs of the embedded loop with and without the pixel loss, and of the experiment command."""
import dataclasses
import json

import numpy as np
import pytest
import torch

from bagel_sr import PixelLossConfig
from bagel_sr.embedded import data, experiment
from bagel_sr.embedded.backbone import TinyBagelConfig
from bagel_sr.embedded.train import TrainConfig, load_checkpoint, train
from bagel_sr.embedded.vae import load_vae

TOK = data.WordTokenizer.default()
SMALL = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, intermediate_size=64)


@pytest.fixture(scope="module")
def vae():
    return load_vae()


@pytest.mark.parametrize("weight,pool_size", [(0.0, 0), (0.05, 0), (0.0, 8), (0.05, 8)])
def test_two_step_loop(tmp_path, vae, weight, pool_size):
    cfg = TrainConfig(steps=2, batch_size=4, gradient_accumulation_steps=2, log_every=1, warmup_steps=1,
                      num_threads=1, pool_size=pool_size)
    pixel = PixelLossConfig(weight=weight, max_t=1.0)  # max_t 1: every paired target is eligible
    run = train(TinyBagelConfig(vocab_size=len(TOK), **SMALL), cfg, pixel, vae, seed=0, output_dir=str(tmp_path),
                progress=False)
    assert [h["step"] for h in run.history] == [1, 2]
    assert all(torch.isfinite(torch.tensor(h["mse"])) for h in run.history)
    if weight:
        assert all("pixel" in h and h["pixel_images"] > 0 for h in run.history)
    else:
        assert all("pixel" not in h for h in run.history)
    for name in ("model.safetensors", "ema.safetensors", "config.json"):
        assert (tmp_path / name).exists()
    model = load_checkpoint(str(tmp_path), "ema")
    for (n, a), (_, b) in zip(model.named_parameters(), run.ema_model.named_parameters()):
        torch.testing.assert_close(a, b)


def test_arms_share_data_and_noise(vae):
    """Same seed: the first step's flow loss is identical with and without the pixel term."""
    cfg = TrainConfig(steps=1, batch_size=4, log_every=1, num_threads=1, pool_size=8)
    model_cfg = TinyBagelConfig(vocab_size=len(TOK), **SMALL)
    a = train(dataclasses.replace(model_cfg), cfg, PixelLossConfig(weight=0.0), vae, seed=1, progress=False)
    b = train(dataclasses.replace(model_cfg), cfg, PixelLossConfig(weight=0.05, max_t=1.0), vae, seed=1,
              progress=False)
    assert a.history[0]["mse"] == pytest.approx(b.history[0]["mse"], rel=1e-6)


def test_experiment_end_to_end(tmp_path):
    argv = ["--steps", "2", "--batch_size", "4", "--sample_steps", "2", "--eval_split", "val", "--output_dir",
            str(tmp_path), "--hidden_size", "32", "--num_hidden_layers", "1", "--num_attention_heads", "2",
            "--num_key_value_heads", "1", "--intermediate_size", "64", "--progress", "False", "--num_threads", "1",
            "--save_checkpoints", "False", "--pool_size", "16", "--pixel_loss_weight", "0.05",
            "--sample_modes", "1:1:0,0.3:2:0,0.3:2:1,0.3:2:0:1", "--term_arms", "ssim:1", "--aligned_condition", "True",
            "--lesion_images", "0"]  # the lesion line has its own test
    report = experiment.main(argv)
    assert (tmp_path / "metrics.json").exists() and (tmp_path / "grid.png").exists()
    saved = json.loads((tmp_path / "metrics.json").read_text())
    arms = saved["seeds"][0]["arms"]
    assert list(arms) == ["flow_only", "pixel", "terms=ssim:1"]
    assert arms["terms=ssim:1"]["pixel_loss"]["pixel_loss_terms"] == "ssim:1"
    for arm in arms.values():
        assert {"psnr", "ssim", "halluc", "unpaired_flow_loss", "paired_flow_loss"} <= set(arm)
    # the hallucination share of the bicubic input, computed here directly: pixels with |error| > 0.1 of [0, 1]
    val = data.eval_pairs("val")
    gray = lambda x: ((x.mean(0) + 1) / 2).clamp(0, 1).numpy()
    expected = np.mean([np.mean(np.abs(gray(p.condition) - gray(p.target)) > 0.1) for p in val])
    assert saved["baselines"]["lr_input"]["halluc"]["mean"] == pytest.approx(expected, rel=1e-6)
    assert arms["flow_only"]["pixel_loss"]["pixel_loss_weight"] == 0.0
    assert arms["pixel"]["pixel_loss"]["pixel_loss_weight"] == 0.05
    assert report["n_pairs"] == len(data.eval_pairs("val"))
    # inference modes: a row per mode and arm, one chosen on val, DC moves the output toward the input
    modes = arms["pixel"]["modes"]
    assert list(modes) == ["T0=1 K=1", "T0=0.3 K=2", "T0=0.3 K=2 +DC", "T0=0.3 K=2 one-step"]
    assert modes["T0=1 K=1"]["psnr"]["mean"] == arms["pixel"]["psnr"]["mean"]  # the stock sampler, same seed
    assert saved["seeds"][0]["chosen_mode"] in modes
    assert modes["T0=0.3 K=2 +DC"]["psnr"]["mean"] != modes["T0=0.3 K=2"]["psnr"]["mean"]
    assert np.isfinite(modes["T0=0.3 K=2 one-step"]["psnr"]["mean"])  # (2 sampler steps: T0 = 0.3 starts at 0)
    assert set(arms["pixel"]["modes_val_per_image_psnr"]) == set(modes)


def test_restorer_defaults_and_the_flags_that_restore_the_plugins():
    """The experiment's own defaults (cost controls, data mix) differ from the plugin's and the loop's, and
    the documented flags bring those back; the plugin's defaults stay untouched."""
    args, pixel = experiment.parse([])
    assert (args.t2i_ratio, args.vae_cond_dropout_prob, args.timestep_shift, args.steps) == (0.1, 0.0, 0.4, 2800)
    assert (pixel.weight, pixel.max_t, pixel.max_images, pixel.crop, pixel.crop_margin) == (0.05, 0.3, 1, 4, 0)
    args, pixel = experiment.parse(["--pixel_loss_max_images", "4", "--pixel_loss_crop", "0", "--t2i_ratio", "0.25",
                                    "--vae_cond_dropout_prob", "0.1"])
    assert (pixel.max_images, pixel.crop, args.t2i_ratio, args.vae_cond_dropout_prob) == (4, 0, 0.25, 0.1)
    assert (PixelLossConfig().max_images, PixelLossConfig().crop, TrainConfig().t2i_ratio) == (4, 0, 0.25)
    assert TrainConfig().steps == 2000 and experiment.parse(["--steps", "2000"])[0].steps == 2000


def test_help_of_the_main_job_prints_the_flags_and_exits_0(capsys):
    """argparse %-formats help texts: a bare '53%' in one crashed --help (and ablate, which reads it)."""
    with pytest.raises(SystemExit) as exit_:
        experiment.parse(["--help"])
    assert exit_.value.code == 0
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps the lines
    assert "--pixel_loss_weight" in out and "--sample_modes" in out and "where the inference modes start" in out


def test_argparse_literal_doubles_only_bare_percent_signs_and_is_idempotent():
    from bagel_sr.config import argparse_literal

    assert argparse_literal("53% at t <= 0.3") == "53%% at t <= 0.3"
    kept = "%(default)s and 100%% already"
    assert argparse_literal(kept) == kept and argparse_literal(argparse_literal("5%")) == "5%%"
    assert argparse_literal(None) is None


def test_pixel_loss_flags_format_in_a_parser_we_do_not_build(monkeypatch):
    """Our flags join a checkout's parser, which never sees literal_help: a '%' in their help is escaped at the
    source (pixel_loss_fields)."""
    import types

    from transformers import HfArgumentParser

    from bagel_sr.config import pixel_loss_arguments_class

    weight = next(f for f in dataclasses.fields(PixelLossConfig) if f.name == "weight")
    monkeypatch.setattr(weight, "metadata", types.MappingProxyType({"help": "lambda; 5% of L_flow is typical"}))
    text = " ".join(HfArgumentParser(pixel_loss_arguments_class()).format_help().split())
    assert "lambda; 5% of L_flow is typical" in text


def test_sample_modes_parse_and_count_evaluations():
    modes = experiment.parse_modes("1:1:0, 0.3:8:1, 0.3:8:0:1")
    assert [m.name for m in modes] == ["T0=1 K=1", "T0=0.3 K=8 +DC", "T0=0.3 K=8 one-step"]
    # 25 steps from 1 to 0: 25 evaluations from 1, 7 from the first grid time <= 0.3 (0.28), 1 with one step
    assert [m.evaluations(25, 1.0) for m in modes] == [25, 8 * 7, 8]
    for bad, message in (("0.3:8", "START_T:NUM_SAMPLES:DC"), ("0.3:8:0:1:1", "START_T:NUM_SAMPLES:DC"),
                         ("x:1:0", "START_T"), ("1.5:1:0", "in \\[0, 1\\]"), ("0.3:0:0", "NUM_SAMPLES >= 1"),
                         ("0.3:2:0,0.3:2:0", "appears twice")):
        with pytest.raises(experiment.BadInput, match=message):
            experiment.parse_modes(bad)


def test_mode_chosen_on_val_is_the_cheapest_within_the_noise_of_the_best():
    rng = np.random.default_rng(0)
    base = rng.normal(27, 3, 40)
    modes = experiment.parse_modes("0.3:8:0,0.3:8:1,0.3:8:0:1")
    names = [m.name for m in modes]
    # DC 0.005 dB ahead on average, one step 0.01 dB behind, ±0.2 dB per image: noise; the cheapest (8 evaluations) wins
    close = {names[0]: base, names[1]: base + 0.005 + rng.normal(0, 0.2, 40),
             names[2]: base - 0.01 + rng.normal(0, 0.2, 40)}
    assert experiment.choose_mode(close, modes, 25, 1.0) == "T0=0.3 K=8 one-step"
    # the multi-step mode ahead by 0.3 dB in every image: the cheaper ones are out, and DC is not ahead of it
    clear = dict(close, **{names[2]: base - 0.3, names[1]: base})
    assert experiment.choose_mode(clear, modes, 25, 1.0) == "T0=0.3 K=8"


@pytest.mark.parametrize("term_arms, message", [
    ("ssim:1;ssim:1", "appears twice"),
    ("nope:1", "--pixel_loss_terms"),
    ("l2:0", "--pixel_loss_terms"),
])
def test_term_arms_bad_input_names_the_flag(term_arms, message, tmp_path):
    from bagel_sr.errors import BadInput

    with pytest.raises(BadInput, match="--term_arms") as info:
        experiment.parse(["--term_arms", term_arms, "--output_dir", str(tmp_path)])
    assert message in str(info.value)


def test_main_job_help_without_a_checkout_is_help_only_and_names_the_demo_defaults(capsys, monkeypatch):
    """``--help`` without a checkout prints no "running" banner and lists where the demo's defaults differ."""
    from bagel_sr.train import main_sr_pixel_loss as main_job

    monkeypatch.delenv("BAGEL_ROOT", raising=False)
    with pytest.raises(SystemExit) as exit_:
        main_job.main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "running the embedded default" not in out and out.startswith("Without a checkout")
    for name, value in (("max_images", 1), ("crop", 4), ("crop_margin", 0), ("checkpointing", False)):
        assert f"--pixel_loss_{name} {value} (wrapper: {getattr(PixelLossConfig(), name)})" in out
    assert "--pixel_loss_weight 0.05 (wrapper" not in out  # equal defaults are not listed


def test_lesion_line_prints_both_arms_and_the_input_and_changes_no_other_number(tmp_path, capsys):
    """The lesion line runs after the results with its own generators: every number is the same with and without
    it (each seed's training reseeds itself, so one seed shows it)."""
    argv = ["--steps", "2", "--batch_size", "4", "--sample_steps", "2", "--eval_split", "val", "--hidden_size", "32",
            "--num_hidden_layers", "1", "--num_attention_heads", "2", "--num_key_value_heads", "1",
            "--intermediate_size", "64", "--progress", "False", "--num_threads", "1", "--save_checkpoints", "False",
            "--pool_size", "8", "--sample_modes", "", "--seeds", "1"]
    plain = experiment.main(argv + ["--output_dir", str(tmp_path / "a"), "--lesion_images", "0"])
    out_plain = capsys.readouterr().out
    with_lesions = experiment.main(argv + ["--output_dir", str(tmp_path / "b"), "--lesion_images", "6"])
    out = capsys.readouterr().out

    def numbers(report):
        keep = ("per_image", "modes_val_per_image_psnr", "unpaired_flow_loss", "paired_flow_loss", "final_log")
        return [(r["seed"], r.get("chosen_mode"), arm, {k: a[k] for k in keep if k in a},
                 {m: v["per_image"] for m, v in a.get("modes", {}).items()}) for r in report["seeds"]
                for arm, a in r["arms"].items()]

    def strip_times(final):
        return {k: v for k, v in final.items() if "second" not in k and k != "time"}

    a, b = numbers(plain), numbers(with_lesions)
    for x, y in zip(a, b):
        x[3]["final_log"], y[3]["final_log"] = strip_times(x[3]["final_log"]), strip_times(y[3]["final_log"])
    assert a == b and len(a) == 2
    assert "lesions (" not in out_plain and "lesions" not in plain
    block = out[out.index("lesions ("):].splitlines()
    assert [line.split(",")[0].split(" (")[0].strip() for line in block[2:5]] == ["LR input", "flow only", "+ pixel"]
    assert "stock sampler T0=1 K=1" in block[0] and "+ pixel, T0=1 K=1" in block[4]  # no modes: the stock sampler
    head = with_lesions["lesions"]["headline"]
    assert set(head) == {"truth", "input", "flow_only", "pixel"} and with_lesions["lesions"]["n_images"] == 6
    assert head["truth"]["cr"] == pytest.approx(1.0) and all(np.isfinite(v["cr"]) for v in head.values())
