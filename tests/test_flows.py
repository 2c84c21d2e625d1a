"""Affine autoregressive flows across time: invertibility, exact likelihood, decorrelation, Pyro use."""

import math

import matplotlib.image as mpimg
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import SVI, Trace_ELBO
from pyro.optim import Adam

from pyro_avf.flows import (
    AffineAutoregressiveFlow,
    FlowSequenceModel,
    flow_observation,
    temporal_correlation,
)
from pyro_avf.plots_flows import plot_flow_frames


def _randomise(module: torch.nn.Module, scale: float = 0.1) -> None:
    """Give every parameter random values so that mu and sigma really depend on the history."""
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0.0, scale)


@pytest.mark.parametrize("network,frame_shape", [("fc", (5,)), ("conv", (2, 6, 6))])
@pytest.mark.parametrize("window", [1, 2])
def test_inverse_round_trip(network, frame_shape, window):
    torch.manual_seed(0)
    flow = AffineAutoregressiveFlow(frame_shape, window=window, network=network, hidden=8)
    _randomise(flow)
    x = torch.randn(3, 6, *frame_shape)
    y, log_abs_det = flow(x)
    assert y.shape == x.shape and log_abs_det.shape == (3,)
    assert not torch.allclose(y, x, atol=1e-2)  # the flow is not the identity
    torch.testing.assert_close(flow.inverse(y), x, atol=1e-5, rtol=0)


def test_stacked_two_af_round_trip():
    torch.manual_seed(1)
    model = FlowSequenceModel((4,), num_flows=2, window=2, hidden=8)
    _randomise(model.flows)
    x = torch.randn(2, 7, 4)
    y, _ = model(x)
    y1, _ = model.flows[0](x)
    y2, _ = model.flows[1](y1)
    torch.testing.assert_close(y, y2)  # the second flow acts on the first flow's y
    torch.testing.assert_close(model.inverse(y), x, atol=1e-5, rtol=0)


def test_history_is_zero_padded_and_causal():
    torch.manual_seed(2)
    flow = AffineAutoregressiveFlow((3,), window=2, hidden=8)
    _randomise(flow)
    x = torch.randn(1, 5, 3)
    mu, sigma = flow.shift_and_scale_all(x)
    mu0, sigma0 = flow.shift_and_scale(torch.zeros(1, 2, 3))
    torch.testing.assert_close(mu[:, 0], mu0)
    mu3, _ = flow.shift_and_scale(x[:, 1:3])
    torch.testing.assert_close(mu[:, 3], mu3)
    x_changed = x.clone()
    x_changed[:, 3:] += 1.0  # the future must not change the prediction of step 3
    torch.testing.assert_close(flow.shift_and_scale_all(x_changed)[0][:, :4], mu[:, :4])


@pytest.mark.parametrize("num_flows,base", [(1, "standard"), (2, "learned")])
def test_log_prob_matches_brute_force_jacobian(num_flows, base):
    torch.manual_seed(3)
    model = FlowSequenceModel((2,), num_flows=num_flows, base=base, window=2, hidden=6).double()
    _randomise(model)
    x = torch.randn(1, 4, 2, dtype=torch.double)

    def to_y(flat):
        return model(flat.reshape(1, 4, 2))[0].reshape(-1)

    jac = torch.autograd.functional.jacobian(to_y, x.reshape(-1))
    _, log_det = torch.linalg.slogdet(jac)
    y = to_y(x.reshape(-1)).reshape(4, 2)
    scale = model.base_log_scale.exp()
    log_base = dist.Normal(model.base_loc, scale).log_prob(y).sum()
    expected = log_base + log_det
    torch.testing.assert_close(model.log_prob(x)[0], expected, atol=1e-10, rtol=0)
    # and the Pyro program gives the same number through its per-step observe sites
    trace = pyro.poutine.trace(model.model).get_trace(x)
    torch.testing.assert_close(trace.log_prob_sum(), expected, atol=1e-10, rtol=0)
    assert [n for n in trace.nodes if n.startswith("x_")] == ["x_0", "x_1", "x_2", "x_3"]


