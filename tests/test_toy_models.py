"""The small reference models: trace structure, sampling, and log joints against hand computations."""

import math

import pyro
import pyro.poutine as poutine
import pytest
import torch
from pyro.poutine.messenger import Messenger

from pyro_avf.models.hierarchical import TwoLevelSSM
from pyro_avf.models.lgssm import LinearGaussianSSM
from pyro_avf.models.volatility import StochasticVolatility
from pyro_avf.step import STEP_TYPE, is_filtering_step


def normal_log_density(x, loc, scale):
    """Σ over the last dim of log N(x; loc, scale²), written out."""
    return (-0.5 * ((x - loc) / scale) ** 2 - torch.log(scale) - 0.5 * math.log(2 * math.pi)).sum(-1)


def log_joint(model_fn, xs, latents, mask=None):
    """log p(x, z) of ``model_fn`` with the latent sites fixed to ``latents`` (a dict name -> value)."""
    conditioned = poutine.condition(model_fn, data=latents)
    trace = poutine.trace(conditioned).get_trace(xs, mask)
    return trace.log_prob_sum(), trace


def per_step(values, prefix):
    """{prefix_t: values[:, t-1]} for t = 1..T."""
    return {f"{prefix}_{t}": values[:, t - 1] for t in range(1, values.size(1) + 1)}


@pytest.fixture(autouse=True)
def clear_params():
    pyro.clear_param_store()
    yield
    pyro.clear_param_store()


