"""IterativeGuide trains on each kind of model the issue names: positive latents, two latents per step,
Bernoulli observations of variable-length sequences, and plate subsampling."""

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine

from pyro_avf import AmortizedFilteringELBO, IterativeGuide, filtering_step
from pyro_avf.models.dmm import DMM
from pyro_avf.models.hierarchical import TwoLevelSSM
from pyro_avf.models.lgssm import LinearGaussianSSM
from pyro_avf.models.volatility import StochasticVolatility

JSB = __import__("pathlib").Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "polyphonic"


def train(model, guide, data, steps, lr=3e-3, elbo=None):
    elbo = elbo or AmortizedFilteringELBO()
    svi = pyro.infer.SVI(model, guide, pyro.optim.Adam({"lr": lr}), elbo)
    losses = [svi.step(*data) for _ in range(steps)]
    return losses, elbo


def check_trains_and_starts_at_prior(losses, elbo, first=5, last=5, iterations_help=None):
    """The loss went down, iteration 0 is the prior, and (given the model, guide and data as
    ``iterations_help``) the final iteration beats the prior prediction on average over 10 passes."""
    assert np.mean(losses[-last:]) < np.mean(losses[:first]), "free energy did not go down"
    d = elbo.diagnostics
    assert d["kl"][..., 0].abs().max() < 1e-4, "iteration 0 is not the prior"
    if iterations_help:
        model, guide, data = iterations_help
        per_iteration = 0
        for _ in range(10):
            elbo.loss(model, guide, *data)
            per_iteration = per_iteration + elbo.diagnostics["free_energy"].mean((0, 1)) / 10
        assert per_iteration[-1] < per_iteration[0], "inference iterations did not lower the free energy"


@pytest.mark.parametrize("positive", [False, True])
def test_stochastic_volatility(positive):
    sv = StochasticVolatility(dim=2, positive_latent=positive)
    xs, _ = sv.sample(64, 10, seed=0)
    guide = IterativeGuide(sv.model, num_iterations=3, hidden_size=32)
    losses, elbo = train(sv.model, guide, (xs,), 40, lr=1e-2)
    check_trains_and_starts_at_prior(losses, elbo, iterations_help=(sv.model, guide, (xs,)))
    site = guide.trace.nodes["v_3" if positive else "h_3"]
    assert (site["value"] > 0).all() or not positive


def test_two_latents_per_step():
    m = TwoLevelSSM.random(seed=0)
    xs = m.sample(16, 8, seed=1)[0]
    guide = IterativeGuide(m.model, num_iterations=3, hidden_size=32, networks="per_slot")
    losses, elbo = train(m.model, guide, (xs,), 40)
    check_trains_and_starts_at_prior(losses, elbo, iterations_help=(m.model, guide, (xs,)))
    assert set(guide.update_nets.keys()) == {"slot0", "slot1"}  # one network per slot, shared over time


def test_one_joint_update_network_sees_all_slots_of_a_step():
    m = TwoLevelSSM.random(seed=0)
    xs = m.sample(16, 8, seed=1)[0]
    guide = IterativeGuide(m.model, num_iterations=3, hidden_size=32)  # networks="joint" is the default
    losses, elbo = train(m.model, guide, (xs,), 40)
    check_trains_and_starts_at_prior(losses, elbo, iterations_help=(m.model, guide, (xs,)))
    assert list(guide.update_nets) == ["slot0_1"]
    assert guide.update_nets["slot0_1"].slot_dims == [m.z1_dim, m.z2_dim]


def test_joint_and_per_slot_networks_agree_for_one_slot():
    m = LinearGaussianSSM.random(latent_dim=3, obs_dim=4, seed=0)
    xs, _ = m.sample(8, 5, seed=1)
    losses = []
    for networks in ("joint", "per_slot"):
        pyro.clear_param_store()
        pyro.set_rng_seed(2)
        guide = IterativeGuide(m.model, num_iterations=2, hidden_size=16, networks=networks)
        losses.append(AmortizedFilteringELBO().loss(m.model, guide, xs))
        assert list(guide.update_nets) == ["slot0"]
    assert losses[0] == losses[1]


