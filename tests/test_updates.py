"""The update network's input normalisation: the stacked fast path against the per-term modules."""

import io

import pytest
import torch

from pyro_avf.updates import UpdateNetwork, _normalise_run, _same_size_runs


def test_same_size_runs_group_consecutive_terms_of_one_size():
    assert _same_size_runs([5, 5, 5, 5, 88]) == [(0, 4), (4, 5)]
    assert _same_size_runs([1, 1, 3, 3, 4]) == [(0, 1), (1, 2), (2, 4), (4, 5)]  # size 1: signed log, alone
    assert _same_size_runs([3, 4, 3, 4]) == [(0, 1), (1, 2), (2, 3), (3, 4)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_stacked_normalisation_equals_each_term_normalised_alone(dtype):
    torch.manual_seed(0)
    net = UpdateNetwork(6, obs_dim=6, hidden=8).to(dtype)
    for n in net.norms:  # trained-looking affine parameters, different per term
        n.norm.weight.data.normal_()
        n.norm.bias.data.normal_()
    terms = [torch.randn(3, 2, 6, dtype=dtype) * s for s in (1.0, 1e-3, 50.0, 0.2, 3.0)]
    expected = torch.cat([n(t) for n, t in zip(net.norms, terms)], -1)
    got = torch.cat([_normalise_run(list(net.norms)[a:b], terms[a:b]) for a, b in net.norm_runs], -1)
    assert net.norm_runs == [(0, 5)]
    assert got.shape == (3, 2, 5 * 7)
    torch.testing.assert_close(got, expected, rtol=1e-6 if dtype == torch.float32 else 1e-12, atol=1e-6)


def test_stacked_normalisation_passes_gradients_to_every_layer_norm():
    torch.manual_seed(0)
    net = UpdateNetwork(4, hidden=8)
    terms = [torch.randn(2, 4) for _ in range(4)]
    norms = list(net.norms)
    _normalise_run(norms, terms).pow(2).sum().backward()
    grads = [n.norm.weight.grad for n in norms]
    reference = UpdateNetwork(4, hidden=8)
    reference.load_state_dict(net.state_dict())
    torch.cat([n(t) for n, t in zip(reference.norms, terms)], -1).pow(2).sum().backward()
    for got, n in zip(grads, reference.norms):
        torch.testing.assert_close(got, n.norm.weight.grad)


def test_a_network_pickled_before_the_stacked_normalisation_loads_and_gives_the_same_update():
    torch.manual_seed(0)
    net = UpdateNetwork(3, obs_dim=1, hidden=8)
    lam, grads, obs = (torch.randn(2, 3), torch.randn(2, 3)), (torch.randn(2, 3), torch.randn(2, 3)), torch.randn(2, 1)
    expected = net(lam, grads=grads, obs=obs)
    runs = net.norm_runs
    del net.norm_runs  # what a network saved by torch.save before this attribute existed holds
    buffer = io.BytesIO()
    torch.save(net, buffer)
    buffer.seek(0)
    old = torch.load(buffer, weights_only=False)
    assert old.norm_runs == runs == [(0, 4), (4, 5)]
    for got, want in zip(old(lam, grads=grads, obs=obs), expected):
        torch.testing.assert_close(got, want)
