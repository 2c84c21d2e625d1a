"""The per-site approximate posterior: a diagonal Normal in the unconstrained space of the site.

For a latent site with support :math:`\\mathcal{S}` and bijection :math:`T: \\mathbb{R}^D \\to \\mathcal{S}`
(``torch.distributions.biject_to``) the guide uses

.. math::

    q_\\lambda(z) = T_\\# \\mathcal{N}(u;\\, \\mu, \\operatorname{diag}\\sigma^2),
    \\qquad \\lambda = (\\mu, \\log\\sigma),

initialised at the prior: :math:`\\mu, \\sigma` are the prior's mean and standard deviation in the
unconstrained space (exact for Normal, LogNormal, Gamma and Beta priors, Monte-Carlo moments otherwise).

With ``family="full"`` a site whose prior is a vector Normal (``Normal(...).to_event(1)``, D > 1) gets a
full-covariance posterior instead,

.. math::

    q_\\lambda(z) = \\mathcal{N}(z;\\, \\mu, L L^\\top), \\qquad L = \\operatorname{diag}(\\sigma) + \\text{lower},
    \\qquad \\lambda = (\\mu, \\log\\sigma, \\text{lower}),

with ``lower`` the D(D−1)/2 strictly-lower entries of L (row by row, ``torch.tril_indices(D, D, -1)``),
initialised at 0. Every other site keeps the diagonal family.

With ``family="joint"`` the vector-Normal sites of a step share one Gaussian: in the order the step samples
them, site j (dimension :math:`D_j`, after sites of total dimension :math:`P_j`) has the rows of a joint
Cholesky factor, :math:`u_j = \\mu_j + C_j \\varepsilon_{<j} + L_j \\varepsilon_j` with the earlier sites'
standard-normal noise :math:`\\varepsilon_{<j}` (:class:`JointDraws`), i.e. the conditional

.. math::

    q_\\lambda(z_j \\mid z_{<j}) = \\mathcal{N}(z_j;\\, \\mu_j + C_j \\varepsilon_{<j},\\, L_j L_j^\\top),
    \\qquad \\lambda_j = (\\mu_j, \\log\\sigma_j, [\\operatorname{vec} C_j, \\text{lower}_j]),

whose product over j is every Gaussian over the step's latents jointly. ``lower`` then holds the
:math:`D_j P_j` entries of :math:`C_j` (row-major) before the strictly-lower entries of :math:`L_j`; all start
at 0 (the prior). The KL of the step, :math:`\\sum_j D_{KL}(q(z_j \\mid z_{<j}) \\| p(z_j \\mid z_{<j}))` at the
drawn :math:`z_{<j}`, stays analytic per site and is an unbiased estimate of the joint KL.
"""

from __future__ import annotations

from typing import Optional, Tuple

import pyro.distributions as dist
import torch
from pyro.distributions.torch_distribution import ExpandedDistribution, MaskedDistribution
from torch.distributions import biject_to
from torch.distributions.transforms import ComposeTransform, IndependentTransform, Transform

NUM_MOMENT_SAMPLES = 256
FAMILIES = ("diagonal", "full", "joint")


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


_NORMALS = (dist.Normal, torch.distributions.Normal)


def _plain_normal(prior: dist.Distribution) -> bool:
    """Whether ``prior`` is a Normal, or one ``Independent`` around a Normal, with nothing masked or expanded."""
    if type(prior) in _NORMALS:
        return True
    return type(prior) in (dist.Independent, torch.distributions.Independent) and type(prior.base_dist) in _NORMALS


def _is_identity(t: Transform) -> bool:
    while isinstance(t, IndependentTransform):
        t = t.base_transform
    return isinstance(t, ComposeTransform) and not t.parts


