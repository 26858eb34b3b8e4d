"""eval/infer: job lists, resumable runs, and restoration through a real checkout's InterleaveInferencer."""
import importlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bagel_sr.embedded import infer as embedded_infer
from bagel_sr.eval import infer
from bagel_sr.errors import UserError


def _checkout_inference_modules(import_bagel):
    """The checkout's ``data.transforms`` and ``inferencer`` modules (skip when their dependencies are missing)."""
    import_bagel()
    try:
        return importlib.import_module("data.transforms"), importlib.import_module("inferencer")
    except ModuleNotFoundError as err:
        pytest.skip(f"the checkout's inference code needs {err.name}, not installed here")

def _image(path: Path, value: int, size=(32, 32)) -> Path:
    Image.fromarray(np.full((*size, 3), value, np.uint8)).save(path)
    return path


def test_jobs_from_folder_and_manifest(tmp_path):
    for name, v in (("b", 20), ("a", 10)):
        _image(tmp_path / f"{name}.png", v)
    (tmp_path / "notes.txt").write_text("x")
    jobs = infer.jobs_from_folder(tmp_path, "Denoise this CT slice")
    assert [j.pair_id for j in jobs] == ["a", "b"] and jobs[0].instruction == "Denoise this CT slice"
    build = tmp_path / "build"
    (build / "heldout/test/lr").mkdir(parents=True)
    _image(build / "heldout/test/lr/p1.png", 5)
    rows = [
        {"pair_id": "p0", "split": "train", "instructions": ["x"]},
        {"pair_id": "p1", "split": "test", "instructions": ["Super-resolve this MR slice by 4x", "y"],
         "heldout": {"lr": "heldout/test/lr/p1.png", "hr": "heldout/test/hr/p1.png"}},
    ]
    (build / "manifest.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    jobs = infer.jobs_from_manifest(build / "manifest.jsonl", "test", None)
    assert [(j.pair_id, j.instruction) for j in jobs] == [("p1", "Super-resolve this MR slice by 4x")]
    assert jobs[0].input_path == build / "heldout/test/lr/p1.png"
    with pytest.raises(UserError, match="no held-out inputs"):
        infer.jobs_from_manifest(build / "manifest.jsonl", "val", None)


class Interrupted(Exception):
    pass


def test_run_jobs_is_resumable_and_keeps_sizes(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    for i in range(3):
        _image(src / f"x{i}.png", 40 * i, size=(24, 40))
    jobs = infer.jobs_from_folder(src, None)
    calls, fail_on = [], {"call": 2}

    def restore(image, instruction):
        calls.append(instruction)
        if len(calls) == fail_on["call"]:
            raise Interrupted  # interrupted in flight
        return Image.fromarray(255 - np.asarray(image)).resize((80, 48))

    out = tmp_path / "out"
    with pytest.raises(UserError, match="generated 80x48 for a 40x24 input; pass --resize_output"):
        infer.run_jobs(jobs, out, restore, progress=False)  # never resized silently
    assert list(out.iterdir()) == []
    calls.clear()
    with pytest.raises(Interrupted):
        infer.run_jobs(jobs, out, restore, progress=False, resize=True)
    assert sorted(p.name for p in out.iterdir()) == ["x0.png"]  # nothing half-written
    fail_on["call"] = None
    assert infer.run_jobs(jobs, out, restore, progress=False, resize=True) == (2, 1)
    for i in range(3):
        with Image.open(out / f"x{i}.png") as im:
            assert im.size == (40, 24) and np.asarray(im)[0, 0, 0] == 255 - 40 * i


def test_cli_needs_a_restorer(tmp_path):
    _image(tmp_path / "a.png", 1)
    with pytest.raises(UserError, match="say what restores: --bagel_root PATH --model_path DIR.*embedded_run"):
        infer.main(["--inputs", str(tmp_path), "--out", str(tmp_path / "o"), "--bagel_root", ""])


def test_resize_output_is_recorded_in_the_folders_settings(tmp_path):
    args = infer.parse_args(["--inputs", str(tmp_path), "--out", str(tmp_path / "o"), "--resize_output"])
    assert infer.run_settings(args)[0]["resize_output"] is True
    assert infer.run_settings(infer.parse_args(["--inputs", "x", "--out", "o"]))[0]["resize_output"] is False


@pytest.mark.bagel
def test_checkout_inferencer_restores_through_the_checkout(tmp_path, checkout_shape):
    """The fork's inferencer ignores the input's size (it would generate at its 1024x1024 default): infer passes
    the size through ``image_shapes``, and the output has the input's size without any resize."""
    from bagel_tiny import SPECIAL_TOKENS, build_tiny_autoencoder, build_tiny_bagel, import_bagel

    transforms, inferencer_mod = _checkout_inference_modules(import_bagel)

    class Tokenizer:  # the one method the inferencer calls
        def encode(self, text):
            return [2 + (ord(c) % 20) for c in text[:8]]

    model = build_tiny_bagel(visual_und=True).eval()
    inferencer = inferencer_mod.InterleaveInferencer(
        model=model, vae_model=build_tiny_autoencoder(), tokenizer=Tokenizer(),
        vae_transform=transforms.ImageTransform(64, 32, 16), vit_transform=transforms.ImageTransform(56, 28, 14),
        new_token_ids=SPECIAL_TOKENS,
    )
    assert infer.takes_image_shapes(inferencer)
    restore = infer.checkout_restorer(inferencer, infer.SamplingArgs(num_timesteps=3, cfg_text_scale=1.5, cfg_img_scale=1.2))
    src = tmp_path / "in"
    src.mkdir()
    _image(src / "s0.png", 100, size=(48, 64))
    done, skipped = infer.run_jobs(infer.jobs_from_folder(src, "Denoise this CT slice"), tmp_path / "out", restore, progress=False)
    assert (done, skipped) == (1, 0)
    with Image.open(tmp_path / "out/s0.png") as im:
        assert im.size == (64, 48) and im.mode == "RGB"


def test_embedded_restorer_through_the_cli(tmp_path):
    """A saved embedded model restores a folder of inputs through ``python -m bagel_sr.embedded.infer``."""
    import dataclasses

    from bagel_sr.embedded.backbone import TinyBagelConfig
    from bagel_sr.embedded.data import WordTokenizer
    from bagel_sr.embedded.train import build_model, save_checkpoint

    config = TinyBagelConfig(vocab_size=len(WordTokenizer.default()), hidden_size=32, num_hidden_layers=1,
                             max_latent_size=8)
    model = build_model(config, seed=0)
    run = tmp_path / "run"
    save_checkpoint(str(run), model, model, {"model": dataclasses.asdict(config)})
    src = tmp_path / "in"
    src.mkdir()
    _image(src / "a.png", 90, size=(40, 72))  # not a multiple of 16: cropped for the model, padded back
    done, skipped = embedded_infer.main(["--inputs", str(src), "--out", str(tmp_path / "out"), "--embedded_run", str(run),
                                "--num_timesteps", "2", "--timestep_shift", "1.0", "--no_progress"])
    assert (done, skipped) == (1, 0)
    with Image.open(tmp_path / "out/a.png") as im:
        assert im.size == (72, 40)
        arr = np.asarray(im)
    assert arr.dtype == np.uint8 and (arr[..., 0] == arr[..., 1]).all()
    assert embedded_infer.main(["--inputs", str(src), "--out", str(tmp_path / "out"), "--embedded_run", str(run),
                       "--num_timesteps", "2", "--timestep_shift", "1.0", "--no_progress"]) == (0, 1)


def _tiny_inferencer():
    from bagel_tiny import SPECIAL_TOKENS, build_tiny_autoencoder, build_tiny_bagel, import_bagel, requires_bagel

    if requires_bagel.args[0]:
        pytest.skip(requires_bagel.kwargs["reason"])
    transforms, inferencer_mod = _checkout_inference_modules(import_bagel)

    class Tokenizer:
        def encode(self, text):
            return [2 + (ord(c) % 20) for c in text[:8]]

    import torch

    torch.manual_seed(0)
    model = build_tiny_bagel(visual_und=True).eval()
    return inferencer_mod.InterleaveInferencer(
        model=model, vae_model=build_tiny_autoencoder(), tokenizer=Tokenizer(),
        vae_transform=transforms.ImageTransform(64, 32, 16), vit_transform=transforms.ImageTransform(56, 28, 14),
        new_token_ids=SPECIAL_TOKENS,
    )


@pytest.mark.bagel
def test_start_t_patch_of_the_checkout_sampler():
    """--start_t through the real checkout: T0 = 1 is the stock sampler bit for bit, T0 = 0 the VAE round trip of
    the input, a small T0 close to it; the registry row undoes both names."""
    import torch

    from bagel_sr.patches import registry
    from bagel_sr.patches.context import PatchContext
    from bagel_sr.patches.inference import patch_start_t

    inferencer = _tiny_inferencer()
    sampling = infer.SamplingArgs(num_timesteps=21, timestep_shift=1.0, cfg_text_scale=1.0, cfg_img_scale=1.0)
    restore = infer.checkout_restorer(inferencer, sampling, seed=3)
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (32, 48, 3), dtype=np.uint8))

    def run(start_t=None):
        if start_t is None:
            return np.asarray(restore(image, "Denoise this"), np.float64)
        undo = patch_start_t(PatchContext(inferencer=inferencer, start_t=start_t))
        try:
            return np.asarray(restore(image, "Denoise this"), np.float64)
        finally:
            undo()

    stock = run()
    assert np.array_equal(run(1.0), stock)
    resized = inferencer.vae_transform.resize_transform(image)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        latent = inferencer.vae_model.encode(inferencer.vae_transform(resized)[None])
        trip = inferencer.vae_model.decode(latent)
    trip = ((trip.float() * 0.5 + 0.5).clamp(0, 1)[0].permute(1, 2, 0) * 255).to(torch.uint8).numpy().astype(np.float64)
    dist = {t: np.abs(run(t) - trip).mean() for t in (0.0, 0.1)}
    assert dist[0.0] <= 1.0  # the round trip (up to bf16 rounding)
    assert dist[0.1] < np.abs(stock - trip).mean() / 2

    ctx = PatchContext(inferencer=inferencer, start_t=0.5)
    row = next(p for p in registry.PATCHES if p.name == "patch_start_t")
    before = row.read(ctx)
    with registry.apply(ctx, groups=("inference",)) as handle:
        assert handle.applied == ["patch_start_t"] and row.read(ctx) != before
    assert row.read(ctx) == before == (None, None)
    assert registry.apply(PatchContext(inferencer=inferencer, start_t=1.0), groups=("inference",)).applied == []


