"""Full-covariance step posteriors (``IterativeGuide(posterior="full")``) against closed forms."""

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import pytest
import torch
from torch.distributions import MultivariateNormal, kl_divergence

import pyro_avf
from pyro_avf import AmortizedFilteringELBO, IterativeGuide
from pyro_avf.baselines.kalman import diagonal_gap, expected_step_free_energy, step_optimum
from pyro_avf.models.lgssm import LinearGaussianSSM
from pyro_avf.posterior import has_full_covariance, kl_full_to_diagonal, kl_or_log_ratio, posterior, scale_tril


def _random_lambda(batch, d, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    loc, log_scale = torch.randn(batch + (d,), generator=g), torch.randn(batch + (d,), generator=g) / 2
    lower = torch.randn(batch + (d * (d - 1) // 2,), generator=g) / 2
    return loc.to(dtype), log_scale.to(dtype), lower.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_kl_matches_torch_mvn_kl(dtype):
    loc, log_scale, lower = _random_lambda((5, 2), 4, dtype)
    p_loc, p_scale = torch.randn(5, 2, 4, dtype=dtype), torch.rand(5, 2, 4, dtype=dtype) + 0.3
    q = MultivariateNormal(loc, scale_tril=scale_tril(log_scale, lower))
    p = MultivariateNormal(p_loc, scale_tril=torch.diag_embed(p_scale))
    kl = kl_full_to_diagonal(loc, log_scale, lower, p_loc, p_scale).sum(-1)
    assert kl.dtype == dtype
    torch.testing.assert_close(kl, kl_divergence(q, p))
    prior = dist.Normal(p_loc, p_scale).to_event(1)
    q_site = posterior(loc, log_scale, prior, lower)
    torch.testing.assert_close(kl_or_log_ratio(q_site, prior, q_site.sample(), (loc, log_scale, lower)), kl)


def test_scale_tril_places_the_lower_entries_row_by_row():
    L = scale_tril(torch.zeros(3), torch.tensor([1.0, 2.0, 3.0]))
    assert torch.equal(L, torch.tensor([[1.0, 0.0, 0.0], [1.0, 1.0, 0.0], [2.0, 3.0, 1.0]]))


def test_which_sites_get_full_covariance():
    vec = dist.Normal(torch.zeros(2, 3), 1.0).to_event(1)
    assert has_full_covariance(vec) and has_full_covariance(vec.mask(torch.tensor([True, False])))
    assert not has_full_covariance(vec, "diagonal")
    assert not has_full_covariance(dist.Normal(torch.zeros(3), 1.0))  # scalar events
    assert not has_full_covariance(dist.Normal(torch.zeros(1), 1.0).to_event(1))  # D = 1
    assert not has_full_covariance(dist.LogNormal(torch.zeros(3), 1.0).to_event(1))
    assert not has_full_covariance(dist.Normal(torch.zeros(2, 3), 1.0).to_event(2))  # matrix events
    with pytest.raises(ValueError, match="posterior must be one of"):
        IterativeGuide(lambda: None, posterior="blockwise")


def _gap(ssm, guide, xs):
    """Mean over steps and sequences of F_t(q_λK) - F*_t and of the diagonal family's floor."""
    AmortizedFilteringELBO().loss(ssm.model, guide, xs)
    A, C, Q, R = ssm.A, ssm.C, ssm.Q, ssm.R
    z_prev, gaps, floors = torch.zeros(xs.shape[0], A.shape[0], dtype=xs.dtype), [], []
    for t in range(xs.shape[1]):
        site = guide.trace.nodes[f"z_{t + 1}"]
        lam = [p.detach() for p in site["infer"]["avf_lambda"]]
        L = scale_tril(lam[1], lam[2]) if len(lam) > 2 else torch.diag_embed(lam[1].exp())
        opt = step_optimum(A, C, Q, R, z_prev, xs[:, t])
        gaps.append(expected_step_free_energy(A, C, Q, R, z_prev, xs[:, t], lam[0], q_scale_tril=L) - opt.free_energy)
        floors.append(diagonal_gap(opt.precision))
        z_prev = site["value"].detach()
    return torch.stack(gaps).mean().item(), torch.stack(floors).mean().item()


def test_adam_reaches_the_exact_step_optimum_with_full_covariance():
    ssm = LinearGaussianSSM.random(latent_dim=3, obs_dim=5, seed=0)
    xs, _ = ssm.sample(8, 3, seed=1)
    gaps = {}
    for family in ("diagonal", "full"):
        pyro.set_rng_seed(0)
        guide = IterativeGuide(ssm.model, 300, update="adam", lr=0.2, lr_decay=0.5, num_samples=8, posterior=family)
        gaps[family], floor = _gap(ssm, guide, xs)
    assert floor > 0.1  # the diagonal family's floor is well above the tolerance
    assert 0 <= gaps["full"] < 0.03  # measured 0.017
    assert floor - 0.01 < gaps["diagonal"] < floor + 0.03  # measured floor + 0.010


def test_no_iterations_give_exactly_the_prior():
    ssm = LinearGaussianSSM.random(latent_dim=3, obs_dim=5, seed=0)
    xs, _ = ssm.sample(4, 2, seed=1)
    guide = IterativeGuide(ssm.model, 0, posterior="full")
    trace = poutine.trace(guide).get_trace(xs)
    model_trace = poutine.trace(poutine.replay(ssm.model, trace=trace)).get_trace(xs)
    for t in (1, 2):
        q, prior = trace.nodes[f"z_{t}"]["fn"], model_trace.nodes[f"z_{t}"]["fn"]
        assert isinstance(q, dist.MultivariateNormal)
        torch.testing.assert_close(q.loc, prior.mean)
        torch.testing.assert_close(q.covariance_matrix, torch.diag_embed(prior.variance))
        assert torch.equal(trace.nodes[f"z_{t}"]["infer"]["avf_lambda"][2], torch.zeros(4, 3))
    # with iterations, λ_0 is the prior too: the off-diagonals start at zero
    guide = IterativeGuide(ssm.model, 2, posterior="full")
    guide(xs)
    (lam0,) = guide.last_pass.steps[0].lambdas[0]
    assert len(lam0) == 3 and torch.equal(lam0[2], torch.zeros(4, 3))


@pytest.mark.parametrize("update", ["learned_sgd", "highway", "residual", "sgd", "adam"])
def test_every_update_refines_the_lower_entries(update):
    pyro.clear_param_store()
    ssm = LinearGaussianSSM.random(latent_dim=3, obs_dim=5, seed=0, learnable=True)
    xs, _ = ssm.sample(4, 3, seed=1)
    guide = IterativeGuide(ssm.model, 2, update=update, posterior="full", hidden_size=16)
    svi = pyro.infer.SVI(ssm.model, guide, pyro.optim.Adam({"lr": 1e-3}), AmortizedFilteringELBO())
    for _ in range(2):  # the residual form starts as the identity: its first step trains Δ
        assert torch.isfinite(torch.tensor(svi.step(xs)))
    lam = guide.trace.nodes["z_3"]["infer"]["avf_lambda"]
    assert len(lam) == 3 and lam[2].shape == (4, 3) and lam[2].abs().sum() > 0
    if guide.amortized:  # a fresh guide rebuilds the full-covariance network from its state dict
        fresh = IterativeGuide(ssm.model, 2, update=update, posterior="full", hidden_size=16, name="fresh")
        fresh.load_state_dict(guide.state_dict())
        assert fresh.update_nets["slot0"].lower_dim == 3


def test_float64_works():
    pyro.clear_param_store()
    ssm = LinearGaussianSSM.random(latent_dim=3, obs_dim=5, seed=0).double()
    xs, _ = ssm.sample(4, 3, seed=1)
    guide = IterativeGuide(ssm.model, 3, posterior="full", hidden_size=16)
    svi = pyro.infer.SVI(ssm.model, guide, pyro.optim.Adam({"lr": 1e-3}), AmortizedFilteringELBO())
    svi.step(xs)
    assert all(p.dtype == torch.float64 for p in guide.trace.nodes["z_2"]["infer"]["avf_lambda"])
    assert guide.trace.nodes["z_2"]["value"].dtype == torch.float64


@pyro_avf.filtering_step
def _masked_step(t, z_prev, x_t, site_mask, event_mask, coordinate_mask):
    prior = dist.Normal(0.5 * z_prev, 1.0)
    prior = (prior if coordinate_mask is None else prior.mask(coordinate_mask)).to_event(1)
    with poutine.mask(mask=site_mask):
        z = pyro.sample(f"z_{t}", prior if event_mask is None else prior.mask(event_mask))
    pyro.sample(f"x_{t}", dist.Normal(z, 0.5).to_event(1), obs=x_t)
    return z


def _masked_model(xs, site_mask=True, event_mask=None, coordinate_mask=None):
    z = xs.new_zeros(xs.shape[0], xs.shape[2])
    with pyro.plate("batch", xs.shape[0], dim=-1):
        for t in range(xs.shape[1]):
            z = _masked_step(t, z, xs[:, t], site_mask, event_mask, coordinate_mask)


@pytest.mark.parametrize("family", ["full", "joint"])
@pytest.mark.parametrize("where", ["poutine", "distribution"])
def test_masked_elements_contribute_zero(where, family):
    xs = torch.randn(3, 2, 4)
    mask = torch.tensor([True, False, True])
    kwargs = {"site_mask": mask} if where == "poutine" else {"event_mask": mask}
    guide = IterativeGuide(_masked_model, 4, update="adam", lr=0.1, posterior=family)
    elbo = AmortizedFilteringELBO()
    elbo.loss(_masked_model, guide, xs, **kwargs)
    for k, step in enumerate(guide.last_pass.steps):
        assert len(step.final[0]) == 3
        assert step.kl[-1][1] == 0 and (step.kl[-1][[0, 2]] > 0).all()
        site = guide.trace.nodes[f"z_{k}"]
        if where == "distribution":  # log q of a masked element is 0, as log p is
            assert site["fn"].log_prob(site["value"])[1] == 0
    assert (elbo.diagnostics["kl"][1] == 0).all()


def test_a_mask_inside_an_event_is_refused():
    xs = torch.randn(3, 2, 4)
    guide = IterativeGuide(_masked_model, 2, update="adam", posterior="full")
    coordinates = torch.tensor([True, False, True, True])
    with pytest.raises(NotImplementedError, match="mask whole events"):
        guide(xs, coordinate_mask=coordinates)
    # a coordinate mask that covers whole events is fine
    guide(xs, coordinate_mask=torch.tensor([[True], [False], [True]]).expand(3, 4))


@pyro_avf.filtering_step
def _mixed_step(t, state, x_t):
    z, s = state
    z = pyro.sample(f"z_{t}", dist.Normal(0.5 * z, 1.0).to_event(1))
    s = pyro.sample(f"s_{t}", dist.LogNormal(s.log(), 0.5).to_event(1))
    u = pyro.sample(f"u_{t}", dist.Normal(torch.zeros(x_t.shape[0]), 1.0))
    pyro.sample(f"x_{t}", dist.Normal(z.sum(-1, keepdim=True) + u[:, None], s).to_event(1), obs=x_t)
    return z, s


def _mixed_model(xs):
    state = (xs.new_zeros(xs.shape[0], 3), xs.new_ones(xs.shape[0], 2))
    with pyro.plate("batch", xs.shape[0], dim=-1):
        for t in range(xs.shape[1]):
            state = _mixed_step(t, state, xs[:, t])


@pytest.mark.parametrize("networks", ["joint", "per_slot"])
def test_other_sites_fall_back_to_the_diagonal_family(networks):
    pyro.clear_param_store()
    xs = torch.randn(4, 3, 2)
    guide = IterativeGuide(_mixed_model, 2, posterior="full", networks=networks, hidden_size=16)
    svi = pyro.infer.SVI(_mixed_model, guide, pyro.optim.Adam({"lr": 1e-3}), AmortizedFilteringELBO())
    svi.step(xs)
    nodes = guide.trace.nodes
    assert [len(nodes[f"{s}_2"]["infer"]["avf_lambda"]) for s in "zsu"] == [3, 2, 2]
    assert isinstance(nodes["z_2"]["fn"], dist.MultivariateNormal)
    assert not isinstance(nodes["s_2"]["fn"], dist.MultivariateNormal)


def test_the_default_stays_diagonal():
    ssm = LinearGaussianSSM.random(latent_dim=3, obs_dim=5, seed=0)
    xs, _ = ssm.sample(4, 2, seed=1)
    guide = IterativeGuide(ssm.model, 2, hidden_size=16)
    guide(xs)
    assert guide.posterior_family == "diagonal"
    assert all(len(lam) == 2 for lam in guide.last_pass.steps[0].final)


def test_online_filtering_and_smc_take_a_full_covariance_guide():
    from pyro_avf.online import OnlineFilter
    from pyro_avf.smc import smc_log_likelihood

    ssm = LinearGaussianSSM.random(latent_dim=3, obs_dim=5, seed=0)
    xs, _ = ssm.sample(2, 3, seed=1)
    guide = IterativeGuide(ssm.model, 2, update="adam", lr=0.1, posterior="full")
    f = OnlineFilter(ssm, guide, predict_steps=1, num_samples=4)
    f.init(batch_size=2, like=xs)
    out = f.step(xs[:, 0])
    assert isinstance(out.posterior["z_1"], dist.MultivariateNormal) and torch.isfinite(out.free_energy).all()
    est = smc_log_likelihood(ssm, guide, xs, num_particles=8, seed=0)
    assert torch.isfinite(est.log_marginal).all()


def test_the_benchmark_runs_at_tiny_sizes(tmp_path):
    import sys
    from pathlib import Path

    import pandas as pd

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import structured

    out = tmp_path / "structured.csv"
    structured.main(["--train-steps", "2", "--T", "3", "--test-sequences", "8", "--smc-sequences", "2", "--seeds", "1",
                     "--timing-rounds", "1", "--out", str(out)])  # fmt: skip
    table = pd.read_csv(out)
    assert table.posterior.tolist() == ["diagonal", "full"]
    assert (table.gap_exact > 0).all() and out.with_suffix(".md").is_file()