def normal_parameters(prior: dist.Distribution) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
    """``(loc, scale)`` of a prior that is Normal in its unconstrained space (Normal, LogNormal), else None.

    Both in one dtype, the promoted one: a model may build ``Normal(loc, scale)`` from a float64 state and a
    float32 parameter, which torch accepts (its log-density promotes), and so must the posterior built from them.

    Example::

        >>> [p.dtype for p in normal_parameters(dist.Normal(torch.zeros(2, dtype=torch.float64), torch.ones(2)))]
        [torch.float64, torch.float64]
    """
    base, _ = unwrap(prior)
    if type(base) in (dist.Normal, torch.distributions.Normal, dist.LogNormal, torch.distributions.LogNormal):
        shape = prior.batch_shape + prior.event_shape
        loc, scale = base.loc.expand(shape), base.scale.expand(shape)
        if loc.dtype != scale.dtype:
            dtype = torch.promote_types(loc.dtype, scale.dtype)
            loc, scale = loc.to(dtype), scale.to(dtype)
        return loc, scale
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


def posterior(loc: torch.Tensor, log_scale: torch.Tensor, prior: dist.Distribution,
              lower: Optional[torch.Tensor] = None) -> dist.Distribution:  # fmt: skip
    r"""The guide's distribution for a site: :math:`T_\# \mathcal{N}(\mu, \sigma)` on the prior's support, or
    :math:`\mathcal{N}(\mu, L L^\top)` with :math:`L` = :func:`scale_tril` ``(log_scale, lower)`` when ``lower``
    is given (a full-covariance site, see :func:`has_full_covariance`).

    A masked prior (``.mask``, ``MaskedDistribution``, at any depth) gives a posterior with the same mask, so
    :math:`\log q(z)` of a masked element is 0 exactly as :math:`\log p(z)` is.

    Example::

        >>> q = posterior(torch.zeros(3), torch.zeros(3), dist.LogNormal(torch.zeros(3), 1.0))
        >>> bool((q.sample() > 0).all())
        True
        >>> prior = dist.Normal(torch.zeros(3), 1.0).to_event(1)
        >>> posterior(torch.zeros(3), torch.zeros(3), prior, lower=torch.ones(3)).covariance_matrix[2]
        tensor([1., 2., 3.])
    """
    if lower is None and _plain_normal(prior):  # the common case, on the hot path of every re-run
        return dist.Normal(loc, log_scale.exp()).to_event(prior.event_dim)
    if lower is not None:
        q = dist.MultivariateNormal(loc, scale_tril=scale_tril(log_scale, lower))
        mask = event_mask(prior)
        return q if mask is None else q.mask(mask)
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


def has_full_covariance(prior: dist.Distribution, family: str = "full") -> bool:
    """Whether a latent site gets the full-covariance posterior: ``family == "full"`` and its prior is a Normal
    over vectors (event dim 1 of size D > 1, e.g. ``Normal(loc, scale).to_event(1)``, masked or expanded).
    Every other site (scalar or matrix events, LogNormal, Gamma, ...) keeps the diagonal family.

    Example::

        >>> has_full_covariance(dist.Normal(torch.zeros(3), 1.0).to_event(1))
        True
        >>> has_full_covariance(dist.LogNormal(torch.zeros(3), 1.0).to_event(1))
        False
    """
    if family == "diagonal":
        return False
    check_family(family)
    base, _ = unwrap(prior)
    vector_normal = type(base) in (dist.Normal, torch.distributions.Normal) and prior.event_dim == 1
    return vector_normal and (prior.event_shape[0] > 1 or family == "joint")


def check_family(family: str) -> str:
    """Refuse an unknown posterior family."""
    if family not in FAMILIES:
        raise ValueError(f"pyro_avf: posterior must be one of {FAMILIES}, got {family!r}")
    return family


def lower_size(dim: int) -> int:
    """Number of strictly-lower entries of a (dim × dim) matrix: dim (dim − 1) / 2."""
    return dim * (dim - 1) // 2