def test_bernoulli_observations_with_masked_variable_lengths():
    x = torch.from_numpy(np.load(JSB / "jsb_chorales.npz")["x_train"][:16, :20]).float()  # real JSB pieces
    lengths = torch.tensor([20, 12, 8, 16] * 4)
    mask = torch.arange(20) < lengths[:, None]
    x = x * mask[..., None]
    m = DMM(x_dim=88, z_dim=8, emission_dim=32, transition_dim=32, rnn_dim=32)
    guide = IterativeGuide(m.model, num_iterations=2, hidden_size=32)
    losses, elbo = train(m.model, guide, (x, mask), 25, lr=1e-2)
    # the model changes fast this early, so only the descent and the prior start are checked here
    check_trains_and_starts_at_prior(losses, elbo)
    assert not elbo.diagnostics["observed"][~mask].any()
    assert elbo.diagnostics["free_energy"][~mask].abs().max() < 1e-6  # padded steps cost nothing


def test_plate_subsampling():
    ssm = LinearGaussianSSM.random(latent_dim=2, obs_dim=3, seed=0)
    xs, _ = ssm.sample(64, 8, seed=1)

    @filtering_step
    def step(t, z_prev, x_t):
        z = pyro.sample(f"z_{t}", dist.Normal(z_prev @ ssm.A.T, ssm.q).to_event(1))
        pyro.sample(f"x_{t}", dist.Normal(z @ ssm.C.T, ssm.r).to_event(1), obs=x_t)
        return z

    def model(xs):
        with pyro.plate("sequences", xs.size(0), subsample_size=16) as idx:
            z = torch.zeros(len(idx), 2)
            for t in pyro.markov(range(xs.size(1))):
                z = step(t, z, xs[idx, t])

    guide = IterativeGuide(model, num_iterations=3, hidden_size=32)
    losses, elbo = train(model, guide, (xs,), 80)
    check_trains_and_starts_at_prior(losses, elbo, first=10, last=10, iterations_help=(model, guide, (xs,)))
    assert elbo.diagnostics["free_energy"].shape == (16, 8, 4)
    # the loss is scaled to the full data set: 64 sequences, not 16
    per_step = elbo.diagnostics["free_energy"][..., -1].sum(1).mean().item()
    assert abs(losses[-1] / 64 - per_step) < 0.5 * abs(per_step) + 5


def test_vectorized_particles():
    ssm = LinearGaussianSSM.random(latent_dim=2, obs_dim=3, seed=0)
    xs, _ = ssm.sample(8, 5, seed=1)
    guide = IterativeGuide(ssm.model, num_iterations=2, hidden_size=16)
    elbo = AmortizedFilteringELBO(num_particles=4, vectorize_particles=True, max_plate_nesting=1)
    loss = elbo.loss(ssm.model, guide, xs)
    assert np.isfinite(loss)
    assert elbo.diagnostics["free_energy"].shape == (4 * 8, 5, 3)


def test_global_latent_outside_the_step_gets_a_mean_field_posterior():
    ssm = LinearGaussianSSM.random(latent_dim=2, obs_dim=3, seed=0)
    xs, _ = ssm.sample(16, 6, seed=1)

    @filtering_step
    def step(t, z_prev, x_t, drift):
        z = pyro.sample(f"z_{t}", dist.Normal(z_prev @ ssm.A.T + drift, ssm.q).to_event(1))
        pyro.sample(f"x_{t}", dist.Normal(z @ ssm.C.T, ssm.r).to_event(1), obs=x_t)
        return z

    def model(xs):
        drift = pyro.sample("drift", dist.Normal(torch.zeros(2), 1.0).to_event(1))
        with pyro.plate("sequences", xs.size(0)):
            z = torch.zeros(xs.size(0), 2)
            for t in pyro.markov(range(xs.size(1))):
                z = step(t, z, xs[:, t], drift)

    guide = IterativeGuide(model, num_iterations=2, hidden_size=16)
    losses, elbo = train(model, guide, (xs + 1.0,), 60, lr=1e-2)
    assert np.mean(losses[-5:]) < np.mean(losses[:5])
    assert "avf_global.drift.loc" in pyro.get_param_store()
    assert guide.trace.nodes["drift"]["infer"].get("avf_step") is None


