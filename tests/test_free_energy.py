"""The step free energy terms (pyro_avf.free_energy.Terms) against hand-computed values."""

import pyro.distributions as dist
import torch

from pyro_avf.free_energy import Terms


def test_empty_terms_are_zero_with_a_scalar_loss():
    terms = Terms(torch.Size([3]), kl_weight=0.5)
    assert terms.loss.shape == () and terms.loss.item() == 0.0
    assert torch.equal(terms.reconstruction, torch.zeros(3))
    assert torch.equal(terms.kl, torch.zeros(3))
    assert torch.equal(terms.free_energy, torch.zeros(3))
    assert torch.equal(terms.observed, torch.zeros(3, dtype=torch.bool))
    assert not terms.scaled


def test_masked_scaled_observation_and_weighted_kl():
    loc, log_scale = torch.tensor([[0.5, -1.0], [0.0, 0.2], [1.0, 1.0]]), torch.full((3, 2), -0.5)
    prior = dist.Normal(torch.zeros(3, 2), torch.ones(3, 2)).to_event(1)
    q = dist.Normal(loc, log_scale.exp()).to_event(1)
    x_fn = dist.Normal(torch.zeros(3, 4), 2.0).to_event(1)
    x = torch.arange(12.0).reshape(3, 4) / 10
    mask = torch.tensor([True, False, True])
    terms = Terms(torch.Size([3]), kl_weight=0.25)
    terms.add_latent(q, prior, q.sample(), None, 1.0, q_params=(loc, log_scale))
    terms.add_observation(x_fn, x, mask, 2.0)
    kl = torch.distributions.kl_divergence(q, prior)
    nll = -x_fn.log_prob(x) * mask
    torch.testing.assert_close(terms.kl, kl)
    torch.testing.assert_close(terms.reconstruction, nll)
    torch.testing.assert_close(terms.free_energy, nll + 0.25 * kl)
    torch.testing.assert_close(terms.loss, 0.25 * kl.sum() + 2.0 * nll.sum())
    assert terms.scaled
    assert terms.observed.tolist() == [True, False, True]


def test_batch_shape_taken_from_the_first_site_when_unknown():
    terms = Terms(None)
    terms.add_observation(dist.Bernoulli(logits=torch.zeros(5, 2)).to_event(1), torch.ones(5, 2), None, 1.0)
    assert terms.batch_shape == (5,)
    torch.testing.assert_close(terms.reconstruction, torch.full((5,), 2 * torch.log(torch.tensor(2.0)).item()))
    assert terms.observed.all() and terms.kl.shape == (5,)