def prior_lambda(prior: dist.Distribution, family: str = "diagonal", preceding: int = 0) -> Tuple[torch.Tensor, ...]:
    """λ of the posterior equal to the prior (detached): ``(loc, log_scale)`` from :func:`unconstrained_moments`,
    plus ``lower = 0`` (off-diagonals zero) for a full-covariance site; for a ``"joint"`` site after joint sites
    of total dimension ``preceding``, ``lower`` also holds the D × ``preceding`` coupling entries (none at all
    for a one-dimensional first site).

    Example::

        >>> [p.shape for p in prior_lambda(dist.Normal(torch.zeros(3), 1.0).to_event(1), "full")]
        [torch.Size([3]), torch.Size([3]), torch.Size([3])]
        >>> [p.shape for p in prior_lambda(dist.Normal(torch.zeros(3), 1.0).to_event(1), "joint", preceding=2)]
        [torch.Size([3]), torch.Size([3]), torch.Size([9])]
    """
    loc, scale = unconstrained_moments(prior)
    if not has_full_covariance(prior, family):
        return loc, scale.log()
    d = loc.size(-1)
    entries = lower_size(d) + (d * preceding if family == "joint" else 0)
    if not entries:
        return loc, scale.log()
    return loc, scale.log(), loc.new_zeros(loc.shape[:-1] + (entries,))


def conditional_lambda(lam: Tuple[torch.Tensor, ...], noise: Optional[torch.Tensor]) -> Tuple[torch.Tensor, ...]:
    r"""The parameters of a joint slot's conditional posterior given the earlier joint slots' noise
    :math:`\varepsilon_{<j}` (``noise``, ``(..., P)``): :math:`(\mu + C\varepsilon_{<j}, \log\sigma,
    \text{lower})`. A slot without coupling entries is returned as it is.

    Example::

        >>> lam = (torch.zeros(1), torch.zeros(1), torch.tensor([2.0]))  # D = 1 after one joint dimension
        >>> conditional_lambda(lam, torch.tensor([0.5]))[0]
        tensor([1.])
    """
    if len(lam) < 3:
        return lam
    d = lam[0].size(-1)
    coupling = lam[2].size(-1) - lower_size(d)
    if not coupling:
        return lam
    p = coupling // d
    if noise is None or noise.size(-1) != p:
        raise RuntimeError(
            f"pyro_avf: a joint latent slot coupled to {p} earlier dimensions follows joint slots of "
            f"{0 if noise is None else noise.size(-1)}; a filtering step must sample the same latent sites in "
            "the same order every time it runs."
        )
    cross = lam[2][..., :coupling].unflatten(-1, (d, p))
    loc = lam[0] + (cross * noise.unsqueeze(-2)).sum(-1)
    return (loc, lam[1], lam[2][..., coupling:])


def standard_noise(value: torch.Tensor, lam: Tuple[torch.Tensor, ...]) -> torch.Tensor:
    r""":math:`\varepsilon = L^{-1}(u - \mu)` of a draw ``value`` from the (conditional) Normal posterior with
    parameters ``lam`` (:math:`(u - \mu)/\sigma` for a diagonal one); detached: it is the draw's noise."""
    diff = (value - lam[0]).detach()
    if len(lam) > 2 and lam[2].size(-1):
        tril = scale_tril(lam[1].detach(), lam[2].detach())
        tril = tril.expand(diff.shape[:-1] + tril.shape[-2:])
        return torch.linalg.solve_triangular(tril, diff.unsqueeze(-1), upper=False).squeeze(-1)
    return diff / lam[1].detach().exp()


class JointDraws:
    """The standard-normal noise of the joint slots drawn so far in one run of a step (``family="joint"``;
    every other family leaves λ as it is). Call :meth:`condition` before a slot is drawn and :meth:`add` with the
    draw after it.

    Example::

        >>> draws = JointDraws("joint")
        >>> prior = dist.Normal(torch.zeros(2), 1.0).to_event(1)
        >>> cond = draws.condition(prior_lambda(prior, "joint", draws.preceding), prior)
        >>> draws.add(site_posterior(cond, prior).sample())
        >>> draws.preceding
        2
    """

    def __init__(self, family: str):
        self.family = family
        self.noise: list = []
        self.preceding = 0
        self.pending: Optional[Tuple[torch.Tensor, ...]] = None  # λ of the joint slot being drawn

    def member(self, prior: dist.Distribution) -> bool:
        return self.family == "joint" and has_full_covariance(prior, "joint")

    def condition(self, lam: Tuple[torch.Tensor, ...], prior: dist.Distribution) -> Tuple[torch.Tensor, ...]:
        """The λ of the slot's posterior given the earlier joint slots' draws (:func:`conditional_lambda`)."""
        if not self.member(prior):
            self.pending = None
            return lam
        if self.noise:
            noise = self.noise[0]
            if len(self.noise) > 1:
                batch = torch.broadcast_shapes(*(n.shape[:-1] for n in self.noise))
                noise = torch.cat([n.expand(batch + n.shape[-1:]) for n in self.noise], -1)
            lam = conditional_lambda(lam, noise)
        self.pending = lam
        return lam

    def add(self, value: torch.Tensor) -> None:
        """Record the noise of the draw ``value`` of the slot last conditioned, if it is a joint one."""
        if self.pending is not None:
            self.noise.append(standard_noise(value, self.pending))
            self.preceding += value.size(-1)
            self.pending = None


