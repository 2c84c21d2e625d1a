"""Streaming any model with a marked step: every reference model follows the step-model protocol
(pyro_avf.transition), OnlineFilter runs it one observation at a time with the batch pass's numbers, memory
stays flat in the length of the stream, and a model without the protocol is refused by name."""

import gc
from pathlib import Path

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from torch.utils._pytree import tree_leaves

from data_loaders.moving_mnist import dequantize, moving_mnist_splits
from pyro_avf import AmortizedFilteringELBO, IterativeGuide, filtering_step
from pyro_avf.evaluation import filtering_free_energy
from pyro_avf.flows import AffineAutoregressiveFlow
from pyro_avf.models import LinearGaussianSSM, StochasticVolatility, TwoLevelSSM
from pyro_avf.models._layers import recurrent_step
from pyro_avf.models.dmm import DMM
from pyro_avf.models.slvm import SLVM
from pyro_avf.models.srnn import SRNN, SRNNStream
from pyro_avf.models.svg import SVG
from pyro_avf.models.vrnn import VRNN
from pyro_avf.online import OnlineFilter, StepStream, as_stream, streamed_free_energy
from pyro_avf.transition import missing_members, run_steps

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
FRAME = (1, 16, 16)
T = 12
LENGTHS = (T, T - 5, T - 3)  # two shorter sequences, padded


def small(name: str):
    """A small instance of each reference model and the kind of data it scores."""
    flow = AffineAutoregressiveFlow(FRAME, window=2, network="conv", hidden=4, init_identity=False)
    return {
        "dmm": lambda: (DMM(z_dim=4, emission_dim=16, transition_dim=16, rnn_dim=16), "music"),
        "vrnn": lambda: (VRNN(h_dim=16, z_dim=4, phi_dim=16, hidden_dim=16), "music"),
        "srnn": lambda: (SRNN(d_dim=16, z_dim=4, a_dim=16, hidden_dim=16), "music"),
        "svg": lambda: (SVG(FRAME, g_dim=16, z_dim=4, rnn_size=16, nf=4), "video"),
        "slvm_flow": lambda: (SLVM(FRAME, z_dim=3, d_dim=8, e_dim=8, hidden=8, nf=4, flow=flow), "video"),
        "lgssm": lambda: (LinearGaussianSSM.random(latent_dim=3, obs_dim=5, seed=0), "lgssm"),
        "two_level": lambda: (TwoLevelSSM.random(seed=0), "two_level"),
        "volatility": lambda: (StochasticVolatility(dim=2, positive_latent=True), "volatility"),
    }[name]()


def padded_batch(model, kind: str):
    """Three real (or model-drawn) sequences of T steps, the last two padded with garbage after their length."""
    g = torch.Generator().manual_seed(0)
    if kind == "music":
        with np.load(DATA / "polyphonic" / "jsb_chorales.npz", allow_pickle=False) as data:
            xs = torch.from_numpy(data["x_train"][:3, :T].copy())
        garbage = torch.bernoulli(torch.full(xs.shape, 0.5), generator=g)
    elif kind == "video":
        train, _ = moving_mnist_splits(DATA / "mnist", num_train=3, num_test=1, frame_size=16, num_frames=T,
                                       num_digits=1, as_uint8=True)  # fmt: skip
        xs = dequantize(torch.stack([train[i] for i in range(3)]), generator=g)
        garbage = torch.rand(xs.shape, generator=g)
    else:
        xs = model.sample(3, T, seed=1)[0]
        garbage = 10 * torch.rand(xs.shape, generator=g)
    mask = torch.arange(T) < torch.tensor(LENGTHS)[:, None]
    xs = torch.where(mask.reshape(3, T, *[1] * (xs.dim() - 2)), xs, garbage)
    return xs, mask


def briefly_trained(model, xs) -> IterativeGuide:
    guide = IterativeGuide(model.model, num_iterations=2, hidden_size=16)
    svi = pyro.infer.SVI(model.model, guide, pyro.optim.Adam({"lr": 1e-2}), loss=AmortizedFilteringELBO())
    for _ in range(2):
        svi.step(xs)
    return guide


