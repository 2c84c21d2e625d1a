"""OnlineFilter: streaming one observation at a time matches the batch filtering pass; predictions are right."""

import pyro
import pyro.distributions as dist
import pytest
import torch

from pyro_avf import AmortizedFilteringELBO, IterativeGuide, filtering_step
from pyro_avf.evaluation import filtering_free_energy
from pyro_avf.models.lgssm import LinearGaussianSSM
from pyro_avf.online import OnlineFilter


def trained_guide(ssm: LinearGaussianSSM, steps: int = 20) -> IterativeGuide:
    guide = IterativeGuide(ssm.model, num_iterations=3, encode_observation=True, hidden_size=32)
    svi = pyro.infer.SVI(ssm.model, guide, pyro.optim.Adam({"lr": 3e-3}), loss=AmortizedFilteringELBO())
    xs, _ = ssm.sample(8, 20, seed=1)
    for _ in range(steps):
        svi.step(xs)
    return guide


def test_streaming_matches_batch_pass():
    ssm = LinearGaussianSSM.random(latent_dim=3, obs_dim=5, seed=0)
    guide = trained_guide(ssm)
    xs, _ = ssm.sample(4, 150, seed=2)  # a long stream

    pyro.set_rng_seed(7)
    batch = filtering_free_energy(ssm.model, guide, xs)

    pyro.set_rng_seed(7)
    f = OnlineFilter(ssm.stream(), guide)
    f.init(batch_size=4)
    streamed = [f.step(xs[:, t]) for t in range(xs.size(1))]

    assert [s.t for s in streamed[:3]] == [1, 2, 3]
    for key in ("free_energy", "kl", "reconstruction"):
        got = torch.stack([getattr(s, key) for s in streamed], 1)
        assert got.shape == (4, 150)
        assert torch.allclose(got, batch[key], atol=1e-5, rtol=1e-5), key
    # constant memory: one step record, no graph in the state, no parameter left frozen
    assert guide.last_pass.online.count == 1 and not guide.last_pass.steps
    assert not f.state["carry"].requires_grad
    assert all(p.requires_grad for p in guide.parameters())
    q = streamed[-1].posterior["z_150"]
    assert q.batch_shape == (4,) and q.event_shape == (3,)


def test_posterior_is_prior_with_no_iterations():
    ssm = LinearGaussianSSM.random(latent_dim=2, obs_dim=3, seed=0)
    f = OnlineFilter(ssm.stream(), IterativeGuide(ssm.model, num_iterations=0))
    f.init(batch_size=2)
    out = f.step(torch.zeros(2, 3))
    q = out.posterior["z_1"]
    assert torch.allclose(q.mean, torch.zeros(2, 2))  # prior mean A z_0 = 0
    assert torch.allclose(q.variance, ssm.q.pow(2).expand(2, 2), rtol=1e-5)


@pytest.mark.parametrize("k", [1, 3])
def test_k_step_predictive_matches_linear_gaussian_algebra(k):
    """p(x_{t+k}) for q(z_t) = N(m, diag s²): mean C A^k m, covariance C (A^k S A^kᵀ + Σ_j A^j Q A^jᵀ) Cᵀ + R."""
    ssm = LinearGaussianSSM.random(latent_dim=3, obs_dim=4, seed=3)
    guide = trained_guide(ssm, steps=10)
    xs, _ = ssm.sample(2, 6, seed=4)
    f = OnlineFilter(ssm.stream(), guide, num_samples=8000)
    f.init(batch_size=2)
    for t in range(5):
        f.step(xs[:, t])
    f.predict_steps = k
    out = f.step(xs[:, 5])
    q = out.posterior["z_6"]
    predictive = out.predictive[f"x_{6 + k}"]
    assert isinstance(predictive, dist.MixtureSameFamily)
    assert predictive.batch_shape == (2,) and predictive.event_shape == (4,)

    A, C = ssm.A.double(), ssm.C.double()
    Ak = torch.linalg.matrix_power(A, k)
    m, S = q.mean.double(), torch.diag_embed(q.variance.double())
    state_cov = Ak @ S @ Ak.T + sum(
        torch.linalg.matrix_power(A, j) @ ssm.Q.double() @ torch.linalg.matrix_power(A, j).T for j in range(k)
    )
    mean = m @ Ak.T @ C.T
    var = torch.diagonal(C @ state_cov @ C.T, dim1=-2, dim2=-1) + ssm.r.double() ** 2
    assert torch.allclose(predictive.mean.double(), mean, atol=0.05 * var.sqrt().max().item())
    assert torch.allclose(predictive.variance.double(), var, rtol=0.06)
    assert predictive.log_prob(xs[:, 0]).shape == (2,)


