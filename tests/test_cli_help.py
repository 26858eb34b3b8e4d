"""``--help`` of every command-line tool: it prints and exits 0, and every flag says in one plain line what it does
(no tracker references, no measured figures, nothing that argparse would %-format)."""
from __future__ import annotations

import argparse
import re
import runpy
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

#: ``python -m MODULE [SUBCOMMAND] --help`` for every tool the README and docs/ name.
MODULES = [
    ("bagel_sr.data", []),
    ("bagel_sr.data", ["build"]),
    ("bagel_sr.data", ["template"]),
    ("bagel_sr.smoke", []),
    ("bagel_sr.gpu_check", []),
    ("bagel_sr.gpu_check.step", []),
    ("bagel_sr.eval.evaluate", []),
    ("bagel_sr.eval.infer", []),
    ("bagel_sr.eval.ablate", []),
    ("bagel_sr.embedded.infer", []),
    ("bagel_sr.embedded.vae", []),
    ("bagel_sr.embedded.vae", ["train"]),
    ("bagel_sr.embedded.vae", ["eval"]),
    ("bagel_sr.embedded.experiment", []),
    ("bagel_sr.train.main_sr_pixel_loss", []),
]
SCRIPTS = sorted(p.relative_to(REPO).as_posix() for p in (REPO / "benchmarks").glob("*.py")
                 if 'if __name__ == "__main__":' in p.read_text())  # the scripts, not their helper modules

#: What a help text must not hold: tracker references, measured figures, a '%' argparse would format.
FORBIDDEN = {
    "a tracker reference": re.compile(r"#\d|\b(iss(?:ue)|tick(?:et))s?\b", re.IGNORECASE),  # spelt not to match itself
    "a measured figure in dB": re.compile(r"\d\s*dB\b"),
    "a percent sign": re.compile(r"%(?!\(\w+\)s)"),
}
MAX_HELP_CHARS = 140


def problems(text: str) -> list:
    return [what for what, pattern in FORBIDDEN.items() if pattern.search(text)]


def parsers_and_subparsers(parsers):
    for parser in parsers:
        yield parser
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                yield from parsers_and_subparsers(action.choices.values())


def help_texts(parser: argparse.ArgumentParser):
    """``(flag, help)`` of every visible argument of ``parser`` and of its subcommands' entries."""
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction) or action.help == argparse.SUPPRESS:
            continue
        if isinstance(action, argparse._SubParsersAction):
            for choice in action._choices_actions:
                yield f"{parser.prog} {choice.dest}", choice.help
            continue
        yield f"{parser.prog} {'/'.join(action.option_strings) or action.dest}", action.help


def run_help(monkeypatch, capsys, argv0: str, run) -> tuple:
    """Run a tool with ``--help`` in this process; returns (its output, the parsers that printed help)."""
    shown = []
    print_help = argparse.ArgumentParser.print_help

    def recording_print_help(self, file=None):
        shown.append(self)
        return print_help(self, file)

    monkeypatch.setattr(argparse.ArgumentParser, "print_help", recording_print_help)
    monkeypatch.delenv("BAGEL_ROOT", raising=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # runpy: the module is already imported
        with pytest.raises(SystemExit) as exit_:
            run()
    out = capsys.readouterr()
    assert exit_.value.code in (0, None), f"{argv0} --help exited {exit_.value.code}: {out.err[-500:]}"
    assert shown, f"{argv0} --help printed no argparse help"
    return out.out + out.err, shown


def check_help(argv0: str, output: str, parsers) -> None:
    assert not problems(output), f"{argv0} --help holds {problems(output)}"
    bad = []
    for parser in parsers_and_subparsers(parsers):
        for flag, text in help_texts(parser):
            if not text or not text.strip():
                bad.append(f"{flag}: no help")
            elif "\n" in text.strip() or len(text) > MAX_HELP_CHARS:
                bad.append(f"{flag}: not one short line ({len(text)} chars)")
            elif problems(text):
                bad.append(f"{flag}: holds {problems(text)}")
    assert not bad, f"{argv0} --help: " + "; ".join(bad)


@pytest.mark.parametrize("module, sub", MODULES, ids=[" ".join([m, *s]) for m, s in MODULES])
def test_help_of_every_module_prints_plain_one_line_flags(module, sub, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", [module, *sub, "--help"])
    output, parsers = run_help(monkeypatch, capsys, module,
                               lambda: runpy.run_module(module, run_name="__main__", alter_sys=True))
    assert "usage:" in output
    check_help(f"python -m {' '.join([module, *sub])}", output, parsers)


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_of_every_benchmark_prints_plain_one_line_flags(script, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", [script, "--help"])
    monkeypatch.syspath_prepend(str((REPO / script).parent))  # as `python benchmarks/x.py` puts its folder first
    output, parsers = run_help(monkeypatch, capsys, script,
                               lambda: runpy.run_path(str(REPO / script), run_name="__main__"))
    check_help(script, output, parsers)


def test_the_checks_catch_what_they_forbid():
    parser = argparse.ArgumentParser(prog="tool")
    parser.add_argument("--a", help="fixed in #" "28, worth 0.4 dB")
    parser.add_argument("--b", help="53%% of the images")
    parser.add_argument("--c")
    parser.add_argument("--d", help="x" * (MAX_HELP_CHARS + 1))
    parser.add_argument("--e", help="what e does (default: %(default)s)")
    with pytest.raises(AssertionError) as info:
        check_help("tool", "", [parser])
    message = str(info.value)
    for expected in ("--a: holds ['a tracker reference', 'a measured figure in dB']", "--b: holds ['a percent sign']",
                     "--c: no help", "--d: not one short line"):
        assert expected in message
    assert "--e" not in message


@pytest.mark.bagel
def test_help_of_the_main_job_on_a_checkout_lists_its_flags_and_ours():
    from bagel_sr.testing.bagel_tiny import upstream_root

    root = upstream_root()
    if root is None:
        pytest.skip("set BAGEL_ROOT to a BAGEL checkout to run")
    proc = subprocess.run([sys.executable, "-m", "bagel_sr.train.main_sr_pixel_loss", "--bagel_root", root, "--help"],
                          capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-1000:]
    text = " ".join(proc.stdout.split())
    assert "--pixel_loss_weight" in text and "--dataset_config_file" in text and "--bagel_sr_host_pixel_loss" in text
    assert not problems(proc.stdout), problems(proc.stdout)
