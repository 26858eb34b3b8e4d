"""Validation's registry rows on a fake training script: they apply only with a val set, each replaces its name and
one handle undoes them; a script without a name they need stops in one line; and when a validation is due."""
import types

import pytest

from bagel_sr.testing import fake_checkout
from bagel_sr.patches import registry
from bagel_sr.patches.context import RunState
from bagel_sr.patches.training import IncompatibleCheckoutError
from bagel_sr.validation import rows as validation_rows
from bagel_sr.validation.loop import Validator
from bagel_sr.validation_config import ValidationConfig

NAMES = [p.name for p in validation_rows.VALIDATION_PATCHES]


def _context(ema=True):
    ctx = fake_checkout.context()
    script = ctx.train_module
    script.add_special_tokens = lambda tokenizer: (tokenizer, {"bos_token_id": 1}, 0)
    script.fsdp_ema_setup = lambda model, *a, **k: ("ema of", model)
    script.FSDPCheckpoint = type("FSDPCheckpoint", (), {
        "try_load_train_state": staticmethod(lambda resume_from, optimizer, scheduler, config: (optimizer, scheduler, 7, None))})
    ctx.validation, ctx.val_sets = ValidationConfig(datasets="set.yaml", every=3, ema=ema), []
    return ctx


def test_the_rows_apply_only_with_a_val_set_feed_the_validator_and_one_handle_undoes_them():
    ctx = _context()
    before = {p.name: p.read(ctx) for p in validation_rows.VALIDATION_PATCHES}
    with registry.apply(fake_checkout.context(), names=NAMES) as handle:
        assert handle.applied == []                                     # no val set: nothing replaced
    handle = registry.apply(ctx, names=NAMES)
    assert handle.applied == NAMES
    script = ctx.train_module
    assert script.add_special_tokens("tok")[0] == "tok" and ctx.validator.tokenizer == "tok"
    assert script.fsdp_ema_setup("m") == ("ema of", "m") and ctx.validator.ema == ("ema of", "m")
    assert script.FSDPCheckpoint.try_load_train_state(None, "o", "s", None)[2] == 7 and ctx.validator.start_step == 7
    assert issubclass(script.Bagel, fake_checkout.ContractModel) and script.Bagel.__name__ == "ContractModel"
    handle.undo()
    after = {p.name: p.read(ctx) for p in validation_rows.VALIDATION_PATCHES}
    assert all(after[n] is before[n] for n in before)
    assert registry.apply(_context(ema=False), names=NAMES).applied == [n for n in NAMES if n != "patch_val_ema"]


def test_a_script_without_add_special_tokens_stops_in_one_line():
    ctx = _context()
    del ctx.train_module.add_special_tokens
    with pytest.raises(IncompatibleCheckoutError, match="does not import `add_special_tokens`"):
        registry.apply(ctx, names=NAMES)
    assert "add_special_tokens" not in vars(ctx.train_module)


@pytest.mark.parametrize("gas, start, expected", [(1, 0, [0, 3, 6, 9]), (2, 0, [0, 3, 6, 9]), (1, 4, [4, 6, 9])])
def test_validation_is_due_at_the_launchs_first_step_and_every_multiple_of_n(gas, start, expected):
    run = RunState(training_args=types.SimpleNamespace(gradient_accumulation_steps=gas))
    v = Validator(ValidationConfig(datasets="x", every=3, images=1), [], run)
    v.start_step = start
    due = [v.due() for _ in range(gas * (10 - start))]
    assert [s for s in due if s is not None] == expected
    assert all(i % gas == 0 for i, s in enumerate(due) if s is not None)   # the first micro-step of the step


def test_the_loops_own_step_is_read_from_its_frame_and_a_step_validates_once(tmp_path):
    from bagel_sr.validation.loop import loop_step

    script = tmp_path / "fake_loop.py"
    script.write_text("def main(model, steps, gas):\n"
                      "    for micro_step in range(steps * gas):\n"
                      "        curr_step = 5 + micro_step // gas\n"
                      "        model()\n")
    namespace = {}
    exec(compile(script.read_text(), str(script), "exec"), namespace)
    run = RunState(training_args=types.SimpleNamespace(gradient_accumulation_steps=99))  # not used: the loop says
    v = Validator(ValidationConfig(datasets="x", every=3, images=1), [], run)
    seen, due = [], []
    namespace["main"](lambda: (seen.append(loop_step(str(script))), due.append(v.due(seen[-1]))), 6, 2)
    assert seen == [5, 5, 6, 6, 7, 7, 8, 8, 9, 9, 10, 10]
    assert [s for s in due if s is not None] == [5, 6, 9]
    assert loop_step(str(script)) is None and loop_step(None) is None          # not called from that loop
