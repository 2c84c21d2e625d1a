"""The step free energy of AVF Eq. 9, site by site.

.. math::

    \\mathcal{F}_t = \\underbrace{-\\mathbb{E}_{q(z_t)}\\left[\\log p_\\theta(x_t \\mid x_{<t}, z_{\\le t})\\right]}
        _{\\text{reconstruction}}
        + \\beta\\, \\underbrace{D_{KL}\\left(q(z_t) \\,\\|\\, p_\\theta(z_t \\mid x_{<t}, z_{<t})\\right)}_{\\text{KL}}

Every term is kept per element of the step's *outer* plates (the plates the step is called in, e.g. the
batch of sequences): dimensions of plates opened inside the step are summed. Masked elements contribute 0.
The loss multiplies each term by the site's scale (subsampling, ``poutine.scale``); diagnostics do not.
"""

from __future__ import annotations

from typing import List, NamedTuple, Optional, Sequence, Tuple

import torch

from pyro_avf.posterior import batch_mask, kl_or_log_ratio


class StepContext(NamedTuple):
    """What the handlers outside a step contribute to each of its sites."""

    frames: tuple  # CondIndepStackFrames of the plates around the step
    scale: object  # float or tensor
    mask: Optional[torch.Tensor]
    whole_model: bool = False  # a static model run as one step: its own plates give the batch
    conditions: tuple = ()  # poutine.condition handlers between the guide and the step, innermost last

    @property
    def batch_shape(self) -> Optional[torch.Size]:
        """Shape of the outer plates, with size 1 at dims that no outer plate occupies (None for a whole
        model without outer plates: the batch shape of its first site is used)."""
        if self.whole_model and not self.frames:
            return None
        dims = [f.dim for f in self.frames if f.dim is not None]
        shape = [1] * (max(-d for d in dims) if dims else 0)
        for f in self.frames:
            if f.dim is not None:
                shape[f.dim] = f.size
        return torch.Size(shape)


def reduce_to(x: torch.Tensor, batch_shape: torch.Size) -> torch.Tensor:
    """Sum ``x`` over every dim that is not an outer plate, giving a tensor of ``batch_shape``."""
    n = len(batch_shape)
    while x.dim() > n:
        x = x.sum(0)
    for d in range(-x.dim(), 0):
        if batch_shape[d] == 1 and x.size(d) > 1:
            x = x.sum(d, keepdim=True)
    return x.expand(batch_shape) if x.shape != batch_shape else x


def apply_mask(x: torch.Tensor, mask) -> torch.Tensor:
    """Zero the masked-out elements (``mask`` False)."""
    if mask is None or mask is True:
        return x
    if mask is False:
        return torch.zeros_like(x)
    return torch.where(mask, x, 0.0 if x.is_floating_point() else x.new_zeros(()))


