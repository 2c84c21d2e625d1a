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
from pyro.distributions.torch_distribution import ExpandedDistribution, MaskedDistribution
from torch.distributions import biject_to
from torch.distributions.transforms import ComposeTransform, IndependentTransform, Transform

NUM_MOMENT_SAMPLES = 256


def _layers(d: dist.Distribution):
    """The wrappers of ``d`` from the outside in, ending with the base distribution."""
    while True:
        yield d
        if isinstance(d, (torch.distributions.Independent, MaskedDistribution, ExpandedDistribution)):
            d = d.base_dist
        else:
            return


def unwrap(d: dist.Distribution) -> Tuple[dist.Distribution, int]:
    """Strip ``Independent``, ``MaskedDistribution`` and ``ExpandedDistribution`` wrappers (every form of
    ``.to_event``, ``.mask`` and ``.expand``); return the base distribution and the number of reinterpreted dims."""
    reinterpreted = 0
    for layer in _layers(d):
        if isinstance(layer, torch.distributions.Independent):
            reinterpreted += layer.reinterpreted_batch_ndims
    return layer, reinterpreted


def coordinate_mask(d: dist.Distribution) -> Optional[torch.Tensor]:
    r"""The masks of every ``MaskedDistribution`` inside ``d``, joined with logical and, as one boolean tensor
    that broadcasts against ``d.batch_shape + d.event_shape`` (None when nothing is masked).

    A mask of a wrapper with event dim :math:`e` masks whole events, so it gains :math:`e` trailing singleton
    dims; masks broadcast from the right, so ``.expand`` around a masked distribution keeps them aligned.
    """
    mask = None
    for layer in _layers(d):
        if isinstance(layer, MaskedDistribution):
            m = layer._mask
            if m is True or (isinstance(m, torch.Tensor) and m.dim() == 0 and bool(m)):
                continue
            m = torch.as_tensor(m, dtype=torch.bool)
            m = m.reshape(m.shape + (1,) * layer.event_dim)
            mask = m if mask is None else mask & m
    return mask


def batch_mask(d: dist.Distribution) -> Optional[torch.Tensor]:
    """:func:`coordinate_mask` reduced to ``d.batch_shape``: an element counts while any coordinate of its
    event is unmasked."""
    mask = coordinate_mask(d)
    if mask is None:
        return None
    mask = mask.expand(torch.broadcast_shapes(mask.shape, d.batch_shape + d.event_shape))
    return mask.flatten(-d.event_dim).any(-1) if d.event_dim else mask


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
    r"""The guide's distribution for a site: :math:`T_\# \mathcal{N}(\mu, \sigma)` on the prior's support.

    A masked prior (``.mask``, ``MaskedDistribution``, at any depth) gives a posterior with the same mask, so
    :math:`\log q(z)` of a masked element is 0 exactly as :math:`\log p(z)` is.

    Example::

        >>> q = posterior(torch.zeros(3), torch.zeros(3), dist.LogNormal(torch.zeros(3), 1.0))
        >>> bool((q.sample() > 0).all())
        True
    """
    transform = biject_to(prior.support)
    event_dim = unconstrained_event_dim(prior)
    mask = coordinate_mask(prior)
    if mask is None:
        base = dist.Normal(loc, log_scale.exp()).to_event(event_dim)
        return base if _is_identity(transform) else dist.TransformedDistribution(base, transform)
    elementwise = _elementwise(transform)
    if elementwise is not None:  # mask each coordinate, then form the event
        q = dist.Normal(loc, log_scale.exp())
        if not _is_identity(elementwise):
            q = dist.TransformedDistribution(q, elementwise)
        return q.mask(mask).to_event(event_dim)
    # a transform that changes the event's shape (e.g. onto the simplex): masks must cover whole events
    full = mask.expand(torch.broadcast_shapes(mask.shape, prior.batch_shape + prior.event_shape))
    events = full.flatten(-prior.event_dim) if prior.event_dim else full.unsqueeze(-1)
    if not torch.equal(events.all(-1), events.any(-1)):
        raise NotImplementedError(
            f"pyro_avf: a mask inside the event of a {type(unwrap(prior)[0]).__name__} prior with support "
            f"{prior.support} is not supported; mask whole events (the batch dims) instead."
        )
    base = dist.Normal(loc, log_scale.exp()).to_event(event_dim)
    return dist.TransformedDistribution(base, transform).mask(events.all(-1))


def _elementwise(transform: Transform) -> Optional[Transform]:
    """The element-wise transform inside ``IndependentTransform`` wrappers, or None if it acts on events."""
    while isinstance(transform, IndependentTransform):
        transform = transform.base_transform
    return transform if transform.domain.event_dim == 0 and transform.codomain.event_dim == 0 else None


def kl_or_log_ratio(q: dist.Distribution, prior: dist.Distribution, value: torch.Tensor, q_params=None) -> torch.Tensor:
    """Per-element :math:`D_{KL}(q \\| p)` when both are Normal in the same unconstrained space, else the
    single-sample estimate :math:`\\log q(z) - \\log p(z)` at ``value``.

    With diagonal Normals,
    :math:`D_{KL} = \\sum_i \\log\\frac{\\sigma_{p,i}}{\\sigma_{q,i}}
    + \\frac{\\sigma_{q,i}^2 + (\\mu_{q,i} - \\mu_{p,i})^2}{2\\sigma_{p,i}^2} - \\frac12`,
    summed over the site's event dims (masked coordinates of a masked prior give 0). ``q_params`` is
    ``(loc, log_scale)`` of ``q``.
    """
    p_params = normal_parameters(prior)
    if p_params is not None and q_params is not None:
        q_loc, q_log_scale = q_params
        p_loc, p_scale = p_params
        var_ratio = (2 * q_log_scale).exp() / p_scale.pow(2)
        kl = 0.5 * (var_ratio + (q_loc - p_loc).pow(2) / p_scale.pow(2) - 1 - var_ratio.log())
        mask = coordinate_mask(prior)
        if mask is not None:
            kl = torch.where(mask, kl, kl.new_zeros(()))
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
