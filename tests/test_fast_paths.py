"""The hot path of the inference re-runs against the general path: plain Normal priors take shortcuts (posterior,
draw, KL, event dims) and re-runs after a step's first run skip the data and site checks; both must give the
numbers of the general code. A prior wrapped in ``.mask(True)`` masks nothing but is not "plain", so it takes
the general path everywhere."""

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import Trace_ELBO

import pyro_avf
from pyro_avf.free_energy import StepContext
from pyro_avf.inference import StepRun
from pyro_avf.posterior import kl_or_log_ratio, posterior, reparameterized_draw, unconstrained_event_dim


def priors(event: bool):
    loc, scale = torch.randn(3, 4), torch.rand(3, 4) + 0.5
    plain = dist.Normal(loc, scale)
    plain = plain.to_event(1) if event else plain
    return plain, plain.mask(True)


@pytest.mark.parametrize("event", [False, True])
def test_plain_normal_shortcuts_equal_the_general_path(event):
    torch.manual_seed(0)
    fast, general = priors(event)
    q_loc, q_log_scale, noise = torch.randn(3, 4), 0.3 * torch.randn(3, 4), torch.randn(3, 4)
    assert unconstrained_event_dim(fast) == unconstrained_event_dim(general) == int(event)
    z_fast = reparameterized_draw((q_loc, q_log_scale), fast, noise)
    torch.testing.assert_close(z_fast, reparameterized_draw((q_loc, q_log_scale), general, noise))
    q_fast, q_general = posterior(q_loc, q_log_scale, fast), posterior(q_loc, q_log_scale, general)
    torch.testing.assert_close(q_fast.log_prob(z_fast), q_general.log_prob(z_fast))
    kl_fast = kl_or_log_ratio(q_fast, fast, z_fast, (q_loc, q_log_scale))
    kl_general = kl_or_log_ratio(q_general, general, z_fast, (q_loc, q_log_scale))
    exact = torch.distributions.kl_divergence(q_fast, fast)  # torch's closed form
    torch.testing.assert_close(kl_fast, exact)
    torch.testing.assert_close(kl_general, exact)


def test_a_rerun_without_checks_scores_like_the_checked_first_run():
    torch.manual_seed(0)
    x = torch.randn(5, 2)

    def step():
        z = pyro.sample("z", dist.Normal(torch.zeros(5, 2), 1.0).to_event(1))
        pyro.sample("x", dist.Normal(z, 0.5).to_event(1), obs=x)

    lam = [(0.1 * torch.randn(5, 2), 0.2 * torch.randn(5, 2))]
    terms = []
    for check in (True, False):
        pyro.set_rng_seed(3)
        run = StepRun(StepContext(frames=(), scale=1.0, mask=None), lam, check=check)
        with run:
            step()
        terms.append(run.terms)
    for name in ("free_energy", "kl", "reconstruction"):
        torch.testing.assert_close(getattr(terms[0], name), getattr(terms[1], name))


def test_the_guide_gives_the_same_training_losses_on_the_fast_and_the_general_path():
    """The docstring model twice, its priors plain or wrapped in mask(True): the same losses step by step, with
    AmortizedFilteringELBO and with Trace_ELBO (every shortcut of the guide, the ELBO and the re-runs)."""

    def make(wrap):
        @pyro_avf.filtering_step
        def step(t, z_prev, x_t):
            z = pyro.sample(f"z_{t}", wrap(dist.Normal(0.9 * z_prev, 0.5).to_event(1)))
            pyro.sample(f"x_{t}", wrap(dist.Normal(z, 0.3).to_event(1)), obs=x_t)
            return z

        def model(xs):
            with pyro.plate("sequences", xs.size(0)):
                z = xs.new_zeros(xs.size(0), xs.size(2))
                for t in pyro.markov(range(xs.size(1))):
                    z = step(t, z, xs[:, t])

        return model

    xs = torch.randn(4, 6, 2, generator=torch.Generator().manual_seed(1))
    for loss in (pyro_avf.AmortizedFilteringELBO(), Trace_ELBO()):
        curves = []
        for wrap in (lambda d: d, lambda d: d.mask(True)):
            pyro.clear_param_store()
            pyro.set_rng_seed(0)
            model = make(wrap)
            guide = pyro_avf.IterativeGuide(model, num_iterations=2, hidden_size=8)
            svi = pyro.infer.SVI(model, guide, pyro.optim.Adam({"lr": 1e-2}), loss=loss)
            curves.append([svi.step(xs) for _ in range(4)])
        assert curves[0] == pytest.approx(curves[1], rel=1e-5), type(loss).__name__
