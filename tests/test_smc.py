"""Sequential Monte Carlo with the AVF guide as proposal: estimates of log p(x_1:T) against the exact Kalman value.

Two LG-SSMs: ``RANDOM`` (a random 2-d latent, 3-d observation model) for the bootstrap filter, and ``SHARP``, whose
observations are informative (the prior is a poor proposal) and whose step posterior is diagonal (the guide's
family holds the locally optimal proposal), with a guide trained briefly on it.
"""

import doctest
import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer.autoguide import AutoNormal

import pyro_avf.smc
from pyro_avf import AmortizedFilteringELBO, IterativeGuide, filtering_step
from pyro_avf.baselines.kalman import kalman_filter
from pyro_avf.models.lgssm import LinearGaussianSSM
from pyro_avf.online import streamed_free_energy
from pyro_avf.smc import ParticleFilter, smc_log_likelihood, systematic_resample

RANDOM = LinearGaussianSSM.random(latent_dim=2, obs_dim=3, seed=0)
SHARP = LinearGaussianSSM(
    torch.tensor([[0.8, 0.3], [-0.3, 0.8]]),
    torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.5, 0.0]]),  # CᵀR⁻¹C diagonal: a diagonal step posterior
    q=torch.tensor([1.0, 0.8]),
    r=torch.tensor([0.25, 0.3, 0.3]),
)


def exact_log_likelihood(ssm, xs, mask=None):
    return -kalman_filter(ssm.A, ssm.C, ssm.Q, ssm.R, xs, mask).nll.sum(1).double()


def bootstrap(ssm):
    return IterativeGuide(ssm.model, num_iterations=0)


@pytest.fixture(scope="module")
def avf():
    """An AVF guide for SHARP after 120 SVI steps (a few seconds)."""
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    guide = IterativeGuide(SHARP.model, num_iterations=2, hidden_size=32)
    svi = pyro.infer.SVI(SHARP.model, guide, pyro.optim.Adam({"lr": 1e-2}), loss=AmortizedFilteringELBO())
    xs, _ = SHARP.sample(32, 10, seed=1)
    for _ in range(120):
        svi.step(xs)
    return guide


def test_docstring_examples_run():
    result = doctest.testmod(pyro_avf.smc, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted >= 5 and result.failed == 0


def test_systematic_resampling():
    weights = torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.5, 0.5, 0.0, 0.0]], dtype=torch.float64)
    index = systematic_resample(weights, u=torch.tensor([[0.5], [0.99]], dtype=torch.float64))
    assert index.tolist() == [[1, 2, 3, 3], [0, 0, 1, 1]]  # positions (n + u)/N against the cumulative weights


# ----- convergence and bias against the exact log-likelihood -----


def test_bootstrap_converges_to_kalman():
    """The error of log p̂ shrinks as N grows: at N = 1000, averaged over 4 independent runs (copies in the batch),
    within 0.03 nats per step of the exact value for each of 3 sequences of 20 steps."""
    xs, _ = RANDOM.sample(3, 20, seed=2)
    copies, exact = xs.repeat_interleave(4, 0), exact_log_likelihood(RANDOM, xs).repeat_interleave(4)
    errors = {}
    for n in (10, 100, 1000):
        est = smc_log_likelihood(RANDOM, bootstrap(RANDOM), copies, num_particles=n, seed=0)
        errors[n] = (est.log_marginal - exact).view(3, 4)
    assert errors[1000].mean(1).abs().max() < 0.03 * 20
    assert errors[1000].abs().mean() < errors[100].abs().mean() < errors[10].abs().mean()


def test_avf_proposal_converges_to_kalman(avf):
    xs, _ = SHARP.sample(3, 20, seed=2)
    exact = exact_log_likelihood(SHARP, xs)
    est = smc_log_likelihood(SHARP, avf, xs, num_particles=1000, seed=0)
    assert (est.log_marginal - exact).abs().max() < 0.05 * 20


