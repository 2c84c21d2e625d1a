r"""Sequential Monte Carlo with the trained AVF guide as proposal: tight estimates of :math:`\log p(x_{1:T})`.

:class:`ParticleFilter` runs B sequences with N particles each as B·N rows of one stream (row ``b·N + n`` is
particle n of sequence b, the layout of :func:`~pyro_avf.online.repeat_streams`), through an
:class:`~pyro_avf.online.OnlineFilter`: at each step the guide infers, per particle and from that particle's
own past, the proposal :math:`q_{\lambda_K}(z_t)` with its K iterations started at the particle's prior
prediction, and draws :math:`z_t` from it. Each particle's incremental weight, over every latent site of the
step, is

.. math::

    \log w_t^n = \log p_\theta(x_t \mid z_{\le t}^n, x_{<t}) + \log p_\theta(z_t^n \mid z_{<t}^n, x_{<t})
        - \log q_{\lambda_K}(z_t^n),

and with the normalised weights :math:`W_{t-1}^n` of the previous step (:math:`W_0^n = 1/N`)

.. math::

    \hat p(x_t \mid x_{<t}) = \sum_{n=1}^{N} W_{t-1}^n w_t^n, \qquad
    W_t^n = \frac{W_{t-1}^n w_t^n}{\sum_m W_{t-1}^m w_t^m}, \qquad
    \log \hat p(x_{1:T}) = \sum_{t=1}^{T} \log \sum_{n=1}^{N} W_{t-1}^n w_t^n.

:math:`\hat p(x_{1:T})` is unbiased, so :math:`\mathbb{E}[\log \hat p] \le \log p(x_{1:T})`, with equality as
:math:`N \to \infty`. When the effective sample size :math:`\mathrm{ESS}_t = 1 / \sum_n (W_t^n)^2` falls
below ``ess_threshold · N``, the sequence's particles are resampled systematically and their state gathered.

``IterativeGuide(model, num_iterations=0)`` proposes from the prior: the bootstrap particle filter, by the same
code. The guide's inference noise only changes which proposal is used, not the validity of the weights.

A step on which a sequence observes nothing (every observation masked: padding) adds 0 to its
:math:`\log \hat p` and does not resample; the latent part of its weights is carried to the next observed
step, so a gap inside a sequence is still weighted right, and trailing padding changes nothing.

Example::

    >>> import pyro_avf, torch
    >>> from pyro_avf.models.lgssm import LinearGaussianSSM
    >>> ssm = LinearGaussianSSM.random(latent_dim=2, obs_dim=3)
    >>> xs, _ = ssm.sample(2, 10)
    >>> bootstrap = pyro_avf.IterativeGuide(ssm.model, num_iterations=0)
    >>> smc_log_likelihood(ssm, bootstrap, xs, num_particles=64, seed=0).log_marginal.shape
    torch.Size([2])
"""

from __future__ import annotations

import math
from typing import Any, Dict, NamedTuple, Optional

import pyro.distributions as dist
import torch
from pyro.infer.smcfilter import SMCFailed
from torch import Tensor
from torch.utils._pytree import tree_leaves, tree_map

from pyro_avf.free_energy import apply_mask, reduce_to
from pyro_avf.guide import IterativeGuide
from pyro_avf.inference import StepRun
from pyro_avf.online import OnlineFilter, as_stream, leading_size
from pyro_avf.posterior import site_posterior

__all__ = [
    "ParticleFilter",
    "ParticleStep",
    "ParticleWeights",
    "SMCEstimate",
    "log_importance_weights",
    "smc_log_likelihood",
    "systematic_resample",
]


class ParticleStep(NamedTuple):
    """What :meth:`ParticleFilter.step` returns for step ``t`` (1-based), each per sequence.

    ``log_increment`` (B,): :math:`\\log \\sum_n W_{t-1}^n w_t^n` (0 where the step observed nothing);
    ``ess`` (B,): the effective sample size of :math:`W_t`, before resampling; ``resampled`` (B,) bool;
    ``observed`` (B,) bool; ``mean``: latent site name → :math:`\\sum_n W_t^n z_t^n`, (B, ...).
    """

    t: int
    log_increment: Tensor
    ess: Tensor
    resampled: Tensor
    observed: Tensor
    mean: Dict[str, Tensor]


