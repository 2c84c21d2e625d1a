"""Antithetic sample pairs for the inference gradient (``IterativeGuide(num_samples=2, antithetic=True)``)."""

import contextlib

import pyro
import pyro.distributions as dist
import pytest
import torch

from pyro_avf import AmortizedFilteringELBO, IterativeGuide
from pyro_avf.free_energy import StepContext
from pyro_avf.inference import StepInference
from pyro_avf.posterior import reparameterized_draw

W = torch.tensor([[1.0, -0.5], [0.3, 2.0], [0.0, 1.5]])
SIGMA = 0.4


class GradientRecorder:
    """An update rule that keeps the inference gradients it is given and leaves λ where it is."""

    def start(self, lambdas):
        return None

    def __call__(self, state, k, lambdas, grads, run):
        self.grads = grads
        return lambdas


def linear_gaussian_step(x):
    z = pyro.sample("z", dist.Normal(torch.zeros(4, 2), 1.0).to_event(1))
    pyro.sample("x", dist.Normal(z @ W.T, SIGMA).to_event(1), obs=x)


def loc_gradient(x: torch.Tensor, antithetic: bool, num_samples: int, seed: int) -> torch.Tensor:
    recorder = GradientRecorder()
    inference = StepInference(1, recorder, num_samples=num_samples, antithetic=antithetic)
    pyro.set_rng_seed(seed)
    inference(linear_gaussian_step, (x,), {}, StepContext((), 1.0, None), 0)
    return recorder.grads[0][0]


def test_pair_gives_the_exact_mean_gradient_of_a_linear_gaussian_step():
    # at λ = the prior N(0, I): ∂/∂μ E_q[-log p(x|z)] = Wᵀ(Wμ - x)/σ² and ∂/∂μ KL = μ = 0; z = μ ± σ_q ε makes the
    # pair's average of the quadratic's gradient exact
    pyro.set_rng_seed(3)
    x = torch.randn(4, 3)
    exact = (-x @ W) / SIGMA**2
    for seed in (3, 4):
        torch.testing.assert_close(loc_gradient(x, True, 2, seed), exact, rtol=1e-5, atol=1e-4)
    independent = loc_gradient(x, False, 2, 3)
    assert (independent - exact).abs().max() > 0.1  # two independent samples are not exact


def test_odd_number_of_samples_pairs_all_but_the_last():
    pyro.set_rng_seed(3)
    x = torch.randn(4, 3)
    exact = (-x @ W) / SIGMA**2
    assert (loc_gradient(x, True, 3, 3) - exact).abs().max() > 1e-3  # the unpaired third sample adds noise


def test_mirrored_draws_on_a_constrained_and_a_full_covariance_posterior():
    eps = torch.tensor([0.7, -1.2])
    lam = (torch.tensor([0.5, -1.0]), torch.tensor([0.1, -0.3]))
    prior = dist.LogNormal(torch.zeros(2), 1.0)
    z, z_mirror = reparameterized_draw(lam, prior, eps), reparameterized_draw(lam, prior, -eps)
    torch.testing.assert_close(z.log() + z_mirror.log(), 2 * lam[0])
    full = lam + (torch.tensor([0.4]),)
    normal = dist.Normal(torch.zeros(2), 1.0).to_event(1)
    u, u_mirror = reparameterized_draw(full, normal, eps), reparameterized_draw(full, normal, -eps)
    torch.testing.assert_close(u + u_mirror, 2 * lam[0])
    tril = torch.tensor([[0.1, 0.0], [0.4, -0.3]])
    tril.diagonal().exp_()
    torch.testing.assert_close(u, lam[0] + tril @ eps)


@pytest.mark.parametrize("plate", [True, False])
@pytest.mark.parametrize("posterior", ["diagonal", "joint"])
def test_guide_trains_with_antithetic_pairs(posterior, plate):
    def model(xs):
        z = torch.zeros(xs.size(0), 2)
        with pyro.plate("sequences", xs.size(0)) if plate else contextlib.nullcontext():
            for t in pyro.markov(range(xs.size(1))):
                z = step(t, z, xs[:, t])

    from pyro_avf import filtering_step

    @filtering_step
    def step(t, z_prev, x_t):
        z = pyro.sample(f"z_{t}", dist.Normal(0.9 * z_prev, 1.0).to_event(1))
        w = pyro.sample(f"w_{t}", dist.Normal(z, 0.5).to_event(1))
        pyro.sample(f"x_{t}", dist.Normal(w @ W.T, SIGMA).to_event(1), obs=x_t)
        return z

    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    xs = torch.randn(8, 5, 3)
    guide = IterativeGuide(model, 2, hidden_size=16, num_samples=2, antithetic=True, posterior=posterior)
    svi = pyro.infer.SVI(model, guide, pyro.optim.Adam({"lr": 1e-3}), loss=AmortizedFilteringELBO())
    losses = [svi.step(xs) for _ in range(3)] + [svi.step(xs[:5])]  # a smaller batch: the same networks
    assert all(torch.isfinite(torch.tensor(losses)))
    with torch.no_grad():
        assert sorted(guide(xs)) == sorted(f"{s}_{t}" for s in "zw" for t in range(5))
