"""Deep sequence models (SRNN, VRNN, DMM): traces, baseline-guide training on real JSB chorales, masking,
Gaussian output, input validation, and the filtering step running unchanged without a handler."""

from pathlib import Path

import numpy as np
import pyro
import pyro.poutine as poutine
import pytest
import torch
from pyro.infer import SVI, Trace_ELBO
from pyro.optim import Adam
from pyro.poutine.util import site_is_subsample

from pyro_avf.models.dmm import DMM
from pyro_avf.models.srnn import SRNN
from pyro_avf.models.vrnn import VRNN
from pyro_avf.step import is_filtering_step

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "polyphonic" / "jsb_chorales.npz"
Z_DIM = 4
SMALL = {
    "srnn": lambda **kw: SRNN(d_dim=16, z_dim=Z_DIM, a_dim=16, hidden_dim=32, **kw),
    "vrnn": lambda **kw: VRNN(h_dim=16, z_dim=Z_DIM, phi_dim=16, hidden_dim=32, **kw),
    "dmm": lambda **kw: DMM(z_dim=Z_DIM, emission_dim=16, transition_dim=16, rnn_dim=16, **kw),
}
NAMES = list(SMALL)


def jsb(n: int = 16, steps: int = 25) -> torch.Tensor:
    with np.load(DATA, allow_pickle=False) as data:
        return torch.from_numpy(data["x_train"][:n, :steps].copy())


def traces(m, xs, mask=None):
    """Guide trace and the model trace replayed on its latent values."""
    guide_tr = poutine.trace(m.guide).get_trace(xs, mask)
    model_tr = poutine.trace(poutine.replay(m.model, trace=guide_tr)).get_trace(xs, mask)
    return guide_tr, model_tr


def sites(tr, observed):
    return {
        n: s
        for n, s in tr.nodes.items()
        if s["type"] == "sample" and s["is_observed"] == observed and not site_is_subsample(s)
    }


@pytest.mark.parametrize("name", NAMES)
def test_model_and_guide_sites_match_in_name_and_shape(name):
    m, xs = SMALL[name](), jsb(3, 6)
    guide_tr, model_tr = traces(m, xs)
    latent = sites(model_tr, observed=False)
    assert list(latent) == list(sites(guide_tr, observed=False)) == [f"z_{t}" for t in range(1, 7)]
    for n, site in latent.items():
        q = guide_tr.nodes[n]["fn"]
        assert site["fn"].batch_shape == q.batch_shape == (3,)
        assert site["fn"].event_shape == q.event_shape == (Z_DIM,)
        assert site["value"].shape == guide_tr.nodes[n]["value"].shape == (3, Z_DIM)
    obs = sites(model_tr, observed=True)
    assert list(obs) == [f"x_{t}" for t in range(1, 7)]
    assert all(s["fn"].batch_shape == (3,) and s["fn"].event_shape == (88,) for s in obs.values())
    assert is_filtering_step(type(m).step)


@pytest.mark.parametrize("name", NAMES)
def test_baseline_guide_training_lowers_loss_and_moves_both_parameter_sets(name):
    m, xs = SMALL[name](), jsb()
    svi = SVI(m.model, m.guide, Adam({"lr": 0.01}), Trace_ELBO())
    svi.step(xs)  # registers the parameters
    store = pyro.get_param_store()
    before = {k: v.detach().clone() for k, v in store.items()}
    losses = [svi.step(xs) / xs[..., 0].numel() for _ in range(30)]  # nats per step
    assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:5]), losses  # about 55 -> 12 nats per step
    moved = {k for k, v in store.items() if not torch.equal(v, before[k])}
    assert any(k.startswith(f"{name}$$$") for k in moved)
    assert any(k.startswith(f"{name}_guide$$$") for k in moved)
    assert all(k.split("$$$")[0] in (name, f"{name}_guide") for k in store.keys())


