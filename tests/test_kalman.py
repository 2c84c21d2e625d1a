"""Exact Kalman computations against Pyro's GaussianHMM and dense joint-Gaussian references."""

import math

import pyro.distributions as dist
import pytest
import torch
from torch.distributions import MultivariateNormal, kl_divergence

from pyro_avf.baselines.kalman import diagonal_gap, expected_step_free_energy, kalman_filter, step_optimum
from pyro_avf.models.lgssm import LinearGaussianSSM


@pytest.fixture
def lgssm():
    return LinearGaussianSSM.random(latent_dim=3, obs_dim=4, seed=1).double()


@pytest.fixture
def data(lgssm):
    xs, _ = lgssm.sample(5, 7, seed=2)
    return xs


def gaussian_hmm(model: LinearGaussianSSM, steps: int) -> dist.GaussianHMM:
    """GaussianHMM equivalent to z_0 = 0: its initial state is multiplied by a zero first transition."""
    d, n = model.latent_dim, model.obs_dim
    trans = model.A.T.expand(steps, d, d).clone()
    trans[0] = 0.0  # GaussianHMM draws z_0 from initial_dist and emits x_1 from z_1 = z_0 @ M_1 + noise
    return dist.GaussianHMM(
        MultivariateNormal(torch.zeros(d, dtype=torch.float64), torch.eye(d, dtype=torch.float64)),
        trans,
        MultivariateNormal(torch.zeros(d, dtype=torch.float64), model.Q),
        model.C.T,
        MultivariateNormal(torch.zeros(n, dtype=torch.float64), model.R),
    )


def dense_observation_law(model: LinearGaussianSSM, steps: int) -> MultivariateNormal:
    """Joint N(0, Σ) of (x_1, ..., x_T) flattened to T*n: Cov(z_s, z_t) = A^{t-s} P_s (t ≥ s), P_t = A
    P_{t-1} Aᵀ + Q, P_1 = Q, and Cov(x_s, x_t) = C Cov(z_s, z_t) Cᵀ + δ_st R."""
    A, C, Q, R = model.A, model.C, model.Q, model.R
    n = model.obs_dim
    P = [Q]
    for _ in range(steps - 1):
        P.append(A @ P[-1] @ A.T + Q)
    cov = torch.zeros(steps * n, steps * n, dtype=torch.float64)
    for s in range(steps):
        for t in range(s, steps):
            block = C @ torch.linalg.matrix_power(A, t - s) @ P[s] @ C.T
            if s == t:
                block = block + R
            cov[t * n : (t + 1) * n, s * n : (s + 1) * n] = block
            cov[s * n : (s + 1) * n, t * n : (t + 1) * n] = block.T
    return MultivariateNormal(torch.zeros(steps * n, dtype=torch.float64), cov)


def test_kalman_total_nll_matches_gaussian_hmm_and_dense_gaussian(lgssm, data):
    result = kalman_filter(lgssm.A, lgssm.C, lgssm.Q, lgssm.R, data)
    assert result.nll.shape == (5, 7)
    assert result.means.shape == (5, 7, 3) and result.covs.shape == (5, 7, 3, 3)
    total = result.nll.sum(-1)
    expected = -gaussian_hmm(lgssm, 7).log_prob(data)
    torch.testing.assert_close(total, expected, rtol=1e-9, atol=1e-9)
    dense = -dense_observation_law(lgssm, 7).log_prob(data.reshape(5, -1))
    torch.testing.assert_close(total, dense, rtol=1e-9, atol=1e-9)


def test_per_step_nll_is_the_predictive_of_each_prefix(lgssm, data):
    """Σ_{s ≤ t} nll_s = -log p(x_{1:t}) for every prefix, so nll_t = -log p(x_t | x_<t)."""
    nll = kalman_filter(lgssm.A, lgssm.C, lgssm.Q, lgssm.R, data).nll
    for t in (1, 3, 7):
        prefix = -gaussian_hmm(lgssm, t).log_prob(data[:, :t])
        torch.testing.assert_close(nll[:, :t].sum(-1), prefix, rtol=1e-9, atol=1e-9)
    # the first step is x_1 ~ N(0, C Q Cᵀ + R) because z_0 = 0
    first = MultivariateNormal(torch.zeros(4, dtype=torch.float64), lgssm.C @ lgssm.Q @ lgssm.C.T + lgssm.R)
    torch.testing.assert_close(nll[:, 0], -first.log_prob(data[:, 0]))