@pytest.mark.parametrize(
    "name", ["dmm", "vrnn", "srnn", "svg", "slvm_flow", "lgssm", "two_level", "volatility"]
)  # fmt: skip
def test_streamed_evaluation_equals_the_batch_pass(name):
    model, kind = small(name)
    assert not missing_members(model)
    xs, mask = padded_batch(model, kind)
    guide = briefly_trained(model, xs[:, :4])

    pyro.set_rng_seed(11)
    batch = filtering_free_energy(model.model, guide, xs, mask)
    real = batch["observed"] & mask
    expected = (batch["free_energy"] * real).sum(1).double()

    rng = torch.get_rng_state()
    total, count = streamed_free_energy(model, guide, xs, mask, seed=11, per_sequence=True)
    assert torch.equal(torch.get_rng_state(), rng)  # the seeded pass leaves the caller's random state alone
    assert count.tolist() == list(LENGTHS)
    torch.testing.assert_close(total, expected, rtol=1e-5, atol=1e-5)
    summed, steps = streamed_free_energy(model, guide, xs, mask, seed=11)
    assert steps == sum(LENGTHS) and summed == pytest.approx(expected.sum().item(), rel=1e-5)

    pyro.set_rng_seed(11)  # step by step, every term of every step, padding included
    f = OnlineFilter(model, guide)
    f.init(batch_size=3)
    outs = [f.step(xs[:, t], mask[:, t]) for t in range(T)]
    for key in ("free_energy", "kl", "reconstruction", "observed"):
        torch.testing.assert_close(torch.stack([getattr(o, key) for o in outs], 1), batch[key], rtol=1e-5, atol=1e-5)
    assert not torch.stack([o.observed for o in outs], 1)[~mask].any()  # padding observes nothing
    q = outs[-1].posterior
    assert list(q) == [n for n in q if n.endswith(f"_{T}")] and all(p.batch_shape == (3,) for p in q.values())