def test_predicting_does_not_change_filtering():
    ssm = LinearGaussianSSM.random(latent_dim=2, obs_dim=3, seed=0)
    guide = IterativeGuide(ssm.model, num_iterations=2, hidden_size=16)
    xs, _ = ssm.sample(2, 5, seed=1)
    filtering_free_energy(ssm.model, guide, xs)  # creates the update networks (their initialisation draws)
    runs = []
    for predict_steps in (0, 2):
        pyro.set_rng_seed(3)
        f = OnlineFilter(ssm.stream(), guide, predict_steps=predict_steps, num_samples=10)
        f.init(batch_size=2)
        runs.append(torch.stack([f.step(xs[:, t]).free_energy for t in range(5)]))
    assert torch.equal(runs[0], runs[1])


class _TwoSteps:
    def __init__(self, step):
        self.step_fn = step

    def init(self, state):
        state["z"] = torch.zeros(1, 2)

    def step(self, state, x_t):
        with pyro.plate("s", 1):
            state["z"] = self.step_fn(0, state["z"], x_t)
            state["z"] = self.step_fn(1, state["z"], x_t)


@filtering_step
def _step(t, z_prev, x_t):
    z = pyro.sample(f"z_{t}", dist.Normal(z_prev, 1.0).to_event(1))
    pyro.sample(f"x_{t}", dist.Normal(z, 1.0).to_event(1), obs=x_t)
    return z


def _model(xs):
    pass


def test_clear_errors():
    ssm = LinearGaussianSSM.random(latent_dim=2, obs_dim=3, seed=0)
    guide = IterativeGuide(ssm.model, num_iterations=1)
    with pytest.raises(TypeError, match="IterativeGuide"):
        OnlineFilter(ssm.stream(), lambda xs: None)
    with pytest.raises(TypeError, match="init"):
        OnlineFilter(object(), guide)
    with pytest.raises(ValueError, match="predict_steps"):
        OnlineFilter(ssm.stream(), guide, predict_steps=-1)
    f = OnlineFilter(ssm.stream(), guide)
    with pytest.raises(RuntimeError, match="before init"):
        f.step(torch.zeros(1, 3))
    f.init(batch_size=1)
    with pytest.raises(RuntimeError, match="at least one step"):
        f.predict(1)
    with pytest.raises(ValueError, match="x_t must have shape"):
        f.step(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="NaN"):
        f.step(torch.tensor([[0.0, float("nan"), 0.0]]))
    twice = OnlineFilter(_TwoSteps(_step), IterativeGuide(_model, num_iterations=1))
    twice.init()
    with pytest.raises(RuntimeError, match="exactly once"):
        twice.step(torch.zeros(1, 2))


def test_srnn_stream_matches_the_batch_pass_and_predicts():
    from pyro_avf.models.srnn import SRNN, SRNNStream

    srnn = SRNN.music(d_dim=12, a_dim=12, hidden_dim=12, z_dim=4)
    guide = IterativeGuide(srnn.model, num_iterations=2, hidden_size=16)
    xs = (torch.rand(3, 40, 88) < 0.1).float()
    filtering_free_energy(srnn.model, guide, xs[:, :2])  # creates the update networks
    pyro.set_rng_seed(5)
    batch = filtering_free_energy(srnn.model, guide, xs)
    pyro.set_rng_seed(5)
    f = OnlineFilter(SRNNStream(srnn), guide, num_samples=7)
    f.init(batch_size=3)
    streamed = torch.stack([f.step(xs[:, t]).free_energy for t in range(40)], 1)
    assert torch.allclose(streamed, batch["free_energy"], atol=1e-4, rtol=1e-4)  # LSTM stepwise vs whole
    predictive = f.predict(2)["x_42"]
    assert predictive.batch_shape == (3,) and predictive.event_shape == (88,)
    assert ((predictive.mean >= 0) & (predictive.mean <= 1)).all()


