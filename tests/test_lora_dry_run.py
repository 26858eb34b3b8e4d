"""The CPU dry run with LoRA (``python -m bagel_sr.smoke --bagel_root PATH --bagel_sr_lora_rank 8``): the checkout's
own ``main()``, two launches and a resume, ends ``smoke: OK`` with the LoRA checks in its last line, on upstream and
on the fork shape (tests/fork_checkout.py) and on the DeepSpeed port."""
import pathlib
import re

import pytest

from bagel_sr.testing.bagel_tiny import bagel_root, requires_bagel
from bagel_sr.testing.commands import last_line, run_python

pytest.importorskip("peft", reason='install the lora extra: pip install -e ".[lora]"')

pytestmark = [pytest.mark.bagel, requires_bagel]
REPO = pathlib.Path(__file__).resolve().parents[1]


def run_cli(*args, timeout=600, env=None):
    return run_python(*args, cwd=REPO, timeout=timeout, env=env)

LORA_NOTES = (
    r"LoRA: resume restored 0000002/adapter",
    r"base weights bit-identical in 0000004/model\.safetensors and ema\.safetensors",
    r"adapters moved \(max \|change\| live [1-9][\d.]*e-\d+, EMA [1-9][\d.]*e-\d+\)",
    r"optimizer state for the adapters only \(([\d,]+) values per moment, adapters \1\)",
    r"base \+ EMA adapter merged loads into stock Bagel \(strict\)",
)


@pytest.fixture(scope="module")
def lora_workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("lora_smoke")


@pytest.mark.parametrize("shape", ["upstream", "fork"])
def test_lora_dry_run_passes_with_its_checks(lora_workdir, tmp_path, shape):
    from bagel_sr.testing.fork_checkout import make_fork

    root = bagel_root() if shape == "upstream" else str(make_fork(bagel_root(), tmp_path / "fork"))
    code, out = run_cli("-m", "bagel_sr.smoke", "--bagel_root", root, "--workdir", str(lora_workdir),
                        "--steps", "4", "--nproc", "2", "--bagel_sr_lora_rank", "8", timeout=900)
    line = last_line(out)
    assert code == 0, out[-3000:]
    assert line.startswith("smoke: OK") and re.search(r"pixel term acted on [1-9]\d*/3 steps", line), line
    for note in LORA_NOTES:
        assert re.search(note, line), (note, line)
    checkpoint = lora_workdir / "checkpoints" / "0000004"
    for sub in ("adapter", "adapter_ema"):
        assert {p.name for p in (checkpoint / sub).iterdir()} == {"adapter_model.safetensors", "adapter_config.json"}


def test_lora_dry_run_of_a_deepspeed_port(tmp_path):
    """BAGEL's script ported to DeepSpeed (ZeRO-2, no EMA, no resume): LoRA joins at ``deepspeed.initialize``."""
    pytest.importorskip("deepspeed", reason="install the deepspeed extra: pip install -e '.[deepspeed]'")
    from bagel_sr.testing.fork_checkout import DEEPSPEED_SCRIPT, make_deepspeed_fork

    root = make_deepspeed_fork(bagel_root(), tmp_path / "checkout")
    code, out = run_cli("-m", "bagel_sr.smoke", "--bagel_root", str(root), "--bagel_train_script", DEEPSPEED_SCRIPT,
                        "--workdir", str(tmp_path / "work"), "--no_resume", "--steps", "2", "--nproc", "2",
                        "--bagel_sr_lora_rank", "8", env={"DS_ACCELERATOR": "cpu"})
    line = last_line(out)
    assert code == 0 and line.startswith("smoke: OK"), out[-3000:]
    for note in (r"LoRA: base weights bit-identical in 0000002/mp_rank_00_model_states\.pt \(DeepSpeed\)",
                 r"adapters moved \(max \|change\| [1-9][\d.]*e-\d+; no EMA in this loop\)",
                 r"optimizer state for the adapters only \(([\d,]+) values per moment, adapters \1\)",
                 r"base \+ adapter merged loads into stock Bagel \(strict\)"):
        assert re.search(note, line), (note, line)