@pytest.mark.parametrize("proposal", ["bootstrap", "avf"])
def test_p_hat_is_unbiased(proposal, request):
    """The mean of p̂/p over 2000 independent runs (copies of one sequence of 3 steps, N = 8) is 1 within 4
    standard errors, while the mean of log p̂ lies below log p (Jensen). (The weights of the trained proposal are
    heavy-tailed, so a longer sequence needs far more runs for the mean of p̂ to settle.)"""
    ssm, guide = (RANDOM, bootstrap(RANDOM)) if proposal == "bootstrap" else (SHARP, request.getfixturevalue("avf"))
    xs, _ = ssm.sample(1, 3, seed=3)
    copies = xs.expand(2000, -1, -1).contiguous()
    est = smc_log_likelihood(ssm, guide, copies, num_particles=8, seed=1)
    log_ratio = est.log_marginal - exact_log_likelihood(ssm, xs)
    ratio = log_ratio.exp()
    assert abs(ratio.mean().item() - 1) < 4 * ratio.std().item() / math.sqrt(2000)
    assert log_ratio.mean() < 0


def test_single_particle_is_the_filtering_bound(avf):
    """With N = 1 nothing is resampled and log p̂ = Σ_t [log p(x_t | z_t) + log p(z_t | z_t-1) - log q(z_t)] along
    the very trajectory that streamed_free_energy scores for the same seed; the free energy F uses the analytic KL,
    so log p̂ + F = Σ_t (KL_t - log q/p(z_t)) is 0 in expectation (exactly 0 for the bootstrap filter: q = p)."""
    xs, _ = SHARP.sample(1, 10, seed=4)
    copies = xs.expand(200, -1, -1).contiguous()
    est = smc_log_likelihood(SHARP, avf, copies, num_particles=1, seed=3)
    free_energy, _ = streamed_free_energy(SHARP, avf, copies, seed=3, per_sequence=True)
    assert not est.resampled.any() and torch.equal(est.ess, torch.ones_like(est.ess))
    difference = est.log_marginal + free_energy
    assert difference.mean().abs() < 4 * difference.std() / math.sqrt(200)

    est = smc_log_likelihood(RANDOM, bootstrap(RANDOM), copies[:5, :, :3], num_particles=1, seed=3)
    free_energy, _ = streamed_free_energy(RANDOM, bootstrap(RANDOM), copies[:5, :, :3], seed=3, per_sequence=True)
    assert torch.allclose(est.log_marginal, -free_energy, rtol=1e-6)


def test_avf_proposal_needs_fewer_particles_than_bootstrap(avf):
    """The trained proposal with 16 particles is closer to log p than the bootstrap filter with 8× as many."""
    xs, _ = SHARP.sample(32, 20, seed=5)
    exact = exact_log_likelihood(SHARP, xs)
    avf_error = (smc_log_likelihood(SHARP, avf, xs, num_particles=16, seed=0).log_marginal - exact).abs().mean()
    boot = smc_log_likelihood(SHARP, bootstrap(SHARP), xs, num_particles=128, seed=0).log_marginal
    assert avf_error < (boot - exact).abs().mean()


# ----- weights, resampling, masks -----


def test_ess_and_resampling(avf):
    xs, _ = SHARP.sample(4, 15, seed=6)
    for guide in (bootstrap(SHARP), avf):
        est = smc_log_likelihood(SHARP, guide, xs, num_particles=50, seed=0)
        assert ((est.ess > 0) & (est.ess <= 50 + 1e-9)).all()
        assert est.resampled.any()  # informative observations: the weights degenerate
        assert not smc_log_likelihood(SHARP, guide, xs, num_particles=50, ess_threshold=0.0).resampled.any()


class Labelled:
    """Particles carry their row as label; x_t ~ N(0, 1) for a label with (label mod 4) < 2, else N(50, 1)."""

    plate_name = "sequences"

    def initial_state(self, batch_size, like):
        return torch.arange(batch_size, dtype=like.dtype)

    @filtering_step
    def step(self, t, label, x_t, mask_t=None):
        pyro.sample(f"z_{t}", dist.Normal(torch.zeros_like(label), 1.0))
        pyro.sample(f"x_{t}", dist.Normal(torch.where(label % 4 < 2, 0.0, 50.0), 1.0), obs=x_t)
        return label

    def advance(self, t, carry, x_t, mask_t=None):
        return self.step(t, carry, x_t, mask_t)


