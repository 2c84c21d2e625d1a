"""The inference core: IterativeGuide + AmortizedFilteringELBO on small models with known answers."""

import math
import warnings

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.infer import SVI, Trace_ELBO

import pyro_avf
from pyro_avf import AmortizedFilteringELBO, IterativeGuide, filtering_step
from pyro_avf.models.lgssm import LinearGaussianSSM


def lgssm_data(num=8, T=6, learnable=False):
    m = LinearGaussianSSM.random(latent_dim=4, obs_dim=8, seed=0)
    if learnable:
        m = LinearGaussianSSM(m.A.detach(), m.C.detach(), m.q.detach(), m.r.detach(), learnable=True)
    xs, _ = m.sample(num, T, seed=1)
    return m, xs


def test_public_names():
    assert {"filtering_step", "IterativeGuide", "AmortizedFilteringELBO"} <= set(pyro_avf.__all__)


def test_step_runs_unchanged_without_a_handler():
    @filtering_step
    def step(t, z, name=None, obs=None):
        return z + t, name, obs

    assert step(2, torch.ones(1), name="n", obs=3) == (torch.ones(1) + 2, "n", 3)


def test_posterior_starts_at_the_prior():
    m, xs = lgssm_data()
    guide = IterativeGuide(m.model, num_iterations=0)
    guide(xs)
    for t in range(1, xs.shape[1] + 1):
        site = guide.trace.nodes[f"z_{t}"]
        prior = site["infer"]["prior"]
        assert torch.allclose(site["fn"].base_dist.loc, prior.base_dist.loc)
        assert torch.allclose(site["fn"].base_dist.scale, prior.base_dist.scale)
    elbo = AmortizedFilteringELBO()
    elbo.loss(m.model, IterativeGuide(m.model, num_iterations=3), xs)
    d = elbo.diagnostics
    assert d["free_energy"].shape == (8, 6, 4)
    assert d["kl"][:, :, 0].abs().max() < 1e-5  # iteration 0 is the prior prediction
    assert torch.all(d["kl"][:, :, 1:] > 0)


def test_one_svi_step_moves_model_and_guide_parameters():
    m, xs = lgssm_data(learnable=True)
    guide = IterativeGuide(m.model, num_iterations=2, hidden_size=16)
    svi = SVI(m.model, guide, pyro.optim.Adam({"lr": 1e-2}), AmortizedFilteringELBO())
    svi.step(xs)
    store = pyro.get_param_store()
    before = {k: v.detach().clone() for k, v in store.items()}
    assert any(k.startswith("avf_update_") for k in before) and any(not k.startswith("avf_") for k in before)
    svi.step(xs)
    moved = {k for k, v in store.items() if not torch.equal(v.detach(), before[k])}
    assert any(k.startswith("avf_update_") for k in moved), "update network did not move"
    assert any(not k.startswith("avf_") for k in moved), "model parameters did not move"


@pytest.mark.parametrize("K", [0, 2])
def test_no_model_replay_and_same_expected_loss_as_trace_elbo(K):
    m, xs = lgssm_data(num=4, T=5)
    guide = IterativeGuide(m.model, num_iterations=K, hidden_size=16)
    losses = {}
    for elbo in (AmortizedFilteringELBO(), Trace_ELBO()):
        elbo.loss(m.model, guide, xs)  # warm-up (Trace_ELBO guesses max_plate_nesting on its first call)
        pyro.set_rng_seed(7)
        losses[type(elbo).__name__] = torch.tensor([elbo.loss(m.model, guide, xs) for _ in range(60)])
        # per step K iterations of an antithetic pair (the default num_samples=2) and the final run, no replay
        assert guide.last_pass.step_executions == 5 * (2 * K + 1)
    # the same seed draws the same samples: the paired difference is analytic KL minus its MC estimate
    diff = losses["AmortizedFilteringELBO"] - losses["Trace_ELBO"]
    assert abs(diff.mean()) < 4 * diff.std() / math.sqrt(60) + 1e-4
    assert diff.std() < 0.5 * losses["Trace_ELBO"].std() + 1e-4


def test_free_energy_falls_over_iterations_with_non_amortized_em():
    m, xs = lgssm_data(num=16, T=5)
    guide = IterativeGuide(m.model, num_iterations=10, update="adam", lr=0.05, num_samples=4)
    elbo = AmortizedFilteringELBO()
    elbo.loss(m.model, guide, xs)
    per_iteration = elbo.diagnostics["free_energy"].mean((0, 1))
    assert per_iteration[-1] < per_iteration[0] - 1.0
    assert per_iteration[5] < per_iteration[0]


# ----- clear errors -----


