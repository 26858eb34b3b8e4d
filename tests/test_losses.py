"""Per-image pixel losses (bagel_sr.losses)."""
import math

import pytest
import torch

from bagel_sr import losses


def test_per_image_losses():
    x = torch.zeros(2, 3, 4, 4)
    y = torch.zeros(2, 3, 4, 4)
    y[0] = 0.5
    y[1, 0, 0, 0] = -2.0
    assert losses.per_image_loss(y, x, "l2").tolist() == pytest.approx([0.25, 4.0 / 48])
    assert losses.per_image_loss(y, x, "l1").tolist() == pytest.approx([0.5, 2.0 / 48])
    ch = losses.per_image_loss(y, x, "charbonnier", eps=1e-3)
    assert ch[0] == pytest.approx(math.sqrt(0.25 + 1e-6) - 1e-3)
    assert float(losses.per_image_loss(x, x, "charbonnier")[0]) == 0.0
    with pytest.raises(ValueError, match="l2"):
        losses.per_image_loss(x, x, "l4")