def site_posterior(lam: Tuple[torch.Tensor, ...], prior: dist.Distribution) -> dist.Distribution:
    """:func:`posterior` of a slot's λ: ``(loc, log_scale)`` (diagonal) or ``(loc, log_scale, lower)`` (full)."""
    return posterior(lam[0], lam[1], prior, lam[2] if len(lam) > 2 else None)


def reparameterized_draw(lam: Tuple[torch.Tensor, ...], prior: dist.Distribution,
                         noise: torch.Tensor) -> torch.Tensor:  # fmt: skip
    r"""The draw :math:`z = T(\mu + L\varepsilon)` of :func:`site_posterior` ``(lam, prior)`` for the given
    standard-normal noise :math:`\varepsilon` (:math:`L = \operatorname{diag}\sigma` for a diagonal λ, :math:`T`
    the bijection onto the prior's support): ``site_posterior(lam, prior).rsample()`` with the noise chosen, as
    antithetic pairs :math:`(\varepsilon, -\varepsilon)` need.

    Example::

        >>> prior = dist.LogNormal(torch.zeros(2), 1.0)
        >>> reparameterized_draw((torch.zeros(2), torch.zeros(2)), prior, torch.tensor([1.0, -1.0]))
        tensor([2.7183, 0.3679])
    """
    if len(lam) > 2 and lam[2].size(-1):
        tril = scale_tril(lam[1], lam[2])
        u = lam[0] + (tril @ noise.unsqueeze(-1)).squeeze(-1)
    else:
        u = lam[0] + lam[1].exp() * noise
    if _plain_normal(prior):
        return u
    transform = biject_to(prior.support)
    return u if _is_identity(transform) else transform(u)


def scale_tril(log_scale: torch.Tensor, lower: torch.Tensor) -> torch.Tensor:
    r"""The Cholesky factor :math:`L = \operatorname{diag}(e^{\log\sigma}) + \sum_{k} \ell_k e_{r_k} e_{c_k}^\top`,
    :math:`(r_k, c_k)` = ``torch.tril_indices(D, D, -1)``: shape ``batch + (D, D)`` from ``log_scale``
    ``(..., D)`` and ``lower`` ``(..., D(D−1)/2)`` (batch dims broadcast).

    Example::

        >>> scale_tril(torch.zeros(2), torch.tensor([3.0]))
        tensor([[1., 0.],
                [3., 1.]])
    """
    d = log_scale.size(-1)
    if lower.size(-1) != lower_size(d):
        raise ValueError(f"pyro_avf: lower has {lower.size(-1)} entries, a {d}-dim scale_tril needs {lower_size(d)}")
    rows, cols = torch.tril_indices(d, d, -1, device=log_scale.device)
    batch = torch.broadcast_shapes(log_scale.shape[:-1], lower.shape[:-1])
    entries = lower.expand(batch + lower.shape[-1:])
    strict = entries.new_zeros(batch + (d * d,)).index_copy(-1, rows * d + cols, entries)
    return strict.reshape(batch + (d, d)) + torch.diag_embed(log_scale.exp())


