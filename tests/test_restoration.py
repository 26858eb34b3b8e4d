"""Fidelity-aware sampling: start from the input, K-sample aggregate, data-consistency projection."""
import numpy as np
import pytest
import torch

from bagel_sr.embedded import data, sampling
from bagel_sr.embedded.backbone import TinyBagelConfig
from bagel_sr.embedded.train import build_model
from bagel_sr.embedded.vae import load_vae
from bagel_sr.data import consistency as operators
from bagel_sr.data.consistency import back_project
from bagel_sr.restoration import aggregate, start_index, visited_times


@pytest.fixture(scope="module")
def bench():
    tok = data.WordTokenizer.default()
    model = build_model(TinyBagelConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, max_latent_size=8),
                        seed=0)
    return model, load_vae(), tok, data.eval_pairs("val")[:2]


def test_start_t_one_is_the_stock_sampler_and_zero_the_round_trip(bench):
    model, vae, tok, pairs = bench
    stock = sampling.euler_sample(model, vae, pairs, tok, steps=10, seed=5)
    assert torch.equal(sampling.euler_sample(model, vae, pairs, tok, steps=10, seed=5, start_t=1.0), stock)
    trip = sampling.vae_round_trip(vae, torch.stack([p.condition for p in pairs]))
    assert torch.allclose(sampling.euler_sample(model, vae, pairs, tok, steps=10, seed=5, start_t=0.0), trip, atol=1e-5)
    near = sampling.euler_sample(model, vae, pairs, tok, steps=10, seed=5, start_t=0.1)
    assert (near - trip).abs().mean() < (stock - trip).abs().mean() / 3


def test_start_index_on_a_shifted_grid():
    ts = [1.0, 0.75, 0.5, 0.25, 0.0]
    assert [start_index(ts, t) for t in (1.0, 0.8, 0.75, 0.3, 0.0)] == [0, 1, 1, 3, 4]


def test_visited_times_with_and_without_one_step():
    ts = [1.0, 0.75, 0.5, 0.25, 0.0]
    assert visited_times(ts, 0.6) == [0.5, 0.25, 0.0] and visited_times(ts, 0.6, one_step=True) == [0.5, 0.0]
    assert visited_times(ts, 1.0, one_step=True) == [1.0, 0.0] and visited_times(ts, 0.0, one_step=True) == [0.0]


def test_one_step_is_the_clean_estimate(bench):
    """One step from T0 is z0_hat = z_T0 - T0 v_hat: the same as a grid whose only step runs from T0 to 0, and
    from T0 = 1 the same as the one-step stock sampler."""
    import copy

    model, vae, tok, pairs = bench
    model = copy.deepcopy(model)
    torch.manual_seed(0)
    torch.nn.init.normal_(model.llm2vae.weight, std=0.5)  # zero at init: every sampler would return its start
    one = sampling.euler_sample(model, vae, pairs, tok, steps=10, seed=4, start_t=0.5, one_step=True)
    assert torch.allclose(one, sampling.euler_sample(model, vae, pairs, tok, steps=2, seed=4, start_t=0.5), atol=1e-5)
    many = sampling.euler_sample(model, vae, pairs, tok, steps=10, seed=4, start_t=0.5)
    assert (many - one).abs().max() > 1e-3  # the rest of the grid is not taken
    from_noise = sampling.euler_sample(model, vae, pairs, tok, steps=10, seed=4, one_step=True)
    assert torch.allclose(from_noise, sampling.euler_sample(model, vae, pairs, tok, steps=1, seed=4), atol=1e-5)
    center, _ = sampling.posterior_samples(model, vae, pairs, tok, num_samples=2, seed=4, steps=10, start_t=0.5,
                                           one_step=True)
    raw = sampling.euler_runs(model, vae, pairs, tok, seeds=[4, 5], steps=10, start_t=0.5, one_step=True, clamp=False)
    assert torch.equal(raw[0].clamp(-1, 1), one) and torch.allclose(center, raw.mean(0).clamp(-1, 1), atol=1e-6)