class StepCounter(Messenger):
    """Counts filtering-step messages that pass through it (and lets them run)."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def _process_message(self, msg):
        if msg["type"] == STEP_TYPE:
            self.count += 1


# ----------------------------------------------------------------------------- LG-SSM


def test_random_lgssm_is_stable_reproducible_and_in_range():
    model = LinearGaussianSSM.random(latent_dim=5, obs_dim=7, seed=3, spectral_radius=0.8)
    radius = torch.linalg.eigvals(model.A).abs().max().item()
    assert radius == pytest.approx(0.8, abs=1e-5) and radius < 1
    assert model.A.shape == (5, 5) and model.C.shape == (7, 5)
    assert bool(((model.q >= 0.3) & (model.q <= 0.7)).all()) and bool(((model.r >= 0.3) & (model.r <= 0.7)).all())
    torch.testing.assert_close(model.Q, torch.diag(model.q**2))
    torch.testing.assert_close(model.R, torch.diag(model.r**2))
    same = LinearGaussianSSM.random(latent_dim=5, obs_dim=7, seed=3, spectral_radius=0.8)
    other = LinearGaussianSSM.random(latent_dim=5, obs_dim=7, seed=4, spectral_radius=0.8)
    assert torch.equal(model.A, same.A) and torch.equal(model.C, same.C)
    assert not torch.equal(model.A, other.A)
    assert list(model.parameters()) == []


def test_lgssm_sample_is_reproducible_and_has_the_model_covariance():
    model = LinearGaussianSSM.random(latent_dim=2, obs_dim=3, seed=0).double()
    xs, zs = model.sample(4, 6, seed=5)
    assert xs.shape == (4, 6, 3) and zs.shape == (4, 6, 2) and xs.dtype == torch.float64
    xs2, zs2 = model.sample(4, 6, seed=5)
    assert torch.equal(xs, xs2) and torch.equal(zs, zs2)
    assert not torch.equal(xs, model.sample(4, 6, seed=6)[0])
    # Cov(x_2) = C (A Q Aᵀ + Q) Cᵀ + R, from 20000 draws (standard error of each entry ~ 1%)
    xs, _ = model.sample(20000, 2, seed=7)
    cov = torch.cov(xs[:, 1].T)
    A, C, Q, R = model.A, model.C, model.Q, model.R
    torch.testing.assert_close(cov, C @ (A @ Q @ A.T + Q) @ C.T + R, atol=0.05, rtol=0.05)


def test_lgssm_trace_sites_shapes_and_log_joint():
    model = LinearGaussianSSM.random(latent_dim=3, obs_dim=5, seed=1).double()
    xs, zs = model.sample(4, 6, seed=0)
    total, trace = log_joint(model.model, xs, per_step(zs, "z"))
    samples = [name for name, site in trace.nodes.items() if site["type"] == "sample" and name != "sequences"]
    assert samples == [f"{v}_{t}" for t in range(1, 7) for v in ("z", "x")]
    for t in range(1, 7):
        assert trace.nodes[f"z_{t}"]["value"].shape == (4, 3)
        assert trace.nodes[f"x_{t}"]["value"].shape == (4, 5)
        assert trace.nodes[f"x_{t}"]["is_observed"]
        assert trace.nodes[f"z_{t}"]["fn"].event_shape == (3,)
    z_prev = torch.cat([torch.zeros(4, 1, 3, dtype=torch.float64), zs[:, :-1]], 1)
    by_hand = normal_log_density(zs, z_prev @ model.A.T, model.q) + normal_log_density(xs, zs @ model.C.T, model.r)
    torch.testing.assert_close(total, by_hand.sum())


def test_lgssm_masked_steps_do_not_score():
    model = LinearGaussianSSM.random(latent_dim=2, obs_dim=3, seed=2).double()
    xs, zs = model.sample(3, 5, seed=1)
    mask = torch.ones(3, 5, dtype=torch.bool)
    mask[0, 1] = mask[2, 4] = False
    total, _ = log_joint(model.model, xs, per_step(zs, "z"), mask)
    z_prev = torch.cat([torch.zeros(3, 1, 2, dtype=torch.float64), zs[:, :-1]], 1)
    obs_terms = normal_log_density(xs, zs @ model.C.T, model.r)
    by_hand = normal_log_density(zs, z_prev @ model.A.T, model.q).sum() + obs_terms[mask].sum()
    torch.testing.assert_close(total, by_hand)
    changed = xs.clone()
    changed[0, 1] = 1e3
    torch.testing.assert_close(log_joint(model.model, changed, per_step(zs, "z"), mask)[0], total)


@pytest.mark.filterwarnings("ignore:trying to observe a value outside of inference")
def test_lgssm_step_is_marked_and_seen_by_handlers():
    model = LinearGaussianSSM.random(latent_dim=2, obs_dim=3, seed=0)
    assert is_filtering_step(LinearGaussianSSM.step)
    z = model.step(1, torch.zeros(2, 2), torch.zeros(2, 3))  # no handler: just runs
    assert z.shape == (2, 2)
    counter = StepCounter()
    with counter:
        model.model(model.sample(2, 4)[0])
    assert counter.count == 4


def test_lgssm_learnable_registers_parameters():
    model = LinearGaussianSSM.random(latent_dim=2, obs_dim=3, seed=0, learnable=True)
    names = {name for name, _ in model.named_parameters()}
    assert names == {"A", "C", "log_q", "log_r"}
    trace = poutine.trace(model.model).get_trace(model.sample(2, 3)[0])
    params = {name for name, site in trace.nodes.items() if site["type"] == "param"}
    assert {"lgssm$$$A", "lgssm$$$C", "lgssm$$$log_q", "lgssm$$$log_r"} <= params
    torch.testing.assert_close(model.q, model.log_q.exp())


@pytest.mark.parametrize(
    ("xs", "mask", "message"),
    [
        (torch.zeros(2, 3, 3, dtype=torch.long), None, "floating-point"),
        (torch.zeros(2, 3), None, r"shape \(B, T, 3\)"),
        (torch.zeros(2, 3, 4), None, r"shape \(B, T, 3\)"),
        ([[0.0]], None, "torch.Tensor"),
        (torch.zeros(2, 3, 3), torch.ones(2, 3), "mask must be a bool tensor"),
        (torch.zeros(2, 3, 3), torch.ones(3, 2, dtype=torch.bool), r"mask must have shape \(2, 3\)"),
        (torch.zeros(2, 3, 3, dtype=torch.float64), None, "model.double()"),
    ],
)
def test_lgssm_rejects_bad_input(xs, mask, message):
    model = LinearGaussianSSM.random(latent_dim=2, obs_dim=3)
    with pytest.raises(ValueError, match=message):
        model.model(xs, mask)


def test_lgssm_constructor_rejects_bad_parameters():
    with pytest.raises(ValueError, match="C must have shape"):
        LinearGaussianSSM(torch.eye(2), torch.ones(3, 4), 0.5, 0.5)
    with pytest.raises(ValueError, match="q must be strictly positive"):
        LinearGaussianSSM(torch.eye(2), torch.ones(3, 2), torch.tensor([0.5, -0.1]), 0.5)


# ----------------------------------------------------------------------------- stochastic volatility


def sv_log_joint_by_hand(model, xs, hs):
    """Σ_t log N(h_t; mu + phi (h_{t-1} - mu), sigma) + log N(x_t; 0, exp(h_t / 2)), with h_0 = mu."""
    h_prev = torch.cat([model.mu.expand(hs.size(0), 1, -1), hs[:, :-1]], 1)
    prior = normal_log_density(hs, model.mu + model.phi * (h_prev - model.mu), model.sigma)
    return prior + normal_log_density(xs, torch.zeros_like(xs), (hs / 2).exp())


def test_volatility_trace_and_log_joint():
    model = StochasticVolatility(dim=2, mu=[-0.5, 0.2], phi=[0.9, 0.7], sigma=0.4).double()
    xs, hs = model.sample(3, 5, seed=0)
    assert xs.shape == hs.shape == (3, 5, 2)
    total, trace = log_joint(model.model, xs, per_step(hs, "h"))
    samples = [name for name, site in trace.nodes.items() if site["type"] == "sample" and name != "sequences"]
    assert samples == [f"{v}_{t}" for t in range(1, 6) for v in ("h", "x")]
    assert all(trace.nodes[f"h_{t}"]["value"].shape == (3, 2) for t in range(1, 6))
    torch.testing.assert_close(total, sv_log_joint_by_hand(model, xs, hs).sum())


def test_volatility_positive_latent_is_the_same_process_with_a_jacobian():
    log_form = StochasticVolatility(dim=1, mu=-1.0, phi=0.95, sigma=0.3).double()
    pos_form = StochasticVolatility(dim=1, mu=-1.0, phi=0.95, sigma=0.3, positive_latent=True).double()
    xs, hs = log_form.sample(4, 6, seed=2)
    xs_pos, vs = pos_form.sample(4, 6, seed=2)
    torch.testing.assert_close(xs_pos, xs)
    torch.testing.assert_close(vs, hs.exp())
    total, trace = log_joint(pos_form.model, xs, per_step(vs, "v"))
    assert trace.nodes["v_1"]["fn"].support.base_constraint.lower_bound == 0
    assert "h_1" not in trace.nodes and trace.nodes["v_3"]["value"].shape == (4, 1)
    # log LogNormal(v) = log Normal(log v) - log v
    by_hand = sv_log_joint_by_hand(log_form, xs, hs).sum() - hs.sum()
    torch.testing.assert_close(total, by_hand)


def test_volatility_mask_sampling_and_learnable():
    model = StochasticVolatility(dim=1, learnable=True)
    assert {name for name, _ in model.named_parameters()} == {"mu", "atanh_phi", "log_sigma"}
    xs, hs = model.sample(2, 4, seed=1)
    xs2, hs2 = model.sample(2, 4, seed=1)
    assert torch.equal(xs, xs2) and torch.equal(hs, hs2)
    assert not torch.equal(xs, model.sample(2, 4, seed=3)[0])
    mask = torch.tensor([[True, False, True, True], [True, True, True, False]])
    with torch.no_grad():
        total, trace = log_joint(model.model, xs, per_step(hs, "h"), mask)
        full = sv_log_joint_by_hand(model, xs, hs)
        prior_only = sv_log_joint_by_hand(model, torch.zeros_like(xs), hs) - normal_log_density(
            torch.zeros_like(xs), torch.zeros_like(xs), (hs / 2).exp()
        )
    torch.testing.assert_close(total, torch.where(mask, full, prior_only).sum())
    assert "stochastic_volatility$$$atanh_phi" in trace.nodes


def test_volatility_rejects_bad_parameters():
    with pytest.raises(ValueError, match="phi must lie in"):
        StochasticVolatility(phi=1.0)
    with pytest.raises(ValueError, match="sigma must be strictly positive"):
        StochasticVolatility(sigma=0.0)
    with pytest.raises(ValueError, match=r"shape \(B, T, 1\)"):
        StochasticVolatility().model(torch.zeros(2, 3, 2))


# ----------------------------------------------------------------------------- two-level SSM


def test_two_level_trace_shapes_and_log_joint():
    model = TwoLevelSSM.random(z1_dim=2, z2_dim=3, obs_dim=4, seed=0).double()
    assert torch.linalg.eigvals(model.A).abs().max().item() < 1
    xs, z1s, z2s = model.sample(3, 5, seed=1)
    assert xs.shape == (3, 5, 4) and z1s.shape == (3, 5, 2) and z2s.shape == (3, 5, 3)
    latents = {**per_step(z1s, "z1"), **per_step(z2s, "z2")}
    total, trace = log_joint(model.model, xs, latents)
    samples = [name for name, site in trace.nodes.items() if site["type"] == "sample" and name != "sequences"]
    assert samples == [f"{v}_{t}" for t in range(1, 6) for v in ("z1", "z2", "x")]
    assert trace.nodes["z1_2"]["value"].shape == (3, 2) and trace.nodes["z2_2"]["value"].shape == (3, 3)
    z1_prev = torch.cat([torch.zeros(3, 1, 2, dtype=torch.float64), z1s[:, :-1]], 1)
    by_hand = (
        normal_log_density(z1s, z1_prev @ model.A.T, model.q1)
        + normal_log_density(z2s, z1s @ model.B.T, model.q2)
        + normal_log_density(xs, z2s @ model.C.T, model.r)
    )
    torch.testing.assert_close(total, by_hand.sum())
    mask = torch.ones(3, 5, dtype=torch.bool)
    mask[1, 2] = False
    masked, _ = log_joint(model.model, xs, latents, mask)
    torch.testing.assert_close(masked, total - normal_log_density(xs, z2s @ model.C.T, model.r)[1, 2])


def test_two_level_sampling_is_reproducible_and_learnable_registers():
    model = TwoLevelSSM.random(seed=4, learnable=True)
    first, second = model.sample(2, 3, seed=9), model.sample(2, 3, seed=9)
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    assert not torch.equal(first[0], model.sample(2, 3, seed=10)[0])
    assert {name for name, _ in model.named_parameters()} == {"A", "B", "C", "log_q1", "log_q2", "log_r"}
    trace = poutine.trace(model.model).get_trace(first[0])
    assert "two_level_ssm$$$B" in trace.nodes
    with pytest.raises(ValueError, match="B must have shape"):
        TwoLevelSSM(torch.eye(2), torch.ones(3, 3), torch.ones(4, 3), 0.5, 0.5, 0.5)