class SMCEstimate(NamedTuple):
    """What :func:`smc_log_likelihood` returns: ``log_marginal`` (B,) float64 :math:`\\log \\hat p(x_{1:T})`,
    ``ess`` (B, T) and ``resampled`` (B, T) bool, per step."""

    log_marginal: Tensor
    ess: Tensor
    resampled: Tensor


def systematic_resample(weights: Tensor, u: Optional[Tensor] = None) -> Tensor:
    r"""Systematic resampling of each row of normalised ``weights`` (B, N): ancestor indices (B, N),

    .. math::

        a^n = \min\{m : \textstyle\sum_{j \le m} W^j > (n + u)/N\}, \qquad u \sim U[0, 1) \text{ per row}.

    Example::

        >>> systematic_resample(torch.tensor([[0.5, 0.5, 0.0, 0.0]]))
        tensor([[0, 0, 1, 1]])
    """
    batch, size = weights.shape
    if u is None:
        u = torch.rand(batch, 1, dtype=weights.dtype, device=weights.device)
    positions = (torch.arange(size, dtype=weights.dtype, device=weights.device) + u) / size
    cdf = weights.cumsum(-1)
    return torch.searchsorted(cdf, positions, right=True).clamp_(max=size - 1)


def log_importance_weights(run: StepRun) -> Tensor:
    r"""The incremental log weight of each element of the step's outer plates, from the step's scored final run:

    .. math::

        \log w_t = \sum_{x\ \text{observed}} \log p(x_t \mid \cdot)
            + \sum_{z\ \text{latent}} \big(\log p(z_t \mid \cdot) - \log q_{\lambda_K}(z_t)\big)

    at the sampled :math:`z_t`, every mask respected (a masked element adds exactly 0).
    """
    shape = run.terms.batch_shape
    log_w = -run.terms.reconstruction
    for rec in run.latents:
        q = site_posterior(rec.posterior_lambda, rec.prior)
        ratio = apply_mask(rec.prior.log_prob(rec.value) - q.log_prob(rec.value), rec.mask)
        log_w = log_w + reduce_to(ratio, shape)
    return log_w


class ParticleWeights:
    r"""The log weights (B, N) of B sequences × N particles and their log-marginal estimate.

    :meth:`update` adds a step's :math:`\log w_t` and, for each sequence that observed something, returns
    :math:`\log \sum_n W_{t-1}^n w_t^n` and normalises; an unobserved sequence keeps its unnormalised weights
    (its increment is counted at its next observed step) and returns 0.
    """

    def __init__(self, batch: int, num_particles: int, device: Optional[torch.device] = None):
        self.num_particles = num_particles
        self.log_weights = torch.full((batch, num_particles), -math.log(num_particles), dtype=torch.float64,
                                      device=device)  # fmt: skip
        self.log_marginal = torch.zeros(batch, dtype=torch.float64, device=device)

    @property
    def normalized(self) -> Tensor:
        """:math:`W^n`, each row summing to 1."""
        return (self.log_weights - self.log_weights.logsumexp(-1, keepdim=True)).exp()

    def ess(self) -> Tensor:
        """:math:`(\\sum_n w^n)^2 / \\sum_n (w^n)^2` per sequence, in (0, N]."""
        return self.normalized.pow(2).sum(-1).reciprocal()

    def update(self, log_w: Tensor, observed: Tensor) -> Tensor:
        """Take in a step's log weights (B, N) and observed flags (B,); returns the log increments (B,)."""
        joint = self.log_weights + log_w.double()
        total = joint.logsumexp(-1)
        increment = torch.where(observed, total, 0.0)
        self.log_weights = torch.where(observed[:, None], joint - total[:, None], joint)
        self.log_marginal = self.log_marginal + increment
        return increment

    def reset(self, which: Tensor) -> None:
        """Equal weights :math:`1/N` for the sequences ``which`` (B,) bool (after resampling them)."""
        self.log_weights[which] = -math.log(self.num_particles)


