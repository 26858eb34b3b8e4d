"""bagel_sr.argv: the one reader of flags on a command line that another parser gets."""
import pytest

from bagel_sr import argv
from bagel_sr.errors import UsageError

WORDS = ["--a", "1", "--b=x=y", "--flag", "--c", "-1", "pos", "--a", "2", "--d", "-h", "--"]


def test_scan_reads_values_by_one_rule():
    got = [(w.name, w.value, w.words) for w in argv.scan(WORDS)]
    assert got == [("a", "1", ("--a", "1")), ("b", "x=y", ("--b=x=y",)), ("flag", None, ("--flag",)),
                   ("c", "-1", ("--c", "-1")), (None, None, ("pos",)), ("a", "2", ("--a", "2")),
                   ("d", None, ("--d",)), (None, None, ("-h",)), (None, None, ("--",))]
    assert [w for s in argv.scan(WORDS) for w in s.words] == WORDS  # nothing lost, nothing reordered


def test_value_given_prefix_help():
    assert argv.value(WORDS, "a") == "2" and argv.value(WORDS, "flag") is None and argv.value(WORDS, "zzz") is None
    assert argv.given(WORDS, "flag") and not argv.given(WORDS, "fla") and not argv.given(["--x", "--flag"], "x=1")
    assert argv.with_prefix(["--p_x", "1", "--q", "--p_y=2", "--p_z"], "p_") == ["--p_x", "1", "--p_y=2", "--p_z"]
    assert argv.wants_help(WORDS) and argv.wants_help(["--help"]) and not argv.wants_help(["--a", "x"])


def test_split_takes_named_flags_and_keeps_prefixed_ones_apart():
    values, prefixed, rest = argv.split(["--root=/r", "--lr", "1e-5", "--p_w", "0.2", "--root", "/s", "--v"],
                                        {"root"}, prefixes=("p_",))
    assert values == {"root": "/s"} and prefixed == ["--p_w", "0.2"] and rest == ["--lr", "1e-5", "--v"]
    with pytest.raises(UsageError, match="--root needs a value"):
        argv.split(["--root", "--lr", "1"], {"root"})