def test_filtered_moments_match_gaussian_hmm_filter(lgssm, data):
    result = kalman_filter(lgssm.A, lgssm.C, lgssm.Q, lgssm.R, data)
    for t in (1, 4, 7):
        posterior = gaussian_hmm(lgssm, t).filter(data[:, :t])
        torch.testing.assert_close(result.means[:, t - 1], posterior.loc, rtol=1e-8, atol=1e-8)
        torch.testing.assert_close(result.covs[:, t - 1], posterior.covariance_matrix, rtol=1e-8, atol=1e-8)


def test_masked_steps_give_the_marginal_of_the_observed_steps(lgssm, data):
    mask = torch.ones(5, 7, dtype=torch.bool)
    mask[0, 2] = mask[1, 0] = mask[1, 6] = mask[2, 3:5] = False
    result = kalman_filter(lgssm.A, lgssm.C, lgssm.Q, lgssm.R, data, mask=mask)
    assert bool((result.nll[~mask] == 0).all())
    assert bool((result.nll[mask] != 0).all())
    law = dense_observation_law(lgssm, 7)
    for b in range(5):
        keep = mask[b].repeat_interleave(4)
        marginal = MultivariateNormal(law.loc[keep], law.covariance_matrix[keep][:, keep])
        expected = -marginal.log_prob(data[b].reshape(-1)[keep])
        torch.testing.assert_close(result.nll[b].sum(), expected, rtol=1e-9, atol=1e-9)
    # a skipped update leaves the filtered mean at the prediction A m_{t-1}
    torch.testing.assert_close(result.means[0, 2], lgssm.A @ result.means[0, 1])
    # changing a masked observation changes nothing
    changed = data.clone()
    changed[0, 2] += 100.0
    torch.testing.assert_close(kalman_filter(lgssm.A, lgssm.C, lgssm.Q, lgssm.R, changed, mask).nll, result.nll)


def test_kalman_filter_rejects_bad_shapes(lgssm, data):
    with pytest.raises(ValueError, match="xs must have shape"):
        kalman_filter(lgssm.A, lgssm.C, lgssm.Q, lgssm.R, data[..., :3])
    with pytest.raises(ValueError, match="C must have shape"):
        kalman_filter(lgssm.A, lgssm.C.T, lgssm.Q, lgssm.R, data)
    with pytest.raises(ValueError, match="mask must be a bool tensor"):
        kalman_filter(lgssm.A, lgssm.C, lgssm.Q, lgssm.R, data, mask=torch.ones(5, 7))


@pytest.fixture
def step_inputs(lgssm):
    g = torch.Generator().manual_seed(3)
    z_prev = torch.randn(6, 3, generator=g, dtype=torch.float64)
    x_t = torch.randn(6, 4, generator=g, dtype=torch.float64)
    return z_prev, x_t


def test_step_optimum_matches_gaussian_conditioning(lgssm, step_inputs):
    A, C, Q, R = lgssm.A, lgssm.C, lgssm.Q, lgssm.R
    z_prev, x_t = step_inputs
    opt = step_optimum(A, C, Q, R, z_prev, x_t)
    assert opt.free_energy.shape == (6,) and opt.mean.shape == (6, 3) and opt.precision.shape == (6, 3, 3)
    # joint of (z_t, x_t) given z_prev: conditioning gives cov Q - Q Cᵀ S⁻¹ C Q, mean A z + Q Cᵀ S⁻¹ (x - C A z)
    S = C @ Q @ C.T + R
    gain = Q @ C.T @ torch.linalg.inv(S)
    cov = Q - gain @ C @ Q
    mean = z_prev @ A.T + (x_t - z_prev @ A.T @ C.T) @ gain.T
    torch.testing.assert_close(opt.mean, mean)
    torch.testing.assert_close(torch.linalg.inv(opt.precision), cov.expand(6, 3, 3))
    resid = x_t - z_prev @ A.T @ C.T
    by_hand = 0.5 * (4 * math.log(2 * math.pi) + torch.logdet(S) + (resid @ torch.linalg.inv(S) * resid).sum(-1))
    torch.testing.assert_close(opt.free_energy, by_hand)