def test_aggregate_mean_median_and_std():
    runs = torch.tensor([[0.0, 1.0], [1.0, 1.0], [5.0, 1.0]])
    mean, std = aggregate(runs, "mean")
    assert torch.allclose(mean, torch.tensor([2.0, 1.0])) and torch.allclose(std, torch.tensor([np.sqrt(14 / 3), 0.0]).float())
    assert torch.equal(aggregate(runs, "median")[0], torch.tensor([1.0, 1.0]))
    assert torch.equal(aggregate(runs[:1])[1], torch.zeros(2))


def test_posterior_samples_differ_by_seed(bench):
    model, vae, tok, pairs = bench
    one = sampling.euler_sample(model, vae, pairs, tok, steps=3, seed=2)
    center, std = sampling.posterior_samples(model, vae, pairs, tok, num_samples=2, seed=2, steps=3)
    two = sampling.euler_sample(model, vae, pairs, tok, steps=3, seed=3)
    raw = sampling.euler_runs(model, vae, pairs, tok, seeds=[2, 3], steps=3, clamp=False)
    assert torch.equal(raw[0].clamp(-1, 1), one) and torch.equal(raw[1].clamp(-1, 1), two)
    assert torch.allclose(center, raw.mean(0).clamp(-1, 1), atol=1e-6)
    assert torch.allclose(std, (raw[0] - raw[1]).abs() / 2, atol=1e-6) and std.mean() > 0.01


def test_runs_encode_once_and_equal_one_call_per_seed(bench):
    """euler_runs shares the encoded inputs between seeds: every run is bit-identical to its own euler_sample call,
    across several chunks (each seed's noise continues from chunk to chunk as in one call)."""
    model, vae, tok, pairs = bench
    kw = dict(steps=4, start_t=0.6, chunk=1)
    runs = sampling.euler_runs(model, vae, pairs, tok, seeds=[7, 8], **kw)
    assert runs.shape == (2, len(pairs), 3, 64, 64)
    for run, seed in zip(runs, (7, 8)):
        assert torch.equal(run, sampling.euler_sample(model, vae, pairs, tok, seed=seed, **kw))
    assert not torch.equal(runs[0], runs[1])


def test_posterior_mean_is_clipped_after_averaging(bench):
    """Samples beyond [-1, 1] are averaged first and the mean clipped: the mean of clipped samples would be biased
    where the truth lies at the range's end (a black background would get the positive half of the noise)."""
    model, vae, tok, pairs = bench

    class Loud:  # the shipped VAE with a decoder that overshoots the range
        def __getattr__(self, name):
            return getattr(vae, name)

        def decode(self, z):
            return vae.decode(z) * 3

    kw = dict(steps=3, start_t=0.6)
    raw = sampling.euler_runs(model, Loud(), pairs, tok, seeds=[2, 3], clamp=False, **kw)
    assert raw.abs().max() > 1.5  # the case this test is about
    center, std = sampling.posterior_samples(model, Loud(), pairs, tok, num_samples=2, seed=2, **kw)
    assert torch.allclose(center, raw.mean(0).clamp(-1, 1), atol=1e-6) and torch.allclose(std, raw.std(0, unbiased=False), atol=1e-5)
    clipped_first = sampling.euler_runs(model, Loud(), pairs, tok, seeds=[2, 3], **kw).mean(0)
    assert (center - clipped_first).abs().max() > 0.1


