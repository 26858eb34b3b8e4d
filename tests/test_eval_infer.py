"""eval/infer: job lists, resumable runs, and restoration through a real checkout's InterleaveInferencer."""
import importlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bagel_sr.eval import infer
from bagel_sr.errors import UserError


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
    with pytest.raises(UserError, match="--embedded_run"):
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

    import_bagel()
    try:
        transforms = importlib.import_module("data.transforms")
        inferencer_mod = importlib.import_module("inferencer")
    except ModuleNotFoundError as err:
        pytest.skip(f"the checkout's inference code needs {err.name}, not installed here")

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
    """A saved embedded model restores a folder of inputs through ``python -m bagel_sr.eval.infer --embedded_run``."""
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
    done, skipped = infer.main(["--inputs", str(src), "--out", str(tmp_path / "out"), "--embedded_run", str(run),
                                "--num_timesteps", "2", "--timestep_shift", "1.0", "--no_progress"])
    assert (done, skipped) == (1, 0)
    with Image.open(tmp_path / "out/a.png") as im:
        assert im.size == (72, 40)
        arr = np.asarray(im)
    assert arr.dtype == np.uint8 and (arr[..., 0] == arr[..., 1]).all()
    assert infer.main(["--inputs", str(src), "--out", str(tmp_path / "out"), "--embedded_run", str(run),
                       "--num_timesteps", "2", "--timestep_shift", "1.0", "--no_progress"]) == (0, 1)