@pytest.mark.bagel
def test_one_step_patch_of_the_checkout_sampler():
    """--one_step through the real checkout: from T0 = 1 on a 21-point grid it is the stock sampler on a 2-point grid
    (one step from 1 to 0) after one model evaluation; from T0 = 0.5 it differs from the rest of the grid."""
    import torch

    import functools

    from bagel_sr.patches.context import PatchContext
    from bagel_sr.patches.inference import patch_start_t

    inferencer = _tiny_inferencer()
    torch.manual_seed(1)
    torch.nn.init.normal_(inferencer.model.llm2vae.weight, std=0.5)  # zero at init: every sampler keeps its start
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 48, 3), dtype=np.uint8))
    calls = {"n": 0}
    flow = inferencer.model._forward_flow

    @functools.wraps(flow)  # the patch checks the signature (x_t)
    def counting_flow(*a, **kw):
        calls["n"] += 1
        return flow(*a, **kw)

    inferencer.model._forward_flow = counting_flow

    def run(num_timesteps, **ctx):
        sampling = infer.SamplingArgs(num_timesteps=num_timesteps, timestep_shift=1.0, cfg_text_scale=1.0,
                                      cfg_img_scale=1.0)
        restore = infer.checkout_restorer(inferencer, sampling, seed=3)
        undo = patch_start_t(PatchContext(inferencer=inferencer, **ctx)) if ctx else (lambda: None)
        calls["n"] = 0
        try:
            return np.asarray(restore(image, "Denoise this"), np.float64), calls["n"]
        finally:
            undo()

    two_point, n_stock = run(2)
    one_step, n_one = run(21, start_t=1.0, one_step=True)
    assert n_stock == n_one == 1 and np.abs(one_step - two_point).mean() <= 1.0  # bf16 rounding of t_k / dt
    from_half, n_half = run(21, start_t=0.5, one_step=True)
    rest, n_rest = run(21, start_t=0.5)
    assert n_half == 1 and n_rest == 10 and np.abs(from_half - rest).mean() > 2.0
    inferencer.model._forward_flow = flow
    from bagel_sr.patches import registry

    with registry.apply(PatchContext(inferencer=inferencer, start_t=1.0, one_step=True), groups=("inference",)) as h:
        assert h.applied == ["patch_start_t"]  # --one_step alone also needs the patch