def test_trace_elbo_trains_the_same_guide():
    ssm = LinearGaussianSSM.random(latent_dim=2, obs_dim=3, seed=0)
    xs, _ = ssm.sample(16, 6, seed=1)
    guide = IterativeGuide(ssm.model, num_iterations=2, hidden_size=16)
    losses, _ = train(ssm.model, guide, (xs,), 60, elbo=pyro.infer.Trace_ELBO())
    assert np.mean(losses[-10:]) < np.mean(losses[:10])


def test_masking_whole_steps_inside_the_model():
    ssm = LinearGaussianSSM.random(latent_dim=2, obs_dim=3, seed=0)
    xs, _ = ssm.sample(4, 6, seed=1)
    mask = torch.ones(4, 6, dtype=torch.bool)
    mask[:2, 3:] = False

    @filtering_step
    def step(t, z_prev, x_t, m_t):
        with poutine.mask(mask=m_t):
            z = pyro.sample(f"z_{t}", dist.Normal(z_prev @ ssm.A.T, ssm.q).to_event(1))
            pyro.sample(f"x_{t}", dist.Normal(z @ ssm.C.T, ssm.r).to_event(1), obs=x_t)
        return z

    def model(xs, mask):
        with pyro.plate("sequences", xs.size(0)):
            z = torch.zeros(xs.size(0), 2)
            for t in pyro.markov(range(xs.size(1))):
                z = step(t, z, xs[:, t], mask[:, t])

    elbo = AmortizedFilteringELBO()
    elbo.loss(model, IterativeGuide(model, num_iterations=3, hidden_size=16), xs, mask)
    assert elbo.diagnostics["free_energy"][~mask].abs().max() == 0
    assert elbo.diagnostics["kl"][mask][:, 1:].min() > 0


def test_subsampling_scales_the_update_network_gradient_of_every_iteration():
    # float64: with gradients up to ~2e3, float32 rounding alone (~1e-7 of the largest) would exceed atol=1e-6
    g = torch.Generator().manual_seed(0)
    x, W = (torch.randn(*shape, generator=g, dtype=torch.float64) for shape in ((8, 3), (2, 3)))

    def make_model(size):
        def model(x):
            with pyro.plate("data", size, subsample=torch.arange(8)):
                z = pyro.sample("z", dist.Normal(x.new_zeros(8, 2), 1.0).to_event(1))
                pyro.sample("x", dist.Normal(z @ W, 0.5).to_event(1), obs=x)

        return model

    def update_grads(size, train_all):
        pyro.clear_param_store()
        pyro.set_rng_seed(1)
        model = make_model(size)
        guide = IterativeGuide(model, num_iterations=3, hidden_size=16)
        guide(x)
        guide.zero_grad()
        pyro.set_rng_seed(2)
        AmortizedFilteringELBO(train_all_iterations=train_all).differentiable_loss(model, guide, x).backward()
        return torch.cat([p.grad.flatten() for p in guide.update_nets.parameters()])

    final_small, all_small = update_grads(8, False), update_grads(8, True)
    final_big, all_big = update_grads(800, False), update_grads(800, True)
    assert final_big.dtype == torch.float64
    assert torch.allclose(final_big, 100 * final_small, rtol=1e-3, atol=1e-6)
    assert torch.allclose(all_big - final_big, 100 * (all_small - final_small), rtol=1e-3, atol=1e-5)