def test_cli_evaluation_streams_padded_songs_like_the_batch_pass():
    from pyro_avf.models.srnn import SRNN
    from pyro_avf.online import streamed_free_energy

    srnn = SRNN.music(d_dim=12, a_dim=12, hidden_dim=12, z_dim=4)
    guide = IterativeGuide(srnn.model, num_iterations=2, hidden_size=16)
    xs = (torch.rand(3, 30, 88) < 0.1).float()
    mask = torch.ones(3, 30, dtype=torch.bool)
    mask[1, 18:] = False  # a shorter song, padded
    mask[2, 25:] = False
    xs[~mask] = 0.0
    filtering_free_energy(srnn.model, guide, xs[:, :2])  # creates the update networks
    pyro.set_rng_seed(3)
    batch = filtering_free_energy(srnn.model, guide, xs, mask)
    pyro.set_rng_seed(3)
    total, steps = streamed_free_energy(srnn, guide, xs, mask)
    assert steps == mask.sum().item() == 30 + 18 + 25
    expected = (batch["free_energy"] * (batch["observed"] & mask)).sum().item()
    assert total == pytest.approx(expected, rel=1e-4)
    assert total > 0 and guide.online is False  # the filter restores the guide's training mode


def test_cli_evaluation_streams_srnns_own_filter_like_the_replayed_pass():
    from pyro_avf.models.srnn import SRNN
    from pyro_avf.online import streamed_free_energy

    srnn = SRNN.music(d_dim=12, a_dim=12, hidden_dim=12, z_dim=4)
    xs = (torch.rand(3, 30, 88) < 0.1).float()
    mask = torch.ones(3, 30, dtype=torch.bool)
    mask[0, 12:] = False
    xs[~mask] = 0.0
    pyro.set_rng_seed(4)
    batch = filtering_free_energy(srnn.model, srnn.guide, xs, mask)
    pyro.set_rng_seed(4)
    total, steps = streamed_free_energy(srnn, srnn.guide, xs, mask)
    assert steps == mask.sum().item() == 12 + 30 + 30
    expected = (batch["free_energy"] * (batch["observed"] & mask)).sum().item()
    assert total == pytest.approx(expected, rel=1e-4)


def test_streamed_baseline_refuses_bad_observations():
    from pyro_avf.models.srnn import SRNN, SRNNStream

    stream = SRNNStream(SRNN.music(d_dim=8, a_dim=8, hidden_dim=8, z_dim=4))
    state: dict = {}
    stream.init(state, batch_size=2)
    with pytest.raises(ValueError, match="x_t must have shape"):
        stream.baseline_traces(state, torch.zeros(3, 88))
    bad = torch.zeros(2, 88)
    bad[0, 5] = float("nan")
    with pytest.raises(ValueError):
        stream.baseline_traces(state, bad)
    assert state["t"] == 0  # nothing advanced on refused input


@filtering_step
def volatility_step(t, h_prev, y):
    h = pyro.sample(f"h_{t}", dist.Normal(0.95 * h_prev, 0.3))
    pyro.sample(f"y_{t}", dist.Normal(0.0, (h / 2).exp()), obs=y)
    return h


class PlateFromData:
    """SMCFilter-shaped, with the plate's size taken from the observation: it cannot simulate (y is None)."""

    def init(self, state, batch_size=3):
        state["h"], state["t"] = torch.zeros(batch_size), 0

    def step(self, state, y):
        with pyro.plate("series", y.shape[0]):
            state["h"] = volatility_step(state["t"], state["h"], y)
        state["t"] += 1


def test_a_model_that_cannot_simulate_is_told_why_when_predicting():
    def model(ys):
        with pyro.plate("series", ys.shape[0]):
            h = torch.zeros(ys.shape[0])
            for t in pyro.markov(range(ys.shape[1])):
                h = volatility_step(t, h, ys[:, t])

    guide = IterativeGuide(model, num_iterations=1, hidden_size=8)
    ys = torch.randn(3, 4)
    f = OnlineFilter(PlateFromData(), guide)
    f.init(batch_size=3)
    assert f.step(ys[:, 0]).free_energy.shape == (3,)  # filtering alone works
    f = OnlineFilter(PlateFromData(), guide, predict_steps=1, num_samples=4)
    f.init(batch_size=3)
    with pytest.raises(RuntimeError, match=r"model.step\(state, None\), which failed: AttributeError.*accept None"):
        f.step(ys[:, 0])