def test_embedded_one_step_through_infer(tmp_path):
    """--one_step --start_t 0.5 with an embedded run: infer writes what the embedded restorer's one step gives."""
    import dataclasses

    import torch

    from bagel_sr.embedded.backbone import TinyBagelConfig
    from bagel_sr.embedded.data import WordTokenizer
    from bagel_sr.embedded.inference import embedded_restorer
    from bagel_sr.embedded.train import build_model, save_checkpoint

    config = TinyBagelConfig(vocab_size=len(WordTokenizer.default()), hidden_size=32, num_hidden_layers=1,
                             max_latent_size=8)
    model = build_model(config, seed=0)
    torch.nn.init.normal_(model.llm2vae.weight, std=0.5)  # zero at init: every sampler would keep its start
    save_checkpoint(str(tmp_path / "run"), model, model, {"model": dataclasses.asdict(config)})
    (tmp_path / "in").mkdir()
    image = Image.fromarray(np.random.default_rng(2).integers(0, 255, (32, 32), dtype=np.uint8)).convert("RGB")
    image.save(tmp_path / "in/a.png")
    for one_step in (False, True):
        out = tmp_path / f"out{int(one_step)}"
        embedded_infer.main(["--inputs", str(tmp_path / "in"), "--out", str(out), "--embedded_run", str(tmp_path / "run"),
                    "--num_timesteps", "10", "--timestep_shift", "1", "--start_t", "0.5", "--no_progress"]
                   + (["--one_step"] if one_step else []))
    restore = embedded_restorer(str(tmp_path / "run"), num_timesteps=10, start_t=0.5, one_step=True)
    expected = np.asarray(restore(image, infer.DEFAULT_INSTRUCTION).convert("L"), np.float64)
    got = {k: np.asarray(Image.open(tmp_path / f"out{k}/a.png").convert("L"), np.float64) for k in (0, 1)}
    assert np.array_equal(got[1], expected) and np.abs(got[1] - got[0]).mean() > 1.0


