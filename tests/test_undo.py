"""bagel_sr.patches.undo: the one replace-and-undo helper and the one handle type every patch returns."""
import sys
import types

import pytest

from bagel_sr.patches.undo import NOTHING, Undo, as_undo, combine, replace_attribute, replace_item


def test_replace_attribute_puts_back_or_deletes_and_leaves_a_later_replacement_alone():
    module = types.ModuleType("m")
    module.f = "old"
    undo = replace_attribute(module, "f", "new")
    assert module.f == "new" and undo.changed and undo.applied == ["f"]
    undo()
    assert module.f == "old" and not undo.changed
    undo()  # once only
    assert module.f == "old"

    class Base:
        def hello(self):
            return "base"

    class Child(Base):
        pass

    with replace_attribute(Child, "hello", lambda self: "patched"):
        assert Child().hello() == "patched"
    assert "hello" not in vars(Child) and Child().hello() == "base"  # inherited: deleted, not copied down

    undo = replace_attribute(module, "f", "ours")
    module.f = "someone else's"
    undo()
    assert module.f == "someone else's"
    with pytest.raises(AttributeError, match="no attribute 'g'"):
        replace_attribute(module, "g", 1, must_exist=True)


def test_replace_item_restores_or_removes_the_key():
    mapping = {"a": 1}
    with replace_item(mapping, "a", 2), replace_item(mapping, "b", 3):
        assert mapping == {"a": 2, "b": 3}
    assert mapping == {"a": 1}
    undo = replace_item(sys.modules, "bagel_sr_test_absent", types.ModuleType("x"))
    undo()
    assert "bagel_sr_test_absent" not in sys.modules


def test_nothing_combine_and_plain_callables():
    assert not NOTHING.changed and NOTHING.applied == []
    NOTHING()  # an undo that changed nothing may be called
    with pytest.raises(TypeError):
        NOTHING.add("x", lambda: None)
    assert combine() is NOTHING and combine(NOTHING, NOTHING) is NOTHING
    order = []
    both = combine(Undo(lambda: order.append(1)), NOTHING, lambda: order.append(2))
    assert both.changed and len(both.applied) == 2
    both()
    assert order == [2, 1]  # newest first
    assert as_undo(both) is both and as_undo(lambda: None).changed
    with pytest.raises(TypeError, match="must return an Undo"):
        as_undo(None)
    handle = Undo()
    assert handle.add("a", replace_item({}, "k", 1)) and not handle.add("b", NOTHING) and handle.applied == ["a"]