def _check_finite(tree: Any, where: str) -> None:
    for v in tree_leaves(tree):
        if isinstance(v, Tensor) and v.is_floating_point() and not torch.isfinite(v).all():
            bad = (~torch.isfinite(v)).sum().item()
            raise ValueError(
                f"pyro_avf: {where} got data with {bad} NaN or infinite value(s) (shape {tuple(v.shape)}); particle "
                "weights need finite observations: replace missing entries with finite values and mask them."
            )


class ParticleFilter:
    r"""A particle filter whose proposal is the trained guide's posterior :math:`q_{\lambda_K}(z_t)`, per
    particle (see the module docstring); the ``init`` / ``step`` shape of :class:`~pyro_avf.online.OnlineFilter`
    and of Pyro's :class:`~pyro.infer.SMCFilter`.

    :param model: a step model (:mod:`pyro_avf.transition`) or a stream (``init(state, batch_size, ...)`` and
        ``step(state, ...)``), as for :class:`~pyro_avf.online.OnlineFilter`.
    :param IterativeGuide guide: the proposal: a trained guide, or ``num_iterations=0`` for the bootstrap filter.
    :param int num_particles: N, particles per sequence.
    :param float ess_threshold: resample a sequence when its ESS falls below ``ess_threshold · N`` (0: never).

    Example::

        >>> import pyro_avf, torch
        >>> from pyro_avf.models.lgssm import LinearGaussianSSM
        >>> ssm = LinearGaussianSSM.random(latent_dim=2, obs_dim=3)
        >>> xs, _ = ssm.sample(4, 5)
        >>> pf = ParticleFilter(ssm, pyro_avf.IterativeGuide(ssm.model, num_iterations=0), num_particles=100)
        >>> pf.init(batch_size=4)
        >>> out = [pf.step(xs[:, t]) for t in range(5)]
        >>> out[-1].mean["z_5"].shape, pf.log_marginal.shape   # E[z_5 | x_1:5] and log p(x_1:5), per sequence
        (torch.Size([4, 2]), torch.Size([4]))
    """

    def __init__(self, model: Any, guide: IterativeGuide, num_particles: int = 100, *, ess_threshold: float = 0.5):
        if not isinstance(guide, IterativeGuide):
            raise TypeError(
                f"guide must be a pyro_avf.IterativeGuide (its posterior is the proposal), got {type(guide).__name__};"
                " for the bootstrap filter use IterativeGuide(model, num_iterations=0)"
            )
        if not isinstance(num_particles, int) or isinstance(num_particles, bool) or num_particles < 1:
            raise ValueError(f"num_particles must be a positive integer, got {num_particles!r}")
        if not 0.0 <= ess_threshold <= 1.0:
            raise ValueError(f"ess_threshold must lie in [0, 1], got {ess_threshold!r}")
        self.filter = OnlineFilter(as_stream(model), guide)
        self.guide, self.num_particles, self.ess_threshold = guide, num_particles, ess_threshold
        self.weights: Optional[ParticleWeights] = None
        self.batch_size = 0

    def init(self, batch_size: int = 1, **kwargs) -> None:
        """Start ``batch_size`` sequences of N particles: the stream's ``init(state, batch_size=B·N, **kwargs)``."""
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        self.filter.init(batch_size=batch_size * self.num_particles, **kwargs)
        rows = leading_size(self.filter.state)
        if rows != batch_size * self.num_particles:
            raise ValueError(f"the stream's init made a state of {rows} rows, not batch_size · N = "
                             f"{batch_size} · {self.num_particles}")  # fmt: skip
        device = next(v.device for v in tree_leaves(self.filter.state) if isinstance(v, Tensor))
        self.batch_size, self.weights = batch_size, ParticleWeights(batch_size, self.num_particles, device)

    @property
    def log_marginal(self) -> Tensor:
        """:math:`\\log \\hat p(x_{1:t})` so far, (B,) float64."""
        if self.weights is None:
            raise RuntimeError("ParticleFilter.log_marginal read before init()")
        return self.weights.log_marginal

    @property
    def log_weights(self) -> Tensor:
        """:math:`\\log W^n` of every particle, (B, N) float64 (normalised after each observed step)."""
        if self.weights is None:
            raise RuntimeError("ParticleFilter.log_weights read before init()")
        return self.weights.log_weights

    def _particles(self, tree: Any) -> Any:
        """Every tensor of ``tree`` (B, ...) repeated for the N particles of each sequence, (B·N, ...)."""
        batch = self.batch_size

        def repeat(v):
            if not isinstance(v, Tensor):
                return v
            if v.dim() == 0 or v.size(0) != batch:
                raise ValueError(f"every tensor argument of ParticleFilter.step must have shape ({batch}, ...): one "
                                 f"row per sequence, got {tuple(v.shape)}")  # fmt: skip
            return v.repeat_interleave(self.num_particles, 0)

        return tree_map(repeat, tree)

    def step(self, *args, **kwargs) -> ParticleStep:
        """Filter one step: the stream's ``step(state, *args, **kwargs)`` for every particle (for a step model:
        ``step(x_t, mask_t=None)``, ``x_t`` (B, ...), ``mask_t`` (B,) bool), weighting and maybe resampling."""
        if self.weights is None:
            raise RuntimeError("ParticleFilter.step() called before init()")
        _check_finite((args, kwargs), "ParticleFilter.step")
        args, kwargs = self._particles((args, kwargs))
        out = self.filter.step(*args, **kwargs)
        run = self.guide.last_pass.last_run
        batch, n = self.batch_size, self.num_particles
        with torch.no_grad():
            log_w = log_importance_weights(run)
            if tuple(log_w.shape) != (batch * n,):
                raise ValueError(
                    f"pyro_avf: ParticleFilter needs the step's outer plates to be the one batch plate of "
                    f"{batch} · {n} rows, but its sites have outer shape {tuple(log_w.shape)}"
                )
            observed = out.observed.reshape(batch, n).any(-1)
            increment = self.weights.update(log_w.reshape(batch, n), observed)
            if not torch.isfinite(increment).all():
                failed = (~torch.isfinite(increment)).nonzero().flatten().tolist()
                raise SMCFailed(f"pyro_avf: every particle of sequence(s) {failed} has zero weight at step {out.t}")
            ess, weights = self.weights.ess(), self.weights.normalized
            mean = {rec.name: _weighted_mean(rec.value, weights) for rec in run.latents}
            resample = observed & (ess < self.ess_threshold * n)
            if resample.any():
                self._resample(resample, weights)
        return ParticleStep(out.t, increment, ess, resample, observed, mean)

    def _resample(self, which: Tensor, weights: Tensor) -> None:
        """Resample the sequences ``which`` (B,) bool systematically and gather the state of their particles."""
        n = self.num_particles
        rows = torch.arange(self.batch_size * n, device=weights.device).reshape(self.batch_size, n)
        offsets = rows[which, :1]
        rows[which] = offsets + systematic_resample(weights[which])
        rows = rows.flatten()
        self.filter.state = tree_map(lambda v: v[rows] if isinstance(v, Tensor) else v, self.filter.state)
        self.weights.reset(which)

    def get_empirical(self) -> Any:
        """The state with every tensor (B·N, ...) replaced by its weighted :class:`~pyro.distributions.Empirical`
        over the particles of each sequence (batch shape (B,)); for the LG-SSM ``get_empirical()["carry"]`` is
        :math:`p(z_t \\mid x_{\\le t})`."""
        if self.weights is None:
            raise RuntimeError("ParticleFilter.get_empirical() called before init()")
        log_w, shape = self.weights.log_weights, (self.batch_size, self.num_particles)

        def empirical(v):
            if not isinstance(v, Tensor):
                return v
            return dist.Empirical(v.reshape(shape + v.shape[1:]), log_w.to(v.dtype) if v.is_floating_point() else log_w)

        return tree_map(empirical, self.filter.state)