@pytest.mark.parametrize("settings", [dict(start_t=0.3), dict(start_t=1.0, one_step=True)])
def test_start_t_patch_refuses_a_checkout_without_the_sampler_it_relies_on(settings):
    """A fork whose generate_image lacks the keywords the patch relies on: --start_t and --one_step alone refuse."""
    from bagel_sr.patches.context import PatchContext
    from bagel_sr.patches.inference import patch_start_t
    from bagel_sr.patches.training import IncompatibleCheckoutError

    class Model:
        def generate_image(self, packed_init_noises, num_timesteps=24):  # no timestep_shift
            return packed_init_noises

    class Inferencer:
        model = Model()
        vae_model = type("V", (), {"encode": lambda self, x: x})()

        def update_context_image(self, image, gen_context, vae=True, vit=True):
            return gen_context

        def vae_transform(self, image):
            return image

    with pytest.raises(IncompatibleCheckoutError, match="generate_image"):
        patch_start_t(PatchContext(inferencer=Inferencer(), **settings))


def test_embedded_posterior_mean_writes_a_std_map_and_projects_on_the_input(tmp_path):
    """--num_samples 2 --start_t 0.5 --data_consistency: aggregate, std map (PNG + float), band of the input kept."""
    import dataclasses

    from bagel_sr.embedded.backbone import TinyBagelConfig
    from bagel_sr.embedded.data import WordTokenizer
    from bagel_sr.embedded.train import build_model, save_checkpoint
    from bagel_sr.eval import operators

    config = TinyBagelConfig(vocab_size=len(WordTokenizer.default()), hidden_size=32, num_hidden_layers=1,
                             max_latent_size=8)
    model = build_model(config, seed=0)
    save_checkpoint(str(tmp_path / "run"), model, model, {"model": dataclasses.asdict(config)})
    build = tmp_path / "build"
    (build / "lr").mkdir(parents=True)
    rng = np.random.default_rng(1)
    band = [{"name": "kspace_truncation", "scale": 4}]
    lr = operators.apply_forward(rng.random((32, 48)), band)[0].clip(0, 1)
    Image.fromarray((lr * 255).round().astype(np.uint8)).convert("RGB").save(build / "lr/p.png")
    row = {"pair_id": "p", "split": "test", "degradations": band, "heldout": {"lr": "lr/p.png", "hr": "hr/p.png"}}
    (build / "manifest.jsonl").write_text(json.dumps(row) + "\n")
    embedded_infer.main(["--inputs", str(build / "manifest.jsonl"), "--out", str(tmp_path / "out"), "--embedded_run",
                str(tmp_path / "run"), "--num_timesteps", "4", "--start_t", "0.5", "--num_samples", "2",
                "--data_consistency", "--dc_steps", "1", "--no_progress"])
    std = np.load(tmp_path / "out/std/p.npy")
    assert std.shape == (32, 48) and std.dtype == np.float32 and std.max() > 0
    with Image.open(tmp_path / "out/std/p.png") as im:
        assert im.size == (48, 32) and np.asarray(im).max() == 255
    with Image.open(tmp_path / "out/p.png") as im:
        out = np.asarray(im.convert("L"), np.float64) / 255
    measured = np.asarray(Image.open(build / "lr/p.png").convert("L"), np.float64) / 255
    assert np.abs(operators.apply_forward(out, band)[0] - measured).mean() < 0.01  # the measured band is the input's
    with pytest.raises(UserError, match="--start_t"):
        embedded_infer.main(["--inputs", str(build / "manifest.jsonl"), "--out", str(tmp_path / "o2"), "--embedded_run",
                    str(tmp_path / "run"), "--start_t", "1.5"])
