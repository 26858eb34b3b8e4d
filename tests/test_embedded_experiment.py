"""The embedded demo's main job (bagel_sr.embedded.experiment): flags checked before any work, and an output
folder that holds a finished run or someone else's files."""
import pytest

from bagel_sr.errors import UserError


@pytest.mark.parametrize("argv, message", [
    (["--steps", "0"], "--steps 0: expected an integer >= 1"),
    (["--steps", "-5"], "--steps -5: expected an integer >= 1"),
    (["--batch_size", "0"], "--batch_size 0: expected an integer >= 1"),
    (["--gradient_accumulation_steps", "0"], "--gradient_accumulation_steps 0"),
    (["--t2i_ratio", "1.5"], "--t2i_ratio 1.5: expected a number in [0, 1]"),
    (["--lr", "0"], "--lr 0.0: expected a finite number > 0"),
    (["--seeds", "0"], "--seeds 0: expected an integer >= 1"),
    (["--sample_steps", "0"], "--sample_steps 0: expected an integer >= 1"),
    (["--pixel_loss_datasets", "sr_pair"], "unknown data set 'sr_pair'; did you mean 'sr_pairs'?"),
])
def test_main_job_validates_flags_before_work(argv, message):
    from bagel_sr.embedded import experiment

    with pytest.raises(UserError) as e:
        experiment.parse(argv)
    assert message in str(e.value)


def test_main_job_refuses_a_finished_output_dir(tmp_path):
    from bagel_sr.embedded import experiment

    args, pixel = experiment.parse(["--output_dir", str(tmp_path / "run"), "--steps", "3"])
    led = experiment.claim_output_dir(args, pixel)
    led.record("metrics.json").write_text("{}")
    led.mark_complete()
    (tmp_path / "run" / "user.txt").write_text("keep")
    with pytest.raises(UserError, match="holds a finished run; pass --overwrite"):
        experiment.claim_output_dir(args, pixel)
    args.overwrite = True
    experiment.claim_output_dir(args, pixel)
    assert not (tmp_path / "run" / "metrics.json").exists() and (tmp_path / "run" / "user.txt").exists()
    with pytest.raises(UserError, match="not empty and was not written by bagel-sr"):
        experiment.claim_output_dir(*experiment.parse(["--output_dir", str(tmp_path / "run2"), "--steps", "3"])) \
            if (tmp_path / "run2").mkdir() or (tmp_path / "run2" / "x").write_text("x") else None