def _second_order_lds(num: int, steps: int, noise: float, seed: int) -> torch.Tensor:
    """x_t = 2 x_{t-1} - x_{t-2} + w_t (position with a random-walk velocity), x_0 = x_{-1} = 0."""
    g = torch.Generator().manual_seed(seed)
    w = noise * torch.randn(num, steps, 1, generator=g, dtype=torch.double)
    velocity = torch.cumsum(w, dim=1)  # u_t = u_{t-1} + w_t
    return torch.cumsum(velocity, dim=1)  # x_t = x_{t-1} + u_t


class _PreviousFrame(AffineAutoregressiveFlow):
    """The poster's fixed 1-AF: mu = x_{t-1}, sigma = 1."""

    def shift_and_scale(self, history):
        return history[:, -1], torch.ones_like(history[:, -1])


def test_poster_linear_dynamical_system_is_reduced_in_order():
    noise, steps = 0.5, 40
    x = _second_order_lds(2000, steps, noise, seed=4)
    flow = _PreviousFrame((1,), window=1).double()
    y, log_abs_det = flow(x)
    # y_t = x_t - x_{t-1} = u_t: the velocity, a first-order Gaussian random walk
    torch.testing.assert_close(y, torch.diff(x, dim=1, prepend=torch.zeros_like(x[:, :1])))
    torch.testing.assert_close(log_abs_det, torch.zeros(2000, dtype=torch.double))
    increments = torch.diff(y, dim=1)  # u_t - u_{t-1} = w_t: i.i.d. N(0, noise^2)
    assert abs(increments.mean().item()) < 0.01
    assert abs(increments.std().item() - noise) < 0.01
    lag1 = (increments[:, 1:] * increments[:, :-1]).mean() / increments.var()
    assert abs(lag1.item()) < 0.02  # increments are uncorrelated: y is first order
    # Var(u_t) = t * noise^2: a random walk, not the cubic growth of the position
    t = torch.arange(1, steps + 1, dtype=torch.double)
    var_y = y[..., 0].var(0)
    assert torch.allclose(var_y / (t * noise**2), torch.ones(steps, dtype=torch.double), atol=0.15)
    # a second 1-AF with mu = y_{t-1} leaves white noise: temporal correlation drops to ~0
    w, _ = flow(y)
    corr_x, corr_y, corr_w = temporal_correlation(x), temporal_correlation(y), temporal_correlation(w)
    assert corr_x > 0.99 and corr_y > 0.9
    assert abs(corr_w.item()) < 0.03


def test_temporal_correlation_of_stationary_ar1_and_its_residual():
    # x_t = a x_{t-1} + e_t started at stationarity has adjacent correlation a; the 1-AF with
    # mu = a x_{t-1} leaves white noise
    a, n, steps = 0.8, 4000, 30
    g = torch.Generator().manual_seed(5)
    e = torch.randn(n, steps, 3, generator=g, dtype=torch.double)
    x = torch.empty_like(e)
    x[:, 0] = e[:, 0] / math.sqrt(1 - a * a)
    for t in range(1, steps):
        x[:, t] = a * x[:, t - 1] + e[:, t]
    assert abs(temporal_correlation(x).item() - a) < 0.01
    y = x[:, 1:] - a * x[:, :-1]
    assert abs(temporal_correlation(y).item()) < 0.01
    per_dim = temporal_correlation(x, per_dim=True)
    assert per_dim.shape == (3,)
    constant = torch.cat([x, torch.ones(n, steps, 1, dtype=torch.double)], dim=-1)
    assert torch.isnan(temporal_correlation(constant, per_dim=True)[3])  # constant pixel left out
    torch.testing.assert_close(temporal_correlation(constant), temporal_correlation(x))
    with pytest.raises(ValueError, match="at least 2 time steps"):
        temporal_correlation(x[:, :1])


