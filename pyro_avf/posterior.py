"""The per-site approximate posterior: a diagonal Normal in the unconstrained space of the site.

For a latent site with support :math:`\\mathcal{S}` and bijection :math:`T: \\mathbb{R}^D \\to \\mathcal{S}`
(``torch.distributions.biject_to``) the guide uses

.. math::

    q_\\lambda(z) = T_\\# \\mathcal{N}(u;\\, \\mu, \\operatorname{diag}\\sigma^2),
    \\qquad \\lambda = (\\mu, \\log\\sigma),

initialised at the prior: :math:`\\mu, \\sigma` are the prior's mean and standard deviation in the
unconstrained space (exact for Normal, LogNormal, Gamma and Beta priors, Monte-Carlo moments otherwise).
"""

from __future__ import annotations

from typing import Optional, Tuple

import pyro.distributions as dist
import torch
from torch.distributions import biject_to
from torch.distributions.transforms import ComposeTransform, IndependentTransform, Transform

NUM_MOMENT_SAMPLES = 256


def unwrap(d: dist.Distribution) -> Tuple[dist.Distribution, int]:
    """Strip ``Independent`` wrappers; return the base distribution and the number of reinterpreted dims."""
    reinterpreted = 0
    while isinstance(d, torch.distributions.Independent):
        reinterpreted += d.reinterpreted_batch_ndims
        d = d.base_dist
    return d, reinterpreted


def _is_identity(t: Transform) -> bool:
    while isinstance(t, IndependentTransform):
        t = t.base_transform
    return isinstance(t, ComposeTransform) and not t.parts


def normal_parameters(prior: dist.Distribution) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
    """``(loc, scale)`` of a prior that is Normal in its unconstrained space (Normal, LogNormal), else None."""
    base, _ = unwrap(prior)
    if type(base) in (dist.Normal, torch.distributions.Normal, dist.LogNormal, torch.distributions.LogNormal):
        shape = prior.batch_shape + prior.event_shape
        return base.loc.expand(shape), base.scale.expand(shape)
    return None


def unconstrained_moments(prior: dist.Distribution) -> Tuple[torch.Tensor, torch.Tensor]:
    """Mean and standard deviation of the prior pushed to the unconstrained space of its support.

    Normal / LogNormal: :math:`(\\mu, \\sigma)`; Gamma(α, β) in log space:
    :math:`(\\psi(\\alpha) - \\log\\beta, \\sqrt{\\psi_1(\\alpha)})`; Beta(a, b) in logit space:
    :math:`(\\psi(a) - \\psi(b), \\sqrt{\\psi_1(a) + \\psi_1(b)})`; otherwise Monte-Carlo moments of
    ``T⁻¹(z)`` with ``z`` drawn from the prior. The result is detached.
    """
    with torch.no_grad():
        params = normal_parameters(prior)
        if params is not None:
            return params[0].clone(), params[1].clone()
        base, _ = unwrap(prior)
        shape = prior.batch_shape + prior.event_shape
        if type(base) in (dist.Gamma, torch.distributions.Gamma):
            a, b = base.concentration, base.rate
            loc, scale = torch.digamma(a) - b.log(), torch.polygamma(1, a).sqrt()
            return loc.expand(shape).clone(), scale.expand(shape).clone()
        if type(base) in (dist.Beta, torch.distributions.Beta):
            a, b = base.concentration1, base.concentration0
            loc = torch.digamma(a) - torch.digamma(b)
            scale = (torch.polygamma(1, a) + torch.polygamma(1, b)).sqrt()
            return loc.expand(shape).clone(), scale.expand(shape).clone()
        samples = prior.sample((NUM_MOMENT_SAMPLES,))
        u = biject_to(prior.support).inv(samples)
        return u.mean(0), u.std(0).clamp_min(1e-3)


def posterior(loc: torch.Tensor, log_scale: torch.Tensor, prior: dist.Distribution) -> dist.Distribution:
    """The guide's distribution for a site: ``Normal(loc, exp(log_scale))`` mapped onto the prior's support."""
    transform = biject_to(prior.support)
    base = dist.Normal(loc, log_scale.exp()).to_event(unconstrained_event_dim(prior))
    if _is_identity(transform):
        return base
    return dist.TransformedDistribution(base, transform)


def kl_or_log_ratio(q: dist.Distribution, prior: dist.Distribution, value: torch.Tensor, q_params=None) -> torch.Tensor:
    """Per-element :math:`D_{KL}(q \\| p)` when both are Normal in the same unconstrained space, else the
    single-sample estimate :math:`\\log q(z) - \\log p(z)` at ``value``.

    With diagonal Normals,
    :math:`D_{KL} = \\sum_i \\log\\frac{\\sigma_{p,i}}{\\sigma_{q,i}}
    + \\frac{\\sigma_{q,i}^2 + (\\mu_{q,i} - \\mu_{p,i})^2}{2\\sigma_{p,i}^2} - \\frac12`,
    summed over the site's event dims. ``q_params`` is ``(loc, log_scale)`` of ``q``.
    """
    p_params = normal_parameters(prior)
    if p_params is not None and q_params is not None:
        q_loc, q_log_scale = q_params
        p_loc, p_scale = p_params
        var_ratio = (2 * q_log_scale).exp() / p_scale.pow(2)
        kl = 0.5 * (var_ratio + (q_loc - p_loc).pow(2) / p_scale.pow(2) - 1 - var_ratio.log())
        if prior.event_dim:
            kl = kl.sum(tuple(range(-prior.event_dim, 0)))
        return kl
    return q.log_prob(value) - prior.log_prob(value)


def is_discrete(prior: dist.Distribution) -> bool:
    """Whether the site's support is discrete (these cannot get a Normal posterior)."""
    return bool(getattr(prior.support, "is_discrete", False))


def check_continuous_latent(name: str, prior: dist.Distribution) -> None:
    """Refuse latent sites that the unconstrained Normal family cannot represent."""
    if is_discrete(prior):
        raise NotImplementedError(
            f"pyro_avf: latent site '{name}' is discrete ({type(prior).__name__}, support {prior.support}); "
            "IterativeGuide only handles continuous latent variables inside a filtering step. Marginalise "
            "it out in the model or use a continuous relaxation (e.g. RelaxedOneHotCategorical)."
        )
    if not prior.has_rsample:
        raise NotImplementedError(
            f"pyro_avf: latent site '{name}' uses {type(prior).__name__}, which has no reparameterized "
            "sampler (has_rsample=False). The step free energy gradient that drives the inference updates "
            "needs pathwise (reparameterized) gradients through the prior; use a reparameterizable "
            "distribution for this site."
        )
    try:
        biject_to(prior.support)
    except NotImplementedError as e:
        raise NotImplementedError(
            f"pyro_avf: latent site '{name}' has support {prior.support} with no bijection to the real line."
        ) from e


def unconstrained_event_dim(prior: dist.Distribution) -> int:
    """Number of event dims of the site's unconstrained representation."""
    transform = biject_to(prior.support)
    return prior.event_dim - transform.codomain.event_dim + transform.domain.event_dim