def _weighted_mean(value: Tensor, weights: Tensor) -> Tensor:
    """:math:`\\sum_n W^n z^n` per sequence: ``value`` (B·N, ...), ``weights`` (B, N) → (B, ...)."""
    grouped = value.reshape(weights.shape + value.shape[1:])
    w = weights.to(value.dtype).reshape(weights.shape + (1,) * (value.dim() - 1))
    return (w * grouped).sum(1)


def smc_log_likelihood(
    model: Any,
    guide: IterativeGuide,
    xs: Tensor,
    mask: Optional[Tensor] = None,
    *,
    num_particles: int = 100,
    ess_threshold: float = 0.5,
    seed: Optional[int] = None,
) -> SMCEstimate:
    r"""The particle estimate :math:`\log \hat p(x_{1:T_b})` of each sequence of a padded batch, with the trained
    guide as proposal (:class:`ParticleFilter`); its expectation is a lower bound on :math:`\log p(x_{1:T_b})`
    that tightens as N grows (see the module docstring).

    :param model: a step model or a stream (``init(state, batch_size)``, ``step(state, x_t, mask_t)``).
    :param guide: the proposal, an :class:`~pyro_avf.IterativeGuide` (``num_iterations=0``: bootstrap filter).
    :param xs: (B, T, ...) sequences; ``mask``: (B, T) bool, False on padding, or None.
    :param num_particles: N, particles per sequence.
    :param ess_threshold: see :class:`ParticleFilter`.
    :param seed: when given, the random state is seeded with it for the pass and restored afterwards.
    :returns: an :class:`SMCEstimate`: ``log_marginal`` (B,), ``ess`` (B, T), ``resampled`` (B, T).

    Example::

        >>> import pyro_avf, torch
        >>> from pyro_avf.models.lgssm import LinearGaussianSSM
        >>> ssm = LinearGaussianSSM.random(latent_dim=2, obs_dim=3)
        >>> xs, _ = ssm.sample(3, 8)
        >>> mask = torch.ones(3, 8, dtype=torch.bool)
        >>> mask[0, 5:] = False                      # the first sequence has 5 steps
        >>> est = smc_log_likelihood(ssm, pyro_avf.IterativeGuide(ssm.model, 0), xs, mask, num_particles=32, seed=1)
        >>> est.ess.shape, bool((est.ess <= 32).all())
        (torch.Size([3, 8]), True)
    """
    if not isinstance(xs, Tensor) or xs.dim() < 2:
        raise ValueError(f"xs must be a tensor of shape (batch, time, ...), got {getattr(xs, 'shape', xs)!r}")
    batch, steps = xs.shape[:2]
    if mask is not None and (not isinstance(mask, Tensor) or mask.dtype != torch.bool
                             or tuple(mask.shape) != (batch, steps)):  # fmt: skip
        raise ValueError(f"mask must be None or a bool tensor of shape ({batch}, {steps}), got {mask!r:.80}")
    _check_finite(xs, "smc_log_likelihood")
    pf = ParticleFilter(model, guide, num_particles, ess_threshold=ess_threshold)
    ess = xs.new_zeros(batch, steps, dtype=torch.float64)
    resampled = torch.zeros(batch, steps, dtype=torch.bool, device=xs.device)
    devices = [xs.device.index or 0] if xs.is_cuda else []
    with torch.random.fork_rng(devices=devices, enabled=seed is not None):
        if seed is not None:
            torch.manual_seed(seed)
        pf.init(batch_size=batch)
        for t in range(steps):
            out = pf.step(xs[:, t]) if mask is None else pf.step(xs[:, t], mask[:, t])
            ess[:, t], resampled[:, t] = out.ess, out.resampled
    return SMCEstimate(pf.log_marginal, ess, resampled)