def _accumulate(total: Optional[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    return x if total is None else total + x


class Terms:
    """Accumulates reconstruction and KL terms of one step (per outer element and scaled for the loss).

    The accumulators start empty (no tensor is made for a term that no site adds to) and the ``observed``
    flag is only computed when read: the guide scores every inference re-run, so these terms sit on the
    hot path of training.
    """

    def __init__(self, batch_shape: Optional[torch.Size], kl_weight: float = 1.0):
        self.kl_weight = kl_weight
        self.batch_shape = batch_shape  # None: taken from the first site
        self.scaled = False  # whether any site carries a scale other than 1 (subsampling, poutine.scale)
        self._loss: Optional[torch.Tensor] = None
        self._reconstruction: Optional[torch.Tensor] = None
        self._kl: Optional[torch.Tensor] = None
        self._seen: List[Tuple[torch.Size, object]] = []  # (shape, mask) of each observation
        self._like: Optional[torch.Tensor] = None  # dtype and device of the terms (those of the first site)

    def _first_site(self, batch_shape: torch.Size, like: torch.Tensor) -> None:
        if self.batch_shape is None:
            self.batch_shape = batch_shape
        if self._like is None:
            self._like = like

    def _add_loss(self, x: torch.Tensor, scale, weight: float = 1.0) -> None:
        if not _is_one(scale):
            x = scale * x
            self.scaled = True
        total = x.sum()
        self._loss = _accumulate(self._loss, total if weight == 1.0 else weight * total)

    def add_observation(self, fn, value: torch.Tensor, mask, scale, name: str = "?") -> None:
        """:math:`-\\log p(x)` of an observed site (its distribution's own masks included)."""
        check_observation_shape(name, fn, value)
        nll = apply_mask(-fn.log_prob(value), mask)
        self._first_site(fn.batch_shape, nll)
        self._reconstruction = _accumulate(self._reconstruction, reduce_to(nll, self.batch_shape))
        self._add_loss(nll, scale)
        self._seen.append((nll.shape, combine_masks(mask, batch_mask(fn))))

    def add_latent(self, q, prior, value: torch.Tensor, mask, scale, q_params=None) -> None:
        """:math:`D_{KL}(q \\| p)` (analytic when both are Normal) or :math:`\\log q(z) - \\log p(z)`."""
        kl = apply_mask(kl_or_log_ratio(q, prior, value, q_params), mask)
        self._first_site(prior.batch_shape, kl)
        self._kl = _accumulate(self._kl, reduce_to(kl, self.batch_shape))
        self._add_loss(kl, scale, self.kl_weight)

    def _zeros(self, dtype=None) -> torch.Tensor:
        shape = self.batch_shape or torch.Size()
        if self._like is None:
            return torch.zeros(shape, dtype=dtype)
        return self._like.new_zeros(shape, dtype=dtype)

    @property
    def loss(self) -> torch.Tensor:
        """The scaled, β-weighted sum over sites and elements (what the ELBO differentiates)."""
        return self._zeros().sum() if self._loss is None else self._loss

    @property
    def reconstruction(self) -> torch.Tensor:
        """Per-element :math:`-\\log p(x_t \\mid \\cdot)` (unscaled, masked)."""
        return self._zeros() if self._reconstruction is None else self._reconstruction

    @property
    def kl(self) -> torch.Tensor:
        """Per-element KL (or its single-sample estimate), unweighted."""
        return self._zeros() if self._kl is None else self._kl

    @property
    def observed(self) -> torch.Tensor:
        """Per element: whether any observation of the step was unmasked."""
        observed = self._zeros(torch.bool)
        for shape, mask in self._seen:
            seen = apply_mask(observed.new_ones(shape), mask)
            observed = observed | reduce_to(seen.to(torch.int64), self.batch_shape).bool()
        return observed

    @property
    def free_energy(self) -> torch.Tensor:
        """Per-element :math:`\\mathcal{F}_t` (unscaled, masked)."""
        if self._kl is None:
            return self.reconstruction
        kl = self._kl if self.kl_weight == 1.0 else self.kl_weight * self._kl
        return kl if self._reconstruction is None else self._reconstruction + kl


class SequenceScores(NamedTuple):
    r"""Per-sequence sums of a filtering pass over a batch, each (B,): ``total``
    :math:`\sum_t m_{n,t}\mathcal{F}_{n,t}` (float64), ``steps`` :math:`T_n = \sum_t m_{n,t}` (long) and
    ``first`` :math:`\mathcal{F}_{n,t_0}` at the first real step :math:`t_0` of sequence n (0 when it has none),
    with :math:`m_{n,t}` true on the real (unpadded, observed) steps. Both normalisations of
    :class:`~pyro_avf.evaluation.FreeEnergy` follow from them."""

    total: torch.Tensor
    steps: torch.Tensor
    first: torch.Tensor

    @classmethod
    def from_steps(cls, free_energy: torch.Tensor, real: torch.Tensor) -> "SequenceScores":
        """From (B, T) step free energies and the (B, T) bool of real steps."""
        f = torch.where(real, free_energy.double(), 0.0)
        first_real = real & (real.long().cumsum(1) == 1)
        return cls(f.sum(1), real.long().sum(1), torch.where(first_real, f, 0.0).sum(1))

    def paper_sum(self) -> float:
        r""":math:`\sum_n \sum_{t > t_0} m_{n,t}\mathcal{F}_{n,t} / T_n` over the sequences with a real step."""
        has = self.steps > 0
        return ((self.total - self.first) / self.steps.clamp_min(1))[has].sum().item()


def _is_one(scale) -> bool:
    return not isinstance(scale, torch.Tensor) and scale == 1.0


def stack_terms(per_step: Sequence[torch.Tensor]) -> torch.Tensor:
    """Stack per-step tensors of equal batch shape into ``(batch, time)`` (batch flattened)."""
    return torch.stack([t.reshape(-1) for t in per_step], 1)


def combine_masks(outer, inner):
    """Logical and of two optional masks."""
    if outer is None:
        return inner
    if inner is None:
        return outer
    return outer & inner


def check_observation_shape(name: str, fn, value) -> None:
    """Refuse observed data whose shape does not fit its distribution, naming the site and both shapes
    (Pyro's own check is off during inference re-runs, and the bare broadcasting error names neither)."""
    if not isinstance(value, torch.Tensor):
        return
    expected = fn.batch_shape + fn.event_shape
    if value.shape == expected:  # the common case, on the hot path
        return
    try:
        torch.broadcast_shapes(value.shape, expected)
        fits = not fn.event_shape or value.shape[value.dim() - len(fn.event_shape) :] == fn.event_shape
    except RuntimeError:
        fits = False
    if not fits:
        raise ValueError(
            f"pyro_avf: observed site '{name}' has data of shape {tuple(value.shape)}, but its distribution "
            f"{type(fn).__name__} has shape {tuple(expected)} (batch {tuple(fn.batch_shape)}, event "
            f"{tuple(fn.event_shape)}); the data must broadcast to it and end with the event shape."
        )


def check_plate_shape(site: dict) -> None:
    r"""Refuse a site (a processed Pyro message or trace node) whose log-probability would have a batch dim
    that no plate declares, left of every plate, or a plate's dim of another size than the plate's: the step
    free energy sums each site over the dims that are not outer plates, so such a dim would be summed silently
    (Pyro's ``Trace_ELBO`` reports it as "invalid log_prob shape"). The shape checked is the broadcast of the
    distribution's batch shape, the observed value's batch part and the site's mask. A site in no plate at
    all is not checked: a static model without plates takes its batch from its first site.

    Example::

        >>> import pyro, pyro.distributions as dist, torch
        >>> def model():
        ...     with pyro.plate("seq", 6, dim=-1):
        ...         pyro.sample("z", dist.Normal(torch.zeros(4, 6), 1.0))  # an unplated batch dim
        >>> site = pyro.poutine.trace(model).get_trace().nodes["z"]
        >>> check_plate_shape(site)
        Traceback (most recent call last):
        ...
        ValueError: pyro_avf: site 'z' has batch shape (4, 6), but its plates are seq (dim -1, size 6): dim -2 ...
    """
    plates = {f.dim: f for f in site["cond_indep_stack"] if f.dim is not None and f.vectorized}
    if not plates:
        return
    fn, value, mask = site["fn"], site["value"], site["mask"]
    shape = fn.batch_shape
    try:
        if site["is_observed"] and isinstance(value, torch.Tensor):
            shape = torch.broadcast_shapes(shape, value.shape[: max(value.dim() - len(fn.event_shape), 0)])
        if isinstance(mask, torch.Tensor):
            shape = torch.broadcast_shapes(shape, mask.shape)
    except RuntimeError:
        return  # check_observation_shape names a value that does not fit its distribution
    leftmost = max(-d for d in plates)
    for d in range(-len(shape), 0):
        plate = plates.get(d)
        if (shape[d] in (1, plate.size)) if plate is not None else (-d <= leftmost or shape[d] == 1):
            continue
        names = ", ".join(f"{f.name} (dim {f.dim}, size {f.size})" for _, f in sorted(plates.items()))
        where = f"plate {plate.name!r} has size {plate.size}" if plate is not None else "it is in no plate"
        raise ValueError(
            f"pyro_avf: site '{site['name']}' has batch shape {tuple(shape)}, but its plates are {names}: dim "
            f"{d} has size {shape[d]} and {where}, so its free energy would be summed over that dim silently. "
            "Enclose the site in a pyro.plate for it, .to_event(...) the distribution, or check the shapes of "
            "its parameters, its observed value and its mask."
        )


def score_site(terms: Terms, site: dict, prior=None, q=None, q_params=None) -> None:
    r"""Add one sample site (a Pyro message or trace node) to the step free energy ``terms``.

    Observed: :math:`-\log p(x)`. Latent, given its ``prior`` and the guide's ``q``: the analytic
    :math:`D_{KL}(q \| p)` where both are Normal in the same unconstrained space (``q_params`` is its
    ``(loc, log_scale)``), else :math:`\log q(z) - \log p(z)` at the site's value. Every mask form counts:
    the site's ``mask`` (``poutine.mask``) and masks inside its distributions (``.mask``,
    ``MaskedDistribution``); masked elements add exactly 0. The site's ``scale`` multiplies the loss.
    """
    if site["is_observed"]:
        terms.add_observation(site["fn"], site["value"], site["mask"], site["scale"], site["name"])
    else:
        terms.add_latent(q, prior, site["value"], site["mask"], site["scale"], q_params)
