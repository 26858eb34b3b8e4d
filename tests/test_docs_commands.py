"""Every shell block of the README and docs/ is marked (see ``docs_blocks``); the README's ``run`` blocks run in
tests/test_user_journey.py; blocks that need GPUs or a user's model are marked ``skip`` and have the flags of their
bagel-sr commands checked against each tool's ``--help`` here."""
from __future__ import annotations

import functools
import os
import re
import subprocess
import sys

import pytest

import docs_blocks
from bagel_sr.testing.bagel_tiny import upstream_root

ALL_BLOCKS = [b for page in docs_blocks.pages() for b in docs_blocks.blocks(page)]


def test_every_shell_block_of_the_readme_and_docs_is_marked_run_or_skip():
    unmarked = [b.where for b in ALL_BLOCKS if b.mode is None]
    assert not unmarked, f"mark these blocks <!-- docs-test: run --> or <!-- docs-test: skip: why -->: {unmarked}"
    assert all(b.reason.strip() for b in ALL_BLOCKS if b.mode == "skip"), "a skipped block says why"
    assert any(b.mode == "run" for b in ALL_BLOCKS if b.page == "README.md")


def test_blocks_are_found_with_their_markers(tmp_path):
    page = tmp_path / "p.md"
    page.write_text("text\n<!-- docs-test: skip: needs GPUs -->\n```bash\npython -m bagel_sr.smoke \\\n  --steps 2\n```\n"
                    "```python\nx = 1\n```\n```bash\necho hi  # unmarked\n```\n")
    docs_blocks.REPO, old = tmp_path, docs_blocks.REPO
    try:
        found = list(docs_blocks.blocks(page))
    finally:
        docs_blocks.REPO = old
    assert [(b.line, b.mode, b.reason) for b in found] == [(3, "skip", "needs GPUs"), (10, None, "")]
    page.write_text("<!-- docs-test: file a.yaml -->\n```yaml\nx: 1\n```\n")
    docs_blocks.REPO = tmp_path
    try:
        (saved,) = docs_blocks.blocks(page)
    finally:
        docs_blocks.REPO = old
    assert (saved.mode, saved.reason, saved.lang, saved.text) == ("file", "a.yaml", "yaml", "x: 1\n")
    assert docs_blocks.commands(found[0].text) == ["python -m bagel_sr.smoke --steps 2"]
    assert docs_blocks.bagel_cli("DS_ACCELERATOR=cpu python -m bagel_sr.data build x.yaml --overwrite") == (
        ["-m", "bagel_sr.data", "build"], ["--overwrite"])
    assert docs_blocks.bagel_cli("torchrun --nproc_per_node 8 train/main_sr_pixel_loss.py --lr 1")[1] == ["--lr"]
    assert docs_blocks.bagel_cli("ls -l") is None


@functools.lru_cache(maxsize=None)
def help_flags(prefix: tuple, with_checkout: bool) -> frozenset:
    argv = [sys.executable, *prefix]
    if with_checkout:
        argv += ["--bagel_root", upstream_root()]
    env = dict(os.environ)
    if not with_checkout:
        env.pop("BAGEL_ROOT", None)
    proc = subprocess.run(argv + ["--help"], capture_output=True, text=True, timeout=300, env=env,
                          cwd=docs_blocks.REPO)
    assert proc.returncode == 0, f"{' '.join(prefix)} --help exited {proc.returncode}: {proc.stderr[-500:]}"
    return frozenset(re.findall(r"--[A-Za-z][\w-]*", proc.stdout + proc.stderr))


def _skipped_commands():
    for block in ALL_BLOCKS:
        if block.mode == "skip":
            for command in docs_blocks.commands(block.text):
                cli = docs_blocks.bagel_cli(command)
                if cli is not None:
                    yield pytest.param(block, command, cli, id=f"{block.where}:{command[:40]}")


@pytest.mark.parametrize("block,command,cli", list(_skipped_commands()))
def test_commands_that_are_not_run_use_flags_their_tool_accepts(block, command, cli):
    prefix, flags = cli
    with_checkout = "--bagel_root" in flags and "main_sr_pixel_loss.py" in prefix[0]
    if with_checkout and upstream_root() is None:
        pytest.skip("the checkout's flags need BAGEL_ROOT")
    known = help_flags(tuple(prefix), with_checkout)
    prefixes = [k for k in known if k.endswith("_")]  # "--pixel_loss_*" in a help text
    unknown = [f for f in flags if f not in known and not any(f.startswith(p) for p in prefixes)]
    if unknown and prefix[-1] == "bagel_sr.smoke":  # passed on to the checkout: its flags
        if upstream_root() is None:
            pytest.skip(f"{unknown} pass on to the checkout, whose flags need BAGEL_ROOT")
        script = str(docs_blocks.REPO / "train" / "main_sr_pixel_loss.py")
        unknown = [f for f in unknown if f not in help_flags((script,), True)]
    assert not unknown, f"{block.where}: {command!r} uses flags its --help does not list: {unknown}"
