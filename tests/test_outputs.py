"""The output ledger (bagel_sr.outputs): a folder's owner, its settings, and what an overwrite may delete."""
import pytest

from bagel_sr.errors import UserError
from bagel_sr.outputs import claim


def test_ledger_overwrite_deletes_only_listed_files(tmp_path):
    led, resumed = claim(tmp_path / "o", "tool", {"a": 1})
    led.record("x.png").write_text("ours")
    (tmp_path / "o" / "user.txt").write_text("theirs")
    with pytest.raises(UserError, match="other settings.*a: 1 then, 2 now.*--overwrite"):
        claim(tmp_path / "o", "tool", {"a": 2})
    claim(tmp_path / "o", "tool", {"a": 2}, overwrite=True)
    assert not (tmp_path / "o" / "x.png").exists() and (tmp_path / "o" / "user.txt").read_text() == "theirs"
    assert not resumed and claim(tmp_path / "o", "tool", {"a": 2})[1]
