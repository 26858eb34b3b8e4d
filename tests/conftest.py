"""Test session set-up: lets a CUDA-built torchvision import next to a CPU torch build (as on CI).

BAGEL's data code imports ``torchvision.transforms``; see ``bagel_sr.patches.cpu.declare_torchvision_ops``.
"""
from bagel_sr.patches.cpu import declare_torchvision_ops

declare_torchvision_ops()


import pytest  # noqa: E402


@pytest.fixture(params=("upstream", "fork"))
def checkout_shape(request):
    """Runs a ``bagel`` test on ``$BAGEL_ROOT`` and on the fork generated from it (bagel_sr/testing/fork_checkout.py);
    yields the shape's name and switches back to upstream afterwards."""
    from bagel_sr.testing.bagel_tiny import upstream_root, use_checkout

    if upstream_root() is None:
        pytest.skip("set BAGEL_ROOT to a BAGEL checkout to run")
    use_checkout(request.param)
    try:
        yield request.param
    finally:
        use_checkout("upstream")


@pytest.fixture
def figures(monkeypatch):
    """Every matplotlib figure saved during the test (inspected instead of the PNG's pixels)."""
    import matplotlib.figure

    saved = []
    original = matplotlib.figure.Figure.savefig

    def keep(fig, *args, **kwargs):
        saved.append(fig)
        return original(fig, *args, **kwargs)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", keep)
    return saved