def test_flow_observation_log_prob_is_base_minus_log_scale():
    torch.manual_seed(6)
    base = dist.Normal(torch.randn(4, 2, 3, 3), torch.rand(4, 2, 3, 3) + 0.5).to_event(3)
    shift = torch.randn(4, 2, 3, 3)
    scale = torch.rand(4, 2, 3, 3) + 0.2
    obs = flow_observation(base, shift, scale)
    x = torch.randn(4, 2, 3, 3)
    y = (x - shift) / scale
    expected = base.log_prob(y) - scale.log().sum((-3, -2, -1))
    torch.testing.assert_close(obs.log_prob(x), expected)
    assert obs.batch_shape == (4,) and obs.event_shape == (2, 3, 3)
    with pytest.raises(ValueError, match="event shape"):
        flow_observation(base, shift[..., :2], scale[..., :2])


def test_flow_observation_in_a_latent_variable_step():
    # one observe site per step, whose log_prob already includes -sum log sigma
    torch.manual_seed(7)
    flow = AffineAutoregressiveFlow((3,), hidden=8)
    _randomise(flow)
    xs = torch.randn(5, 4, 3)
    mu, sigma = flow.shift_and_scale_all(xs)

    def model():
        with pyro.plate("seq", 5):
            for t in range(4):
                z = pyro.sample(f"z_{t}", dist.Normal(torch.zeros(5, 3), 1.0).to_event(1))
                pyro.sample(
                    f"x_{t}", flow_observation(dist.Normal(z, 1.0).to_event(1), mu[:, t], sigma[:, t]), obs=xs[:, t]
                )

    trace = pyro.poutine.trace(model).get_trace()
    trace.compute_log_prob()
    for t in range(4):
        z = trace.nodes[f"z_{t}"]["value"]
        y = (xs[:, t] - mu[:, t]) / sigma[:, t]
        expected = dist.Normal(z, 1.0).log_prob(y).sum(-1) - sigma[:, t].log().sum(-1)
        torch.testing.assert_close(trace.nodes[f"x_{t}"]["log_prob"], expected)


def test_flow_sequence_model_svi_lowers_loss_and_samples():
    pyro.clear_param_store()
    torch.manual_seed(8)
    x = _second_order_lds(64, 10, 0.3, seed=9).float().expand(64, 10, 2).contiguous()
    model = FlowSequenceModel((2,), num_flows=1, base="learned", window=2, hidden=16)
    svi = SVI(model.model, lambda *a, **k: None, Adam({"lr": 2e-2}), Trace_ELBO())
    first = svi.evaluate_loss(x)
    for _ in range(25):
        svi.step(x)
    last = svi.evaluate_loss(x)
    assert last < 0.5 * first
    torch.testing.assert_close(torch.tensor(last), -model.log_prob(x).sum().detach(), rtol=1e-4, atol=1e-3)
    samples = model.sample(3, 5)
    assert samples.shape == (3, 5, 2) and torch.isfinite(samples).all()


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="window"):
        AffineAutoregressiveFlow((3,), window=0)
    with pytest.raises(ValueError, match="conv"):
        AffineAutoregressiveFlow((3,), network="conv")
    flow = AffineAutoregressiveFlow((3,))
    with pytest.raises(ValueError, match="x must have shape"):
        flow(torch.zeros(2, 4, 5))


def test_plot_flow_frames_writes_png(tmp_path):
    torch.manual_seed(10)
    flow = AffineAutoregressiveFlow((1, 16, 16), network="conv", hidden=4)
    _randomise(flow, 0.1)
    x = torch.rand(2, 6, 1, 16, 16)
    mu, sigma = flow.shift_and_scale_all(x)
    y = (x - mu) / sigma
    path = plot_flow_frames(x[0], mu[0], sigma[0], y[0], tmp_path / "flow.png", num_frames=5, dpi=50)
    assert path == tmp_path / "flow.png"
    image = mpimg.imread(path)
    # 5 columns of 1.6 in, 4 rows of 1.6 in at 50 dpi
    assert image.shape[:2] == (4 * 80, 5 * 80)
    assert image.std() > 0.01  # not a blank canvas
    with pytest.raises(ValueError, match="num_frames"):
        plot_flow_frames(x[0], mu[0], sigma[0], y[0], tmp_path / "bad.png", num_frames=7)