def test_stepwise_layers_match_the_whole_sequence_layers():
    """The deterministic layers advanced one step at a time (what advance() runs) give the numbers of the same
    layers run over the whole sequence (what the baseline guides and benchmarks/plain_torch_srnn_avf.py use)."""
    torch.manual_seed(0)
    xs = (torch.rand(3, 30, 88) < 0.2).float()
    gen = SRNN(d_dim=16, z_dim=4, a_dim=16, hidden_dim=16).generative
    state, x_prev, ds = (xs.new_zeros(3, 16), xs.new_zeros(3, 16)), xs.new_zeros(3, 88), []
    for t in range(30):
        state, x_prev = gen.recur(x_prev, state), xs[:, t]
        ds.append(state[0])
    torch.testing.assert_close(torch.stack(ds, 1), gen.deterministic(xs), rtol=1e-5, atol=1e-6)

    frames = torch.rand(2, 6, *FRAME)
    svg = SVG(FRAME, g_dim=16, z_dim=4, rnn_size=16, nf=4).generative
    h_all, skips_all = svg.encode_previous(frames)
    loc_all, scale_all = svg.prior(h_all)
    state, x_prev = (frames.new_zeros(2, 16), frames.new_zeros(2, 16)), frames.new_zeros(2, *FRAME)
    for t in range(6):
        h, skips = svg.encoder(x_prev)
        loc, scale, state = svg.prior.step(h, state)
        torch.testing.assert_close(h, h_all[:, t], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(skips[0], skips_all[0][:, t], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close((loc, scale), (loc_all[:, t], scale_all[:, t]), rtol=1e-5, atol=1e-6)
        x_prev = frames[:, t]

    flow = AffineAutoregressiveFlow(FRAME, window=2, network="conv", hidden=4, init_identity=False)
    slvm = SLVM(FRAME, z_dim=3, d_dim=8, e_dim=8, hidden=8, nf=4, flow=flow)
    us, shift_all, scale_all = slvm.transform(frames)
    d_all = slvm.generative.deterministic(us)
    carry = slvm.initial_state(2, frames)
    for t in range(6):  # the carry's window and u_{t-1} as advance() moves them on, x_t observed
        shift, scale = flow.shift_and_scale(carry.window)
        torch.testing.assert_close((shift, scale), (shift_all[:, t], scale_all[:, t]), rtol=1e-5, atol=1e-6)
        d = recurrent_step(slvm.generative.rnn, slvm.generative.encoder(carry.u), carry.d)
        torch.testing.assert_close(d, d_all[:, t], rtol=1e-5, atol=1e-6)
        with pyro.poutine.block(), pyro.plate("sequences", 2):
            carry = slvm.advance(t + 1, carry, frames[:, t])
        torch.testing.assert_close(carry.d, d)


def live_tensors() -> tuple[int, int, int]:
    """Live tensors in this process: how many, the bytes of their distinct storages, and the number of autograd
    graph nodes reachable from them (a graph kept from step to step would grow)."""
    gc.collect()
    count, storages, frontier = 0, {}, []
    for obj in gc.get_objects():
        try:
            if not issubclass(type(obj), torch.Tensor):
                continue
            storage = obj.untyped_storage()
        except Exception:  # objects that cannot be inspected, tensors without storage
            continue
        count += 1
        storages[storage.data_ptr()] = storage.nbytes()
        if obj.grad_fn is not None:
            frontier.append(obj.grad_fn)
    seen = set()
    while frontier:
        node = frontier.pop()
        if node is not None and node not in seen:
            seen.add(node)
            frontier.extend(n for n, _ in node.next_functions)
    return count, sum(storages.values()), len(seen)


@pytest.mark.parametrize("name", ["vrnn", "dmm", "svg"])
def test_memory_is_flat_in_the_length_of_the_stream(name):
    """After 20 and after 200 streamed steps the same tensors are alive (count, bytes) and no autograd graph is
    kept: memory does not grow with the length. Observations are drawn on the fly, one step at a time."""
    model, kind = small(name)
    shape = FRAME if kind == "video" else (88,)
    g = torch.Generator().manual_seed(0)

    def observation() -> torch.Tensor:
        u = torch.rand(2, *shape, generator=g)
        return u if kind == "video" else (u < 0.1).float()

    guide = IterativeGuide(model.model, num_iterations=1, hidden_size=16)
    filtering_free_energy(model.model, guide, torch.stack([observation() for _ in range(2)], 1))  # networks
    f = OnlineFilter(model, guide)
    f.init(batch_size=2)
    seen = {}
    for t in range(1, 201):
        out = f.step(observation())
        if t in (20, 200):
            del out
            seen[t] = live_tensors()
    (n20, bytes20, graph20), (n200, bytes200, graph200) = seen[20], seen[200]
    assert abs(n200 - n20) <= 2, (n20, n200)
    assert abs(bytes200 - bytes20) <= 4096, (bytes20, bytes200)
    assert graph200 == graph20 == 0
    assert f.t == 200 and guide.last_pass.online.count == 1 and not guide.last_pass.steps
    assert all(not v.requires_grad for v in tree_leaves(f.state) if isinstance(v, torch.Tensor))


@pytest.mark.parametrize("name", ["vrnn", "svg"])
def test_predictions_feed_simulated_observations_through_the_carry(name):
    """VRNN's recurrence reads φx(x_t), SVG's next step encodes x_t: k-step predictions simulate x_t and move the
    carry on with it, through the same advance()."""
    model, kind = small(name)
    xs, _ = padded_batch(model, kind)
    guide = IterativeGuide(model.model, num_iterations=1, hidden_size=16)
    filtering_free_energy(model.model, guide, xs[:, :2])
    f = OnlineFilter(model, guide, num_samples=5)
    f.init(batch_size=3)
    for t in range(3):
        f.step(xs[:, t])
    predictive = f.predict(3)["x_6"]
    assert predictive.batch_shape == (3,) and predictive.event_shape == xs.shape[2:]
    assert torch.isfinite(predictive.log_prob(xs[:, 5])).all()
    if kind == "music":
        assert ((predictive.mean >= 0) & (predictive.mean <= 1)).all()


def test_a_drop_in_for_the_training_commands_streamed_evaluation():
    """streamed_free_energy(model, guide, xs, mask) -> (float, float), Σ m F and Σ m: what the training command's
    SRNN-only streamed evaluations computed, for AVF and for SRNN's own filter (its stream's baseline_traces)."""
    srnn, _ = small("srnn")
    assert isinstance(as_stream(srnn), SRNNStream)
    xs, mask = padded_batch(srnn, "music")
    guide = IterativeGuide(srnn.model, num_iterations=2, hidden_size=16)
    filtering_free_energy(srnn.model, guide, xs[:, :2])
    for g in (guide, srnn.guide):
        pyro.set_rng_seed(3)
        out = filtering_free_energy(srnn.model, g, xs, mask)
        expected = (out["free_energy"] * (out["observed"] & mask)).sum().item()
        pyro.set_rng_seed(3)
        total, steps = streamed_free_energy(srnn, g, xs, mask)
        assert isinstance(total, float) and isinstance(steps, float)
        assert steps == sum(LENGTHS) and total == pytest.approx(expected, rel=1e-5)
    assert guide.online is False  # the filter restores the guide's training mode
    dmm, _ = small("dmm")
    with pytest.raises(TypeError, match="baseline_traces"):  # DMM's own guide is not streamed: no baseline_traces
        streamed_free_energy(dmm, dmm.guide, xs, mask)


class _NoAdvance:
    def initial_state(self, batch_size, like):
        return like.new_zeros(batch_size, 2)


class _Silent(_NoAdvance):
    """advance() without the marked step: nothing for the guide to filter."""

    def advance(self, t, carry, x_t, mask_t=None):
        return carry + 1


@filtering_step
def _walk(t, z_prev, x_t):
    z = pyro.sample(f"z_{t}", dist.Normal(z_prev, 1.0).to_event(1))
    pyro.sample(f"x_{t}", dist.Normal(z, 1.0).to_event(1), obs=x_t)
    return z


class _Walk(_NoAdvance):
    """A user's model: the protocol and nothing else (no validate, default plate name)."""

    def advance(self, t, carry, x_t, mask_t=None):
        return _walk(t, carry, x_t)

    def model(self, xs, mask=None):
        return run_steps(self, xs, mask)


def test_any_model_with_the_protocol_streams_and_one_without_is_refused_by_name():
    walk = _Walk()
    guide = IterativeGuide(walk.model, num_iterations=1, hidden_size=8)
    xs = torch.randn(2, 5, 2)
    pyro.set_rng_seed(1)
    batch = filtering_free_energy(walk.model, guide, xs)
    pyro.set_rng_seed(1)
    total, steps = streamed_free_energy(walk, guide, xs)
    assert steps == 10 and total == pytest.approx(batch["free_energy"].sum().item(), rel=1e-5)

    with pytest.raises(TypeError, match=r"object has no initial_state\(batch_size, like\).*no advance.*no init"):
        OnlineFilter(object(), guide)
    with pytest.raises(TypeError, match=r"_NoAdvance cannot be streamed: it has no advance\(t, carry, x_t, mask_t\)"):
        StepStream(_NoAdvance())
    with pytest.raises(TypeError, match=r"has no advance\(t, carry, x_t, mask_t\)"):
        OnlineFilter(_NoAdvance(), guide)
    silent = OnlineFilter(_Silent(), guide)
    silent.init(batch_size=2)
    with pytest.raises(RuntimeError, match=r"advance\(\) must call a @pyro_avf.filtering_step function exactly once"):
        silent.step(torch.zeros(2, 2))


def test_bad_observations_are_refused_before_the_stream_moves():
    dmm, _ = small("dmm")
    guide = IterativeGuide(dmm.model, num_iterations=1, hidden_size=8)
    f = OnlineFilter(dmm, guide)
    f.init(batch_size=2)
    with pytest.raises(ValueError, match=r"x_t must have shape \(2, \.\.\.\)"):
        f.step(torch.zeros(3, 88))
    with pytest.raises(ValueError, match=r"x_t of shape \(2, 5\).*xs must have shape \(B, T, 88\)"):
        f.step(torch.zeros(2, 5))
    with pytest.raises(ValueError, match="binary"):
        f.step(torch.full((2, 88), 0.5))
    with pytest.raises(ValueError, match="mask_t must be None or a bool tensor of shape"):
        f.step(torch.zeros(2, 88), torch.ones(2))
    assert f.t == 0 and f.state["t"] == 0
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        f.init(batch_size=0)
    with pytest.raises(ValueError, match=r"mask must be None or a bool tensor of shape \(2, 3\)"):
        streamed_free_energy(dmm, guide, torch.zeros(2, 3, 88), torch.ones(2, 3))


def test_both_normalisations_streamed_and_batched_on_real_songs():
    """Ours divides the total over real steps by their number; the AVF paper's leaves out each song's first step,
    divides by the song's length and averages over songs. Streamed and batch passes agree on both."""
    from pyro_avf.evaluation import FreeEnergy, evaluate
    from pyro_avf.free_energy import SequenceScores
    from pyro_avf.online import streamed_sequence_scores

    model, kind = small("srnn")
    xs, mask = padded_batch(model, kind)
    guide = briefly_trained(model, xs[:, :4])
    pyro.set_rng_seed(5)
    batch = filtering_free_energy(model.model, guide, xs, mask)
    f, real = batch["free_energy"].double(), batch["observed"] & mask
    per_step = (f * real).sum() / real.sum()
    paper = torch.stack([f[n, 1:LENGTHS[n]].sum() / LENGTHS[n] for n in range(3)]).mean()  # t = 0 not scored
    assert paper < per_step - 0.1  # the first step of a song costs more than the average step

    streamed = streamed_sequence_scores(model, guide, xs, mask, seed=5)
    torch.testing.assert_close(streamed.first, f[:, 0], rtol=1e-5, atol=1e-5)
    scored = FreeEnergy.from_scores(streamed)
    assert scored.steps == sum(LENGTHS) and scored.sequences == 3
    assert scored.per_step == pytest.approx(per_step.item(), rel=1e-5)
    assert scored.paper == pytest.approx(paper.item(), rel=1e-5)
    songs = [xs[n, : LENGTHS[n]] for n in range(3)]  # whole data sets, in batches: the same either way
    batched, streamed = (evaluate(model, guide, songs, batch_size=2, stream=s, seed=5) for s in (None, as_stream))
    assert batched.sequences == streamed.sequences == 3 and batched.steps == streamed.steps == sum(LENGTHS)
    assert streamed.per_step == pytest.approx(batched.per_step, rel=1e-5)
    assert streamed.paper == pytest.approx(batched.paper, rel=1e-5)
    # a padded sequence with no real step counts in neither normalisation
    empty = SequenceScores.from_steps(f, real & (torch.arange(3) < 2)[:, None])
    assert empty.steps.tolist() == list(LENGTHS[:2]) + [0] and empty.paper_sum() == pytest.approx(
        sum(f[n, 1 : LENGTHS[n]].sum().item() / LENGTHS[n] for n in range(2)), rel=1e-6)


def test_a_stream_takes_the_update_networks_from_the_param_store(tmp_path):
    """Parameters loaded into Pyro's store before a stream starts are the ones it filters with (the update
    networks are registered once per stream, in OnlineFilter.init, not at every step)."""
    pyro.clear_param_store()
    model, kind = small("lgssm")
    xs, mask = padded_batch(model, kind)
    guide = briefly_trained(model, xs[:, :4])
    saved = streamed_free_energy(model, guide, xs, mask, seed=11)
    pyro.get_param_store().save(tmp_path / "params.pt")
    svi = pyro.infer.SVI(model.model, guide, pyro.optim.Adam({"lr": 1e-1}), loss=AmortizedFilteringELBO())
    for _ in range(3):
        svi.step(xs[:, :4])
    assert streamed_free_energy(model, guide, xs, mask, seed=11)[0] != pytest.approx(saved[0], rel=1e-4)
    pyro.get_param_store().load(tmp_path / "params.pt")
    assert streamed_free_energy(model, guide, xs, mask, seed=11)[0] == pytest.approx(saved[0], rel=1e-6)
