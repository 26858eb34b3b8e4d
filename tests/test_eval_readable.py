"""What makes reports readable (bagel_sr.eval.readable): console tables within 120 columns, the small-sample
note, run labels from paths."""
import pandas as pd

from bagel_sr.eval.readable import fit_console, small_sample_note

def test_fit_console_keeps_width_and_names_what_it_leaves_out():
    df = pd.DataFrame({"run": ["x" * 70, "y"], **{f"metric_{i}": ["12.34 [12.00, 12.70]"] * 2 for i in range(8)}})
    text = fit_console(df, "report.md")
    assert max(len(line) for line in text.splitlines()) <= 120
    assert "not shown here" in text and "metric_7" in text.splitlines()[-1] and "report.md" in text
    assert "metric_0" in text.splitlines()[0]


def test_small_sample_note_thresholds():
    assert small_sample_note(12, "image", 12, ["p1", "p2", "p3"]) is None
    assert "3 image(s) from 1 subject(s)" in small_sample_note(3, "image", 3, ["p1"] * 3)
    assert "from 2 subject(s)" in small_sample_note(40, "image", 40, ["p1", "p2"] * 20)
    assert small_sample_note(9, "image", 9, [None] * 9) is not None
    assert small_sample_note(10, "image", 10, [None] * 10) is None


def test_path_labels_skip_generic_folders_and_tell_runs_apart(tmp_path):
    from bagel_sr.eval.readable import pair_labels, path_label

    assert path_label(tmp_path / "runs" / "weight0.05" / "outputs") == "weight0.05"
    assert path_label(tmp_path / "restored") == "restored"
    a, b = (tmp_path / "runs" / w / "outputs" / "start_t=0.3" for w in ("w0", "w1"))
    assert pair_labels(a, b) == ("w0/start_t=0.3", "w1/start_t=0.3")
    assert pair_labels(a, b, ("mine", None)) == ("mine", "w1/start_t=0.3")