def test_discrete_latent_inside_a_step_is_refused():
    @filtering_step
    def step(t, x):
        k = pyro.sample(f"k_{t}", dist.Bernoulli(0.5))
        pyro.sample(f"x_{t}", dist.Normal(k, 1.0), obs=x)

    def model(xs):
        for t in pyro.markov(range(len(xs))):
            step(t, xs[t])

    with pytest.raises(NotImplementedError, match="discrete"):
        IterativeGuide(model, num_iterations=1)(torch.zeros(3))


def test_latents_in_a_markov_loop_without_a_marked_step_are_refused():
    def model(xs):
        z = torch.zeros(())
        for t in pyro.markov(range(len(xs))):
            z = pyro.sample(f"z_{t}", dist.Normal(z, 1.0))
            pyro.sample(f"x_{t}", dist.Normal(z, 1.0), obs=xs[t])

    with pytest.raises(ValueError, match="filtering_step"):
        IterativeGuide(model, num_iterations=1)(torch.zeros(3))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_or_inf_in_observed_data_is_refused(bad):
    m, xs = lgssm_data()
    xs[2, 3, 1] = bad
    with pytest.raises(ValueError, match="NaN or infinite"):
        IterativeGuide(m.model, num_iterations=1)(xs)


def test_a_slot_whose_shape_changes_is_refused():
    @filtering_step
    def step(t, x):
        z = pyro.sample(f"z_{t}", dist.Normal(torch.zeros(2 + t), 1.0).to_event(1))
        pyro.sample(f"x_{t}", dist.Normal(z.sum(), 1.0), obs=x)

    def model(xs):
        for t in pyro.markov(range(len(xs))):
            step(t, xs[t])

    with pytest.raises(ValueError, match="changed shape"):
        IterativeGuide(model, num_iterations=1)(torch.zeros(3))


@pytest.mark.parametrize("K", [-1, 1.5, "3"])
def test_bad_number_of_iterations_is_refused(K):
    with pytest.raises(ValueError, match="num_iterations"):
        IterativeGuide(lambda: None, num_iterations=K)


class NotReparameterized(dist.Normal):
    has_rsample = False


def test_non_reparameterizable_continuous_latent_is_refused():
    @filtering_step
    def step(t, x):
        z = pyro.sample(f"z_{t}", NotReparameterized(0.0, 1.0))
        pyro.sample(f"x_{t}", dist.Normal(z, 1.0), obs=x)

    def model(xs):
        for t in pyro.markov(range(len(xs))):
            step(t, xs[t])

    with pytest.raises(NotImplementedError, match="reparameterized"):
        IterativeGuide(model, num_iterations=1)(torch.zeros(3))


def test_a_step_that_observes_nothing_warns():
    @filtering_step
    def step(t):
        pyro.sample(f"z_{t}", dist.Normal(0.0, 1.0))

    def model():
        for t in pyro.markov(range(2)):
            step(t)

    with pytest.warns(UserWarning, match="observes nothing"):
        IterativeGuide(model, num_iterations=1)()


def test_a_well_formed_model_gives_no_warning():
    m, xs = lgssm_data()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        IterativeGuide(m.model, num_iterations=1)(xs)


def test_other_guides_are_refused_by_the_elbo():
    m, xs = lgssm_data()
    with pytest.raises(TypeError, match="IterativeGuide"):
        AmortizedFilteringELBO().loss(m.model, lambda xs: None, xs)


def test_masked_steps_do_not_score():
    m, xs = lgssm_data(num=4, T=6)
    mask = torch.ones(4, 6, dtype=torch.bool)
    mask[:, 4:] = False
    guide = IterativeGuide(m.model, num_iterations=0)
    elbo = AmortizedFilteringELBO()
    pyro.set_rng_seed(3)
    a = elbo.loss(m.model, guide, xs, mask)
    xs2 = xs.clone()
    xs2[:, 4:] = 100.0
    pyro.set_rng_seed(3)
    b = elbo.loss(m.model, guide, xs2, mask)
    assert a == pytest.approx(b, rel=1e-6)
    assert not elbo.diagnostics["observed"][:, 4:].any() and elbo.diagnostics["observed"][:, :4].all()


def test_poutine_scale_multiplies_the_loss():
    m, xs = lgssm_data(num=4, T=4)
    guide = IterativeGuide(m.model, num_iterations=0)
    elbo = AmortizedFilteringELBO()
    pyro.set_rng_seed(5)
    a = elbo.loss(m.model, guide, xs)
    pyro.set_rng_seed(5)
    b = elbo.loss(poutine.scale(m.model, scale=3.0), IterativeGuide(poutine.scale(m.model, scale=3.0), 0), xs)
    assert b == pytest.approx(3 * a, rel=1e-5)