def kl_full_to_diagonal(loc: torch.Tensor, log_scale: torch.Tensor, lower: torch.Tensor, p_loc: torch.Tensor,
                        p_scale: torch.Tensor) -> torch.Tensor:  # fmt: skip
    r"""Per coordinate i, the terms of

    .. math::

        D_{KL}\big(\mathcal{N}(m, L L^\top) \,\|\, \mathcal{N}(\mu, \operatorname{diag}\sigma^2)\big)
        = \tfrac12 \Big[\sum_i \frac{(L L^\top)_{ii}}{\sigma_i^2} + \sum_i \frac{(\mu_i - m_i)^2}{\sigma_i^2} - D
          + \sum_i \log\sigma_i^2 - 2 \sum_i \log L_{ii}\Big],

    with :math:`(L L^\top)_{ii} = L_{ii}^2 + \sum_{j<i} L_{ij}^2` and :math:`L` = :func:`scale_tril`
    ``(log_scale, lower)``: summing the result over its last dim gives the KL (a coordinate mask can zero
    terms before the sum). Shapes: ``loc``, ``log_scale``, ``p_loc``, ``p_scale`` ``(..., D)``, ``lower``
    ``(..., D(D−1)/2)``.

    Example::

        >>> kl = kl_full_to_diagonal(torch.zeros(2), torch.zeros(2), torch.ones(1), torch.zeros(2), torch.ones(2))
        >>> kl.sum()  # ½ (1 + 2 − 2): the second row of L has norm² 2
        tensor(0.5000)
    """
    d = log_scale.size(-1)
    rows, _ = torch.tril_indices(d, d, -1, device=log_scale.device)
    batch = torch.broadcast_shapes(log_scale.shape[:-1], lower.shape[:-1])
    row_norms = lower.new_zeros(batch + (d,)).index_add(-1, rows, lower.pow(2).expand(batch + lower.shape[-1:]))
    p_var = p_scale.pow(2)
    var = (2 * log_scale).exp() + row_norms
    return 0.5 * ((var + (p_loc - loc).pow(2)) / p_var - 1 + p_var.log() - 2 * log_scale)


def event_mask(prior: dist.Distribution) -> Optional[torch.Tensor]:
    """:func:`batch_mask` of a prior whose masks cover whole events (None when nothing is masked); a mask that
    differs inside one event is refused: a full-covariance posterior has no per-coordinate log-density."""
    mask = coordinate_mask(prior)
    if mask is None:
        return None
    full = mask.expand(torch.broadcast_shapes(mask.shape, prior.batch_shape + prior.event_shape))
    events = full.flatten(-prior.event_dim) if prior.event_dim else full.unsqueeze(-1)
    if not torch.equal(events.all(-1), events.any(-1)):
        raise NotImplementedError(
            f"pyro_avf: a mask inside the event of a {type(unwrap(prior)[0]).__name__} prior is not supported by "
            "the full-covariance posterior; mask whole events (the batch dims) or use posterior='diagonal'."
        )
    return events.all(-1)


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
    ``(loc, log_scale)`` of ``q``, or ``(loc, log_scale, lower)`` of a full-covariance ``q``
    (:func:`kl_full_to_diagonal`).
    """
    if q_params is not None and _plain_normal(prior):  # the hot path: no mask to apply, no expand needed
        base = prior.base_dist if prior.event_dim else prior
        p_params, mask = (base.loc, base.scale), None
    else:
        p_params = normal_parameters(prior)
        mask = coordinate_mask(prior) if p_params is not None else None
    if p_params is not None and q_params is not None:
        q_loc, q_log_scale = q_params[:2]
        p_loc, p_scale = p_params
        if len(q_params) > 2:  # full covariance: see kl_full_to_diagonal
            kl = kl_full_to_diagonal(q_loc, q_log_scale, q_params[2], p_loc, p_scale)
        else:
            var_ratio = (2 * q_log_scale).exp() / p_scale.pow(2)
            kl = 0.5 * (var_ratio + (q_loc - p_loc).pow(2) / p_scale.pow(2) - 1 - var_ratio.log())
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
    if _plain_normal(prior):  # the hot path: the identity bijection
        return prior.event_dim
    transform = biject_to(prior.support)
    return prior.event_dim - transform.codomain.event_dim + transform.domain.event_dim
