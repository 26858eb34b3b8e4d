"""Flow conventions (bagel_sr.flow): z_t, the velocity and z0_hat, the timestep shift, the gates over t."""
import pytest
import torch

from bagel_sr import flow


def test_z0_hat_equals_z0_when_velocity_is_exact():
    g = torch.Generator().manual_seed(0)
    z0, noise = torch.randn(10, 64, generator=g), torch.randn(10, 64, generator=g)
    t = torch.rand(10, 1, generator=g)
    z_t = flow.interpolate(z0, noise, t)
    torch.testing.assert_close(flow.z0_from_velocity(z_t, t, flow.velocity(z0, noise)), z0, atol=1e-6, rtol=0)


def test_shift_and_inverse():
    t = torch.linspace(0, 1, 11)
    for s in (1.0, 3.0, 0.5):
        torch.testing.assert_close(flow.unshift_timesteps(flow.shift_timesteps(t, s), s), t)
    assert flow.shift_timesteps(0.5, 3.0) == pytest.approx(0.75)
    assert float(flow.raw_to_t(torch.tensor(float("-inf")), 3.0)) == 0.0


def test_gates():
    t = torch.tensor([0.0, 0.1, 0.3, 0.31, 0.9])
    assert flow.gate_weight(t, 0.3, "hard").tolist() == [1, 1, 1, 0, 0]
    torch.testing.assert_close(flow.gate_weight(t, 0.3, "ramp"), torch.tensor([1.0, 2 / 3, 0.0, 0.0, 0.0]))
    with pytest.raises(ValueError, match="schedule"):
        flow.gate_weight(t, 0.3, "cosine")


@pytest.mark.parametrize("shift,expected", [(1.0, 0.20), (3.0, 0.03)])
def test_admitted_share_matches_known_values_and_monte_carlo(shift, expected):
    share = flow.admitted_share(0.3, shift)
    assert share == pytest.approx(expected, abs=0.01)
    raw = torch.randn(400_000, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    mc = float((flow.raw_to_t(raw, shift) <= 0.3).double().mean())
    assert share == pytest.approx(mc, abs=0.003)
    assert flow.mean_gate_weight(0.3, shift, "hard") == pytest.approx(share, abs=1e-3)
    assert flow.mean_gate_weight(0.3, shift, "ramp") < share
