"""SVG (learned prior) and the small SLVM with an optional 1-AF likelihood: traces, the flow log joint,
training with IterativeGuide (and SVG's own filter), and the posterior's start at the prior."""

from pathlib import Path

import pyro
import pytest
import torch
from pyro import poutine
from pyro.infer import SVI, Trace_ELBO

from data_loaders.moving_mnist import dequantize, moving_mnist_splits
from pyro_avf import AmortizedFilteringELBO, IterativeGuide
from pyro_avf.flows import AffineAutoregressiveFlow
from pyro_avf.models.slvm import SLVM
from pyro_avf.models.svg import SVG

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
FRAME = (1, 16, 16)


@pytest.fixture(scope="module")
def videos() -> torch.Tensor:
    """Four real Moving MNIST sequences, 4 frames of 16x16, dequantized to (0, 1): (4, 4, 1, 16, 16)."""
    train, _ = moving_mnist_splits(DATA / "mnist", num_train=4, num_test=1, frame_size=16, num_frames=4,
                                   num_digits=1, as_uint8=True)  # fmt: skip
    u8 = torch.stack([train[i] for i in range(4)])
    return dequantize(u8, generator=torch.Generator().manual_seed(0))


def _randomise(module: torch.nn.Module, scale: float = 0.1) -> None:
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0.0, scale)


def _sites(trace):
    return {n: s for n, s in trace.nodes.items() if s["type"] == "sample" and n != "sequences"}


def _small_svg() -> SVG:
    return SVG(FRAME, g_dim=16, z_dim=4, rnn_size=16, nf=4)


def test_svg_model_and_guide_traces(videos):
    svg = _small_svg()
    model_sites = _sites(poutine.trace(svg.model).get_trace(videos))
    guide_sites = _sites(poutine.trace(svg.guide).get_trace(videos))
    assert list(model_sites) == [f"{k}_{t}" for t in range(1, 5) for k in ("z", "x")]
    assert list(guide_sites) == [f"z_{t}" for t in range(1, 5)]
    for t in range(1, 5):
        assert model_sites[f"z_{t}"]["value"].shape == (4, 4)
        assert model_sites[f"x_{t}"]["is_observed"] and model_sites[f"x_{t}"]["value"].shape == (4, *FRAME)
        assert model_sites[f"x_{t}"]["fn"].event_shape == FRAME
        assert guide_sites[f"z_{t}"]["fn"].batch_shape == (4,) and guide_sites[f"z_{t}"]["fn"].event_shape == (4,)
    loc = model_sites["x_1"]["fn"].base_dist.loc
    assert ((loc > 0) & (loc < 1)).all()  # sigmoid mean


@pytest.mark.parametrize("frame_shape", [(5,), FRAME])
@pytest.mark.parametrize("with_flow", [False, True])
def test_slvm_trace_shapes(frame_shape, with_flow):
    torch.manual_seed(0)
    flow = AffineAutoregressiveFlow(frame_shape, network="fc" if len(frame_shape) == 1 else "conv", hidden=4)
    slvm = SLVM(frame_shape, z_dim=3, d_dim=8, e_dim=8, hidden=8, nf=4, flow=flow if with_flow else None)
    xs = torch.rand(2, 4, *frame_shape)
    sites = _sites(poutine.trace(slvm.model).get_trace(xs))
    assert list(sites) == [f"{k}_{t}" for t in range(1, 5) for k in ("z", "x")]
    for t in range(1, 5):
        assert sites[f"z_{t}"]["value"].shape == (2, 3)
        assert sites[f"x_{t}"]["fn"].batch_shape == (2,) and sites[f"x_{t}"]["fn"].event_shape == frame_shape
        assert sites[f"x_{t}"]["fn"].log_prob(xs[:, t - 1]).shape == (2,)