def test_back_projection_restores_what_was_measured():
    rng = np.random.default_rng(0)
    truth = rng.random((32, 32))
    guess = np.clip(truth + rng.normal(0, 0.2, truth.shape), 0, 1)
    band = [{"name": "kspace_truncation", "scale": 4}]
    measured = operators.apply_forward(truth, band)[0]
    projected, note = back_project(guess, measured, band, steps=1)
    assert note == "" and np.allclose(operators.apply_forward(projected, band)[0], measured)
    null = lambda x: x - operators.apply_forward(x, band)[0]  # noqa: E731
    assert np.allclose(null(projected), null(guess))  # the unmeasured part is the restorer's
    down = [{"name": "bicubic_downsample", "scale": 2}, {"name": "gaussian_noise", "sigma": 0.01}]
    lr = operators.apply_forward(truth, down)[0]
    before = np.abs(operators.apply_forward(guess, down)[0] - lr).mean()
    after = np.abs(operators.apply_forward(back_project(guess, lr, down, steps=10)[0], down)[0] - lr).mean()
    assert after < before / 5
    same, note = back_project(guess, guess, [{"name": "gaussian_noise", "sigma": 0.1}])
    assert np.array_equal(same, guess) and "denoising" in note


def test_experiment_reuses_the_stock_sample_for_the_stock_mode(bench):
    """``T0=1 K=1`` is the stock sampler's own sample (a K=1 mean is the sample itself): the experiment passes the
    stock prediction instead of sampling it again, and gets what sampling it again would give."""
    import copy
    from types import SimpleNamespace

    from bagel_sr.embedded.experiment import parse_modes, sample_modes

    model, vae, tok, pairs = bench
    model = copy.deepcopy(model)
    torch.manual_seed(0)
    torch.nn.init.normal_(model.llm2vae.weight, std=0.5)
    args = SimpleNamespace(sample_steps=6, sample_timestep_shift=1.0)
    modes = parse_modes("1:1:0,1:1:1")
    fresh = sample_modes(model, vae, pairs, tok, modes, args, seed=3)
    stock = sampling.euler_sample(model, vae, pairs, tok, steps=6, seed=3)
    reused = sample_modes(model, vae, pairs, tok, modes, args, seed=3, stock=(stock, 0.0))
    for name in ("T0=1 K=1", "T0=1 K=1 +DC"):
        assert torch.equal(fresh[name]["pred"], reused[name]["pred"])
    assert reused["T0=1 K=1"]["seconds"] == 0.0 and fresh["T0=1 K=1"]["seconds"] > 0


def test_experiment_modes_share_runs_across_k_and_equal_posterior_samples(bench, monkeypatch):
    """A K=2 mode averages the first 2 runs of the K=3 mode's set: the same prediction as sampling it alone."""
    import copy
    from types import SimpleNamespace

    from bagel_sr.embedded.experiment import parse_modes, sample_modes

    model, vae, tok, pairs = bench
    model = copy.deepcopy(model)
    torch.manual_seed(0)
    torch.nn.init.normal_(model.llm2vae.weight, std=0.5)
    args = SimpleNamespace(sample_steps=6, sample_timestep_shift=1.0)
    calls = []
    real_runs = sampling.euler_runs

    def counted(*a, **kw):
        calls.append((len(list(kw["seeds"])), kw["one_step"]))
        return real_runs(*a, **kw)

    monkeypatch.setattr(sampling, "euler_runs", counted)
    shared = sample_modes(model, vae, pairs, tok, parse_modes("0.5:3:0,0.5:2:0,0.5:2:1,0.5:2:0:1"), args, seed=3)
    monkeypatch.undo()
    assert calls == [(3, False), (2, True)]  # one set of runs per (start, one-step), as many as the largest K
    for name, k, one_step in (("T0=0.5 K=3", 3, False), ("T0=0.5 K=2", 2, False), ("T0=0.5 K=2 one-step", 2, True)):
        alone, _ = sampling.posterior_samples(model, vae, pairs, tok, num_samples=k, seed=3, steps=6, start_t=0.5,
                                              one_step=one_step)
        assert torch.equal(shared[name]["pred"], alone), name
    assert not torch.equal(shared["T0=0.5 K=3"]["pred"], shared["T0=0.5 K=2"]["pred"])
    assert torch.equal(shared["T0=0.5 K=2 +DC"]["pred"], sampling.back_project(shared["T0=0.5 K=2"]["pred"], pairs))
