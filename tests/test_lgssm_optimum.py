"""The guide against closed-form answers on a linear-Gaussian state-space model."""

import sys
from pathlib import Path

import pyro
import torch

from pyro_avf import AmortizedFilteringELBO, IterativeGuide
from pyro_avf.baselines.kalman import kalman_filter
from pyro_avf.models.lgssm import LinearGaussianSSM

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from lgssm import analytic_gap  # noqa: E402


def test_non_amortized_filtering_em_reaches_the_diagonal_optimum():
    ssm = LinearGaussianSSM.random(latent_dim=4, obs_dim=8, seed=0)
    xs, _ = ssm.sample(16, 4, seed=2)
    guide = IterativeGuide(ssm.model, num_iterations=150, update="adam", lr=0.1, lr_decay=0.5, num_samples=8)
    out = analytic_gap(ssm, guide, xs)
    assert 0 <= out["gap_per_step"] < 0.02
    per_iteration = torch.tensor(out["per_iteration"])
    assert per_iteration[-1] < per_iteration[0] - 3


def test_the_bound_is_never_below_the_exact_kalman_likelihood():
    ssm = LinearGaussianSSM.random(latent_dim=4, obs_dim=8, seed=0)
    xs, _ = ssm.sample(6, 5, seed=3)
    nll = kalman_filter(ssm.A, ssm.C, ssm.Q, ssm.R, xs).nll.sum(1)
    for guide in (IterativeGuide(ssm.model, 0), IterativeGuide(ssm.model, 20, update="adam", lr=0.1, num_samples=2)):
        elbo = AmortizedFilteringELBO()
        bounds = []
        for _ in range(25):
            elbo.loss(ssm.model, guide, xs)
            bounds.append(elbo.diagnostics["free_energy"][..., -1].sum(1))
        bounds = torch.stack(bounds)
        se = bounds.std(0) / 25**0.5
        assert (bounds.mean(0) > nll - 3 * se).all()
    # a well-optimised posterior is close to the exact answer: within a few nats per sequence of 5 steps
    assert (bounds.mean(0) - nll).mean() < 5


def test_amortized_filtering_learns_to_infer():
    ssm = LinearGaussianSSM.random(latent_dim=2, obs_dim=4, seed=1)
    xs, _ = ssm.sample(64, 5, seed=1)
    test, _ = ssm.sample(64, 5, seed=7)
    # the AVF paper's gated update with its single sample, which starts far from the optimum (gap 4.3 nats/step
    # untrained); with the default antithetic pair its last iteration rises by 0.008 nats/step (4.155 -> 4.163)
    guide = IterativeGuide(ssm.model, num_iterations=3, update="highway", hidden_size=64, encode_observation=True,
                           num_samples=1)
    svi = pyro.infer.SVI(ssm.model, guide, pyro.optim.Adam({"lr": 3e-3}), AmortizedFilteringELBO())
    untrained = analytic_gap(ssm, guide, test)
    for _ in range(150):
        svi.step(xs)
    trained = analytic_gap(ssm, guide, test)
    assert trained["gap_per_step"] < untrained["gap_per_step"] - 1.0
    per_iteration = trained["per_iteration"]
    assert all(b < a for a, b in zip(per_iteration, per_iteration[1:])), per_iteration


def test_the_default_update_starts_close_and_learns():
    """The default bounded natural-gradient step with its antithetic pair improves on the prior untrained
    (measured gap 0.61 nats/step; one sample 0.76) and learns (0.040 after 150 steps; one sample 0.22). Its last
    iteration can still raise the free energy slightly after this little training (measured 4.063 -> 4.077; one
    sample 4.239 -> 4.267; see benchmarks/RESULTS.md), so only the earlier ones must fall."""
    ssm = LinearGaussianSSM.random(latent_dim=2, obs_dim=4, seed=1)
    xs, _ = ssm.sample(64, 5, seed=1)
    test, _ = ssm.sample(64, 5, seed=7)
    guide = IterativeGuide(ssm.model, num_iterations=3, hidden_size=64)
    svi = pyro.infer.SVI(ssm.model, guide, pyro.optim.Adam({"lr": 3e-3}), AmortizedFilteringELBO())
    untrained = analytic_gap(ssm, guide, test)
    assert untrained["gap_per_step"] < 1.5  # the gated highway update, untrained: 4.3
    for _ in range(150):
        svi.step(xs)
    trained = analytic_gap(ssm, guide, test)
    assert trained["gap_per_step"] < min(0.35, untrained["gap_per_step"] / 2)
    per_iteration = trained["per_iteration"]
    assert per_iteration[2] < per_iteration[1] < per_iteration[0] - 1, per_iteration