@pytest.mark.parametrize("name", NAMES)
def test_masked_padding_contributes_nothing(name):
    m, xs = SMALL[name](), jsb(4, 8)
    mask = torch.ones(4, 8, dtype=torch.bool)
    mask[:, 5:] = False
    garbage = xs.clone()
    garbage[:, 5:] = torch.bernoulli(torch.full((4, 3, 88), 0.5))
    guide_tr = poutine.trace(m.guide).get_trace(xs, mask)

    def log_joint(x, msk=None):
        return poutine.trace(poutine.replay(m.model, trace=guide_tr)).get_trace(x, msk).log_prob_sum()

    reference = log_joint(xs, mask)
    assert torch.allclose(log_joint(garbage, mask), reference)
    assert torch.allclose(log_joint(xs[:, :5]), reference)  # padding = truncation
    changed = xs.clone()
    changed[:, 4] = 1 - changed[:, 4]
    assert not torch.allclose(log_joint(changed, mask), reference)  # a real step does count

    elbo = Trace_ELBO()
    pyro.set_rng_seed(1)
    padded = elbo.loss(m.model, m.guide, garbage, mask)
    pyro.set_rng_seed(1)
    truncated = elbo.loss(m.model, m.guide, xs[:, :5])
    assert padded == pytest.approx(truncated, rel=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_guide_is_a_filter(name):
    """q(z_t) depends on x_{<=t} only: changing the future leaves earlier guide distributions unchanged."""
    m, xs = SMALL[name](), jsb(2, 8)
    future = xs.clone()
    future[:, 4:] = 1 - future[:, 4:]
    pyro.set_rng_seed(3)
    a = poutine.trace(m.guide).get_trace(xs)
    pyro.set_rng_seed(3)
    b = poutine.trace(m.guide).get_trace(future)
    for t in range(1, 9):
        same = torch.allclose(a.nodes[f"z_{t}"]["fn"].mean, b.nodes[f"z_{t}"]["fn"].mean)
        assert same == (t <= 4), t


def test_srnn_guide_mean_is_residual_on_the_prior_mean():
    m, xs = SMALL["srnn"](), jsb(3, 5)
    with torch.no_grad():
        m.inference.q_net[1].loc.weight.zero_()
        m.inference.q_net[1].loc.bias.zero_()
    guide_tr, model_tr = traces(m, xs)
    for t in range(1, 6):
        prior, q = model_tr.nodes[f"z_{t}"]["fn"], guide_tr.nodes[f"z_{t}"]["fn"]
        assert torch.allclose(q.mean, prior.mean, atol=1e-6)


def test_vrnn_guide_runs_the_model_recurrence_on_its_own_samples():
    m, xs = SMALL["vrnn"](), jsb(3, 5)
    guide_tr, model_tr = traces(m, xs)
    for g, p in zip(guide_tr.nodes["_RETURN"]["value"], model_tr.nodes["_RETURN"]["value"]):
        assert g.shape == (3, 16) and torch.allclose(g, p)


@pytest.mark.parametrize("name", NAMES)
def test_gaussian_output_on_random_data(name):
    m = SMALL[name](x_dim=6, likelihood="gaussian")
    xs = torch.randn(5, 7, 6)
    svi = SVI(m.model, m.guide, Adam({"lr": 0.01}), Trace_ELBO())
    losses = [svi.step(xs) for _ in range(20)]
    assert np.all(np.isfinite(losses)) and np.mean(losses[-5:]) < np.mean(losses[:5])
    _, model_tr = traces(m, xs)
    x1 = model_tr.nodes["x_1"]["fn"].base_dist
    assert isinstance(x1, torch.distributions.Normal) and x1.scale.shape == (5, 6) and (x1.scale > 0).all()


def test_named_constructors():
    music, speech = SRNN.music(), SRNN.speech(d_dim=8, a_dim=8, hidden_dim=8)
    assert (music.x_dim, music.z_dim, music.likelihood) == (88, 100, "bernoulli")
    assert music.generative.rnn.hidden_size == 300
    assert (speech.x_dim, speech.z_dim, speech.likelihood) == (200, 256, "gaussian")
    vrnn = VRNN.speech(h_dim=8, phi_dim=8, hidden_dim=8, n_layers=1)
    assert (vrnn.x_dim, vrnn.likelihood) == (200, "gaussian")


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize(
    "xs, mask, message",
    [
        (torch.zeros(2, 3, 5), None, "shape"),
        (torch.zeros(2, 3), None, "shape"),
        (torch.zeros(2, 3, 88, dtype=torch.long), None, "floating"),
        (torch.full((2, 3, 88), float("nan")), None, "NaN"),
        (torch.full((2, 3, 88), 0.5), None, "binary"),
        (torch.zeros(2, 3, 88), torch.ones(2, 4, dtype=torch.bool), "mask"),
        (torch.zeros(2, 3, 88), torch.ones(2, 3), "bool"),
    ],
)
def test_bad_input_raises(name, xs, mask, message):
    m = SMALL[name]()
    for fn in (m.model, m.guide):
        with pytest.raises(ValueError, match=message):
            fn(xs, mask)


@pytest.mark.parametrize("name", NAMES)
def test_bad_constructor_arguments_raise(name):
    with pytest.raises(ValueError, match="likelihood"):
        SMALL[name](likelihood="poisson")
    with pytest.raises(ValueError, match="x_dim"):
        SMALL[name](x_dim=0)


@pytest.mark.filterwarnings("ignore:trying to observe a value outside of inference")
@pytest.mark.parametrize("name", NAMES)
def test_filtering_step_runs_unchanged_without_a_handler(name):
    m, xs = SMALL[name](), jsb(3, 4)
    out = m.model(xs)  # no handler at all: pyro.sample just samples
    state = out if isinstance(out, tuple) else (out,)
    assert all(s.shape[0] == 3 and torch.isfinite(s).all() for s in state)
    args = {
        "srnn": (torch.zeros(3, Z_DIM), torch.zeros(3, 16)),
        "vrnn": (torch.zeros(3, 16),),  # h_{t-1}
        "dmm": (torch.zeros(3, Z_DIM),),
    }[name]
    pyro.set_rng_seed(5)
    marked = m.step(1, *args, xs[:, 0])
    pyro.set_rng_seed(5)
    plain = type(m).step.__wrapped__(m, 1, *args, xs[:, 0])
    for a, b in zip(
        marked if isinstance(marked, tuple) else (marked,), plain if isinstance(plain, tuple) else (plain,)
    ):
        assert torch.equal(a, b)