def test_online_evaluation_matches_the_training_pass_and_keeps_no_graph():
    from pyro_avf.evaluation import filtering_free_energy, mean_free_energy_per_step

    m, xs = lgssm_data(num=32, T=8)
    guide = IterativeGuide(m.model, num_iterations=10, update="adam", lr=0.05)
    elbo = AmortizedFilteringELBO()
    batch = torch.stack([torch.tensor(elbo.loss(m.model, guide, xs)) for _ in range(20)]).mean()
    online = torch.stack(
        [torch.tensor(mean_free_energy_per_step(filtering_free_energy(m.model, guide, xs))) for _ in range(20)]
    ).mean()
    assert online * 32 * 8 == pytest.approx(batch.item(), rel=0.02)
    out = filtering_free_energy(m.model, guide, xs)
    assert out["free_energy"].shape == (32, 8) and not out["free_energy"].requires_grad
    assert len(guide.trace.nodes) == 0 or all(
        n.get("infer", {}).get("avf_step") is None for n in guide.trace.nodes.values()
    )


def test_static_models_are_one_step():
    def vae_like(x):
        with pyro.plate("data", x.size(0)):
            z = pyro.sample("z", dist.Normal(torch.zeros(x.size(0), 2), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(z.sum(-1, keepdim=True), 0.5).to_event(1), obs=x)

    x = torch.randn(10, 1)
    guide = IterativeGuide(vae_like, num_iterations=4, update="adam", lr=0.1)
    elbo = AmortizedFilteringELBO()
    elbo.loss(vae_like, guide, x)
    assert elbo.diagnostics["free_energy"].shape == (10, 1, 5)
    assert guide.trace.nodes["z"]["infer"]["avf_step"] == 0
    from pyro_avf.evaluation import filtering_free_energy

    assert filtering_free_energy(vae_like, guide, x)["free_energy"].shape == (10, 1)


EULER, PI2_6 = 0.5772156649015329, math.pi**2 / 6


@pytest.mark.parametrize(
    "prior, expected_loc, expected_scale",
    [
        # log space: psi(3) - log 2 with psi(n) = H_(n-1) - Euler gamma; sqrt(psi_1(3)) = sqrt(pi^2/6 - 1 - 1/4)
        (dist.Gamma(torch.tensor(3.0), torch.tensor(2.0)), 1.5 - EULER - math.log(2), math.sqrt(PI2_6 - 1.25)),
        # logit space: psi(2) - psi(5) = H_1 - H_4; sqrt(psi_1(2) + psi_1(5))
        (
            dist.Beta(torch.tensor(2.0), torch.tensor(5.0)),
            1 - (1 + 1 / 2 + 1 / 3 + 1 / 4),
            math.sqrt((PI2_6 - 1) + (PI2_6 - 1 - 1 / 4 - 1 / 9 - 1 / 16)),
        ),
        (dist.LogNormal(torch.tensor(0.3), torch.tensor(0.7)), 0.3, 0.7),
    ],
)
def test_constrained_latents_start_at_the_prior_moments_in_the_unconstrained_space(prior, expected_loc, expected_scale):
    @filtering_step
    def step(t, x):
        v = pyro.sample(f"v_{t}", prior)
        pyro.sample(f"x_{t}", dist.Normal(v, 1.0), obs=x)

    def model(xs):
        for t in pyro.markov(range(len(xs))):
            step(t, xs[t])

    guide = IterativeGuide(model, num_iterations=0)
    guide(torch.zeros(2))
    loc, log_scale = guide.trace.nodes["v_1"]["infer"]["avf_lambda"]
    assert loc.item() == pytest.approx(expected_loc, abs=1e-5)
    assert log_scale.exp().item() == pytest.approx(expected_scale, rel=1e-4)
    values = torch.stack([guide(torch.zeros(2))["v_1"] for _ in range(200)])
    assert prior.support.check(values).all()
    assert values.mean().item() == pytest.approx(prior.mean.item(), rel=0.15)


def test_an_untrained_residual_update_keeps_the_prior_and_then_learns():
    m, xs = lgssm_data(num=32, T=5)
    guide = IterativeGuide(m.model, num_iterations=3, update="residual", hidden_size=32)
    elbo = AmortizedFilteringELBO()
    elbo.loss(m.model, guide, xs)
    assert elbo.diagnostics["kl"].abs().max() < 1e-5  # every iteration is still the prior
    svi = SVI(m.model, guide, pyro.optim.Adam({"lr": 3e-3}), elbo)
    for _ in range(30):
        svi.step(xs)
    per_iteration = 0
    for _ in range(5):
        elbo.loss(m.model, guide, xs)
        per_iteration = per_iteration + elbo.diagnostics["free_energy"].mean((0, 1)) / 5
    assert per_iteration[-1] < per_iteration[0] - 1.0