@pytest.mark.parametrize("frame_shape", [(5,), FRAME])
def test_flow_slvm_log_joint_is_base_on_y_minus_log_sigma(frame_shape):
    """log p(x, z) = log p_base(y, z) - Σ_{t,d} log σ_t,d with y = (x - μ(x_<t)) / σ(x_<t), same z."""
    torch.manual_seed(1)
    network = "fc" if len(frame_shape) == 1 else "conv"
    flow = AffineAutoregressiveFlow(frame_shape, window=2, network=network, hidden=6, init_identity=False)
    _randomise(flow, 0.3)
    with_flow = SLVM(frame_shape, z_dim=3, d_dim=8, e_dim=8, hidden=8, nf=4, flow=flow)
    base = SLVM(frame_shape, z_dim=3, d_dim=8, e_dim=8, hidden=8, nf=4)
    base.generative.load_state_dict(with_flow.generative.state_dict())
    xs = torch.rand(3, 5, *frame_shape)
    flow_trace = poutine.trace(with_flow.model).get_trace(xs)
    zs = {n: s["value"] for n, s in _sites(flow_trace).items() if not s["is_observed"]}
    mu, sigma = flow.shift_and_scale_all(xs)
    ys = (xs - mu) / sigma
    assert (sigma - 1).abs().max() > 0.05  # the flow really rescales
    base_trace = poutine.trace(poutine.condition(base.model, data=zs)).get_trace(ys)
    expected = base_trace.log_prob_sum() - sigma.log().sum()
    torch.testing.assert_close(flow_trace.log_prob_sum(), expected, rtol=1e-5, atol=1e-3)


def _assert_zero(kl: torch.Tensor) -> None:
    """KL(q || p) = 0 up to rounding: q's scale is exp(log σ_p), which may differ from σ_p in the last bit."""
    torch.testing.assert_close(kl, torch.zeros_like(kl), atol=1e-10, rtol=0)


def _fit(svi: SVI, xs: torch.Tensor, steps: int) -> tuple[float, float]:
    """Mean loss of the first 3 and last 3 of ``steps`` SVI steps on one batch."""
    losses = [svi.step(xs) for _ in range(steps)]
    return sum(losses[:3]) / 3, sum(losses[-3:]) / 3


def test_flow_slvm_trains_with_iterative_guide(videos):
    flow = AffineAutoregressiveFlow(FRAME, network="conv", hidden=4)
    slvm = SLVM(FRAME, z_dim=4, d_dim=16, e_dim=16, hidden=16, nf=4, flow=flow)
    guide = IterativeGuide(slvm.model, num_iterations=1, hidden_size=32)
    elbo = AmortizedFilteringELBO()
    first, last = _fit(SVI(slvm.model, guide, pyro.optim.Adam({"lr": 3e-3}), elbo), videos, 12)
    assert last < first - 0.1 * abs(first)
    kl = elbo.diagnostics["kl"]
    assert kl.shape == (4, 4, 2)
    _assert_zero(kl[..., 0])  # iteration 0 is the prior
    assert any(n.startswith("slvm_flow") for n in pyro.get_param_store().keys())  # the flow is trained too


@pytest.mark.parametrize("guide_kind", ["iterative", "baseline"])
def test_svg_trains(videos, guide_kind):
    svg = _small_svg()
    if guide_kind == "iterative":
        guide, elbo = IterativeGuide(svg.model, num_iterations=1, hidden_size=32), AmortizedFilteringELBO()
    else:
        guide, elbo = svg.guide, Trace_ELBO()
    first, last = _fit(SVI(svg.model, guide, pyro.optim.Adam({"lr": 1e-2}), elbo), videos, 12)
    assert last < first - 0.1 * abs(first)
    if guide_kind == "iterative":
        _assert_zero(elbo.diagnostics["kl"][..., 0])
        assert (elbo.diagnostics["kl"][..., 1] > 0).any()  # the update moved the posterior off the prior
    else:
        assert any(n.startswith("svg_guide") for n in pyro.get_param_store().keys())


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="power of two"):
        SVG((1, 24, 24))
    with pytest.raises(ValueError, match="square images"):
        SVG((1, 16, 32))
    with pytest.raises(ValueError, match=r"xs must have shape \(batch, time, 1, 16, 16\)"):
        _small_svg().model(torch.rand(2, 3, 1, 8, 8))
    with pytest.raises(ValueError, match="flow frame shape"):
        SLVM((4,), flow=AffineAutoregressiveFlow((5,)))
    with pytest.raises(TypeError, match="AffineAutoregressiveFlow"):
        SLVM((4,), flow=torch.nn.Linear(4, 4))
    with pytest.raises(ValueError, match="NaN"):
        SLVM((4,)).model(torch.full((1, 2, 4), float("nan")))