def test_resampling_gathers_the_state_of_each_sequence():
    """Sequence 0 (x = 0): weights (½, ½, 0, 0), ESS 2 < 0.75 · 4, resampled to labels (0, 0, 1, 1); sequence 1
    (x = 25): equal weights, ESS 4, untouched (labels 4..7)."""
    model = Labelled()
    pf = ParticleFilter(model, IterativeGuide(model.step, num_iterations=0), num_particles=4, ess_threshold=0.75)
    pf.init(batch_size=2)
    out = pf.step(torch.tensor([0.0, 25.0]))
    normal = dist.Normal(0.0, 1.0)
    assert out.resampled.tolist() == [True, False]
    assert torch.allclose(out.ess, torch.tensor([2.0, 4.0], dtype=torch.float64))
    expected = torch.stack([math.log(0.5) + normal.log_prob(torch.tensor(0.0)), normal.log_prob(torch.tensor(25.0))])
    assert torch.allclose(out.log_increment, expected.double(), atol=1e-5)
    assert pf.filter.state["carry"].tolist() == [0, 0, 1, 1, 4, 5, 6, 7]
    assert torch.allclose(pf.log_weights, torch.full((2, 4), -math.log(4), dtype=torch.float64))
    out = pf.step(torch.tensor([0.0, 25.0]))  # every particle of sequence 0 now fits x = 0
    assert not out.resampled.any() and torch.allclose(out.ess, torch.tensor([4.0, 4.0], dtype=torch.float64))
    assert torch.allclose(pf.log_marginal, 2 * expected.double() - torch.tensor([math.log(0.5), 0.0]).double(),
                          atol=1e-4)  # fmt: skip


@pytest.mark.parametrize("proposal", ["bootstrap", "avf"])
def test_padding_changes_nothing(proposal, request):
    guide = bootstrap(SHARP) if proposal == "bootstrap" else request.getfixturevalue("avf")
    xs, _ = SHARP.sample(3, 12, seed=7)
    padded = torch.cat([xs, 100 * torch.randn(3, 4, 3)], 1)  # junk after the end
    mask = torch.ones(3, 16, dtype=torch.bool)
    mask[:, 12:] = False
    plain = smc_log_likelihood(SHARP, guide, xs, num_particles=20, seed=0)
    est = smc_log_likelihood(SHARP, guide, padded, mask, num_particles=20, seed=0)
    assert torch.equal(est.log_marginal, plain.log_marginal)
    assert torch.equal(est.ess[:, :12], plain.ess) and not est.resampled[:, 12:].any()

    mask[0, 7:] = False  # sequences of 7, 16 and 12 steps: other values on padding change nothing
    other = torch.where(mask[..., None], padded, -padded)
    a = smc_log_likelihood(SHARP, guide, padded, mask, num_particles=20, seed=1)
    b = smc_log_likelihood(SHARP, guide, other, mask, num_particles=20, seed=1)
    assert torch.equal(a.log_marginal, b.log_marginal) and torch.equal(a.ess[mask], b.ess[mask])
    # (an encode_observation guide reads the padding, so its proposal, hence the ESS, differs on padded steps)


def test_gap_inside_a_sequence_is_weighted_right():
    """Missing observations inside a sequence: the estimate still converges to the exact masked likelihood
    (N = 1000, averaged over 4 runs, within 0.03 nats per step)."""
    xs, _ = RANDOM.sample(3, 20, seed=8)
    mask = torch.ones(3, 20, dtype=torch.bool)
    mask[:, 5:9] = False
    mask[1, 15:] = False
    exact = exact_log_likelihood(RANDOM, xs, mask)
    copies, copied_mask = xs.repeat_interleave(4, 0), mask.repeat_interleave(4, 0)
    est = smc_log_likelihood(RANDOM, bootstrap(RANDOM), copies, copied_mask, num_particles=1000, seed=0)
    assert (est.log_marginal.view(3, 4).mean(1) - exact).abs().max() < 0.03 * 20
    assert not est.resampled[~copied_mask].any()