def test_free_energy_of_any_diagonal_q_is_optimum_plus_kl_to_posterior(lgssm, step_inputs):
    A, C, Q, R = lgssm.A, lgssm.C, lgssm.Q, lgssm.R
    z_prev, x_t = step_inputs
    opt = step_optimum(A, C, Q, R, z_prev, x_t)
    g = torch.Generator().manual_seed(4)
    q_loc = torch.randn(6, 3, generator=g, dtype=torch.float64)
    q_scale = torch.rand(6, 3, generator=g, dtype=torch.float64) + 0.1
    F = expected_step_free_energy(A, C, Q, R, z_prev, x_t, q_loc, q_scale)
    q = MultivariateNormal(q_loc, scale_tril=torch.diag_embed(q_scale))
    posterior = MultivariateNormal(opt.mean, precision_matrix=opt.precision)
    torch.testing.assert_close(F, opt.free_energy + kl_divergence(q, posterior))


def test_free_energy_at_best_diagonal_q_is_optimum_plus_gap(lgssm, step_inputs):
    A, C, Q, R = lgssm.A, lgssm.C, lgssm.Q, lgssm.R
    z_prev, x_t = step_inputs
    opt = step_optimum(A, C, Q, R, z_prev, x_t)
    best_scale = torch.diagonal(opt.precision, dim1=-2, dim2=-1).rsqrt()
    F_best = expected_step_free_energy(A, C, Q, R, z_prev, x_t, opt.mean, best_scale)
    gap = diagonal_gap(opt.precision)
    assert bool((gap > 1e-4).all()), "a random C should give a non-diagonal posterior precision"
    torch.testing.assert_close(F_best, opt.free_energy + gap)
    # the gap is the KL from the best diagonal q to the full posterior
    q = MultivariateNormal(opt.mean, scale_tril=torch.diag_embed(best_scale))
    posterior = MultivariateNormal(opt.mean, precision_matrix=opt.precision)
    torch.testing.assert_close(gap, kl_divergence(q, posterior))
    # any perturbation of one coordinate of loc or scale raises the free energy
    for i in range(3):
        for eps in (-0.05, 0.05):
            bump = torch.zeros(3, dtype=torch.float64)
            bump[i] = eps
            assert bool(
                (expected_step_free_energy(A, C, Q, R, z_prev, x_t, opt.mean + bump, best_scale) > F_best).all()
            )
            scaled = best_scale * (1 + bump)
            assert bool((expected_step_free_energy(A, C, Q, R, z_prev, x_t, opt.mean, scaled) > F_best).all())
    # and it is a stationary point: the gradient vanishes
    loc = opt.mean.clone().requires_grad_()
    scale = best_scale.clone().requires_grad_()
    expected_step_free_energy(A, C, Q, R, z_prev, x_t, loc, scale).sum().backward()
    torch.testing.assert_close(loc.grad, torch.zeros_like(loc), atol=1e-9, rtol=0)
    torch.testing.assert_close(scale.grad, torch.zeros_like(scale), atol=1e-9, rtol=0)


def test_gap_vanishes_when_the_posterior_precision_is_diagonal(step_inputs):
    z_prev, x_t = step_inputs
    x_t = x_t[:, :3]
    A = torch.tensor([[0.5, 0.2, 0.0], [0.0, 0.7, -0.1], [0.3, 0.0, 0.4]], dtype=torch.float64)
    C = torch.diag(torch.tensor([1.5, -0.7, 0.3], dtype=torch.float64))
    Q = torch.diag(torch.tensor([0.2, 0.5, 0.3], dtype=torch.float64))
    R = torch.diag(torch.tensor([0.4, 0.1, 0.6], dtype=torch.float64))
    opt = step_optimum(A, C, Q, R, z_prev, x_t)
    torch.testing.assert_close(opt.precision, torch.diag_embed(torch.diagonal(opt.precision, dim1=-2, dim2=-1)))
    torch.testing.assert_close(diagonal_gap(opt.precision), torch.zeros(6, dtype=torch.float64))
    best_scale = torch.diagonal(opt.precision, dim1=-2, dim2=-1).rsqrt()
    F_best = expected_step_free_energy(A, C, Q, R, z_prev, x_t, opt.mean, best_scale)
    torch.testing.assert_close(F_best, opt.free_energy)


def test_diagonal_gap_of_a_known_matrix():
    L = torch.tensor([[2.0, 1.0], [1.0, 2.0]], dtype=torch.float64)
    torch.testing.assert_close(
        diagonal_gap(L), torch.tensor(0.5 * (2 * math.log(2.0) - math.log(3.0)), dtype=torch.float64)
    )