def test_weighted_mean_and_empirical_match_the_kalman_filter():
    xs, _ = RANDOM.sample(2, 10, seed=9)
    kalman = kalman_filter(RANDOM.A, RANDOM.C, RANDOM.Q, RANDOM.R, xs)
    pf = ParticleFilter(RANDOM, bootstrap(RANDOM), num_particles=4000)
    pf.init(batch_size=2)
    for t in range(10):
        out = pf.step(xs[:, t])
        assert torch.allclose(out.mean[f"z_{t + 1}"], kalman.means[:, t], atol=0.1)
    empirical = pf.get_empirical()["carry"]  # the state is z_10, with its weights (uniform where resampled)
    assert empirical.batch_shape == (2,) and torch.allclose(empirical.mean, kalman.means[:, -1], atol=0.1)
    kept = ~out.resampled
    assert torch.allclose(empirical.mean[kept], out.mean["z_10"][kept], atol=1e-5)
    assert torch.allclose(empirical.variance, kalman.covs[:, -1].diagonal(dim1=-2, dim2=-1), rtol=0.3)


def test_no_graph_survives_a_step(avf):
    xs, _ = SHARP.sample(2, 3, seed=10)
    pf = ParticleFilter(SHARP, avf, num_particles=5)
    pf.init(batch_size=2)
    with torch.enable_grad():
        outs = [pf.step(xs[:, t]) for t in range(3)]
    assert not pf.filter.state["carry"].requires_grad and not pf.log_marginal.requires_grad
    assert not any(v.requires_grad for out in outs for v in (out.log_increment, out.ess, *out.mean.values()))
    assert all(p.requires_grad for p in avf.parameters())


# ----- errors -----


class Coin:
    """A step model with a discrete latent site."""

    def initial_state(self, batch_size, like):
        return like.new_zeros(batch_size)

    @filtering_step
    def step(self, t, prev, x_t, mask_t=None):
        k = pyro.sample(f"k_{t}", dist.Bernoulli(0.5 * torch.ones_like(prev)))
        pyro.sample(f"x_{t}", dist.Normal(k, 1.0), obs=x_t)
        return k

    def advance(self, t, carry, x_t, mask_t=None):
        return self.step(t, carry, x_t, mask_t)


def test_errors():
    guide = bootstrap(RANDOM)
    with pytest.raises(TypeError, match="IterativeGuide"):
        ParticleFilter(RANDOM, AutoNormal(RANDOM.model))
    for bad in (0, -3, 1.5, True):
        with pytest.raises(ValueError, match="num_particles"):
            ParticleFilter(RANDOM, guide, num_particles=bad)
    with pytest.raises(ValueError, match="ess_threshold"):
        ParticleFilter(RANDOM, guide, ess_threshold=1.5)
    xs, _ = RANDOM.sample(2, 4, seed=11)
    xs[1, 2, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        smc_log_likelihood(RANDOM, guide, xs)
    pf = ParticleFilter(RANDOM, guide, num_particles=3)
    with pytest.raises(RuntimeError, match="before init"):
        pf.step(xs[:, 0])
    pf.init(batch_size=2)
    with pytest.raises(ValueError, match="NaN"):
        pf.step(xs[:, 2])
    with pytest.raises(ValueError, match=r"shape \(2, \.\.\.\)"):
        pf.step(xs[:1, 0])
    with pytest.raises(ValueError, match="mask"):
        smc_log_likelihood(RANDOM, guide, xs[:, :2], torch.ones(2, 3, dtype=torch.bool))
    coin = Coin()
    with pytest.raises(NotImplementedError, match="'k_1' is discrete"):
        smc_log_likelihood(coin, IterativeGuide(coin.step, num_iterations=0), torch.zeros(2, 3))
